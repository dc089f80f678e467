#!/usr/bin/env bash
# Chart tests for chart/kata-deploy (job mode): helm lint, helm template of the example values files
# and a matrix of values, with assertions on the rendered objects, and the schema's rejections.
#
#   hack/test-chart.sh            # helm from $HELM, else .cache/testenv/bin/helm
#
# Needs python3 with PyYAML. Prints one line per check; the last line is "N passed, M failed" and
# the exit status is non-zero when anything failed (a missing tool is a failure, never a skip).
set -uo pipefail
cd "$(dirname "$0")/.."
HELM="${HELM:-$PWD/.cache/testenv/bin/helm}"
CHART="${CHART:-$PWD/chart/kata-deploy}"
export HELM CHART REPO="$PWD"
if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "FAIL python3 with PyYAML is required (pip install pyyaml)"
  echo "0 passed, 1 failed"
  exit 1
fi
exec python3 - "$@" <<'PY'
import atexit, json, os, re, shutil, subprocess, sys, tempfile
import yaml

HELM = os.environ["HELM"]
CHART = os.environ["CHART"]
KUBE = "1.34.0"
VAP = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"
passed = failed = 0
TMP = tempfile.mkdtemp(prefix="kata-chart-test.")
atexit.register(shutil.rmtree, TMP, ignore_errors=True)


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"PASS {name}")
    else:
        failed += 1
        print(f"FAIL {name}" + (f": {detail}" if detail else ""))
    return cond


def helm(*args):
    p = subprocess.run([HELM, *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def values_file(values):
    fd, path = tempfile.mkstemp(suffix=".yaml", dir=TMP)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(values, f)
    return path


def render(values=None, files=(), extra=(), release="kata-deploy", ns="kata-system", api_vap=False):
    args = ["template", release, CHART, "-n", ns, "--kube-version", KUBE]
    for f in files:
        args += ["-f", f]
    if values is not None:
        args += ["-f", values_file(values)]
    if api_vap:
        args += ["--api-versions", VAP]
    args += list(extra)
    rc, out, err = helm(*args)
    if rc != 0:
        raise RuntimeError(err.strip() or out)
    return [d for d in yaml.safe_load_all(out) if d]


def render_err(values=None, extra=()):
    """Render expected to fail; returns the error text ('' if it unexpectedly rendered)."""
    args = ["template", "x", CHART, "--kube-version", KUBE]
    if values is not None:
        args += ["-f", values_file(values)]
    args += list(extra)
    rc, out, err = helm(*args)
    return "" if rc == 0 else err


def find(objs, kind, name=None):
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs, kind, name=None):
    found = find(objs, kind, name)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def dispatcher(objs, role):
    jobs = [o for o in find(objs, "Job") if o["metadata"]["labels"].get("katacontainers.io/dispatcher-role") == role]
    if len(jobs) != 1:
        raise AssertionError(f"expected one {role} dispatcher Job, found {len(jobs)}")
    return jobs[0]


def args_of(job):
    return job["spec"]["template"]["spec"]["containers"][0]["args"]


def flag_values(args, flag):
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def templates(objs):
    cm = [o for o in find(objs, "ConfigMap") if "install-job.yaml" in o.get("data", {})]
    assert len(cm) == 1, f"expected one job-templates ConfigMap, found {len(cm)}"
    return yaml.safe_load(cm[0]["data"]["install-job.yaml"]), yaml.safe_load(cm[0]["data"]["cleanup-job.yaml"]), cm[0]


def stage_config(objs):
    cm = [o for o in find(objs, "ConfigMap") if "config.yaml" in o.get("data", {})]
    assert len(cm) == 1, f"expected one stage-config ConfigMap, found {len(cm)}"
    return yaml.safe_load(cm[0]["data"]["config.yaml"]), cm[0]


def rcs(objs):
    return {o["metadata"]["name"]: o for o in find(objs, "RuntimeClass")}


def guarded(name, fn):
    """Runs a group of checks; an exception (render error, missing object) is one failure."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report and continue with the next group
        check(name, False, f"{type(e).__name__}: {e}")


# Upstream kata-deploy's current (4.x) shim list, with upstream's names.
ALL_SHIMS = ["clh", "clh-azure", "clh-runtime-rs", "clh-azure-runtime-rs", "dragonball", "fc", "qemu", "qemu-runtime-rs",
             "qemu-nvidia-cpu", "qemu-nvidia-cpu-runtime-rs", "qemu-nvidia-gpu", "qemu-nvidia-gpu-runtime-rs",
             "qemu-nvidia-gpu-snp", "qemu-nvidia-gpu-snp-runtime-rs", "qemu-nvidia-gpu-tdx", "qemu-nvidia-gpu-tdx-runtime-rs",
             "qemu-snp", "qemu-snp-runtime-rs", "qemu-tdx", "qemu-tdx-runtime-rs", "qemu-se", "qemu-se-runtime-rs",
             "qemu-coco-dev", "qemu-coco-dev-runtime-rs", "remote", "openvmm-azure-runtime-rs"]
DEFAULT_ON = [s for s in ALL_SHIMS if s not in ("remote", "fc")]  # upstream: remote is off unless enabled; fc: off here (values.yaml says why)
# Guest pull by default (nydus on containerd, guest pull on CRI-O): TEE and confidential-GPU shims.
GUEST_PULL = ["qemu-snp", "qemu-snp-runtime-rs", "qemu-tdx", "qemu-tdx-runtime-rs", "qemu-se", "qemu-se-runtime-rs",
              "qemu-coco-dev", "qemu-coco-dev-runtime-rs", "remote", "qemu-nvidia-gpu-snp", "qemu-nvidia-gpu-snp-runtime-rs",
              "qemu-nvidia-gpu-tdx", "qemu-nvidia-gpu-tdx-runtime-rs"]
GATE = {"katacontainers.io/kata-runtime": "true", "katacontainers.io/kata-deploy-installed": "true"}
# What the DaemonSet controller gives every daemon pod (the dispatcher's admission assumes them).
DS_TOLERATIONS = [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
                  {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
                  {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
                  {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
                  {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
                  {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}]
FIXTURES = os.path.join(os.environ["REPO"], "chart", "fixtures")
STAGE_KEYS = {"multiInstallSuffix", "debug", "installPrefix", "imagePullTimeoutSeconds", "cri", "restart",
              "runtimeReadyTimeoutSeconds", "labelReadyTimeoutSeconds", "runningPodsWaitSeconds", "forceHandlerRemoval", "shims"}
SHIM_KEYS = {"name", "baseConfig", "supportedArches", "dropIn", "allowedHypervisorAnnotations",
             "containerdSnapshotter", "crioPullType"}

# ---------------------------------------------------------------------------------------- lint
def t_lint():
    rc, out, err = helm("lint", CHART, "--kube-version", KUBE)
    check("helm lint (default values)", rc == 0, err or out)
    for f in ["try-kata-nvidia-gpu.values.yaml", "try-kata-tee.values.yaml"]:
        rc, out, err = helm("lint", CHART, "--kube-version", KUBE, "-f", os.path.join(CHART, f))
        check(f"helm lint -f {f}", rc == 0, err or out)
guarded("lint", t_lint)

# ------------------------------------------------------------------------------ default render
def t_default():
    objs = render()
    kinds = sorted(o["kind"] for o in objs)
    check("default: no DaemonSet/Deployment (job mode only)", not any(k in ("DaemonSet", "Deployment") for k in kinds), kinds)
    check("default: one RuntimeClass per enabled built-in shim (upstream's list; remote and fc off)",
          sorted(rcs(objs)) == sorted(f"kata-{s}" for s in DEFAULT_ON), sorted(rcs(objs)))
    check("default: both ValidatingAdmissionPolicies (per-node token, dispatcher record) rendered on Kubernetes >= 1.30", len(find(objs, "ValidatingAdmissionPolicy")) == 2)

    # Hooks: exactly the three dispatcher Jobs; everything the cleanup needs is a regular resource.
    hooks = [o for o in objs if "helm.sh/hook" in o["metadata"].get("annotations", {})]
    check("default: only the three dispatcher Jobs (install, retire, cleanup) are hooks", sorted((o["kind"], o["metadata"]["name"]) for o in hooks)
          == [("Job", "kata-deploy-dispatch-cleanup"), ("Job", "kata-deploy-dispatch-install"), ("Job", "kata-deploy-dispatch-retire")], hooks)
    for kind in ["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ConfigMap"]:
        check(f"default: {kind}s exist and are regular resources (alive during pre-delete)",
              find(objs, kind) and all("helm.sh/hook" not in o["metadata"].get("annotations", {}) for o in find(objs, kind)))
    inst, clean = dispatcher(objs, "install"), dispatcher(objs, "cleanup")
    a = inst["metadata"]["annotations"]
    check("install dispatcher: post-install,post-upgrade,post-rollback hook (helm rollback re-installs the revision rolled back to)",
          a.get("helm.sh/hook") == "post-install,post-upgrade,post-rollback", a)
    check("install dispatcher: before-hook-creation only (kept for logs, replaced by the next upgrade)",
          a.get("helm.sh/hook-delete-policy") == "before-hook-creation", a)
    a = clean["metadata"]["annotations"]
    check("cleanup dispatcher: pre-delete hook", a.get("helm.sh/hook") == "pre-delete", a)
    check("cleanup dispatcher: before-hook-creation,hook-succeeded",
          a.get("helm.sh/hook-delete-policy") == "before-hook-creation,hook-succeeded", a)
    for role, job in [("install", inst), ("cleanup", clean)]:
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        c = pod["containers"][0]
        check(f"{role} dispatcher: backoffLimit 0, restartPolicy Never", spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never")
        check(f"{role} dispatcher: bounded (activeDeadlineSeconds > --deadline, ttlSecondsAfterFinished)",
              spec["activeDeadlineSeconds"] > 1800 and spec["ttlSecondsAfterFinished"] > 0, spec)
        psc, sc = pod["securityContext"], c["securityContext"]
        check(f"{role} dispatcher: pod runAsNonRoot/65532/RuntimeDefault",
              psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532 and psc["seccompProfile"]["type"] == "RuntimeDefault", psc)
        check(f"{role} dispatcher: container locked down",
              sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 65532 and sc.get("allowPrivilegeEscalation") is False
              and sc.get("readOnlyRootFilesystem") is True and sc["capabilities"]["drop"] == ["ALL"]
              and sc.get("privileged") is False and "add" not in sc["capabilities"]
              and sc["seccompProfile"]["type"] == "RuntimeDefault", sc)
        r = c.get("resources", {})
        check(f"{role} dispatcher: resource requests and limits", {"cpu", "memory"} <= set(r.get("requests", {})) and {"cpu", "memory"} <= set(r.get("limits", {})), r)
        check(f"{role} dispatcher: no host access, no tolerations",
              not pod.get("hostPID") and not pod.get("hostNetwork") and not pod.get("tolerations")
              and all("hostPath" not in v for v in pod.get("volumes", [])), pod)
        check(f"{role} dispatcher: uses the dispatcher ServiceAccount", pod["serviceAccountName"] == "kata-deploy-dispatcher")
        env = {e["name"]: e for e in c["env"]}
        check(f"{role} dispatcher: POD_NAMESPACE from the downward API",
              env.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace", env)
        check(f"{role} dispatcher: image is the dispatcher image",
              c["image"] == "quay.io/kata-containers/kata-deploy-job-dispatcher:0.1.0", c["image"])
        args = args_of(job)
        check(f"{role} dispatcher: --owner-job is its own name", flag_values(args, "--owner-job") == [job["metadata"]["name"]], args)
        check(f"{role} dispatcher: --template under the mounted ConfigMap",
              flag_values(args, "--template") == [f"/etc/kata-deploy-dispatcher/{role if role == 'cleanup' else 'install'}-job.yaml"]
              and c["volumeMounts"][0]["mountPath"] == "/etc/kata-deploy-dispatcher", args)
        check(f"{role} dispatcher: --parallelism/--deadline/--max-failures",
              flag_values(args, "--parallelism") == ["10"] and flag_values(args, "--deadline") == ["1800s"]
              and flag_values(args, "--max-failures") == ["5"], args)
        prefix = flag_values(args, "--name-prefix")
        check(f"{role} dispatcher: --name-prefix valid for the dispatcher (<=30, starts with a letter)",
              len(prefix) == 1 and re.fullmatch(r"[a-z][-a-z0-9]{0,28}[a-z0-9]", prefix[0]) is not None, prefix)
    check("install dispatcher: default selector excludes control-plane nodes",
          flag_values(args_of(inst), "--selector") == ["!node-role.kubernetes.io/control-plane"] and "--nodes" not in args_of(inst), args_of(inst))
    check("cleanup dispatcher: default selector is kata-runtime OR claimed (two --selector = union)",
          flag_values(args_of(clean), "--selector") == ["katacontainers.io/kata-runtime", "katacontainers.io/kata-deploy-claimed", "katacontainers.io/kata-deploy-state"], args_of(clean))

    # RBAC: exact verbs.
    def rules_of(kind, name):
        return [(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"])), tuple(r.get("resourceNames", [])))
                for r in one(objs, kind, name)["rules"]]
    check("RBAC: dispatcher ClusterRole = nodes list/watch + patch (its install record annotation) only",
          rules_of("ClusterRole", "kata-system-kata-deploy-dispatcher") == [(("",), ("nodes",), ("list", "patch", "watch"), ())],
          rules_of("ClusterRole", "kata-system-kata-deploy-dispatcher"))
    check("RBAC: dispatcher Role = jobs create/get/list/watch/delete + pods list/watch (leftover pods, failure messages) + get and patch of the rollout summary ConfigMap only (the recorded selection), in the namespace only",
          rules_of("Role", "kata-deploy-dispatcher") == [(("batch",), ("jobs",), ("create", "delete", "get", "list", "watch"), ()),
                                                          (("",), ("pods",), ("list", "watch"), ()),
                                                          (("",), ("configmaps",), ("get", "patch"), ("kata-deploy-rollout",))]
          and one(objs, "Role", "kata-deploy-dispatcher")["metadata"]["namespace"] == "kata-system",
          rules_of("Role", "kata-deploy-dispatcher"))
    check("RBAC: node ClusterRole = nodes get/patch only",
          rules_of("ClusterRole", "kata-system-kata-deploy-node") == [(("",), ("nodes",), ("get", "patch"), ())],
          rules_of("ClusterRole", "kata-system-kata-deploy-node"))
    for kind, name, sa in [("ClusterRoleBinding", "kata-system-kata-deploy-dispatcher", "kata-deploy-dispatcher"),
                           ("RoleBinding", "kata-deploy-dispatcher", "kata-deploy-dispatcher"),
                           ("ClusterRoleBinding", "kata-system-kata-deploy-node", "kata-deploy-node")]:
        b = one(objs, kind, name)
        check(f"RBAC: {kind} {name} binds only {sa}",
              b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "kata-system"}] and b["roleRef"]["name"] == name, b)
    st = one(objs, "ConfigMap", "kata-deploy-kata-deploy-state")
    check("identity: state ConfigMap records the suffix and the mode (upstream 4.x name and keys)",
          st["data"] == {"multiInstallSuffix": "", "deploymentMode": "job"} and "helm.sh/hook" not in st["metadata"].get("annotations", {}), st)
    ev = [r for r in find(objs, "Role") if r["metadata"]["name"] != "kata-deploy-dispatcher"]
    check("RBAC: the dispatcher's node-Events Role = events create only, in namespace default",
          len(ev) == 1 and ev[0]["metadata"]["namespace"] == "default"
          and [(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in ev[0]["rules"]] == [(("",), ("events",), ("create",))], ev)
    check("RBAC: exactly 2 ClusterRoles, 2 Roles (namespace + default's Events), 2 ServiceAccounts",
          len(find(objs, "ClusterRole")) == 2 and len(find(objs, "Role")) == 2 and len(find(objs, "ServiceAccount")) == 2)

    # Per-node Job templates.
    ij, cj, cm = templates(objs)
    check("templates: one ConfigMap with install-job.yaml and cleanup-job.yaml", set(cm["data"]) == {"install-job.yaml", "cleanup-job.yaml"}, set(cm["data"]))
    vol = [v for v in inst["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    check("templates: the dispatcher mounts that ConfigMap", vol and vol[0]["configMap"]["name"] == cm["metadata"]["name"], vol)
    for role, job, inits, main in [("install", ij, ["copy-stage", "host-check", "claim", "artifacts", "cri", "prune-artifacts"], "label"),
                                   ("cleanup", cj, ["unlabel", "revert-cri", "remove-artifacts"], "unclaim")]:
        pod = job["spec"]["template"]["spec"]
        check(f"{role} template: batch/v1 Job", job["apiVersion"] == "batch/v1" and job["kind"] == "Job")
        check(f"{role} template: no nodeName (the dispatcher pins it)", "nodeName" not in pod and "nodeSelector" not in pod and "affinity" not in pod, pod.keys())
        check(f"{role} template: no name (the dispatcher names it)", "name" not in job.get("metadata", {}) and "generateName" not in job.get("metadata", {}))
        check(f"{role} template: stage order {inits} -> {main}",
              [c["name"] for c in pod["initContainers"]] == inits and [c["name"] for c in pod["containers"]] == [main],
              ([c["name"] for c in pod["initContainers"]], [c["name"] for c in pod["containers"]]))
        check(f"{role} template: restartPolicy Never, backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished",
              pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 3 and job["spec"]["activeDeadlineSeconds"] == 900
              and job["spec"]["ttlSecondsAfterFinished"] == 86400, job["spec"])
        check(f"{role} template: no parallelism/completions other than 1",
              job["spec"].get("parallelism", 1) == 1 and job["spec"].get("completions", 1) == 1)
        check(f"{role} template: node ServiceAccount", pod["serviceAccountName"] == "kata-deploy-node")
        if role == "install":
            check("install template: DaemonSet rules by default: exactly the daemon pods' implied tolerations, no blanket operator: Exists",
                  pod.get("tolerations") == DS_TOLERATIONS, pod.get("tolerations"))
        else:
            check(f"{role} template: tolerates every taint (a node tainted after install must still be cleaned)",
                  pod.get("tolerations") == [{"operator": "Exists"}], pod.get("tolerations"))
        check(f"{role} template: no automatic ServiceAccount token (pod automountServiceAccountToken: false)",
              pod.get("automountServiceAccountToken") is False, pod.get("automountServiceAccountToken"))
        vol = next((v for v in pod["volumes"] if v["name"] == "api-access"), {})
        srcs = vol.get("projected", {}).get("sources", [])
        check(f"{role} template: the token is a projected, pod-bound, expiring serviceAccountToken",
              any("serviceAccountToken" in x and x["serviceAccountToken"].get("expirationSeconds", 0) <= 3607 for x in srcs)
              and any(x.get("configMap", {}).get("name") == "kube-root-ca.crt" for x in srcs), vol)
        check(f"{role} template: no hostPID (systemd is reached over the D-Bus system bus)", not pod.get("hostPID"), pod.get("hostPID"))
        check(f"{role} template: stage-config ConfigMap volume + hostPath / volume",
              any(v.get("configMap", {}).get("name") == "kata-deploy-stage-config" for v in pod["volumes"])
              and any(v.get("hostPath", {}).get("path") == "/" for v in pod["volumes"]), pod["volumes"])
        # stage.hostMounts: precise (default): each host-writing stage writes only these host directories.
        # No /etc/systemd/system: the nydus unit file lives under the prefix and systemd links it.
        WRITES = {"artifacts": {"/host/opt/kata", "/host/var/lib/kata-deploy", "/host/run/lock"},
                  "cri": {"/host/etc", "/host/var/lib/kata-deploy", "/host/run/lock"}}
        WRITES["prune-artifacts"] = WRITES["remove-artifacts"] = WRITES["artifacts"]
        WRITES["revert-cri"] = WRITES["cri"]
        vols = {v["name"]: v.get("hostPath") for v in pod["volumes"] if v.get("hostPath")}
        check(f"{role} template: the writable host directories are created when missing only where that is harmless",
              vols["host-install"] == {"path": "/opt/kata", "type": "DirectoryOrCreate"} and vols["host-state"]["type"] == "DirectoryOrCreate"
              and vols["host-lock"] == {"path": "/run/lock", "type": "DirectoryOrCreate"}
              and vols["host-cri-config"] == {"path": "/etc", "type": "DirectoryOrCreate"}
              and "host-systemd-units" not in vols, vols)
        # stage.cri auto: the template names the CRI volume; the dispatcher points it (and its mount
        # under /host) at each node's own CRI directory, so no node gets the whole /etc writable.
        check(f"{role} template: stage.cri auto: the dispatcher chooses each node's CRI directory (pod annotation names the volume)",
              job["spec"]["template"]["metadata"]["annotations"].get("katacontainers.io/cri-config-volume") == "host-cri-config",
              job["spec"]["template"]["metadata"]["annotations"])
        for c in pod["initContainers"] + pod["containers"]:
            n = c["name"]
            if n == "copy-stage":  # the stage binary copies itself into the emptyDir; no host, no token, non-root
                sc = c["securityContext"]
                check("install/copy-stage: stage image copies itself into the kata-stage emptyDir, non-root, no host, no token",
                      c["image"] == "quay.io/kata-containers/kata-deploy-stage:0.1.0" and "command" not in c
                      and c["args"] == ["copy-self", "--copy-to", "/kata-stage/kata-deploy-stage"]
                      and c["volumeMounts"] == [{"name": "kata-stage", "mountPath": "/kata-stage"}]
                      and sc.get("runAsNonRoot") is True and sc.get("privileged") is False and sc.get("readOnlyRootFilesystem") is True
                      and sc["capabilities"]["drop"] == ["ALL"], c)
                check("install: the kata-stage emptyDir exists in the install pod only",
                      {"name": "kata-stage", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
                      and not any(v["name"] == "kata-stage" for v in cj["spec"]["template"]["spec"]["volumes"]), pod["volumes"])
                continue
            if n in ("host-check", "artifacts", "prune-artifacts"):  # the payload: the official release image, unchanged
                check(f"{role}/{n}: runs the copied stage binary in the Kata release image quay.io/kata-containers/kata-deploy:4.1.0",
                      c["image"] == "quay.io/kata-containers/kata-deploy:4.1.0" and c.get("command") == ["/kata-stage/kata-deploy-stage"]
                      and c["args"] == ["--config", "/etc/kata-deploy/config.yaml", "--host-root", "/host", "--payload", "/opt/kata-artifacts", n]
                      and {"name": "kata-stage", "mountPath": "/kata-stage", "readOnly": True} in c["volumeMounts"],
                      (c["image"], c.get("command"), c["args"], c["volumeMounts"]))
            else:
                check(f"{role}/{n}: stage image and command line",
                      c["image"] == "quay.io/kata-containers/kata-deploy-stage:0.1.0"
                      and c["args"] == ["--config", "/etc/kata-deploy/config.yaml", "--host-root", "/host", n]
                      and "command" not in c and "/kata-stage" not in {m["mountPath"] for m in c["volumeMounts"]},
                      (c["image"], c.get("command"), c["args"]))
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            check(f"{role}/{n}: stage config at /etc/kata-deploy (read-only)", mounts.get("/etc/kata-deploy", {}).get("readOnly") is True, mounts)
            api = n in ("claim", "label", "unlabel", "unclaim")  # the stages that patch the Node (none sees the host)
            tok = mounts.get("/var/run/secrets/kubernetes.io/serviceaccount")
            check(f"{role}/{n}: token mounted {'(read-only) because it patches the Node' if api else 'NOT at all (no API use)'}",
                  (tok is not None and tok.get("readOnly") is True and tok["name"] == "api-access") if api else tok is None, mounts)
            sc = c["securityContext"]
            check(f"{role}/{n}: the host stages leave the claim to the claim / unclaim containers",
                  {"name": "KATA_STAGE_CLAIMS", "value": "external"} in c.get("env", []), c.get("env"))
            if n in ("label", "unlabel", "claim", "unclaim"):
                check(f"{role}/{n}: no host access, non-root, locked down",
                      "/host" not in mounts and sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 65532
                      and sc.get("privileged") is False and sc.get("allowPrivilegeEscalation") is False
                      and sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
                      and sc.get("readOnlyRootFilesystem") is True, (mounts, sc))
            elif n == "host-check":
                check(f"{role}/{n}: host root read-only, not privileged",
                      mounts.get("/host", {}).get("readOnly") is True and sc.get("privileged") is False
                      and sc.get("allowPrivilegeEscalation") is False, (mounts, sc))
            else:  # cri, revert-cri restart the CRI; the artifacts stages manage the nydus unit (systemd)
                check(f"{role}/{n}: root with the host root read-only plus writable mounts of what it writes, NOT privileged, no escalation, only file capabilities",
                      mounts.get("/host", {}).get("readOnly") is True and mounts["/host"].get("recursiveReadOnly") == "IfPossible"
                      and WRITES[n] == {p for p, m in mounts.items() if p.startswith("/host/") and not m.get("readOnly")}
                      and sc.get("privileged") is False
                      and sc.get("allowPrivilegeEscalation") is False and sc.get("runAsUser") == 0
                      and sc["capabilities"]["drop"] == ["ALL"]
                      and set(sc["capabilities"].get("add", [])) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID"}, (mounts, sc))
            check(f"{role}/{n}: resources set", "limits" in c.get("resources", {}) and "requests" in c.get("resources", {}))

    # Stage configuration.
    cfg, _ = stage_config(objs)
    check("stage config: exactly the documented keys", set(cfg) == STAGE_KEYS, set(cfg) ^ STAGE_KEYS)
    check("stage config: defaults", cfg["multiInstallSuffix"] == "" and cfg["debug"] is False and cfg["installPrefix"] == "/opt/kata"
          and cfg["imagePullTimeoutSeconds"] == 1200 and cfg["cri"] == "auto" and cfg["restart"] == "systemd"
          and cfg["runtimeReadyTimeoutSeconds"] == 0 and cfg["labelReadyTimeoutSeconds"] == 120
          and cfg["runningPodsWaitSeconds"] == 60 and cfg["forceHandlerRemoval"] is False, cfg)
    check("stage config: every shim but remote and fc enabled by default", sorted(s["name"] for s in cfg["shims"]) == sorted(DEFAULT_ON))
    gp = {s["name"]: (s["containerdSnapshotter"], s["crioPullType"]) for s in cfg["shims"]}
    check("stage config: TEE and confidential-GPU shims pull in the guest by default (nydus / guest-pull), others on the host",
          all(gp[n] == ("nydus", "guest-pull") for n in GUEST_PULL if n in gp)
          and all(v == ("", "") for n, v in gp.items() if n not in GUEST_PULL), gp)
    check("stage config: shim entries have exactly the documented keys", all(set(s) == SHIM_KEYS for s in cfg["shims"]),
          [set(s) ^ SHIM_KEYS for s in cfg["shims"]])
    q = next(s for s in cfg["shims"] if s["name"] == "qemu-nvidia-gpu")
    check("stage config: qemu-nvidia-gpu entry", q == {"name": "qemu-nvidia-gpu", "baseConfig": "qemu-nvidia-gpu", "supportedArches": ["amd64"],
          "dropIn": "", "allowedHypervisorAnnotations": [], "containerdSnapshotter": "", "crioPullType": ""}, q)
    ihash = ij["spec"]["template"]["metadata"]["annotations"]["katacontainers.io/config-hash"]
    other = templates(render({"imagePullTimeoutSeconds": 1800}))[0]["spec"]["template"]["metadata"]["annotations"]["katacontainers.io/config-hash"]
    check("templates: a stage-config change changes the template (so upgrades re-run nodes)", ihash != other)

    # RuntimeClasses.
    cc = {"snp": "amd.feature.node.kubernetes.io/snp", "tdx": "intel.feature.node.kubernetes.io/tdx"}
    for name, rc in rcs(objs).items():
        shim = name[len("kata-"):]
        want = dict(GATE)
        if shim.startswith("qemu-nvidia-gpu"):
            kind = next((k for k in cc if f"-{k}" in shim), None)
            want.update({"nvidia.com/cc.ready.state": "true", cc[kind]: "true"} if kind else {"nvidia.com/cc.ready.state": "false"})
        ok = (rc["handler"] == name and rc["scheduling"]["nodeSelector"] == want and set(rc["overhead"]["podFixed"]) == {"cpu", "memory"})
        if not check(f"RuntimeClass {name}: handler, overhead, kata-runtime + this install's marker (+ upstream's GPU selectors)", ok, rc):
            break
    check("RuntimeClasses: every one of them checked", len(rcs(objs)) == len(DEFAULT_ON))
    g = rcs(objs)["kata-qemu-nvidia-gpu"]["overhead"]["podFixed"]
    check("RuntimeClass kata-qemu-nvidia-gpu overhead 10240Mi/1", g == {"memory": "10240Mi", "cpu": "1"}, g)
guarded("default render", t_default)

# ------------------------------------------------------------------------ selector compilation
def t_selectors():
    cases = [
        ("In", {"nodeSelectorExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux", "plan9"]}]},
         ["kubernetes.io/os in (linux,plan9)"]),
        ("NotIn", {"nodeSelectorExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gpu"]}]}, ["tier notin (gpu)"]),
        ("Exists", {"nodeSelectorExpressions": [{"key": "kata", "operator": "Exists"}]}, ["kata"]),
        ("DoesNotExist", {"nodeSelectorExpressions": [{"key": "node-role.kubernetes.io/master", "operator": "DoesNotExist"}]},
         ["!node-role.kubernetes.io/master"]),
        ("nodeSelector AND expressions (one string)",
         {"nodeSelector": {"kata-containers": "enabled", "a.b/c": "d"},
          "nodeSelectorExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                                      {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"}]},
         ["a.b/c=d,kata-containers=enabled,kubernetes.io/os in (linux),!node-role.kubernetes.io/control-plane"]),
        ("nodeSelector only (expressions cleared)", {"nodeSelector": {"kata-containers": "enabled"}, "nodeSelectorExpressions": []},
         ["kata-containers=enabled"]),
        ("all empty = every node (no --selector)", {"nodeSelectorExpressions": []}, []),
    ]
    for name, job, want in cases:
        a = args_of(dispatcher(render({"job": job}), "install"))
        check(f"install selector: {name}", flag_values(a, "--selector") == want and "--nodes" not in a, a)
    a = args_of(dispatcher(render({"job": {"nodes": ["worker-1", "worker-2"], "nodeSelector": {"x": "y"}}}), "install"))
    check("install selector: job.nodes wins, passed verbatim", flag_values(a, "--nodes") == ["worker-1,worker-2"] and "--selector" not in a, a)
    # Cleanup.
    a = args_of(dispatcher(render({"job": {"cleanup": {"nodeSelectorExpressions": [
        {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"}]}}}), "cleanup"))
    check("cleanup selector: explicit expressions replace the default union",
          flag_values(a, "--selector") == ["!node-role.kubernetes.io/control-plane"], a)
    a = args_of(dispatcher(render({"job": {"cleanup": {"nodeSelector": {"pool": "kata"}}}}), "cleanup"))
    check("cleanup selector: nodeSelector", flag_values(a, "--selector") == ["pool=kata"], a)
    a = args_of(dispatcher(render({"job": {"cleanup": {"nodes": ["worker-1"]}}}), "cleanup"))
    check("cleanup selector: cleanup.nodes", flag_values(a, "--nodes") == ["worker-1"] and "--selector" not in a, a)
    a = args_of(dispatcher(render({"job": {"nodes": ["w1"], "nodeSelector": {"x": "y"}}}), "cleanup"))
    check("cleanup selector: independent of the install selection (still the union)",
          flag_values(a, "--selector") == ["katacontainers.io/kata-runtime", "katacontainers.io/kata-deploy-claimed", "katacontainers.io/kata-deploy-state"], a)
    objs = render({"job": {"settle": "30s", "parallelism": 3, "logFormat": "json"}})
    a = args_of(dispatcher(objs, "install"))
    check("install dispatcher: --settle/--parallelism/--log-format from values",
          flag_values(a, "--settle") == ["30s"] and flag_values(a, "--parallelism") == ["3"] and flag_values(a, "--log-format") == ["json"], a)
    check("settle: never for the uninstall selection", "--settle" not in args_of(dispatcher(objs, "cleanup")), args_of(dispatcher(objs, "cleanup")))
    a = args_of(dispatcher(render({"job": {"settle": "30s", "nodes": ["w1"]}}), "install"))
    check("settle: never for named nodes (job.nodes)", "--settle" not in a, a)
    a = args_of(dispatcher(render({"job": {"nodeSettleSeconds": 15}}), "install"))
    check("settle: upstream job.nodeSettleSeconds=15 -> --settle 15s", flag_values(a, "--settle") == ["15s"], a)
    check("requireNodes: on by default (an empty selection fails, naming the selector)", "--require-nodes" in args_of(dispatcher(render(), "install")))
    check("requireNodes: never for uninstall", "--require-nodes" not in args_of(dispatcher(render(), "cleanup")))
    check("requireNodes=false: explicit opt-out keeps an empty selection a no-op",
          "--require-nodes" not in args_of(dispatcher(render({"job": {"requireNodes": False}}), "install")))
    check("upstream job.waitForNodesSeconds=0: empty selection accepted; 120: required",
          "--require-nodes" not in args_of(dispatcher(render({"job": {"waitForNodesSeconds": 0}}), "install"))
          and "--require-nodes" in args_of(dispatcher(render({"job": {"waitForNodesSeconds": 120, "requireNodes": False}}), "install")))
    # Upstream 4.x selection: top-level nodeSelector and affinity.nodeAffinity (terms ORed, each ANDed with the rest).
    aff = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a", "b"]}]},
        {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}, "podAntiAffinity": {"x": 1}}
    a = args_of(dispatcher(render({"nodeSelector": {"kata": "yes"}, "affinity": aff}), "install"))
    check("upstream nodeSelector + affinity.nodeAffinity: one --selector per term (OR), each ANDed with the rest",
          flag_values(a, "--selector") == ["kata=yes,!node-role.kubernetes.io/control-plane,pool in (a,b)",
                                           "kata=yes,!node-role.kubernetes.io/control-plane,gpu"], a)
    for name, term, want in [("matchFields", {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]}, "matchFields: a node query cannot select by field"),
                             ("Gt", {"matchExpressions": [{"key": "cpu", "operator": "Gt", "values": ["3"]}]}, "operator Gt (key cpu) cannot be expressed"),
                             ("empty term", {}, "an empty term matches no node")]:
        err = render_err({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}})
        check(f"affinity.nodeAffinity {name}: refused with one message naming the field", want in err and "affinity.nodeAffinity" in err, err)
    a = args_of(dispatcher(render({"job": {"cleanup": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["kata"]}]}]}}}}}), "cleanup"))
    check("upstream job.cleanup.nodeAffinity compiled into the cleanup selector", flag_values(a, "--selector") == ["pool in (kata)"], a)
guarded("selectors", t_selectors)


# ------------------------------------------------------------------------------ retire on upgrade
def t_retire():
    objs = render()
    r = dispatcher(objs, "retire")
    a = args_of(r)
    inst = args_of(dispatcher(objs, "install"))
    ann = r["metadata"]["annotations"]
    check("retire: a post-upgrade,post-rollback hook after the install dispatcher (weight 1 > 0), removed when it succeeded",
          ann["helm.sh/hook"] == "post-upgrade,post-rollback" and ann["helm.sh/hook-weight"] == "1"
          and dispatcher(objs, "install")["metadata"]["annotations"]["helm.sh/hook-weight"] == "0"
          and ann["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded", ann)
    check("retire: the cleanup template on this install's claimed nodes, minus the install selection, tainted or not, forgetting the install record",
          flag_values(a, "--template") == ["/etc/kata-deploy-dispatcher/cleanup-job.yaml"]
          and flag_values(a, "--selector") == ["katacontainers.io/kata-deploy-claimed"]
          and flag_values(a, "--except-selector") == flag_values(inst, "--selector")
          and flag_values(a, "--forget-record") == flag_values(inst, "--name-prefix")
          and "--ignore-taints" in a and "--require-nodes" not in a and "--skip-installed" not in a, a)
    a = args_of(dispatcher(render({"env": {"multiInstallSuffix": "blue"}, "job": {"nodeSelector": {"pool": "kata"}}}), "retire"))
    check("retire: a suffixed install retires only its own claimed nodes",
          flag_values(a, "--selector") == ["katacontainers.io/kata-deploy-claimed-blue"]
          and flag_values(a, "--except-selector") == ["pool=kata,!node-role.kubernetes.io/control-plane"], a)
    a = args_of(dispatcher(render({"job": {"nodes": ["w1", "w2"]}}), "retire"))
    check("retire: named nodes are the exception", flag_values(a, "--except-nodes") == ["w1,w2"]
          and not flag_values(a, "--except-selector"), a)
    a = args_of(dispatcher(objs, "retire"))
    rec = json.loads(flag_values(a, "--record-selection")[0])
    check("retire: only nodes the recorded selection covered (a change of values dropped them), recording this selection",
          "--within-recorded" in a and rec == {"nodes": [], "selectors": flag_values(inst, "--selector")}, a)
    check("install: a first install records its selection, keeping a newer record (a rollback to it)",
          json.loads(flag_values(inst, "--record-selection")[0]) == rec and "--record-if-absent" in inst, inst)
    up = args_of(dispatcher(render(extra=["--is-upgrade"]), "install"))
    check("install: an upgrade records nothing (the retire run moves the record once the dropped nodes are clean)",
          "--record-selection" not in up and "--record-if-absent" not in up, up)
    a = args_of(dispatcher(render({"job": {"nodeSelectorExpressions": []}}), "retire"))
    check("retire: when the install selects every node, an empty run (claimed minus claimed) that records 'every node'",
          flag_values(a, "--selector") == ["katacontainers.io/kata-deploy-claimed"]
          and flag_values(a, "--except-selector") == ["katacontainers.io/kata-deploy-claimed"]
          and json.loads(flag_values(a, "--record-selection")[0]) == {"nodes": [], "selectors": []}, a)
    a = args_of(dispatcher(render(), "cleanup"))
    check("cleanup: removes the install and a failed retire dispatcher once every node is clean",
          flag_values(a, "--remove-on-success") == ["kata-deploy-dispatch-install,kata-deploy-dispatch-retire"], a)
guarded("retire", t_retire)


# ------------------------------------------------------------------------------ NotReady nodes
def t_not_ready():
    for role in ("install", "retire", "cleanup"):
        a = args_of(dispatcher(render(), role))
        check(f"job.notReadyNodes default skip: the {role} dispatcher skips a node that stays NotReady (no failed uninstall on a down node)",
              flag_values(a, "--unready") == ["skip"] and not flag_values(a, "--unready-grace"), a)
    a = args_of(dispatcher(render({"job": {"notReadyNodes": "fail"}}), "cleanup"))
    check("job.notReadyNodes=fail: the node is not-started, the hook fails", flag_values(a, "--unready") == ["fail"], a)
    a = args_of(dispatcher(render({"job": {"notReadyNodes": "wait", "deadlineSeconds": 900}}), "install"))
    check("job.notReadyNodes=wait: waits until the deadline, then fails",
          flag_values(a, "--unready") == ["fail"] and flag_values(a, "--unready-grace") == ["900s"], a)
    err = render_err({"job": {"notReadyNodes": "maybe"}})
    check("job.notReadyNodes: anything else refused naming the key", "notReadyNodes" in err, err)
guarded("notReadyNodes", t_not_ready)

# ------------------------------------------- what an upgrade re-runs (--skip-installed and its checks)
def t_skip_installed():
    objs = render()
    a = args_of(dispatcher(objs, "install"))
    check("install dispatcher: --skip-installed with the marker label the label stage sets (--installed-label <marker>=true)",
          "--skip-installed" in a and flag_values(a, "--installed-label") == ["katacontainers.io/kata-deploy-installed=true"], a)
    marker = flag_values(a, "--installed-label")[0].split("=")[0]
    check("install dispatcher: the checked marker is the one every RuntimeClass selects (this install's own label)",
          all(r["scheduling"]["nodeSelector"].get(marker) == "true" for r in rcs(objs).values()), marker)
    check("install dispatcher: default (any architecture): only the handlers of the enabled shims installed on every architecture",
          flag_values(a, "--expect-handler") == ["kata-qemu", "kata-qemu-runtime-rs"], flag_values(a, "--expect-handler"))
    check("install dispatcher: every expected handler is the handler of a rendered RuntimeClass",
          set(flag_values(a, "--expect-handler")) <= {r["handler"] for r in rcs(objs).values()}, a)
    check("install dispatcher: no --reinstall-all by default", "--reinstall-all" not in a, a)
    for role in ("cleanup", "retire"):
        ra = args_of(dispatcher(objs, role))
        check(f"{role} dispatcher: none of the install's skip flags, and --ignore-taints (tainted nodes are still cleaned)",
              not {"--skip-installed", "--installed-label", "--expect-handler", "--reinstall-all"} & set(ra) and "--ignore-taints" in ra, ra)
    check("install dispatcher: no --ignore-taints (DaemonSet rules)", "--ignore-taints" not in a, a)
    for v in (True, "true"):
        a = args_of(dispatcher(render({"job": {"reinstallAll": v}}), "install"))
        check(f"job.reinstallAll={v!r}: --reinstall-all (records still written: --skip-installed stays)",
              "--reinstall-all" in a and "--skip-installed" in a, a)
    a = args_of(dispatcher(render({"job": {"reinstallAll": "false"}}), "install"))
    check("job.reinstallAll='false' (string): no --reinstall-all", "--reinstall-all" not in a, a)
    err = render_err({"job": {"reinstallAll": "yes"}})
    check("schema rejects job.reinstallAll that is not a boolean", "/job/reinstallAll" in err, err)
    # The architecture of the selection decides which handlers every selected node must report.
    objs = render({"job": {"nodeSelector": {"kubernetes.io/arch": "amd64"}}})
    amd64 = sorted(f"kata-{x['name']}" for x in stage_config(objs)[0]["shims"] if "amd64" in x["supportedArches"])
    got = flag_values(args_of(dispatcher(objs, "install")), "--expect-handler")
    check("job.nodeSelector kubernetes.io/arch=amd64: every enabled amd64 shim's handler (not qemu-se, s390x only)",
          got == amd64 and "kata-qemu-se" not in got and "kata-clh" in got, got)
    got = flag_values(args_of(dispatcher(render({"nodeSelector": {"kubernetes.io/arch": "s390x"}}), "install")), "--expect-handler")
    check("nodeSelector (upstream) kubernetes.io/arch=s390x: the s390x shims' handlers",
          "kata-qemu-se" in got and "kata-clh" not in got and "kata-qemu" in got, got)
    got = flag_values(args_of(dispatcher(render({"job": {"nodeSelectorExpressions": [
        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}}), "install")), "--expect-handler")
    check("job.nodeSelectorExpressions arch In (amd64, arm64): handlers of shims installed on both",
          "kata-qemu-nvidia-gpu-runtime-rs" in got and "kata-qemu-nvidia-gpu" not in got and "kata-qemu-coco-dev-runtime-rs" in got, got)
    got = flag_values(args_of(dispatcher(render({"job": {"nodeSelectorExpressions": [
        {"key": "kubernetes.io/arch", "operator": "NotIn", "values": ["arm64", "ppc64le", "s390x"]}]}}), "install")), "--expect-handler")
    check("job.nodeSelectorExpressions arch NotIn (all but amd64): the amd64 handlers", got == amd64, got)
    aff = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]},
        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["s390x"]}]}]}}}
    got = flag_values(args_of(dispatcher(render({"affinity": aff}), "install")), "--expect-handler")
    check("affinity.nodeAffinity terms (ORed) amd64 | s390x: handlers of shims installed on both",
          "kata-qemu-coco-dev" in got and "kata-qemu-se" not in got and "kata-clh" not in got, got)
    got = flag_values(args_of(dispatcher(render({"job": {"nodes": ["w1"], "nodeSelector": {"kubernetes.io/arch": "amd64"}}}), "install")), "--expect-handler")
    check("job.nodes (any architecture): only the every-architecture handlers", got == ["kata-qemu", "kata-qemu-runtime-rs"], got)
    objs = render({"env": {"multiInstallSuffix": "cicd"}, "shims": {"disableAll": True, "qemu": {"enabled": True}, "clh": {"enabled": True}},
                   "job": {"nodeSelector": {"kubernetes.io/arch": "amd64"}},
                   "customRuntimes": {"enabled": True, "runtimes": {
                       "mine": {"baseConfig": "qemu", "runtimeClass": "kind: RuntimeClass\nmetadata: {name: team}\nhandler: team-sandbox\n"},
                       "small": {"baseConfig": "clh"}, "s390": {"baseConfig": "qemu-se"}}}})
    a = args_of(dispatcher(objs, "install"))
    check("suffix + custom runtimes: the suffixed marker; shims' suffixed handlers; a custom runtime's own handler; an s390x-only one left out on amd64",
          flag_values(a, "--installed-label") == ["katacontainers.io/kata-deploy-installed-cicd=true"]
          and flag_values(a, "--expect-handler") == ["kata-clh-cicd", "kata-qemu-cicd", "kata-small-cicd", "team-sandbox"], a)
    check("custom runtimes: every expected handler is one the stage config registers (own handler, or kata-<name>-<suffix>)",
          set(flag_values(a, "--expect-handler")) <= {x.get("handler") or f"kata-{x['name']}-cicd" for x in stage_config(objs)[0]["shims"]},
          stage_config(objs)[0]["shims"])
    n = notes_of()
    check("NOTES: what an upgrade re-runs (record, machine, marker label, handlers), how to force every node",
          "What an upgrade (or helm rollback) re-runs" in n and "katacontainers.io/kata-deploy-installed=true" in n
          and "(kata-qemu, kata-qemu-runtime-rs)" in n and "--set job.reinstallAll=true" in n and "EVERY selected node is re-run" not in n, n)
    check("NOTES: job.reinstallAll=true is called out (--reuse-values keeps it)",
          "EVERY selected node is re-run on each upgrade" in notes_of({"job": {"reinstallAll": True}}))

# --------------------------------------------------------------------- taints: DaemonSet rules
def t_taints():
    tol = [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]
    objs = render({"tolerations": tol, "job": {"nodeJobs": {"tolerations": [{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}]}}})
    ij, cj, _ = templates(objs)
    check("tolerations (upstream) + job.nodeJobs.tolerations reach the install Jobs after the daemon pods' implied ones",
          ij["spec"]["template"]["spec"]["tolerations"] == DS_TOLERATIONS + tol + [{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}],
          ij["spec"]["template"]["spec"]["tolerations"])
    check("tolerations: control-plane eligible (selector drops the exclusion) AND its taint tolerated by the install Jobs (single-node CI)",
          "--selector" not in args_of(dispatcher(objs, "install")), args_of(dispatcher(objs, "install")))
    check("tolerations: cleanup Jobs still tolerate every taint", cj["spec"]["template"]["spec"]["tolerations"] == [{"operator": "Exists"}])
    ij, _, _ = templates(render({"tolerations": tol, "job": {"nodeJobs": {"tolerations": tol}}}))
    check("the same toleration in both lists appears once", ij["spec"]["template"]["spec"]["tolerations"] == DS_TOLERATIONS + tol,
          ij["spec"]["template"]["spec"]["tolerations"])
    ij, _, _ = templates(render({"job": {"nodeJobs": {"tolerations": [{"operator": "Exists"}]}}}))
    check("job.nodeJobs.tolerations [{operator: Exists}] (the earlier default) still installs on every node whatever its taints",
          {"operator": "Exists"} in ij["spec"]["template"]["spec"]["tolerations"], ij["spec"]["template"]["spec"]["tolerations"])
    n = notes_of({"job": {"nodeJobs": {"tolerations": [{"operator": "Exists"}]}}})
    check("NOTES: an every-taint toleration in job.nodeJobs.tolerations is called out, with how to get DaemonSet rules",
          "job.nodeJobs.tolerations has {operator: Exists}" in n and "job.nodeJobs.tolerations=[]" in n, n[-1500:])
    n = notes_of()
    check("NOTES: DaemonSet taint rules explained; no every-taint warning by default",
          "Install Jobs follow DaemonSet taint rules" in n and "has {operator: Exists}" not in n, n[-1500:])
    d = dispatcher(render({"job": {"nodeJobs": {"tolerations": [{"key": "x", "operator": "Exists"}]}}}), "install")["spec"]["template"]["spec"]
    check("job.nodeJobs.tolerations do not reach the dispatcher pod", not d.get("tolerations"), d.get("tolerations"))
    ij1 = templates(render())[0]
    ij2 = templates(render({"job": {"nodeJobs": {"tolerations": [{"key": "x", "operator": "Exists"}]}}}))[0]
    check("a toleration change changes the install template (so its hash: the next upgrade re-runs the nodes)", ij1 != ij2)

# ------------------------------------------------------------------- suffix, shims, stage knobs
def t_values():
    objs = render({"env": {"multiInstallSuffix": "cicd", "debug": True}})
    names = sorted(rcs(objs))
    check("multiInstallSuffix: RuntimeClasses named kata-<shim>-<suffix>", names == sorted(f"kata-{s}-cicd" for s in DEFAULT_ON), names)
    check("multiInstallSuffix: handler equals the suffixed name", all(r["handler"] == n for n, r in rcs(objs).items()))
    cfg, _ = stage_config(objs)
    check("multiInstallSuffix/debug: in the stage config", cfg["multiInstallSuffix"] == "cicd" and cfg["debug"] is True, cfg)
    a = args_of(dispatcher(objs, "cleanup"))
    check("multiInstallSuffix: cleanup default = kata-runtime OR this install's claimed-<suffix> marker OR its state-<suffix> label",
          flag_values(a, "--selector") == ["katacontainers.io/kata-runtime", "katacontainers.io/kata-deploy-claimed-cicd", "katacontainers.io/kata-deploy-state-cicd"], a)

    check("multiInstallSuffix: RuntimeClasses select this install's own marker",
          all(r["scheduling"]["nodeSelector"].get("katacontainers.io/kata-deploy-installed-cicd") == "true"
              and "katacontainers.io/kata-deploy-installed" not in r["scheduling"]["nodeSelector"] for r in rcs(objs).values()))
    check("multiInstallSuffix: state ConfigMap records it", one(objs, "ConfigMap", "kata-deploy-kata-deploy-state")["data"]["multiInstallSuffix"] == "cicd")
    objs = render({"shims": {"qemu": {"runtimeClass": {"nodeSelector": {"katacontainers.io/kata-runtime": "false", "pool": "x",
                                                                        "katacontainers.io/kata-deploy-installed": "false"}}}}})
    check("a shim's nodeSelector cannot restate the ownership gate", rcs(objs)["kata-qemu"]["scheduling"]["nodeSelector"] == {**GATE, "pool": "x"},
          rcs(objs)["kata-qemu"]["scheduling"])

    objs = render({"shims": {"disableAll": True, "qemu": {"enabled": True}, "fc": {"enabled": False}}})
    check("shims.disableAll + one enabled: only that shim", sorted(rcs(objs)) == ["kata-qemu"]
          and [s["name"] for s in stage_config(objs)[0]["shims"]] == ["qemu"], sorted(rcs(objs)))
    objs = render({"shims": {"fc": {"enabled": False}}})
    check("shims.<s>.enabled: false removes the shim", "kata-fc" not in rcs(objs)
          and "fc" not in [s["name"] for s in stage_config(objs)[0]["shims"]])
    objs = render({"runtimeClasses": {"enabled": False}})
    check("runtimeClasses.enabled=false: no RuntimeClass, shims still installed",
          not rcs(objs) and len(stage_config(objs)[0]["shims"]) == len(DEFAULT_ON))

    objs = render({"imagePullTimeoutSeconds": 2400, "stage": {"cri": "k3s", "restart": "none", "installPrefix": "/opt/kata-test"},
                   "shims": {"qemu": {"dropIn": "[agent.kata]\ndial_timeout = 999\n", "allowedHypervisorAnnotations": ["kernel_params"],
                                      "containerd": {"snapshotter": "nydus"}, "crio": {"pullType": "guest-pull"}}}})
    cfg, _ = stage_config(objs)
    check("imagePullTimeoutSeconds wired to the stage config", cfg["imagePullTimeoutSeconds"] == 2400, cfg)
    check("stage.cri / stage.restart / stage.installPrefix wired", cfg["cri"] == "k3s" and cfg["restart"] == "none"
          and cfg["installPrefix"] == "/opt/kata-test", cfg)
    q = next(s for s in cfg["shims"] if s["name"] == "qemu")
    check("shim options wired (dropIn, annotations, snapshotter, pullType)",
          q["dropIn"] == "[agent.kata]\ndial_timeout = 999\n" and q["allowedHypervisorAnnotations"] == ["kernel_params"]
          and q["containerdSnapshotter"] == "nydus" and q["crioPullType"] == "guest-pull", q)
    ij, cj, _ = templates(objs)
    check("stage.restart=none: per-node pods get no hostPID", not ij["spec"]["template"]["spec"].get("hostPID")
          and not cj["spec"]["template"]["spec"].get("hostPID"))
    ctrs = {c["name"]: c for j in (ij, cj) for c in j["spec"]["template"]["spec"]["initContainers"] + j["spec"]["template"]["spec"]["containers"]}
    for n in ("artifacts", "prune-artifacts", "remove-artifacts"):
        sc = ctrs[n]["securityContext"]
        check(f"stage.restart=none: {n} is root with the host root read-only and its prefix writable, NOT privileged",
              sc.get("privileged") is False and sc.get("allowPrivilegeEscalation") is False and sc["capabilities"]["drop"] == ["ALL"]
              and any(m["mountPath"] == "/host" and m.get("readOnly") for m in ctrs[n]["volumeMounts"])
              and any(m["mountPath"] == "/host/opt/kata-test" and not m.get("readOnly") for m in ctrs[n]["volumeMounts"]), sc)
    check("stage.cri=k3s: the cri stages write k3s's containerd directory (must exist), nothing else of /etc or /var/lib/rancher",
          {m["mountPath"] for m in ctrs["cri"]["volumeMounts"] if not m.get("readOnly") and m["mountPath"].startswith("/host/")}
          == {"/host/var/lib/rancher/k3s/agent/etc/containerd", "/host/var/lib/kata-deploy", "/host/run/lock"}
          and {"path": "/var/lib/rancher/k3s/agent/etc/containerd", "type": "Directory"} in [v.get("hostPath") for v in ij["spec"]["template"]["spec"]["volumes"]],
          ctrs["cri"]["volumeMounts"])
    ij2, cj2, _ = templates(render({"stage": {"cri": "containerd"}, "env": {"multiInstallSuffix": "blue"}, "shims": {"disableAll": True, "qemu": {"enabled": True}}}))
    c2 = {c["name"]: c for j in (ij2, cj2) for c in j["spec"]["template"]["spec"]["initContainers"] + j["spec"]["template"]["spec"]["containers"]}
    w = lambda n: {m["mountPath"] for m in c2[n]["volumeMounts"] if not m.get("readOnly") and m["mountPath"].startswith("/host/")}
    check("stage.cri=containerd + suffix, no nydus shim: /etc/containerd, the suffixed prefix and state dir; no systemd unit directory",
          w("cri") == {"/host/etc/containerd", "/host/var/lib/kata-deploy-blue", "/host/run/lock"}
          and w("artifacts") == {"/host/opt/kata-blue", "/host/var/lib/kata-deploy-blue", "/host/run/lock"}, (w("cri"), w("artifacts")))
    check("stage.cri set: the dispatcher does not choose the CRI directory (no cri-config-volume annotation)",
          all("katacontainers.io/cri-config-volume" not in (j["spec"]["template"]["metadata"].get("annotations") or {}) for j in (ij, ij2, cj2)))
    ij3, cj3, _ = templates(render({"stage": {"hostMounts": "root"}}))
    c3 = {c["name"]: c for j in (ij3, cj3) for c in j["spec"]["template"]["spec"]["initContainers"] + j["spec"]["template"]["spec"]["containers"]}
    check("stage.hostMounts=root: the host root read-write, no other host mount (uninstall leaves no empty directory)",
          all(any(m["mountPath"] == "/host" and not m.get("readOnly") for m in c3[n]["volumeMounts"])
              and not any(m["mountPath"].startswith("/host/") for m in c3[n]["volumeMounts"])
              for n in ("artifacts", "cri", "revert-cri", "remove-artifacts")), c3["cri"]["volumeMounts"])
    check("stage.restart=none: cri/revert-cri are not privileged either", ctrs["cri"]["securityContext"]["privileged"] is False
          and ctrs["revert-cri"]["securityContext"]["privileged"] is False)

    ij, cj, _ = templates(render({"stage": {"systemdAccess": "pid1"}}))
    ctrs = {c["name"]: c for j in (ij, cj) for c in j["spec"]["template"]["spec"]["initContainers"] + j["spec"]["template"]["spec"]["containers"]}
    check("stage.systemdAccess=pid1 (the 0.1 shape): hostPID, and the stages that talk to systemd are privileged",
          ij["spec"]["template"]["spec"].get("hostPID") is True and cj["spec"]["template"]["spec"].get("hostPID") is True
          and all(ctrs[n]["securityContext"].get("privileged") is True for n in ("cri", "revert-cri", "artifacts", "prune-artifacts", "remove-artifacts"))
          and all(ctrs[n]["securityContext"].get("privileged") is False for n in ("host-check", "label", "unlabel")), ctrs)
    objs = render({"shims": {"qemu": {"allowedHypervisorAnnotations": ["path", "kernel_params"], "allowRestrictedAnnotations": True}}})
    q = next(s for s in stage_config(objs)[0]["shims"] if s["name"] == "qemu")
    check("restricted annotation accepted with allowRestrictedAnnotations: true", q["allowedHypervisorAnnotations"] == ["path", "kernel_params"], q)

    objs = render({"image": {"reference": "registry.local/kata-deploy-stage", "tag": "t1"},
                   "job": {"dispatcherImage": {"reference": "registry.local/kata-deploy-job-dispatcher", "tag": "t2"}}})
    check("image overrides", args_of(dispatcher(objs, "install")) and
          dispatcher(objs, "install")["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/kata-deploy-job-dispatcher:t2"
          and templates(objs)[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/kata-deploy-stage:t1")

    # Custom runtimes.
    rc_text = ("kind: RuntimeClass\napiVersion: node.k8s.io/v1\nmetadata:\n  name: kata-my-gpu-runtime\nhandler: kata-my-gpu-runtime\n"
               "overhead:\n  podFixed:\n    memory: \"640Mi\"\n    cpu: \"500m\"\nscheduling:\n  nodeSelector:\n    katacontainers.io/kata-runtime: \"true\"\n")
    objs = render({"customRuntimes": {"enabled": True, "runtimes": {"my-gpu-runtime": {
        "baseConfig": "qemu-nvidia-gpu", "dropIn": "[hypervisor.qemu]\ndefault_memory = 1024\n", "runtimeClass": rc_text,
        "containerd": {"snapshotter": "nydus"}, "crio": {"pullType": "guest-pull"}}}}})
    r = rcs(objs).get("kata-my-gpu-runtime")
    check("customRuntimes: RuntimeClass rendered from the given manifest (its overhead wins)",
          r is not None and r["handler"] == "kata-my-gpu-runtime" and r["overhead"]["podFixed"] == {"memory": "640Mi", "cpu": "500m"}, r)
    check("customRuntimes: the class is gated on this install's Kata nodes", r["scheduling"]["nodeSelector"] == GATE, r)
    c = next((s for s in stage_config(objs)[0]["shims"] if s["name"] == "my-gpu-runtime"), None)
    check("customRuntimes: stage config entry with baseConfig and CRI options",
          c == {"name": "my-gpu-runtime", "baseConfig": "qemu-nvidia-gpu", "supportedArches": ["amd64"],
                "dropIn": "[hypervisor.qemu]\ndefault_memory = 1024\n", "allowedHypervisorAnnotations": [],
                "containerdSnapshotter": "nydus", "crioPullType": "guest-pull"}, c)
    objs = render({"customRuntimes": {"enabled": False, "runtimes": {"x": {"baseConfig": "qemu"}}}})
    check("customRuntimes.enabled=false: ignored", "kata-x" not in rcs(objs))
    objs = render({"customRuntimes": {"enabled": True, "runtimes": {"small": {"baseConfig": "qemu"}}}, "env": {"multiInstallSuffix": "b"}})
    check("customRuntimes without runtimeClass: generated kata-<name>-<suffix>", "kata-small-b" in rcs(objs)
          and rcs(objs)["kata-small-b"]["handler"] == "kata-small-b", sorted(rcs(objs)))
    # The user's own handler (as upstream accepts it): registered as is; the configuration is named after the runtime.
    objs = render({"customRuntimes": {"enabled": True, "runtimes": {"mine": {"baseConfig": "qemu",
          "runtimeClass": "kind: RuntimeClass\napiVersion: node.k8s.io/v1\nmetadata: {name: team-sandbox}\nhandler: something-else\n"}}}})
    c = next((s for s in stage_config(objs)[0]["shims"] if s["name"] == "mine"), None)
    check("customRuntimes: a handler of any DNS-label form is kept, and the stage registers exactly it",
          rcs(objs).get("team-sandbox", {}).get("handler") == "something-else" and c is not None and c.get("handler") == "something-else", c)
    # The user's handler name (seed 004's example) with a suffix: accepted when it carries the suffix.
    own = "kind: RuntimeClass\napiVersion: node.k8s.io/v1\nmetadata:\n  name: gpu-big\nhandler: kata-gpu-big-cicd\n"
    objs = render({"env": {"multiInstallSuffix": "cicd"}, "customRuntimes": {"enabled": True, "runtimes": {"x": {"baseConfig": "qemu-nvidia-gpu", "runtimeClass": own}}}})
    r = rcs(objs).get("gpu-big")
    check("customRuntimes: the user's handler kept; overhead inherited from the base shim; gated on this install's marker",
          r is not None and r["handler"] == "kata-gpu-big-cicd" and r["overhead"]["podFixed"] == {"memory": "10240Mi", "cpu": "1"}
          and r["scheduling"]["nodeSelector"] == {"katacontainers.io/kata-runtime": "true", "katacontainers.io/kata-deploy-installed-cicd": "true"}, r)
    check("customRuntimes: the stage entry registers exactly that handler (kata-<name>-<suffix>)",
          any(s["name"] == "gpu-big" for s in stage_config(objs)[0]["shims"]), stage_config(objs)[0]["shims"])
    objs = render({"customRuntimes": {"enabled": True, "runtimes": {"x": {"baseConfig": "qemu", "inheritBaseOverhead": False,
                                                                          "runtimeClass": "kind: RuntimeClass\nhandler: kata-x\nmetadata: {name: kata-x}\n"}}}})
    check("customRuntimes: inheritBaseOverhead=false and no overhead: none", "overhead" not in rcs(objs)["kata-x"], rcs(objs)["kata-x"])
    # Seed 004's example handler with a suffix: kept (it was refused for not ending in -<suffix>).
    objs = render({"env": {"multiInstallSuffix": "cicd"}, "customRuntimes": {"enabled": True, "runtimes": {"x": {"baseConfig": "qemu",
          "runtimeClass": "kind: RuntimeClass\nmetadata: {name: kata-my-gpu-runtime}\nhandler: kata-my-gpu-runtime\n"}}}})
    c = next((s for s in stage_config(objs)[0]["shims"] if s["name"] == "x"), None)
    check("customRuntimes: with a suffix, a handler without it is kept and passed to the stage",
          rcs(objs).get("kata-my-gpu-runtime", {}).get("handler") == "kata-my-gpu-runtime" and c is not None
          and c.get("handler") == "kata-my-gpu-runtime", c)
    err = render_err({"customRuntimes": {"enabled": True, "runtimes": {
        "a": {"baseConfig": "qemu", "runtimeClass": "kind: RuntimeClass\nmetadata: {name: a}\nhandler: kata-b\n"},
        "b": {"baseConfig": "qemu", "runtimeClass": "kind: RuntimeClass\nmetadata: {name: b}\nhandler: other\n"}}}})
    check("customRuntimes: two runtimes whose configurations would share a name are refused, naming both",
          "customRuntimes.runtimes.a" in err and "customRuntimes.runtimes.b" in err and '"b"' in err, err)
    for name, h in [("not a DNS label", "Kata_X"), ("built-in handler", "kata-qemu")]:
        err = render_err({"customRuntimes": {"enabled": True, "runtimes": {"x": {"baseConfig": "qemu",
              "runtimeClass": f"kind: RuntimeClass\nmetadata: {{name: c}}\nhandler: {h}\n"}}}})
        check(f"customRuntimes: handler {name} refused", f'handler "{h}"' in err, err)
    err = render_err({"customRuntimes": {"enabled": True, "runtimes": {
        "a": {"baseConfig": "qemu", "runtimeClass": "kind: RuntimeClass\nmetadata: {name: a}\nhandler: kata-same\n"},
        "b": {"baseConfig": "qemu", "runtimeClass": "kind: RuntimeClass\nmetadata: {name: b}\nhandler: kata-same\n"}}}})
    check("customRuntimes: two runtimes with one handler refused", "handlers must be unique" in err, err)
    err = render_err({"customRuntimes": {"enabled": True, "runtimes": {"bad": {"baseConfig": "qemu-nope"}}}})
    check("customRuntimes: unknown baseConfig rejected", "/customRuntimes/runtimes/bad/baseConfig" in err and "value must be one of" in err, err)

    # Release name handling.
    long = "a-very-long-release-name-that-goes-on-and-on"
    objs = render(release=long)
    p = flag_values(args_of(dispatcher(objs, "install")), "--name-prefix")[0]
    p2 = flag_values(args_of(dispatcher(render(release=long + "x"), "install")), "--name-prefix")[0]
    check("long release name: prefix shortened to <=30 with a hash, distinct per release",
          len(p) <= 30 and re.fullmatch(r"[a-z][-a-z0-9]*[a-z0-9]", p) is not None and p != p2, (p, p2))
    objs = render(release="1st")
    p = flag_values(args_of(dispatcher(objs, "install")), "--name-prefix")[0]
    check("release name starting with a digit: prefix starts with a letter", p[0].isalpha(), p)
    names = [o["metadata"]["name"] for o in render(release=long, ns="a-namespace-that-is-also-quite-long-really")]
    check("all object names are <=63 characters", all(len(n) <= 63 for n in names), [n for n in names if len(n) > 63])
guarded("values", t_values)

# ------------------------------------------------------------------------ NFD and node selectors
def t_nfd():
    objs = render({"shims": {"disableAll": True, "qemu-snp": {"enabled": True}, "qemu-tdx": {"enabled": True},
                             "qemu-se": {"enabled": True}, "qemu-nvidia-gpu-snp": {"enabled": True}}})
    check("NFD: helm template (no cluster, nfd.enabled=false) injects nothing (the CC GPU class keeps upstream's selectors)",
          all(r["scheduling"]["nodeSelector"] == GATE for n, r in rcs(objs).items() if n != "kata-qemu-nvidia-gpu-snp")
          and rcs(objs)["kata-qemu-nvidia-gpu-snp"]["scheduling"]["nodeSelector"]
          == {**GATE, "nvidia.com/cc.ready.state": "true", "amd.feature.node.kubernetes.io/snp": "true"}, rcs(objs))
    objs = render({"nfd": {"enabled": True}, "shims": {
        "disableAll": True, "qemu-snp": {"enabled": True}, "qemu-tdx": {"enabled": True}, "qemu-se": {"enabled": True},
        "qemu-se-runtime-rs": {"enabled": True}, "qemu-nvidia-gpu-snp": {"enabled": True}, "qemu-coco-dev": {"enabled": True}}})
    sel = {n: r["scheduling"]["nodeSelector"] for n, r in rcs(objs).items()}
    k = GATE
    check("NFD: SNP selector", sel["kata-qemu-snp"] == {**k, "amd.feature.node.kubernetes.io/snp": "true"}, sel)
    check("NFD: TDX selector", sel["kata-qemu-tdx"] == {**k, "intel.feature.node.kubernetes.io/tdx": "true"}, sel)
    check("NFD: SE selectors", sel["kata-qemu-se"] == sel["kata-qemu-se-runtime-rs"] == {**k, "feature.node.kubernetes.io/cpu-security.se.enabled": "true"}, sel)
    check("NFD: GPU shims keep their own selectors, non-TEE shims untouched",
          sel["kata-qemu-nvidia-gpu-snp"] == {**k, "nvidia.com/cc.ready.state": "true", "amd.feature.node.kubernetes.io/snp": "true"}
          and sel["kata-qemu-coco-dev"] == k, sel)
    objs = render({"nfd": {"enabled": True}, "shims": {"disableAll": True, "qemu-snp": {"enabled": True, "runtimeClass": {"nodeSelector": {"pool": "snp"}}}}})
    check("NFD: a manual runtimeClass.nodeSelector wins over auto-inject",
          rcs(objs)["kata-qemu-snp"]["scheduling"]["nodeSelector"] == {**k, "pool": "snp"}, rcs(objs)["kata-qemu-snp"])
    err = render_err({"node-feature-discovery": {"enabled": True}})
    check("NFD: node-feature-discovery.enabled=true (upstream installs NFD) refused with how to install NFD",
          "node-feature-discovery.enabled=true" in err and "helm install nfd" in err and "node-feature-discovery.enabled=false" in err, err)
    objs = render({"nfd": {"enabled": True, "autoInjectNodeSelectors": False}, "shims": {"disableAll": True, "qemu-snp": {"enabled": True}}})
    check("NFD: autoInjectNodeSelectors=false", rcs(objs)["kata-qemu-snp"]["scheduling"]["nodeSelector"] == k)
    objs = render({"shims": {"disableAll": True, "qemu-nvidia-gpu": {"enabled": True, "runtimeClass": {"nodeSelector": {"nvidia.com/cc.ready.state": "false"}}}}})
    check("manual runtimeClass.nodeSelector applied without NFD",
          rcs(objs)["kata-qemu-nvidia-gpu"]["scheduling"]["nodeSelector"] == {**k, "nvidia.com/cc.ready.state": "false"})
guarded("nfd", t_nfd)

# --------------------------------------------------------------------- ValidatingAdmissionPolicy
def t_vap():
    objs = render()
    vap = one(objs, "ValidatingAdmissionPolicy", "kata-system-kata-deploy-node-scope")
    b = one(objs, "ValidatingAdmissionPolicyBinding", "kata-system-kata-deploy-node-scope")
    dvap = one(objs, "ValidatingAdmissionPolicy", "kata-system-kata-deploy-record-scope")
    db = one(objs, "ValidatingAdmissionPolicyBinding", "kata-system-kata-deploy-record-scope")
    dtext = json.dumps(dvap["spec"])
    check("dispatcher VAP: the dispatcher's ServiceAccount, node UPDATEs, denied unless only its own install record changes",
          "system:serviceaccount:kata-system:kata-deploy-dispatcher" in dtext and dvap["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["nodes"]
          and "katacontainers.io/installed-by-kata-deploy-install" in dtext and "object.spec == oldObject.spec" in dtext
          and dvap["spec"]["failurePolicy"] == "Fail" and db["spec"]["policyName"] == dvap["metadata"]["name"]
          and db["spec"]["validationActions"] == ["Deny"], dvap["spec"])
    err = render_err(extra=["--kube-version", "1.29.9"])
    check("Kubernetes < 1.30: refused (the policy cannot confine the token), naming the opt-out",
          "cannot confine the per-node Jobs' token" in err and "nodeScopePolicy.enabled=false" in err, err)
    err = render_err({"nodeScopePolicy": {"enabled": False}}, extra=["--kube-version", "1.29.9"])
    check("Kubernetes < 1.30 with nodeScopePolicy.enabled=false: explicit opt-out renders", err == "", err)
    check("VAP: binding denies", b["spec"]["policyName"] == vap["metadata"]["name"] and b["spec"]["validationActions"] == ["Deny"], b)
    check("VAP: matches node updates", vap["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["nodes"]
          and vap["spec"]["failurePolicy"] == "Fail", vap["spec"])
    mc = " ".join(m["expression"] for m in vap["spec"]["matchConditions"])
    check("VAP: applies to the per-node Jobs' ServiceAccount only", "system:serviceaccount:kata-system:kata-deploy-node" in mc, mc)
    text = json.dumps(vap["spec"])
    check("VAP: node-name from request.userInfo.extra must equal the Node's name",
          "authentication.kubernetes.io/node-name" in text and "object.metadata.name" in text and "request.userInfo.extra" in text, text)
    check("VAP: only katacontainers.io/* labels may change", "katacontainers.io/" in text and "oldObject" in text, text)
    check("VAP: not rendered with nodeScopePolicy.enabled=false",
          not find(render({"nodeScopePolicy": {"enabled": False}}, api_vap=True), "ValidatingAdmissionPolicy"))
guarded("vap", t_vap)

# ------------------------------------------------------------------------------ example values
def t_examples():
    objs = render(files=[os.path.join(CHART, "try-kata-nvidia-gpu.values.yaml")])
    gpu = ["qemu-nvidia-gpu", "qemu-nvidia-gpu-runtime-rs", "qemu-nvidia-gpu-snp", "qemu-nvidia-gpu-tdx"]
    check("try-kata-nvidia-gpu: its RuntimeClasses", sorted(rcs(objs)) == [f"kata-{s}" for s in gpu], sorted(rcs(objs)))
    sel = {n: r["scheduling"]["nodeSelector"] for n, r in rcs(objs).items()}
    check("try-kata-nvidia-gpu: confidential GPU classes pinned to cc.ready.state=true + SNP/TDX feature label",
          sel["kata-qemu-nvidia-gpu-snp"] == {**GATE, "nvidia.com/cc.ready.state": "true", "amd.feature.node.kubernetes.io/snp": "true"}
          and sel["kata-qemu-nvidia-gpu-tdx"] == {**GATE, "nvidia.com/cc.ready.state": "true", "intel.feature.node.kubernetes.io/tdx": "true"}
          and sel["kata-qemu-nvidia-gpu"] == {**GATE, "nvidia.com/cc.ready.state": "false"}, sel)
    cfg = {s["name"]: s for s in stage_config(objs)[0]["shims"]}
    check("try-kata-nvidia-gpu: confidential GPU shims pull in the guest, the others on the host",
          sorted(cfg) == gpu and all((cfg[n]["containerdSnapshotter"], cfg[n]["crioPullType"]) == ("nydus", "guest-pull") for n in gpu[2:])
          and all((cfg[n]["containerdSnapshotter"], cfg[n]["crioPullType"]) == ("", "") for n in gpu[:2]), cfg)
    objs = render(files=[os.path.join(CHART, "try-kata-tee.values.yaml")])
    tee = ["qemu-coco-dev", "qemu-coco-dev-runtime-rs", "qemu-se", "qemu-se-runtime-rs", "qemu-snp", "qemu-snp-runtime-rs", "qemu-tdx", "qemu-tdx-runtime-rs"]
    check("try-kata-tee: the eight TEE RuntimeClasses", sorted(rcs(objs)) == [f"kata-{s}" for s in tee], sorted(rcs(objs)))
    cfg = {s["name"]: s for s in stage_config(objs)[0]["shims"]}
    check("try-kata-tee: guest pull (nydus / guest-pull) and arches",
          sorted(cfg) == tee and all(s["containerdSnapshotter"] == "nydus" and s["crioPullType"] == "guest-pull" for s in cfg.values())
          and cfg["qemu-se"]["supportedArches"] == ["s390x"] and cfg["qemu-snp"]["supportedArches"] == ["amd64"], cfg)
    objs = render({"runtimeClasses": {"createDefault": True}}, files=[os.path.join(CHART, "try-kata-tee.values.yaml")])
    k = rcs(objs).get("kata")
    check("try-kata-tee + createDefault: the kata class has defaultShim.amd64's handler, selectors and overhead",
          k is not None and k["handler"] == "kata-qemu-snp" and k["overhead"] == rcs(objs)["kata-qemu-snp"]["overhead"]
          and k["scheduling"] == rcs(objs)["kata-qemu-snp"]["scheduling"], k)
    # What the CI does for single-node clusters: clear the expressions -> every node.
    objs = render({"job": {"nodeSelectorExpressions": []}}, files=[os.path.join(CHART, "try-kata-nvidia-gpu.values.yaml")])
    check("try-kata-nvidia-gpu + nodeSelectorExpressions: [] targets every node", "--selector" not in args_of(dispatcher(objs, "install")))
guarded("examples", t_examples)

# ------------------------------------------------------------------------- release size is O(1)
def t_size():
    # The release must not grow with the fleet: per-node Jobs are created by the dispatcher at run
    # time, never rendered by Helm. job.nodes is data (one --nodes argument), so rendering with 1
    # and with 5,000 explicit node names must give the same objects (same kinds and names, same
    # count); only that one argument grows. The same holds for selector-based installs, which do not
    # depend on the node count at all.
    many = [f"worker-{i:05d}.example.internal" for i in range(5000)]
    a = render({"job": {"nodes": ["worker-00000.example.internal"], "cleanup": {"nodes": ["worker-00000.example.internal"]}}})
    b = render({"job": {"nodes": many, "cleanup": {"nodes": many}}})
    key = lambda objs: sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    check("release size: 1 vs 5,000 nodes render the same number of objects", len(a) == len(b), (len(a), len(b)))
    check("release size: ... and the same objects", key(a) == key(b))
    check("release size: no per-node Job rendered (only the 3 dispatcher Jobs)", len(find(b, "Job")) == 3)
    check("release size: the 5,000 names reach the dispatcher as one --nodes argument",
          flag_values(args_of(dispatcher(b, "install")), "--nodes") == [",".join(many)])
    check("release size: job templates ConfigMap identical for 1 and 5,000 nodes", templates(a)[2]["data"] == templates(b)[2]["data"])
guarded("size", t_size)

# ------------------------------------------------------------------------------ schema rejections
def t_schema():
    cases = [
        ("unknown selector operator", {"job": {"nodeSelectorExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]}},
         ["/job/nodeSelectorExpressions/0/operator", "value must be one of 'In', 'NotIn', 'Exists', 'DoesNotExist'"]),
        ("In with empty values", {"job": {"nodeSelectorExpressions": [{"key": "a", "operator": "In", "values": []}]}},
         ["/job/nodeSelectorExpressions/0/values", "minItems: got 0, want 1"]),
        ("NotIn without values", {"job": {"nodeSelectorExpressions": [{"key": "a", "operator": "NotIn"}]}},
         ["/job/nodeSelectorExpressions/0", "missing property 'values'"]),
        ("Exists with values", {"job": {"nodeSelectorExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}},
         ["/job/nodeSelectorExpressions/0/values", "maxItems: got 1, want 0"]),
        ("cleanup: unknown operator", {"job": {"cleanup": {"nodeSelectorExpressions": [{"key": "a", "operator": "in", "values": ["x"]}]}}},
         ["/job/cleanup/nodeSelectorExpressions/0/operator", "value must be one of"]),
        ("cleanup: In with empty values", {"job": {"cleanup": {"nodeSelectorExpressions": [{"key": "a", "operator": "In", "values": []}]}}},
         ["/job/cleanup/nodeSelectorExpressions/0/values", "minItems: got 0, want 1"]),
        ("suffix that is not a DNS label", {"env": {"multiInstallSuffix": "CI_run"}},
         ["/env/multiInstallSuffix", "'CI_run' does not match pattern"]),
        ("suffix ending with '-'", {"env": {"multiInstallSuffix": "ci-"}}, ["/env/multiInstallSuffix", "does not match pattern"]),
        ("suffix too long", {"env": {"multiInstallSuffix": "a" * 40}}, ["/env/multiInstallSuffix", "maxLength"]),
        ("parallelism 0", {"job": {"parallelism": 0}}, ["/job/parallelism", "minimum: got 0, want 1"]),
        ("parallelism negative", {"job": {"parallelism": -2}}, ["/job/parallelism", "minimum: got -2, want 1"]),
        ("restricted annotation without opt-in", {"shims": {"qemu": {"allowedHypervisorAnnotations": ["kernel_params", "path"]}}},
         ["/shims/qemu", "missing property 'allowRestrictedAnnotations'"]),
        ("restricted annotation (full name) without opt-in",
         {"shims": {"clh": {"allowedHypervisorAnnotations": ["io.katacontainers.config.hypervisor.virtio_fs_daemon"]}}},
         ["/shims/clh", "missing property 'allowRestrictedAnnotations'"]),
        ("restricted annotation with opt-in false",
         {"shims": {"fc": {"allowedHypervisorAnnotations": ["jailer_path"], "allowRestrictedAnnotations": False}}},
         ["/shims/fc/allowRestrictedAnnotations", "value must be true"]),
        ("restricted annotation in a custom runtime",
         {"customRuntimes": {"enabled": True, "runtimes": {"c": {"baseConfig": "qemu", "allowedHypervisorAnnotations": ["entropy_source"]}}}},
         ["/customRuntimes/runtimes/c", "missing property 'allowRestrictedAnnotations'"]),
        ("unknown shim name (typo)", {"shims": {"qemu-nvidia-gpus": {"enabled": True}}}, ["/shims", "qemu-nvidia-gpus"]),
        ("bad snapshotter", {"shims": {"qemu": {"containerd": {"snapshotter": "overlay"}}}}, ["/shims/qemu/containerd/snapshotter", "value must be one of"]),
        ("bad pullType", {"shims": {"qemu": {"crio": {"pullType": "host"}}}}, ["/shims/qemu/crio/pullType", "value must be one of"]),
        ("bad cri", {"stage": {"cri": "docker"}}, ["/stage/cri", "value must be one of"]),
        ("bad restart", {"stage": {"restart": "reboot"}}, ["/stage/restart", "value must be one of"]),
        ("unknown top-level value", {"deploymentMod": "job"}, ["additional properties 'deploymentMod' not allowed"]),
    ]
    for name, values, want in cases:
        err = render_err(values)
        check(f"schema rejects {name}", err != "" and all(w in err for w in want), err.strip().splitlines()[-3:] if err else "rendered!")
    err = render_err({"shims": {"disableAll": True}})
    check("no shim enabled is rejected (the stages refuse an empty shim list)", "no shim is enabled" in err, err)
    err = render_err({"deploymentMode": "daemonset"})
    check("deploymentMode=daemonset rejected: 'this chart implements job mode', with the migration steps",
          "this chart implements job mode" in err and "helm uninstall" in err and "--set deploymentMode=job" in err, err)
    # The template checks hold even when the schema is skipped.
    skip = ["--skip-schema-validation"]
    for name, values, want in [
        ("unknown operator", {"job": {"nodeSelectorExpressions": [{"key": "a", "operator": "Equals"}]}}, 'unknown operator "Equals"'),
        ("empty In values", {"job": {"nodeSelectorExpressions": [{"key": "a", "operator": "In", "values": []}]}}, "needs a non-empty 'values'"),
        ("bad suffix", {"env": {"multiInstallSuffix": "CI_run"}}, "is not a DNS label"),
        ("parallelism 0", {"job": {"parallelism": 0}}, "must be at least 1"),
        ("restricted annotation", {"shims": {"qemu": {"allowedHypervisorAnnotations": ["path"]}}}, "allowRestrictedAnnotations: true"),
    ]:
        err = render_err(values, extra=skip)
        check(f"template check (schema skipped) rejects {name}", want in err, err)
    for name, values in [("opt-in accepted", {"shims": {"qemu": {"allowedHypervisorAnnotations": ["path"], "allowRestrictedAnnotations": True}}}),
                         ("upstream string booleans accepted", {"env": {"debug": "true"}, "shims": {"qemu": {"enabled": "false"}}}),
                         ("In with values accepted", {"job": {"nodeSelectorExpressions": [{"key": "a", "operator": "In", "values": ["b"]}]}})]:
        err = render_err(values)
        check(f"schema: {name}", err == "", err)
guarded("schema", t_schema)


# ------------------------------------------------------------- upstream kata-deploy compatibility
# Every key of upstream's values (3.32 job-mode chart and the current 4.x one) and what this chart
# does with it: impl (implemented with upstream's meaning), noeffect (accepted, listed in NOTES.txt
# with the reason), refused (one message naming the key and what to use instead). "shims.*" and
# "customRuntimes.runtimes.*" stand for any shim / runtime name. README.md has the same table.
UPSTREAM_KEYS = {
    "deploymentMode": "impl", "job.dispatcherImage.reference": "impl", "job.dispatcherImage.tag": "impl",
    "job.dispatcherNodeSelector": "impl", "job.dispatcherTolerations": "impl", "job.parallelism": "impl", "job.nodes": "impl",
    "job.nodeSelector": "impl", "job.nodeSelectorExpressions": "impl", "job.waitForNodesSeconds": "impl",
    "job.nodeSettleSeconds": "impl", "job.waitNodeReadySeconds": "impl", "job.cleanup.nodes": "impl",
    "job.cleanup.nodeSelector": "impl", "job.cleanup.nodeSelectorExpressions": "impl", "job.cleanup.nodeAffinity": "impl",
    "job.ttlSecondsAfterFinished": "impl", "job.activeDeadlineSeconds": "impl", "job.backoffLimit": "impl",
    "imagePullPolicy": "impl", "imagePullSecrets": "impl", "image.reference": "impl", "image.tag": "impl",
    "kubectlImage": "noeffect", "monitor.enabled": "refused", "monitor": "noeffect", "k8sDistribution": "impl",
    "containerd.configDir": "refused", "containerd.runtimeSocket": "refused", "containerd.configFileName": "refused",
    "containerd.userDropIn": "noeffect", "nodeSelector": "impl", "tolerations": "impl", "startupTaints": "impl",
    "podLabels": "impl", "podAnnotations": "impl", "affinity.nodeAffinity": "impl", "affinity.podAffinity": "noeffect",
    "affinity.podAntiAffinity": "noeffect", "affinity": "impl", "priorityClassName": "impl", "updateStrategy": "noeffect",
    "resources": "impl", "debug": "impl", "devkit": "noeffect", "logLevel": "noeffect", "health": "noeffect",
    "snapshotter.setup": "impl", "snapshotter.erofsMergeMode": "noeffect", "snapshotter.erofsSnapshotterMode": "noeffect",
    "snapshotter.erofsDmverity": "noeffect", "shims.disableAll": "impl", "shims.*.enabled": "impl", "shims.*.supportedArches": "impl",
    "shims.*.allowedHypervisorAnnotations": "impl", "shims.*.dropIn": "impl", "shims.*.containerd.snapshotter": "impl",
    "shims.*.containerd.forceGuestPull": "impl", "shims.*.crio.guestPull": "impl", "shims.*.agent.httpsProxy": "impl",
    "shims.*.agent.noProxy": "impl", "shims.*.runtimeClass.nodeSelector": "impl", "shims.*.runtimeClass.overhead": "impl",
    "shims.*.runtimeClass.overheadEnabled": "impl", "defaultShim": "impl", "runtimeClasses.enabled": "impl",
    "runtimeClasses.createDefault": "impl", "runtimeClasses.defaultName": "impl", "runtimeClasses.overheadEnabled": "impl",
    "env.installationPrefix": "impl", "env.hostOS": "noeffect", "env.multiInstallSuffix": "impl",
    "node-feature-discovery.enabled": "refused", "nodeFeatureRules.create": "noeffect", "verification.namespace": "impl",
    "verification.timeout": "impl", "verification.daemonsetTimeout": "noeffect", "verification.pod": "impl",
    "customRuntimes.enabled": "impl", "customRuntimes.runtimes": "impl", "customRuntimes.runtimes.*.baseConfig": "impl",
    "customRuntimes.runtimes.*.dropIn": "impl", "customRuntimes.runtimes.*.runtimeClass": "impl",
    "customRuntimes.runtimes.*.inheritBaseOverhead": "impl", "customRuntimes.runtimes.*.containerd.snapshotter": "impl",
    "customRuntimes.runtimes.*.crio.pullType": "impl",
}
# Subtrees whose inner keys follow their parent (DaemonSet-only settings, opaque maps).
OPAQUE = ["kubectlImage", "monitor", "updateStrategy", "health", "nodeSelector", "podLabels", "podAnnotations", "resources",
          "job.dispatcherNodeSelector", "job.nodeSelector", "job.cleanup.nodeSelector", "job.cleanup.nodeAffinity", "defaultShim",
          "shims.*.runtimeClass.nodeSelector", "shims.*.runtimeClass.overhead", "affinity.nodeAffinity"]


def key_paths(v, prefix=""):
    out = []
    for k, val in v.items():
        p = f"{prefix}{k}"
        if prefix == "shims." and k != "disableAll":
            p = "shims.*"
        if prefix == "customRuntimes.runtimes.":
            p = "customRuntimes.runtimes.*"
        if isinstance(val, dict) and val and not any(p == o or p.startswith(o + ".") for o in OPAQUE):
            out += key_paths(val, p + ".")
        else:
            out.append(p)
    return out


def table_entry(path):
    while path:
        if path in UPSTREAM_KEYS:
            return UPSTREAM_KEYS[path]
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return None


def notes_of(values=None, files=(), chart=CHART, release="kata-deploy"):
    """NOTES.txt as rendered (helm template does not render it: go through tpl in a scratch copy)."""
    import shutil
    copy = tempfile.mkdtemp(dir=TMP)
    copy = os.path.join(copy, "c")
    shutil.copytree(chart, copy)
    shutil.copy(os.path.join(chart, "templates", "NOTES.txt"), os.path.join(copy, "notes.txt"))
    with open(os.path.join(copy, "templates", "zz-notes.yaml"), "w") as f:
        f.write('apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    args = ["template", release, copy, "-n", "kata-system", "--kube-version", KUBE]
    for fl in files:
        args += ["-f", fl]
    if values is not None:
        args += ["-f", values_file(values)]
    rc, out, err = helm(*args)
    if rc != 0:
        raise RuntimeError(err)
    return next(d["data"]["notes"] for d in yaml.safe_load_all(out) if d and d["metadata"]["name"] == "notes")


def reuse_chart(fixture):
    """This chart as `helm upgrade --reuse-values` sees it over an upstream release: Helm replaces the
    chart's default values with the previous release's values (here: an upstream-shaped fixture)."""
    import shutil
    d = os.path.join(tempfile.mkdtemp(dir=TMP), "kata-deploy")
    shutil.copytree(CHART, d)
    shutil.copy(os.path.join(FIXTURES, fixture), os.path.join(d, "values.yaml"))
    return d


def t_upstream():
    with open(os.path.join(CHART, "values.yaml"), "rb") as a, open(os.path.join(CHART, "files", "values-defaults.yaml"), "rb") as b:
        check("files/values-defaults.yaml is a byte-identical copy of values.yaml (defaults for --reuse-values)", a.read() == b.read())
    # The table covers every key of both upstream generations.
    for fx in ["upstream-3.32-job.values.yaml", "upstream-4.x-job.values.yaml"]:
        with open(os.path.join(FIXTURES, fx)) as f:
            paths = sorted(set(key_paths(yaml.safe_load(f))))
        missing = [p for p in paths if table_entry(p) is None]
        check(f"{fx}: every upstream key ({len(paths)}) has a verdict (impl / noeffect / refused)", not missing, missing)
    # Every fixture with upstream's shapes renders (install), except the DaemonSet-mode one.
    for fx in sorted(f for f in os.listdir(FIXTURES) if f.startswith("upstream-")):
        err = render_err(None, extra=["-f", os.path.join(FIXTURES, fx)])
        if "daemonset" in fx:
            check(f"{fx}: refused with the migration steps", "this chart implements job mode" in err and "helm uninstall" in err, err)
        else:
            check(f"{fx}: renders with this chart", err == "", err)
    # --reuse-values over an upstream release (Helm's semantics: old values replace our defaults).
    for fx, ver in [("upstream-3.32-job.values.yaml", "3.32"), ("upstream-4.x-job.values.yaml", "4.x")]:
        chart = reuse_chart(fx)
        rc, out, err = helm("template", "kata-deploy", chart, "-n", "kata-system", "--kube-version", KUBE)
        if not check(f"--reuse-values over an upstream {ver} job-mode release renders", rc == 0, err):
            continue
        objs = [d for d in yaml.safe_load_all(out) if d]
        ij = templates(objs)[0]["spec"]["template"]["spec"]
        check(f"reuse {ver}: our stage and dispatcher images, not upstream's",
              ij["initContainers"][0]["image"] == "quay.io/kata-containers/kata-deploy-stage:0.1.0"
              and dispatcher(objs, "install")["spec"]["template"]["spec"]["containers"][0]["image"] == "quay.io/kata-containers/kata-deploy-job-dispatcher:0.1.0")
        check(f"reuse {ver}: upstream priorityClassName and resources reach the per-node pods",
              ij.get("priorityClassName") == "system-node-critical" and ij["initContainers"][0]["resources"] == {"requests": {"cpu": "25m", "memory": "16Mi"}}, ij)
        cfg, _ = stage_config(objs)
        check(f"reuse {ver}: our stage keys filled from this chart's defaults", set(cfg) == STAGE_KEYS and cfg["restart"] == "systemd", cfg)
        check(f"reuse {ver}: VAP and state record present (our keys filled)", find(objs, "ValidatingAdmissionPolicy")
              and one(objs, "ConfigMap", "kata-deploy-kata-deploy-state"))
        check(f"reuse {ver}: upstream's remote shim stays off, and fc (on upstream, devmapper) is off here", "kata-remote" not in rcs(objs) and "kata-fc" not in rcs(objs))
        ia = args_of(dispatcher(objs, "install"))
        check(f"reuse {ver}: install Jobs follow DaemonSet taint rules (upstream's tolerations: []), the skip checks are passed",
              ij.get("tolerations") == DS_TOLERATIONS and flag_values(ia, "--installed-label") == ["katacontainers.io/kata-deploy-installed=true"]
              and "--reinstall-all" not in ia, (ij.get("tolerations"), ia))
        a = args_of(dispatcher(objs, "cleanup"))
        check(f"reuse {ver}: upstream's cleanup default (kata-runtime Exists) also takes the claimed marker",
              flag_values(a, "--selector") == ["katacontainers.io/kata-runtime", "katacontainers.io/kata-deploy-claimed", "katacontainers.io/kata-deploy-state"], a)
        notes = notes_of(chart=chart)
        for k in ["updateStrategy", "health", "kubectlImage", "monitor.*", "verification.daemonsetTimeout",
                  "shims.fc (upstream: on by default, snapshotter devmapper): off by default in this chart"]:
            check(f"reuse {ver}: NOTES lists {k} as having no effect", f"  - {k}" in notes, notes[-1500:])
        check(f"reuse {ver}: upstream's image.reference (untagged) is the Kata release installed, at this chart's release",
              "Kata release installed on the nodes: quay.io/kata-containers/kata-deploy:4.1.0 " in notes
              and "image.reference=" not in notes
              and ij["initContainers"][1]["image"] == "quay.io/kata-containers/kata-deploy:4.1.0", notes[:600])
    chart = reuse_chart("chart-0.1.0.values.yaml")
    rc, out, err = helm("template", "kata-deploy", chart, "-n", "kata-system", "--kube-version", KUBE)
    objs = [d for d in yaml.safe_load_all(out) if d] if rc == 0 else []
    check("--reuse-values over this chart's 0.1.0 release renders; its old shim names are not installed",
          rc == 0 and "kata-cloud-hypervisor" not in rcs(objs) and "kata-stratovirt" not in rcs(objs) and "kata-clh-runtime-rs" in rcs(objs), err)
    ij = templates(objs)[0]["spec"]["template"]["spec"] if objs else {}
    check("reuse 0.1.0: its job.nodeJobs.tolerations [{operator: Exists}] (that version's default) is kept: install Jobs tolerate every taint",
          {"operator": "Exists"} in ij.get("tolerations", []) and ij.get("tolerations", [])[:len(DS_TOLERATIONS)] == DS_TOLERATIONS, ij.get("tolerations"))
    notes = notes_of(chart=chart)
    check("reuse 0.1.0: NOTES says install Jobs tolerate every taint and how to get DaemonSet rules",
          "job.nodeJobs.tolerations has {operator: Exists}" in notes and "job.nodeJobs.tolerations=[]" in notes, notes[-1500:])
    check("reuse 0.1.0: NOTES names the old shim names and the new one",
          "  - shims.cloud-hypervisor: not a shim of this chart (ignored); it is called clh-runtime-rs" in notes
          and "  - shims.stratovirt: not a shim of this chart (ignored)" in notes, notes[-800:])
    err = render_err(None, extra=["-f", os.path.join(FIXTURES, "upstream-4.x-daemonset.values.yaml")])
    check("DaemonSet-mode upstream values: refused, with the exact steps", all(w in err for w in [
        "helm get values", "helm uninstall", "kubectl get nodes -l katacontainers.io/kata-runtime", "--set deploymentMode=job"]), err)

    # Refused keys: one message naming the key and what to use instead.
    refused = [
        ({"monitor": {"enabled": True}}, ["monitor.enabled=true", "monitor.enabled=false"]),
        ({"containerd": {"configDir": "/etc/my-containerd/"}}, ["containerd.configDir", "stage.cri"]),
        ({"containerd": {"runtimeSocket": "unix:///run/x.sock"}}, ["containerd.runtimeSocket", "stage.cri"]),
        ({"containerd": {"configFileName": "my.toml"}}, ["containerd.configFileName", "stage.cri"]),
        ({"startupTaints": ["katacontainers.io/kata-runtime:Sometimes"]}, ["startupTaints", "key[=value][:Effect]"]),
        ({"node-feature-discovery": {"enabled": True}}, ["node-feature-discovery.enabled=true", "helm install nfd"]),
        ({"nodeFeatureRules": {"create": True}}, ["nodeFeatureRules.create=true", "auto or false"]),
        ({"image": {"reference": "quay.io/kata-containers/kata-deploy", "tag": "3.32.0"}, "payload": {"image": {"reference": "registry.example.com/kata-deploy-mirror"}}},
         ["image.reference=quay.io/kata-containers/kata-deploy", "payload.image.reference=\"registry.example.com/kata-deploy-mirror\"", "one place"]),
        ({"shims": {"cloud-hypervisor": {"enabled": True}}}, ["shims.cloud-hypervisor", "clh-runtime-rs"]),
        ({"runtimeClasses": {"createDefault": True}, "defaultShim": {"amd64": "qemu"}, "shims": {"qemu": {"enabled": False}}},
         ["runtimeClasses.createDefault=true", "defaultShim", "shims.qemu"]),
    ]
    for values, want in refused:
        err = render_err(values)
        check(f"refused: {want[0]} (one message with what to use instead)", err != "" and all(w in err for w in want), err)
    # Implemented keys (beyond the groups above).
    objs = render({"podLabels": {"team": "platform", "name": "x", "app.kubernetes.io/name": "mine"}, "podAnnotations": {"a.example/x": "1"},
                   "priorityClassName": "system-node-critical", "resources": {"requests": {"cpu": "25m", "memory": "16Mi"}},
                   "env": {"installationPrefix": "/opt/kata-up"}, "k8sDistribution": "rke2", "job": {"waitNodeReadySeconds": 300},
                   "debug": True, "tolerations": [{"key": "t", "operator": "Exists"}]})
    ij, cj, _ = templates(objs)
    meta = ij["spec"]["template"]["metadata"]
    check("podLabels/podAnnotations on the per-node pods (upstream's 'name' dropped, ours win)",
          meta["labels"].get("team") == "platform" and "name" not in meta["labels"] and meta["labels"]["app.kubernetes.io/name"] == "kata-deploy"
          and meta["annotations"].get("a.example/x") == "1" and "katacontainers.io/config-hash" in meta["annotations"], meta)
    pod = ij["spec"]["template"]["spec"]
    check("priorityClassName/resources on the per-node pods", pod.get("priorityClassName") == "system-node-critical"
          and all(c["resources"] == {"requests": {"cpu": "25m", "memory": "16Mi"}} for c in pod["initContainers"]), pod)
    cfg, _ = stage_config(objs)
    check("env.installationPrefix / k8sDistribution=rke2 / job.waitNodeReadySeconds / debug reach the stage config",
          cfg["installPrefix"] == "/opt/kata-up" and cfg["cri"] == "rke2" and cfg["labelReadyTimeoutSeconds"] == 300 and cfg["debug"] is True, cfg)
    check("k8sDistribution=k3s leaves detection to the stage (server or agent)", stage_config(render({"k8sDistribution": "k3s"}))[0]["cri"] == "auto")
    a = args_of(dispatcher(render({"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]}), "install"))
    check("tolerations (upstream): tolerating the control-plane taint makes control-plane nodes eligible (single-node CI)",
          "--selector" not in a and "--require-nodes" in a, a)
    a = args_of(dispatcher(render({"tolerations": [{"key": "other", "operator": "Exists"}]}), "install"))
    check("tolerations: another taint keeps the control-plane exclusion", flag_values(a, "--selector") == ["!node-role.kubernetes.io/control-plane"], a)
    d = dispatcher(objs, "install")["spec"]["template"]["spec"]
    check("tolerations (upstream): the dispatcher pods' tolerations when job.dispatcher.tolerations is empty",
          d.get("tolerations") == [{"key": "t", "operator": "Exists"}], d.get("tolerations"))
    d = dispatcher(render({"job": {"dispatcherNodeSelector": {"node-role.kubernetes.io/control-plane": ""},
                                   "dispatcherTolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]}}),
                   "install")["spec"]["template"]["spec"]
    check("job.dispatcherNodeSelector / job.dispatcherTolerations (upstream 4.x) place the dispatcher",
          d.get("nodeSelector") == {"node-role.kubernetes.io/control-plane": ""} and d["tolerations"][0]["key"] == "node-role.kubernetes.io/control-plane", d)
    objs = render({"job": {"nodeJobs": {"tolerations": [{"key": "only-this", "operator": "Exists"}]}}})
    ij, cj, _ = templates(objs)
    check("job.nodeJobs.tolerations are added to the install Jobs' DaemonSet tolerations; uninstall Jobs still tolerate every taint",
          cj["spec"]["template"]["spec"]["tolerations"] == [{"operator": "Exists"}]
          and ij["spec"]["template"]["spec"]["tolerations"] == DS_TOLERATIONS + [{"key": "only-this", "operator": "Exists"}],
          (ij["spec"]["template"]["spec"]["tolerations"], cj["spec"]["template"]["spec"]["tolerations"]))
    objs = render({"shims": {"qemu": {"runtimeClass": {"overheadEnabled": False}}, "clh": {"crio": {"guestPull": True}, "containerd": {"snapshotter": "erofs"}}}})
    check("shims.<s>.runtimeClass.overheadEnabled=false drops that class's overhead only",
          "overhead" not in rcs(objs)["kata-qemu"] and "overhead" in rcs(objs)["kata-clh"])
    c = next(x for x in stage_config(objs)[0]["shims"] if x["name"] == "clh")
    check("crio.guestPull=true -> guest-pull; containerd.snapshotter=erofs -> no effect (host pull)",
          c["crioPullType"] == "guest-pull" and c["containerdSnapshotter"] == "", c)
    objs = render({"runtimeClasses": {"createDefault": True, "defaultName": "kata"}})
    k = rcs(objs).get("kata")
    check("runtimeClasses.createDefault: kata class with defaultShim.amd64's handler (qemu-runtime-rs)",
          k is not None and k["handler"] == "kata-qemu-runtime-rs" and k["scheduling"]["nodeSelector"] == GATE, k)
    check("runtimeClasses.createDefault with a suffix: not created, NOTES says why",
          "kata" not in rcs(render({"runtimeClasses": {"createDefault": True}, "env": {"multiInstallSuffix": "b"}}))
          and "runtimeClasses.createDefault: the default RuntimeClass is not created" in notes_of({"runtimeClasses": {"createDefault": True}, "env": {"multiInstallSuffix": "b"}}))
    pod_yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: kata-check\nspec:\n  runtimeClassName: kata-qemu\n  containers:\n  - name: c\n    image: busybox\n"
    objs = render({"verification": {"pod": pod_yaml, "namespace": "checks", "timeout": 240}})
    v = find(objs, "Pod", "kata-check")
    check("verification.pod: a post-install/post-upgrade/post-rollback hook Pod after the dispatcher (weight 10), in verification.namespace, bounded by verification.timeout",
          len(v) == 1 and v[0]["metadata"]["namespace"] == "checks" and v[0]["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade,post-rollback"
          and int(v[0]["metadata"]["annotations"]["helm.sh/hook-weight"]) > 0 and v[0]["spec"]["activeDeadlineSeconds"] == 240
          and v[0]["spec"]["restartPolicy"] == "Never", v)
    err = render_err({"verification": {"pod": "kind: Deployment\nmetadata: {name: x}\n"}})
    check("verification.pod that is not a Pod: refused", "verification.pod must be a Pod manifest" in err, err)
    notes = notes_of({"env": {"hostOS": "cbl-mariner"}, "containerd": {"userDropIn": "[x]\n"}, "devkit": True, "logLevel": "debug",
                      "snapshotter": {"setup": ["nydus", "erofs"]}, "affinity": {"podAntiAffinity": {"x": 1}}})
    for k in ["env.hostOS=cbl-mariner", "containerd.userDropIn: NOT applied", "devkit", "logLevel=debug", "snapshotter.setup erofs",
              "affinity.podAffinity / podAntiAffinity"]:
        check(f"NOTES lists {k.split(':')[0]} as having no effect (with the reason)", f"  - {k}" in notes, notes[-1200:])
    n0 = notes_of()
    check("NOTES: nothing listed for default values", "NO effect" not in n0)
    check("NOTES: an empty selection fails; how to include a lone control-plane node; the opt-out",
          "job.nodeSelectorExpressions=[]" in n0 and "job.requireNodes=false" in n0
          and "job.requireNodes=false" not in notes_of({"job": {"requireNodes": False}}), n0)
guarded("upstream", t_upstream)

# ----------------------------------- upstream keys (issue 24): agent proxy, forceGuestPull, fc, NFD
def t_upstream_shim_keys():
    base_text = stage_config(render())[1]["data"]["config.yaml"]
    objs = render({"shims": {
        "qemu-tdx": {"agent": {"httpsProxy": "http://user:p=w@proxy.example:3128", "noProxy": "10.0.0.0/8,.svc,.cluster.local"}},
        "qemu-snp": {"agent": {"noProxy": "localhost"}, "containerd": {"forceGuestPull": True}},
        "qemu-coco-dev": {"containerd": {"forceGuestPull": "true"}}},
        "customRuntimes": {"enabled": True, "runtimes": {"my-tdx": {"baseConfig": "qemu-tdx", "agent": {"httpsProxy": "http://p2:8080"}}}}})
    shims = {x["name"]: x for x in stage_config(objs)[0]["shims"]}
    check("agent.httpsProxy / noProxy reach that shim's stage entry (agentHttpsProxy / agentNoProxy), verbatim",
          shims["qemu-tdx"].get("agentHttpsProxy") == "http://user:p=w@proxy.example:3128"
          and shims["qemu-tdx"].get("agentNoProxy") == "10.0.0.0/8,.svc,.cluster.local"
          and shims["qemu-snp"].get("agentNoProxy") == "localhost" and "agentHttpsProxy" not in shims["qemu-snp"]
          and shims["my-tdx"].get("agentHttpsProxy") == "http://p2:8080", {k: shims[k] for k in ["qemu-tdx", "qemu-snp", "my-tdx"]})
    check("containerd.forceGuestPull: true (or \"true\") reaches that shim's stage entry as forceGuestPull: true",
          shims["qemu-snp"].get("forceGuestPull") is True and shims["qemu-coco-dev"].get("forceGuestPull") is True, shims["qemu-snp"])
    # The stage parses what the chart renders (deny_unknown_fields: the key names agree).
    cands = [os.environ.get("KATA_STAGE_BIN", ""), os.path.join(os.environ["REPO"], "target/debug/kata-deploy-stage")]
    stage = next((c for c in cands if c and os.access(c, os.X_OK)), None)
    if check("upstream shim keys: a kata-deploy-stage binary (KATA_STAGE_BIN, or cargo build -p kata-deploy-stage)", stage, cands):
        path = os.path.join(TMP, "agent-config.yaml")
        with open(path, "w") as f:
            f.write(stage_config(objs)[1]["data"]["config.yaml"])
        p = subprocess.run([stage, "--config", path, "--host-root", tempfile.mkdtemp(dir=TMP), "--payload", tempfile.mkdtemp(dir=TMP), "status"],
                           capture_output=True, text=True, timeout=60)
        check("the stage binary accepts the rendered agentHttpsProxy / agentNoProxy / forceGuestPull", p.returncode == 0, (p.stdout + p.stderr)[-400:])
    others = [n for n, x in shims.items() if n not in ("qemu-tdx", "qemu-snp", "qemu-coco-dev", "my-tdx")]
    check("the other shims' entries are untouched (no new keys)", others and all(set(shims[n]) == SHIM_KEYS for n in others),
          [shims[n] for n in others if set(shims[n]) != SHIM_KEYS])
    same = stage_config(render({"shims": {"qemu": {"agent": {"httpsProxy": "", "noProxy": ""}, "containerd": {"forceGuestPull": False}}}}))[1]["data"]["config.yaml"]
    check("unset / empty / false values leave the stage configuration byte-identical (its hash: no node re-runs)", same == base_text)
    for where, values in [
        ("shims.qemu-tdx.agent.httpsProxy", {"shims": {"qemu-tdx": {"agent": {"httpsProxy": "http://a b:3128"}}}}),
        ("shims.qemu-tdx.agent.noProxy", {"shims": {"qemu-tdx": {"agent": {"noProxy": "10.0.0.0/8, .svc"}}}}),
        ("shims.qemu.agent.httpsProxy", {"shims": {"qemu": {"agent": {"httpsProxy": '"http://p:1"'}}}}),
        ("shims.qemu.agent.noProxy", {"shims": {"qemu": {"agent": {"noProxy": "a\tb"}}}}),
        ("customRuntimes.runtimes.c.agent.noProxy", {"customRuntimes": {"enabled": True, "runtimes": {"c": {"baseConfig": "qemu", "agent": {"noProxy": "it's"}}}}}),
    ]:
        err = render_err(values)
        check(f"{where}: a value the kernel command line cannot carry is refused naming the key",
              f"{where}=" in err and "kernel command line" in err and "agent." in err, err)
    # fc: off by default (the stage does not configure the devmapper snapshotter it needs).
    objs = render()
    check("fc: off by default (no RuntimeClass, no stage entry)", "kata-fc" not in rcs(objs)
          and "fc" not in [x["name"] for x in stage_config(objs)[0]["shims"]])
    with open(os.path.join(CHART, "values.yaml")) as f:
        vtext = f.read()
    check("values.yaml gives the reason next to fc's enabled: false",
          re.search(r"#[^\n]*devmapper[^\n]*\n(  #[^\n]*\n)*  fc:\n    enabled: false\n", vtext) is not None)
    for values, label in [({"shims": {"fc": {"enabled": True}}}, "enabled: true"),
                          ({"shims": {"disableAll": True, "fc": {"enabled": True}}}, "disableAll + enabled: true")]:
        objs = render(values)
        check(f"fc {label}: still installed (RuntimeClass and stage entry)", "kata-fc" in rcs(objs)
              and "fc" in [x["name"] for x in stage_config(objs)[0]["shims"]])
    notes = notes_of({"shims": {"fc": {"enabled": True, "containerd": {"snapshotter": "devmapper"}}}})
    check("fc enabled: NOTES says the devmapper snapshotter is not configured and where kata-fc pods start",
          "  - shims.fc.containerd.snapshotter=devmapper: the devmapper snapshotter Firecracker needs is not configured by the stage" in notes
          and "containerd uses devmapper as its default snapshotter" in notes, notes[-1200:])
    notes = notes_of(files=[os.path.join(FIXTURES, "upstream-4.x-job.values.yaml")])
    check("upstream's values (fc on, devmapper): fc off, and NOTES says so with how to turn it on",
          "  - shims.fc (upstream: on by default, snapshotter devmapper): off by default in this chart" in notes
          and "shims.fc.enabled=true" in notes, notes[-1200:])
    check("default values: no fc line in NOTES", "shims.fc" not in notes_of())
    # NFD: injected on the pure TEE classes only; a confidential-GPU class keeps only its own
    # runtimeClass.nodeSelector, also when a default label of it is cleared (upstream's chart).
    gpu = {"disableAll": True, "qemu-snp": {"enabled": True}, "qemu-tdx-runtime-rs": {"enabled": True}}
    for nfd in (True, False):
        objs = render({"nfd": {"enabled": nfd}, "shims": {**gpu,
            "qemu-nvidia-gpu-snp": {"enabled": True, "runtimeClass": {"nodeSelector": None}},
            "qemu-nvidia-gpu-tdx": {"enabled": True, "runtimeClass": {"nodeSelector": {"intel.feature.node.kubernetes.io/tdx": None}}}}})
        sel = {n: r["scheduling"]["nodeSelector"] for n, r in rcs(objs).items()}
        check(f"NFD {'on' if nfd else 'off'}: a confidential-GPU class whose default nodeSelector is cleared gets no feature label back",
              sel["kata-qemu-nvidia-gpu-snp"] == GATE and sel["kata-qemu-nvidia-gpu-tdx"] == {**GATE, "nvidia.com/cc.ready.state": "true"}, sel)
        pure = {**GATE, "amd.feature.node.kubernetes.io/snp": "true"} if nfd else GATE
        check(f"NFD {'on' if nfd else 'off'}: pure TEE classes {'get' if nfd else 'do not get'} the feature label",
              sel["kata-qemu-snp"] == pure and sel["kata-qemu-tdx-runtime-rs"] == ({**GATE, "intel.feature.node.kubernetes.io/tdx": "true"} if nfd else GATE), sel)
    objs = render({"nfd": {"enabled": True}, "shims": {"disableAll": True, "qemu-nvidia-gpu-snp": {"enabled": True}}})
    check("NFD on, defaults: the confidential-GPU class has exactly upstream's values selector",
          rcs(objs)["kata-qemu-nvidia-gpu-snp"]["scheduling"]["nodeSelector"]
          == {**GATE, "nvidia.com/cc.ready.state": "true", "amd.feature.node.kubernetes.io/snp": "true"})
guarded("upstream shim keys", t_upstream_shim_keys)
guarded("skip-installed", t_skip_installed)  # after notes_of is defined
guarded("taints", t_taints)

# ----------------------------------------------- the real stage binary parses the rendered config
def t_stage_parses():
    # The stage parses config.yaml with deny_unknown_fields: feed it what the chart renders.
    cands = [os.environ.get("KATA_STAGE_BIN", ""), os.path.join(os.environ["REPO"], "target/debug/kata-deploy-stage"),
             os.path.join(os.environ["REPO"], "target/x86_64-unknown-linux-musl/release/kata-deploy-stage")]
    stage = next((c for c in cands if c and os.access(c, os.X_OK)), None)
    if not check("a kata-deploy-stage binary to parse the rendered config (KATA_STAGE_BIN, or cargo build -p kata-deploy-stage)", stage, cands):
        return
    host, payload = tempfile.mkdtemp(dir=TMP), tempfile.mkdtemp(dir=TMP)
    matrix = [("default", None, []), ("try-kata-nvidia-gpu", None, [os.path.join(CHART, "try-kata-nvidia-gpu.values.yaml")]),
              ("try-kata-tee", None, [os.path.join(CHART, "try-kata-tee.values.yaml")]),
              ("suffix+custom runtime+restart none", {"env": {"multiInstallSuffix": "cicd", "debug": True}, "stage": {"restart": "none", "cri": "k3s"},
               "customRuntimes": {"enabled": True, "runtimes": {"my-gpu": {"baseConfig": "qemu-nvidia-gpu", "dropIn": "[hypervisor.qemu]\ndefault_memory = 1024\n"}}},
               "shims": {"qemu": {"allowedHypervisorAnnotations": ["kernel_params"], "dropIn": "[agent.kata]\ndial_timeout = 999\n"}}}, []),
              ("disableAll with a custom runtime only", {"shims": {"disableAll": True},
               "customRuntimes": {"enabled": True, "runtimes": {"solo": {"baseConfig": "qemu"}}}}, [])]
    matrix += [(f"fixture {fx}", None, [os.path.join(FIXTURES, fx)]) for fx in sorted(os.listdir(FIXTURES)) if fx.startswith("upstream-") and "daemonset" not in fx]
    unknown = []
    for shim in ALL_SHIMS:
        cfg = stage_config(render({"shims": {"disableAll": True, shim: {"enabled": True}}}))[1]["data"]["config.yaml"]
        path = os.path.join(TMP, f"one-{shim}.yaml")
        with open(path, "w") as f:
            f.write(cfg)
        p = subprocess.run([stage, "--config", path, "--host-root", host, "--payload", payload, "status"], capture_output=True, text=True)
        if "unknown shim" in p.stdout + p.stderr:
            unknown.append(shim)
    check("the stage binary accepts every shim name of upstream's list the chart renders", not unknown, f"refused: {unknown}")
    for name, values, files in matrix:
        cfg = stage_config(render(values, files=files))[1]["data"]["config.yaml"]
        path = os.path.join(TMP, "config.yaml")
        with open(path, "w") as f:
            f.write(cfg)
        p = subprocess.run([stage, "--config", path, "--host-root", host, "--payload", payload, "status"], capture_output=True, text=True)
        check(f"stage parses the rendered config ({name})", p.returncode == 0, (p.stdout + p.stderr)[-400:])
    # stage.hostMounts: precise: the chart mounts writable exactly what the stage says each host stage
    # writes (kata-deploy-stage writable-dirs; node-stages/tests/host_failures.rs proves that suffices).
    for cri in ["auto", "containerd", "crio", "k3s", "k3s-agent", "rke2", "k0s", "microk8s"]:
        for extra in ({}, {"env": {"multiInstallSuffix": "blue"}, "shims": {"disableAll": True, "qemu": {"enabled": True}}}):
            objs = render({**extra, "stage": {"cri": cri}})
            path = os.path.join(TMP, "config.yaml")
            with open(path, "w") as f:
                f.write(stage_config(objs)[1]["data"]["config.yaml"])
            p = subprocess.run([stage, "--config", path, "--host-root", host, "--payload", payload, "writable-dirs"], capture_output=True, text=True)
            want = json.loads(p.stdout) if p.returncode == 0 else p.stderr
            ij, cj, _ = templates(objs)
            got = {c["name"]: sorted(m["mountPath"][len("/host"):] for m in c["volumeMounts"] if m["mountPath"].startswith("/host/") and not m.get("readOnly"))
                   for j in (ij, cj) for c in j["spec"]["template"]["spec"]["initContainers"] + j["spec"]["template"]["spec"]["containers"]
                   if c["name"] in ("artifacts", "cri", "prune-artifacts", "revert-cri", "remove-artifacts")}
            check(f"stage.cri={cri}{' + suffix, no nydus' if extra else ''}: the chart's writable mounts are the stage's writable-dirs",
                  isinstance(want, dict) and got == {k: sorted(v) for k, v in want.items()}, (got, want))
guarded("stage parses config", t_stage_parses)

# --------------------------------------------------------------------------------------- NOTES
def chart_with_notes(name):
    # helm template does not render NOTES.txt: a scratch copy of the chart renders it into a
    # ConfigMap through tpl.
    import shutil
    copy = os.path.join(TMP, name)
    shutil.copytree(CHART, copy)
    shutil.copy(os.path.join(CHART, "templates", "NOTES.txt"), os.path.join(copy, "notes.txt"))
    with open(os.path.join(copy, "templates", "zz-notes.yaml"), "w") as f:
        f.write('apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    return copy

def t_notes():
    # helm template does not render NOTES.txt: render it through tpl from a scratch copy of the chart.
    copy = chart_with_notes("notes-chart")
    rc, out, err = helm("template", "kata-deploy", copy, "-n", "kata-system", "--kube-version", KUBE)
    notes = next((d["data"]["notes"] for d in yaml.safe_load_all(out) if d and d["metadata"]["name"] == "notes"), "") if rc == 0 else ""
    check("NOTES: how to follow the dispatcher logs", "kubectl -n kata-system logs -f job/kata-deploy-dispatch-install" in notes, err or notes)
    check("NOTES: how to list the per-node Jobs", "kubectl -n kata-system get jobs -l katacontainers.io/dispatcher=kata-deploy-install" in notes, notes)
    check("NOTES: how to re-run (adding nodes / failed dispatcher)", "helm upgrade kata-deploy" in notes and "--reuse-values" in notes, notes)
guarded("notes", t_notes)

def t_nulls():
    # `--set <key>=null` (Helm's "not set", the usual way to clear an upstream default) for every
    # key down to the second level of values.yaml and of the upstream values files users bring
    # (chart/fixtures), and the nested upstream keys users clear (affinity.nodeAffinity...): the
    # objects AND NOTES.txt render, or the install fails with a message naming that key. Never a
    # Go template error about a nil.
    import concurrent.futures
    copy = chart_with_notes("nulls-chart")
    import glob
    paths = {"affinity.nodeAffinity", "affinity.podAffinity", "affinity.podAntiAffinity",
             "job.nodeSelectorExpressions", "job.cleanup.nodeSelector", "job.cleanup.nodeAffinity",
             "verification.pod", "snapshotter.setup", "env.multiInstallSuffix"}
    for path in [os.path.join(CHART, "values.yaml")] + sorted(glob.glob(os.path.join(FIXTURES, "*.values.yaml"))):
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        for k, v in values.items():
            paths.add(k)
            paths.update(f"{k}.{k2}" for k2 in (v if isinstance(v, dict) else {}) if "." not in k2 and "/" not in k2)
    paths = sorted(paths)
    def render(path):
        rc, _, err = helm("template", "kata-deploy", copy, "-n", "kata-system", "--kube-version", KUBE, "--set", f"{path}=null")
        return path, rc, err
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(render, paths))
    bad = [(p, err.strip()[-300:]) for p, rc, err in results if rc != 0 and (p.split(".")[-1] not in err or "nil" in err)]
    check(f"every values key set to null ({len(paths)} keys): renders (objects and NOTES) or names the key", not bad, bad[:3])
guarded("nulls", t_nulls)

# ------------------------------------------------------- hack/wait-for-kata.sh (curl mode, fake API)
def t_wait():
    # A tiny fake API server: nodes (labelled or not), one failed Job, one pod with logs; token auth.
    import http.server, threading
    state = {"labelled": False}
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != "Bearer tok":
                self.send_response(401); self.end_headers(); return
            p = self.path
            if p.startswith("/api/v1/nodes?labelSelector=katacontainers.io/kata-runtime%3Dtrue"):
                body = {"items": [{"metadata": {"name": "n1"}}] if state["labelled"] else []}
            elif p == "/apis/batch/v1/namespaces/ns1/jobs":
                body = {"items": [{"metadata": {"name": "kd-install-n1", "annotations": {"katacontainers.io/node-name": "n1"}},
                                   "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}]}
            elif p == "/api/v1/namespaces/ns1/pods":
                body = {"items": [{"metadata": {"name": "kd-install-n1-x"}, "spec": {"initContainers": [{"name": "host-check"}],
                                   "containers": [{"name": "label"}]}, "status": {"phase": "Failed"}}]}
            elif p.startswith("/api/v1/namespaces/ns1/pods/kd-install-n1-x/log?container="):
                self.send_response(200); self.end_headers(); self.wfile.write(b"LOG " + p.split("container=")[1].split("&")[0].encode() + b"\n"); return
            else:
                self.send_response(404); self.end_headers(); return
            self.send_response(200); self.end_headers(); self.wfile.write(json.dumps(body).encode())
        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    kc = values_file({"apiVersion": "v1", "kind": "Config", "current-context": "x",
                      "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{srv.server_port}"}}],
                      "users": [{"name": "u", "user": {"token": "tok"}}], "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]})
    script = os.path.join(os.environ["REPO"], "hack", "wait-for-kata.sh")
    env = dict(os.environ, KUBECTL="none", KUBECONFIG=kc)
    run = lambda: subprocess.run([script, "-n", "ns1", "--timeout", "2", "--interval", "1"], capture_output=True, text=True, env=env)
    p = run()
    check("wait-for-kata: times out (exit 1) when no node is labelled", p.returncode == 1, p.returncode)
    check("wait-for-kata: dumps the Jobs, pods and every container's logs on timeout",
          "kd-install-n1: active=0 succeeded=0 failed=1 node=n1" in p.stdout and "LOG host-check" in p.stdout and "LOG label" in p.stdout, p.stdout)
    state["labelled"] = True
    p = run()
    check("wait-for-kata: exit 0 once a node carries katacontainers.io/kata-runtime=true", p.returncode == 0 and "n1" in p.stdout, p.stdout + p.stderr)
    srv.shutdown()
guarded("wait-for-kata", t_wait)

# ------------------------------------------- rollout controls (issue 23): per-node Job failure policy
def t_failure_policy():
    for kube, replacement in [("1.34.0", True), ("1.29.0", True), ("1.28.0", False)]:
        # Before 1.30 the chart needs nodeScopePolicy.enabled=false (no node-bound tokens).
        rc, out, err = helm("template", "kata-deploy", CHART, "--kube-version", kube, "--set", "nodeScopePolicy.enabled=false")
        check(f"renders for Kubernetes {kube}", rc == 0, err)
        ij, cj, _ = templates([d for d in yaml.safe_load_all(out) if d])
        for role, job in [("install", ij), ("cleanup", cj)]:
            rules = job["spec"].get("podFailurePolicy", {}).get("rules", [])
            check(f"{role} template (Kubernetes {kube}): an eviction (DisruptionTarget) is ignored first, exit code 2 fails the Job",
                  rules[:2] == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                                {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}], rules)
            check(f"{role} template (Kubernetes {kube}): podReplacementPolicy Failed {'set' if replacement else 'not set (field unknown before 1.29)'}",
                  job["spec"].get("podReplacementPolicy") == ("Failed" if replacement else None), job["spec"].get("podReplacementPolicy"))
guarded("per-node Job failure policy", t_failure_policy)

# ------------------------------------- rollout controls (issue 23): node state label and summary
def t_visibility():
    for suffix, key in [("", "katacontainers.io/kata-deploy-state"), ("blue", "katacontainers.io/kata-deploy-state-blue")]:
        objs = render({"env": {"multiInstallSuffix": suffix}, "job": {"nodeSelector": {"pool": "kata"}}})
        for role in ["install", "retire", "cleanup"]:
            a = args_of(dispatcher(objs, role))
            check(f"{role} dispatcher{' (suffix ' + suffix + ')' if suffix else ''}: --state-label {key}, summary under key {role} of kata-deploy-rollout",
                  flag_values(a, "--state-label") == [key] and flag_values(a, "--summary-configmap") == ["kata-deploy-rollout"]
                  and flag_values(a, "--summary-key") == [role], a)
        cm = one(objs, "ConfigMap", "kata-deploy-rollout")
        check("rollout ConfigMap: a regular resource with no data (helm never resets what the dispatchers wrote)",
              "data" not in cm and "helm.sh/hook" not in cm["metadata"].get("annotations", {}), cm)
        vap = find(render({"env": {"multiInstallSuffix": suffix}}, api_vap=True), "ValidatingAdmissionPolicy")
        rec = [p for p in vap if p["metadata"]["name"].endswith("-record-scope")][0]
        var = {v["name"]: v["expression"] for v in rec["spec"]["variables"]}
        check(f"record-scope policy: the dispatcher may set only {key}, to pending or failed",
              var.get("state") == json.dumps(key) and any("['pending', 'failed']" in v["expression"] for v in rec["spec"]["validations"]), var)
        notes = notes_of({"env": {"multiInstallSuffix": suffix}})
        check(f"NOTES print the node state and summary commands{' (suffix ' + suffix + ')' if suffix else ''}",
              f"kubectl get nodes -L {key}" in notes
              and "kubectl -n kata-system get configmap kata-deploy-rollout -o jsonpath='{.data.install}'" in notes, notes)
guarded("node state label and rollout summary", t_visibility)

# ------------------------------------- the Kata release image is the payload (issue 22)
def t_payload():
    def payload_images(objs):
        pod = templates(objs)[0]["spec"]["template"]["spec"]
        return {c["name"]: c["image"] for c in pod["initContainers"]}
    rel = "quay.io/kata-containers/kata-deploy"
    digest = "sha256:" + "ab" * 32
    for values, want_payload, what in [
        ({}, f"{rel}:4.1.0", "default: the official release image at the Kata version the chart targets"),
        ({"image": {"reference": rel, "tag": "3.32.0"}}, f"{rel}:3.32.0", "upstream's image.reference + image.tag select that release"),
        ({"image": {"reference": rel, "tag": ""}}, f"{rel}:4.1.0", "upstream's untagged image.reference: the chart's release"),
        ({"image": {"reference": "registry.example.com/mirror/kata-deploy", "tag": "4.0.0"}}, "registry.example.com/mirror/kata-deploy:4.0.0",
         "a mirror of the release image (last path part kata-deploy) is the release"),
        ({"payload": {"image": {"tag": "3.32.0"}}}, f"{rel}:3.32.0", "payload.image.tag"),
        ({"payload": {"image": {"digest": digest}}}, f"{rel}@{digest}", "payload.image.digest pins the image (wins over the tag)"),
        ({"image": {"reference": rel, "tag": "3.32.0"}, "payload": {"image": {"digest": digest}}}, f"{rel}@{digest}", "upstream's image.* with a digest pin"),
    ]:
        objs = render(values)
        imgs = payload_images(objs)
        check(f"payload: {what} -> {want_payload}",
              imgs["host-check"] == imgs["artifacts"] == imgs["prune-artifacts"] == want_payload
              and imgs["copy-stage"] == imgs["claim"] == imgs["cri"] == "quay.io/kata-containers/kata-deploy-stage:0.1.0", imgs)
        notes = notes_of(values)
        check(f"payload NOTES: {what}", f"Kata release installed on the nodes: {want_payload} " in notes, notes[:500])
    # Our own stage image's payload directory (air-gapped bundles, tests): no copy, no release image.
    objs = render({"payload": {"image": {"reference": ""}}})
    pod = templates(objs)[0]["spec"]["template"]["spec"]
    check("payload.image.reference='': the stage image's own /opt/kata-payload, no copy-stage, no emptyDir",
          [c["name"] for c in pod["initContainers"]] == ["host-check", "claim", "artifacts", "cri", "prune-artifacts"]
          and all(c["image"] == "quay.io/kata-containers/kata-deploy-stage:0.1.0" and "--payload" not in c["args"] for c in pod["initContainers"])
          and not any(v["name"] == "kata-stage" for v in pod["volumes"]), pod["initContainers"])
    check("payload.image.reference='': NOTES say the stage image's payload is installed",
          "the payload directory of the stage image quay.io/kata-containers/kata-deploy-stage:0.1.0" in notes_of({"payload": {"image": {"reference": ""}}}))
    objs = render({"image": {"reference": "registry.example.com/kata-deploy-stage", "tag": "t1"}})
    check("our stage image under image.* stays the stage image; the release is payload.image's",
          payload_images(objs)["copy-stage"] == "registry.example.com/kata-deploy-stage:t1" and payload_images(objs)["artifacts"] == f"{rel}:4.1.0",
          payload_images(objs))
    for bad in ["sha256:abc", "md5:" + "a" * 64, "ab" * 32]:
        err = render_err({"payload": {"image": {"digest": bad}}})
        check(f"schema refuses payload.image.digest={bad[:12]}...", "digest" in err, err)
    # A changed release re-runs every node: it is part of the per-node Job template.
    a = templates(render({}))[2]["data"]["install-job.yaml"]
    b = templates(render({"payload": {"image": {"tag": "4.1.1"}}}))[2]["data"]["install-job.yaml"]
    check("a new payload.image changes the per-node Job template (the dispatcher re-runs every node)", a != b)
guarded("the Kata release image is the payload", t_payload)

# --------------------------------------------------------------- rollout controls (issue 23): canary
def t_canary():
    for values, want in [(None, "auto"), ({"job": {"canary": 0}}, "0"), ({"job": {"canary": 3}}, "3"), ({"job": {"canary": "auto"}}, "auto")]:
        objs = render(values)
        check(f"install dispatcher: --canary {want} for job.canary={values and values['job']['canary']}",
              flag_values(args_of(dispatcher(objs, "install")), "--canary") == [want], args_of(dispatcher(objs, "install")))
    objs = render({"job": {"nodeSelector": {"pool": "kata"}}})
    for role in ["retire", "cleanup"]:
        check(f"{role} dispatcher: no canary (uninstall reaches every node)", "--canary" not in args_of(dispatcher(objs, role)))
    for bad in [-1, "sometimes", 1.5]:
        check(f"schema refuses job.canary={bad!r}", render_err({"job": {"canary": bad}}) != "")
guarded("canary", t_canary)

# ------------------------------------------------------- rollout controls (issue 23): startupTaints
def t_startup_taints():
    objs = render({"startupTaints": ["example.com/kata-not-ready:NoSchedule", "b=1"]}, api_vap=True)
    cfg, _ = stage_config(objs)
    check("startupTaints reach the stage configuration verbatim", cfg.get("startupTaints") == ["example.com/kata-not-ready:NoSchedule", "b=1"], cfg.get("startupTaints"))
    ij, cj, _ = templates(objs)
    tol = ij["spec"]["template"]["spec"]["tolerations"]
    check("install Jobs tolerate the startup taints (they lift them)",
          {"key": "example.com/kata-not-ready", "operator": "Exists", "effect": "NoSchedule"} in tol
          and {"key": "b", "operator": "Exists"} in tol and tol[:len(DS_TOLERATIONS)] == DS_TOLERATIONS, tol)
    pol = [p for p in find(objs, "ValidatingAdmissionPolicy") if p["metadata"]["name"].endswith("-node-scope")][0]
    var = {v["name"]: v["expression"] for v in pol["spec"]["variables"]}
    check("node-scope policy: the startup taints as a CEL list, and a taint rule that removes only them",
          json.loads(var.get("startup", "[]")) == [{"key": "example.com/kata-not-ready", "effect": "NoSchedule", "value": "", "hasValue": "false"},
                                                   {"key": "b", "effect": "", "value": "1", "hasValue": "true"}]
          and any("variables.startup.exists" in v["expression"] for v in pol["spec"]["validations"]), var)
    cfg, _ = stage_config(render())
    pol = [p for p in find(render(api_vap=True), "ValidatingAdmissionPolicy") if p["metadata"]["name"].endswith("-node-scope")][0]
    check("no startupTaints: nothing in the stage configuration, the spec stays frozen",
          "startupTaints" not in cfg and any(v["expression"] == "object.spec == oldObject.spec" for v in pol["spec"]["validations"]), pol["spec"]["validations"])
    for bad in ["k:Sometimes", ":NoSchedule", "a b"]:
        err = render_err({"startupTaints": [bad]})
        check(f"startupTaints {bad!r} refused naming the form", "key[=value][:Effect]" in err, err)
guarded("startupTaints", t_startup_taints)

# --------------------------------------------------- rollout controls (issue 23): reconcile CronJob
def t_reconcile():
    objs = render()
    check("reconcile: no CronJob unless job.reconcile.schedule is set", not find(objs, "CronJob"))
    check("reconcile off: the cleanup removes no CronJob and the dispatcher may delete none",
          "--remove-cronjob" not in args_of(dispatcher(objs, "cleanup"))
          and not any("cronjobs" in r["resources"] for r in one(objs, "Role", "kata-deploy-dispatcher")["rules"]))
    objs = render({"job": {"reconcile": {"schedule": "*/15 * * * *"}, "nodeSelector": {"pool": "kata"}}})
    cj = one(objs, "CronJob", "kata-deploy-reconcile")
    spec = cj["spec"]
    check("reconcile: the schedule, concurrencyPolicy Forbid, bounded history",
          spec["schedule"] == "*/15 * * * *" and spec["concurrencyPolicy"] == "Forbid"
          and spec["successfulJobsHistoryLimit"] == 1 and spec["failedJobsHistoryLimit"] == 1, spec)
    job = spec["jobTemplate"]
    a = job["spec"]["template"]["spec"]["containers"][0]["args"]
    inst = args_of(dispatcher(objs, "install"))
    same = ["--template", "--name-prefix", "--selector", "--installed-label", "--expect-handler", "--canary", "--state-label", "--summary-configmap"]
    check("reconcile: the install dispatcher's template, prefix, selection and skip rule (the release's current template)",
          all(flag_values(a, f) == flag_values(inst, f) for f in same) and "--skip-installed" in a, a)
    a2 = one(render({"job": {"reconcile": {"schedule": "@hourly"}, "reinstallAll": True}}), "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    check("reconcile: no --reinstall-all even with job.reinstallAll, no --require-nodes", "--reinstall-all" not in a2 and "--require-nodes" not in a2, a2)
    check("reconcile: yields to an active hook run of the release, its summary key is reconcile, no fixed owner name",
          flag_values(a, "--yield-to") == ["app.kubernetes.io/instance=kata-deploy,katacontainers.io/dispatcher-role in (install,retire,cleanup)"]
          and flag_values(a, "--summary-key") == ["reconcile"] and "--owner-job" not in a, a)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    check("reconcile: the owner is the CronJob's Job, read from the pod's job-name label",
          env.get("DISPATCHER_OWNER_JOB", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.labels['batch.kubernetes.io/job-name']", env)
    check("reconcile: its Jobs carry dispatcher-role=reconcile (what the hooks stop)",
          job["metadata"]["labels"].get("katacontainers.io/dispatcher-role") == "reconcile"
          and "helm.sh/hook" not in job["metadata"].get("annotations", {}), job["metadata"])
    for role in ["install", "retire", "cleanup"]:
        check(f"{role} hook: first stops the release's reconcile runs",
              flag_values(args_of(dispatcher(objs, role)), "--supersede-runs") == ["app.kubernetes.io/instance=kata-deploy,katacontainers.io/dispatcher-role in (reconcile)"])
    check("cleanup: removes the reconcile CronJob first, and only that one may be deleted",
          flag_values(args_of(dispatcher(objs, "cleanup")), "--remove-cronjob") == ["kata-deploy-reconcile"]
          and {"apiGroups": ["batch"], "resources": ["cronjobs"], "resourceNames": ["kata-deploy-reconcile"], "verbs": ["delete"]}
              in one(objs, "Role", "kata-deploy-dispatcher")["rules"], one(objs, "Role", "kata-deploy-dispatcher")["rules"])
    check("schema refuses an unknown job.reconcile key", render_err({"job": {"reconcile": {"every": "5m"}}}) != "")
    notes = notes_of({"job": {"reconcile": {"schedule": "*/15 * * * *"}}})
    check("NOTES with reconcile: how to run it now and read its summary",
          "kubectl -n kata-system create job --from=cronjob/kata-deploy-reconcile" in notes and "{.data.reconcile}" in notes, notes)
    check("NOTES without reconcile: say nothing watches for new nodes", "set job.reconcile.schedule" in notes_of(), "")
guarded("reconcile CronJob", t_reconcile)

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
