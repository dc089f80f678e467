//! End to end: `helm install` of the real chart on the test bed. The real dispatcher (as its
//! ServiceAccount) creates per-node Jobs; on local nodes `kata-local-kubelet` runs the real stage
//! binary against fake host roots; simulated nodes complete through kwok.

use anyhow::{bail, Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kata_testbed::cluster::{repo_root, wait_until, SimNode, TestCluster};
use kata_testbed::hostroot::snapshot;
use kata_testbed::local_kubelet::LOCAL_LABEL;
use kube::api::{Api, ListParams, Patch, PatchParams};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

mod common;
use common::{labels_of, mtimes, nodes_as, Bed, KATA_LABEL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_upgrade_uninstall_on_local_and_simulated_nodes() -> Result<()> {
    let bed = Bed::start("e2e", 2).await?;
    let (cluster, ns, hosts, local, group, nodes) = (
        &bed.cluster,
        &bed.ns,
        &bed.hosts,
        &bed.local,
        &bed.group,
        &bed.nodes,
    );
    let ns = ns.clone();
    let sim_spec = SimNode {
        labels: group.clone(),
        ..Default::default()
    };
    let sim = cluster.sim_nodes(&format!("{ns}-s"), 2, &sim_spec).await?;
    // Install Jobs follow DaemonSet taint rules: sim_nodes lifts the not-ready taint once a node
    // is Ready, as the node-lifecycle controller (not run by the test bed) would.
    let original: Vec<_> = local
        .iter()
        .map(|n| snapshot(&hosts.join(n)))
        .collect::<Result<_>>()?;

    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let group_sel = format!("job.nodeSelector.kata-test/group={ns}");
    // The default uninstall selection (kata-runtime OR this install's claim/state labels) would
    // also take the Kata nodes of the tests running beside this one (the shared kata-runtime
    // label), whose kubelets may be gone by then: the uninstall then hangs on their pods.
    let cleanup_sel = format!("job.cleanup.nodeSelector.kata-test/group={ns}");
    // Tests share one cluster: the hook pods must land on this test's local nodes.
    let dispatcher_on = format!(
        "job.dispatcher.nodeSelector.{}={ns}",
        LOCAL_LABEL.replace('.', "\\.")
    );
    let common = [
        "--namespace",
        &ns,
        "--set",
        "stage.restart=none",
        "--set",
        "job.parallelism=2",
        // Install Jobs follow DaemonSet taint rules: the simulated nodes' kwok taint must be
        // tolerated for them to get their Job (cleanup and retire tolerate every taint anyway).
        "--set",
        "job.nodeJobs.tolerations[0].key=kwok.x-k8s.io/node",
        "--set",
        "job.nodeJobs.tolerations[0].operator=Exists",
        "--set-string",
        &group_sel,
        "--set-string",
        &cleanup_sel,
        "--set-string",
        &dispatcher_on,
        "--set",
        "shims.disableAll=true",
        "--set",
        "shims.qemu.enabled=true",
        "--set",
        "shims.qemu-runtime-rs.enabled=true",
        "--wait",
        "--timeout",
        "4m",
    ];

    // --- install ---
    let mut args = vec!["install", "kata-deploy", chart];
    args.extend(common);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "helm install failed: {out}");
    for n in local.iter() {
        let l = labels_of(&nodes.get(n).await?);
        assert_eq!(
            l.get(KATA_LABEL).map(String::as_str),
            Some("true"),
            "{n} labelled: {l:?}"
        );
        let root = hosts.join(n);
        assert!(
            root.join("opt/kata/bin/containerd-shim-kata-v2").is_file(),
            "{n}: payload installed"
        );
        assert_ne!(snapshot(&root)?.get("etc/containerd/config.toml"), None);
    }
    for n in &sim {
        assert!(
            !labels_of(&nodes.get(n).await?).contains_key(KATA_LABEL),
            "simulated nodes run no stage"
        );
    }
    let rcs: Api<RuntimeClass> = Api::all(cluster.client.clone());
    assert_eq!(rcs.get("kata-qemu").await?.handler, "kata-qemu");
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &ns);
    let per_node = jobs
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/managed-by=kata-deploy-job-dispatcher"),
        )
        .await?;
    if per_node.items.len() != 4 {
        // The dispatcher's per-node results are Events on the Nodes (its pod is gone with the hook).
        let events: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(cluster.client.clone(), "default");
        let report: Vec<String> = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| {
                e.reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("KataDeploy"))
            })
            .map(|e| {
                format!(
                    "{}: {} {}",
                    e.involved_object.name.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default()
                )
            })
            .collect();
        let names: Vec<_> = per_node
            .items
            .iter()
            .map(|j| j.metadata.name.clone().unwrap_or_default())
            .collect();
        panic!(
            "one Job per selected node: {names:?}; the dispatcher's node events:\n{}",
            report.join("\n")
        );
    }
    // The per-node pods as the API server admitted them: no automatic token volume, and the token
    // only in the containers that patch the Node (claim, label), which see nothing of the host.
    let stage_pods = Api::<Pod>::namespaced(cluster.client.clone(), &ns)
        .list(&ListParams::default().labels("katacontainers.io/stages=install"))
        .await?;
    assert!(!stage_pods.items.is_empty(), "per-node pods exist");
    for p in &stage_pods.items {
        let spec = p.spec.as_ref().context("pod spec")?;
        let vols: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert!(
            !vols.iter().any(|v| v.starts_with("kube-api-access")),
            "no automatic token volume: {vols:?}"
        );
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            let token = c
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount");
            let host = c
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == "/host");
            assert_eq!(
                token,
                c.name == "claim" || c.name == "label",
                "{}: token mounted only where the Node is patched",
                c.name
            );
            assert!(
                !(token && host),
                "{}: no container holds both a token and the host",
                c.name
            );
        }
    }

    // --- the admission policy: a per-node token may change only its own Node's kata labels ---
    let node_sa = Api::<ServiceAccount>::namespaced(cluster.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|sa| sa.metadata.name)
        .find(|n| n.ends_with("-node"))
        .context("the chart's per-node ServiceAccount")?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    let as_node = nodes_as(cluster, &ns, &node_sa, "token-probe", &sim[0]).await?;
    let label = |k: &str| serde_json::json!({"metadata": {"labels": {k: "true"}}});
    let own = as_node
        .patch(
            &sim[0],
            &PatchParams::default(),
            &Patch::Merge(label(KATA_LABEL)),
        )
        .await;
    assert!(own.is_ok(), "own node, kata label: {own:?}");
    let other = as_node
        .patch(
            &sim[1],
            &PatchParams::default(),
            &Patch::Merge(label(KATA_LABEL)),
        )
        .await;
    assert!(
        matches!(&other, Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422),
        "another node must be refused: {other:?}"
    );
    let foreign = as_node
        .patch(
            &sim[0],
            &PatchParams::default(),
            &Patch::Merge(label("example.com/other")),
        )
        .await;
    assert!(
        matches!(&foreign, Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422),
        "non-kata label must be refused: {foreign:?}"
    );
    let remove = serde_json::json!({"metadata": {"labels": {KATA_LABEL: null}}});
    nodes
        .patch(&sim[0], &PatchParams::default(), &Patch::Merge(remove))
        .await?;

    // --- the dispatcher's token may change only this release's install record on a Node ---
    let record = "katacontainers.io/installed-by-kata-deploy-install";
    for n in local.iter() {
        let a = nodes.get(n).await?.metadata.annotations.unwrap_or_default();
        assert!(
            a.get(record).is_some_and(|h| !h.is_empty()),
            "{n}: the dispatcher's record passed the admission policy: {a:?}"
        );
    }
    let dispatcher_sa = "kata-deploy-dispatcher";
    let as_dispatcher = nodes_as(cluster, &ns, dispatcher_sa, "dispatcher-probe", &sim[0]).await?;
    let annotate =
        |k: &str, v: Option<&str>| serde_json::json!({"metadata": {"annotations": {k: v}}});
    let set = as_dispatcher
        .patch(
            &sim[1],
            &PatchParams::default(),
            &Patch::Merge(annotate(record, Some("h"))),
        )
        .await;
    assert!(set.is_ok(), "its own record: {set:?}");
    let unset = as_dispatcher
        .patch(
            &sim[1],
            &PatchParams::default(),
            &Patch::Merge(annotate(record, None)),
        )
        .await;
    assert!(unset.is_ok(), "removing its own record: {unset:?}");
    for (what, patch) in [
        ("a label", label(KATA_LABEL)),
        (
            "another annotation",
            annotate("katacontainers.io/installed-by-other-install", Some("h")),
        ),
        (
            "the spec",
            serde_json::json!({"spec": {"unschedulable": true}}),
        ),
    ] {
        let r = as_dispatcher
            .patch(&sim[1], &PatchParams::default(), &Patch::Merge(patch))
            .await;
        assert!(
            matches!(&r, Err(kube::Error::Api(s)) if (s.code == 403 || s.code == 422) && s.message.contains(record)),
            "the dispatcher must not change {what}: {r:?}"
        );
    }

    // --- upgrade after adding a node: only the new node does real work ---
    let before: Vec<_> = local
        .iter()
        .map(|n| mtimes(&hosts.join(n)))
        .collect::<Result<_>>()?;
    let added = cluster
        .local_nodes(&format!("{ns}-n"), 1, hosts, &ns, group)
        .await?;
    let added_original = snapshot(&hosts.join(&added[0]))?;
    let mut args = vec!["upgrade", "kata-deploy", chart, "--reuse-values"];
    args.extend(common);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "helm upgrade failed: {out}");
    assert_eq!(
        labels_of(&nodes.get(&added[0]).await?)
            .get(KATA_LABEL)
            .map(String::as_str),
        Some("true")
    );
    for (n, b) in local.iter().zip(&before) {
        assert_eq!(
            &mtimes(&hosts.join(n))?,
            b,
            "{n}: an installed node must see no write on upgrade"
        );
    }

    // --- upgrade that narrows the selection: the node that falls out is cleaned (retire) ---
    let retire_label = serde_json::json!({"metadata": {"labels": {"kata-test/retire": "yes"}}});
    nodes
        .patch(
            &local[1],
            &PatchParams::default(),
            &Patch::Merge(retire_label),
        )
        .await?;
    let kept_before = mtimes(&hosts.join(&local[0]))?;
    let mut args = vec![
        "upgrade",
        "kata-deploy",
        chart,
        "--reuse-values",
        "--set",
        "job.nodeSelectorExpressions[0].key=kata-test/retire",
        "--set",
        "job.nodeSelectorExpressions[0].operator=DoesNotExist",
    ];
    args.extend(common);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "helm upgrade (narrowed selection) failed: {out}");
    assert_eq!(
        &snapshot(&hosts.join(&local[1]))?,
        &original[1],
        "{}: the node left out of the selection is restored byte for byte",
        local[1]
    );
    let retired = nodes.get(&local[1]).await?;
    let l = labels_of(&retired);
    assert!(
        !l.keys().any(|k| k.starts_with("katacontainers.io/")),
        "{}: kata labels removed: {l:?}",
        local[1]
    );
    assert!(
        !retired
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(record),
        "{}: install record removed, so selecting it again installs it again",
        local[1]
    );
    assert_eq!(
        mtimes(&hosts.join(&local[0]))?,
        kept_before,
        "{}: still selected, untouched",
        local[0]
    );
    assert_eq!(
        labels_of(&nodes.get(&local[0]).await?)
            .get(KATA_LABEL)
            .map(String::as_str),
        Some("true")
    );

    // --- uninstall: every host back to its original bytes, labels, Jobs and RBAC gone ---
    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "kata-deploy",
            "--namespace",
            &ns,
            "--wait",
            "--timeout",
            "4m",
        ])
        .await?;
    assert!(ok, "helm uninstall failed: {out}");
    let all_local: Vec<&String> = local.iter().chain(&added).collect();
    let originals: Vec<&BTreeMap<String, String>> =
        original.iter().chain([&added_original]).collect();
    for (n, orig) in all_local.iter().zip(originals) {
        assert_eq!(
            &snapshot(&hosts.join(n))?,
            orig,
            "{n}: host restored byte for byte"
        );
        let l = labels_of(&nodes.get(n).await?);
        assert!(
            !l.keys().any(|k| k.starts_with("katacontainers.io/")),
            "{n}: kata labels removed: {l:?}"
        );
    }
    // Hook Jobs go with the uninstall; their per-node Jobs follow through garbage collection.
    wait_until(
        Duration::from_secs(60),
        "no Job left behind after uninstall",
        || async { Ok(jobs.list(&ListParams::default()).await?.items.is_empty()) },
    )
    .await?;
    let crs: Api<ClusterRole> = Api::all(cluster.client.clone());
    let left: Vec<String> = crs
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .filter(|n| n.starts_with(&ns))
        .collect();
    assert!(left.is_empty(), "no RBAC left behind: {left:?}");
    assert!(
        rcs.get_opt("kata-qemu").await?.is_none(),
        "RuntimeClasses removed"
    );

    // --- a node whose stage fails makes helm install fail and is named ---
    std::fs::remove_file(hosts.join(&local[1]).join("dev/kvm"))?;
    let mut args = vec!["install", "kata-deploy", chart];
    args.extend(common);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(!ok, "install must fail when a node cannot take Kata: {out}");
    let dispatchers = pods
        .list(&ListParams::default().labels("katacontainers.io/dispatcher-role=install"))
        .await?;
    let message: String = dispatchers
        .items
        .iter()
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
        })
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .collect();
    assert!(
        message.contains(&local[1]) && message.contains("kvm"),
        "the dispatcher's termination message names the node and why: {message:?}"
    );
    assert!(
        !message.contains(&format!("{}:", local[0])),
        "the healthy node is not reported failed: {message}"
    );
    cluster
        .run_helm(&[
            "uninstall",
            "kata-deploy",
            "--namespace",
            &ns,
            "--wait",
            "--timeout",
            "4m",
        ])
        .await?;
    bed.kubelet.shutdown().await;
    Ok(())
}

/// A stand-in for an upstream kata-deploy release: a chart named kata-deploy whose values are one of
/// our upstream-shaped fixtures (so `helm upgrade --reuse-values` to this chart sees exactly what it
/// would see over upstream), with upstream 4.x's identity record and, in DaemonSet mode, a
/// DaemonSet like upstream's (inert: it selects no node).
fn upstream_chart(dir: &Path, fixture: &str) -> Result<std::path::PathBuf> {
    let chart = dir.join("kata-deploy");
    std::fs::create_dir_all(chart.join("templates"))?;
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: kata-deploy\nversion: 3.32.0\nappVersion: \"3.32.0\"\n",
    )?;
    std::fs::copy(
        repo_root().join("chart/fixtures").join(fixture),
        chart.join("values.yaml"),
    )?;
    // 4.x records its identity; 3.32 has only its job-templates ConfigMap named after the suffix.
    let (record, content) = if fixture.contains("3.32") {
        (
            "templates/job-templates.yaml",
            "{{- if eq .Values.deploymentMode \"job\" }}\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  \
             name: kata-deploy{{ with .Values.env.multiInstallSuffix }}-{{ . }}{{ end }}-job-templates\ndata: {}\n{{- end }}\n",
        )
    } else {
        (
            "templates/state.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ printf \"%s-kata-deploy-state\" .Release.Name }}\ndata:\n  \
             multiInstallSuffix: {{ .Values.env.multiInstallSuffix | default \"\" | quote }}\n  deploymentMode: {{ .Values.deploymentMode | quote }}\n",
        )
    };
    std::fs::write(chart.join(record), content)?;
    std::fs::write(
        chart.join("templates/daemonset.yaml"),
        "{{- if eq .Values.deploymentMode \"daemonset\" }}\napiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: kata-deploy{{ with .Values.env.multiInstallSuffix }}-{{ . }}{{ end }}\n\
         spec:\n  selector: {matchLabels: {name: kata-deploy}}\n  template:\n    metadata: {labels: {name: kata-deploy}}\n    spec:\n      \
         nodeSelector: {kata-test/none: none}\n      containers: [{name: kata-deploy, image: quay.io/kata-containers/kata-deploy}]\n{{- end }}\n",
    )?;
    Ok(chart)
}

/// The termination messages of a release's install dispatcher pods (what failed, per node).
async fn dispatcher_message(cluster: &TestCluster, ns: &str, release: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let sel =
        format!("katacontainers.io/dispatcher-role=install,app.kubernetes.io/instance={release}");
    Ok(pods
        .list(&ListParams::default().labels(&sel))
        .await?
        .items
        .iter()
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
        })
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .collect())
}

async fn release_revision(cluster: &TestCluster, ns: &str, release: &str) -> Result<String> {
    let (ok, out) = cluster
        .run_helm(&[
            "history",
            release,
            "--namespace",
            ns,
            "--max",
            "1",
            "-o",
            "json",
        ])
        .await?;
    if !ok {
        bail!("helm history {release}: {out}");
    }
    let v: serde_json::Value = serde_json::from_str(
        out.lines()
            .find(|l| l.starts_with('['))
            .context("helm history JSON")?,
    )?;
    Ok(format!("{}/{}", v[0]["revision"], v[0]["status"]))
}

/// Switching from upstream: an empty selection fails naming the selector; a release installed with
/// upstream-shaped values (upstream CI's shape) is taken over with `helm upgrade --reuse-values`;
/// the suffix cannot change on upgrade; a DaemonSet-mode release is refused with the steps, which
/// then work. Real helm, real API server, real stage binary on local nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_release_switch_identity_and_empty_selection() -> Result<()> {
    let bed = Bed::start("upstream", 1).await?;
    let (cluster, ns) = (&bed.cluster, bed.ns.as_str());
    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let scope = bed.scope();
    let scope: Vec<&str> = scope.iter().map(String::as_str).collect();
    let scratch = tempfile::tempdir()?;
    // Suffixes unique to this run: RuntimeClasses are cluster-scoped and handlers must be unique.
    let up = ns.replace("upstream-", "u");
    let dsx = ns.replace("upstream-", "d");
    let few = [
        "--set",
        "shims.disableAll=true",
        "--set",
        "shims.qemu.enabled=true",
        "--wait",
        "--timeout",
        "3m",
    ];

    // --- 1. an install that selects no node fails, naming the selector ---
    let none = format!("job.nodeSelector.kata-test/absent={ns}");
    let mut args = vec![
        "install",
        "empty",
        chart,
        "--set",
        "env.multiInstallSuffix=e0",
    ];
    args.extend(&scope);
    args.extend(["--set-string", &none]);
    args.extend(few);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(!ok, "an install selecting no node must fail: {out}");
    let msg = dispatcher_message(cluster, ns, "empty").await?;
    assert!(
        msg.contains("kata-test/absent") && msg.contains("!node-role.kubernetes.io/control-plane"),
        "the failure names the selector and the control-plane default: {msg:?}"
    );
    cluster
        .run_helm(&[
            "uninstall",
            "empty",
            "--namespace",
            ns,
            "--wait",
            "--timeout",
            "2m",
        ])
        .await?;
    // The explicit opt-out keeps an empty selection a successful no-op.
    args.extend(["--set", "job.requireNodes=false"]);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(
        ok,
        "job.requireNodes=false: an empty selection is a no-op: {out}"
    );
    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "empty",
            "--namespace",
            ns,
            "--wait",
            "--timeout",
            "2m",
        ])
        .await?;
    assert!(ok, "{out}");

    // --- 2. take over a release installed with upstream-shaped values (upstream CI's base shape) ---
    let up_chart = upstream_chart(&scratch.path().join("job"), "upstream-4.x-job.values.yaml")?;
    let ci = repo_root().join("chart/fixtures/upstream-ci-base.values.yaml");
    let set_up = format!("env.multiInstallSuffix={up}");
    let (ok, out) = cluster
        .run_helm(&[
            "install",
            "kd",
            up_chart.to_str().unwrap(),
            "--namespace",
            ns,
            "-f",
            ci.to_str().unwrap(),
            "--set",
            &set_up,
            // As upstream CI does on runtimes without per-runtime snapshotters (the local nodes report containerd 1.6).
            "--set",
            "shims.qemu-coco-dev.containerd.snapshotter=",
            "--set",
            "shims.qemu-coco-dev.crio.guestPull=false",
        ])
        .await?;
    assert!(ok, "stand-in upstream release: {out}");
    // Upstream CI's image is upstream's kata-deploy image: point at ours (the one thing a user must change), plus the test-bed scope.
    let mut args = vec![
        "upgrade",
        "kd",
        chart,
        "--reuse-values",
        "--set",
        "image.reference=quay.io/kata-containers/kata-deploy-stage",
        "--set",
        "image.tag=",
    ];
    args.extend(&scope);
    args.extend(["--wait", "--timeout", "4m"]);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(
        ok,
        "helm upgrade --reuse-values over upstream-shaped values: {out}\ndispatcher: {}",
        dispatcher_message(cluster, ns, "kd").await?
    );
    assert!(
        out.contains("NO effect"),
        "NOTES lists what has no effect: {out}"
    );
    let node = bed.nodes.get(&bed.local[0]).await?;
    let l = labels_of(&node);
    assert_eq!(
        l.get(&format!("katacontainers.io/kata-deploy-installed-{up}"))
            .map(String::as_str),
        Some("true"),
        "installed with the recorded suffix: {l:?}"
    );
    let rcs: Api<RuntimeClass> = Api::all(cluster.client.clone());
    let rc = rcs.get(&format!("kata-qemu-coco-dev-{up}")).await?;
    assert_eq!(rc.handler, format!("kata-qemu-coco-dev-{up}"));
    let sel = rc
        .scheduling
        .and_then(|s| s.node_selector)
        .unwrap_or_default();
    assert_eq!(
        sel.get(&format!("katacontainers.io/kata-deploy-installed-{up}"))
            .map(String::as_str),
        Some("true"),
        "class selects this install's marker: {sel:?}"
    );
    assert!(
        rcs.get_opt("kata").await?.is_none(),
        "createDefault is not applied with a suffix (NOTES says so)"
    );
    assert!(
        bed.hosts
            .join(&bed.local[0])
            .join(format!("opt/kata-{up}/bin/containerd-shim-kata-v2"))
            .is_file(),
        "payload under the suffixed prefix"
    );
    // Handlers are unique across installs: a second release with the same suffix is refused by name.
    let mut args = vec![
        "install",
        "kd2",
        chart,
        "--set",
        &set_up,
        "--set",
        "shims.disableAll=true",
        "--set",
        "shims.qemu-coco-dev.enabled=true",
    ];
    args.extend(&scope);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(
        !ok && out.contains("handlers must be unique across installs")
            && out.contains(&format!("kata-qemu-coco-dev-{up}")),
        "a second install reusing a handler must be refused: {out}"
    );

    // --- 3. the suffix cannot change on upgrade; nothing is touched ---
    let before = release_revision(cluster, ns, "kd").await?;
    let mut args = vec![
        "upgrade",
        "kd",
        chart,
        "--reuse-values",
        "--set",
        "env.multiInstallSuffix=other",
    ];
    args.extend(&scope);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(
        !ok && out.contains("env.multiInstallSuffix cannot change")
            && out.contains(&format!("\"{up}\""))
            && out.contains("\"other\""),
        "suffix change refused: {out}"
    );
    assert_eq!(
        release_revision(cluster, ns, "kd").await?,
        before,
        "a refused upgrade leaves the release as it was"
    );
    // The same upgrade without the change is fine (reuse again, idempotent).
    let mut args = vec!["upgrade", "kd", chart, "--reuse-values"];
    args.extend(&scope);
    args.extend(["--wait", "--timeout", "4m"]);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "second --reuse-values upgrade: {out}");
    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "kd",
            "--namespace",
            ns,
            "--wait",
            "--timeout",
            "4m",
        ])
        .await?;
    assert!(ok, "{out}");
    let l = labels_of(&bed.nodes.get(&bed.local[0]).await?);
    assert!(
        !l.keys().any(|k| k.starts_with("katacontainers.io/")),
        "uninstall removed this install's labels: {l:?}"
    );

    // --- 3b. a 3.32 job-mode release records no identity: its job-templates ConfigMap says it ---
    let old_chart = upstream_chart(&scratch.path().join("old"), "upstream-3.32-job.values.yaml")?;
    let set_old = format!("env.multiInstallSuffix={up}o");
    let (ok, out) = cluster
        .run_helm(&[
            "install",
            "kd3",
            old_chart.to_str().unwrap(),
            "--namespace",
            ns,
            "--set",
            &set_old,
        ])
        .await?;
    assert!(ok, "stand-in upstream 3.32 release: {out}");
    let mut args = vec![
        "upgrade",
        "kd3",
        chart,
        "--reuse-values",
        "--set",
        "env.multiInstallSuffix=changed",
    ];
    args.extend(&scope);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(
        !ok && out.contains("env.multiInstallSuffix cannot change")
            && out.contains(&format!("\"{up}o\"")),
        "suffix change over a 3.32 release refused: {out}"
    );
    let (ok, out) = cluster
        .run_helm(&["uninstall", "kd3", "--namespace", ns, "--no-hooks"])
        .await?;
    assert!(ok, "{out}");

    // --- 4. an upstream DaemonSet-mode release: refused with the steps, which then work ---
    let ds_chart = upstream_chart(
        &scratch.path().join("ds"),
        "upstream-4.x-daemonset.values.yaml",
    )?;
    let (ok, out) = cluster
        .run_helm(&[
            "install",
            "dsrel",
            ds_chart.to_str().unwrap(),
            "--namespace",
            ns,
            "--set",
            &format!("env.multiInstallSuffix={dsx}"),
        ])
        .await?;
    assert!(ok, "stand-in upstream DaemonSet release: {out}");
    let before = release_revision(cluster, ns, "dsrel").await?;
    for extra in [&[][..], &["--set", "deploymentMode=job"][..]] {
        let mut args = vec!["upgrade", "dsrel", chart, "--reuse-values"];
        args.extend(extra);
        args.extend(&scope);
        let (ok, out) = cluster.run_helm(&args).await?;
        assert!(
            !ok,
            "an in-place upgrade of a DaemonSet-mode release must be refused ({extra:?}): {out}"
        );
        for step in [
            "helm get values dsrel",
            "helm uninstall dsrel",
            "kubectl get nodes -l katacontainers.io/kata-runtime",
            "--set deploymentMode=job",
        ] {
            assert!(
                out.contains(step),
                "the refusal gives the step {step:?} ({extra:?}): {out}"
            );
        }
    }
    assert_eq!(
        release_revision(cluster, ns, "dsrel").await?,
        before,
        "refused upgrades leave the DaemonSet release as it was"
    );
    let ds: Api<k8s_openapi::api::apps::v1::DaemonSet> =
        Api::namespaced(cluster.client.clone(), ns);
    assert!(
        ds.get_opt(&format!("kata-deploy-{dsx}")).await?.is_some(),
        "the old DaemonSet was not touched"
    );
    // The documented steps.
    let saved = scratch.path().join("kata-values.yaml");
    let (ok, out) = cluster
        .run_helm(&["get", "values", "dsrel", "--namespace", ns, "-o", "yaml"])
        .await?;
    assert!(ok, "{out}");
    std::fs::write(
        &saved,
        out.lines()
            .skip_while(|l| l.starts_with("---"))
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "dsrel",
            "--namespace",
            ns,
            "--wait",
            "--timeout",
            "2m",
        ])
        .await?;
    assert!(ok, "{out}");
    let mut args = vec![
        "install",
        "dsrel",
        chart,
        "-f",
        saved.to_str().unwrap(),
        "--set",
        "deploymentMode=job",
    ];
    args.extend(&scope);
    args.extend(few);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "install after the documented steps: {out}");
    assert_eq!(
        labels_of(&bed.nodes.get(&bed.local[0]).await?)
            .get(&format!("katacontainers.io/kata-deploy-installed-{dsx}"))
            .map(String::as_str),
        Some("true")
    );
    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "dsrel",
            "--namespace",
            ns,
            "--wait",
            "--timeout",
            "4m",
        ])
        .await?;
    assert!(ok, "{out}");
    bed.kubelet.shutdown().await;
    Ok(())
}
