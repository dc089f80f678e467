//! End to end: `helm install` of the real chart on the test bed. The real dispatcher (as its
//! ServiceAccount) creates per-node Jobs; on local nodes `kata-local-kubelet` runs the real stage
//! binary against fake host roots; simulated nodes complete through kwok.

use anyhow::{bail, Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kata_testbed::cluster::{
    client_from_kubeconfig, repo_root, wait_until, workspace_bin, SimNode, TestCluster,
};
use kata_testbed::hostroot::snapshot;
use kata_testbed::local_kubelet::{
    parse_bind, request_pod_token, Config, ImageMap, LocalKubelet, LocalKubeletHandle, LOCAL_LABEL,
};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const KATA_LABEL: &str = "katacontainers.io/kata-runtime";

/// Every file's content hash and mtime: equal before and after means nothing was written.
fn mtimes(root: &Path) -> Result<BTreeMap<String, (String, std::time::SystemTime)>> {
    let content = snapshot(root)?;
    content
        .into_iter()
        .map(|(rel, hash)| {
            Ok((
                rel.clone(),
                (
                    hash,
                    std::fs::symlink_metadata(root.join(&rel))?.modified()?,
                ),
            ))
        })
        .collect()
}

fn labels_of(node: &Node) -> BTreeMap<String, String> {
    node.metadata.labels.clone().unwrap_or_default()
}

/// One test's share of the test bed: a namespace, `n` local nodes (real stage binary on fake host
/// roots under `hosts`) labelled `kata-test/group=<ns>`, and the local kubelet running their pods.
struct Bed {
    cluster: TestCluster,
    ns: String,
    hosts: std::path::PathBuf,
    local: Vec<String>,
    group: BTreeMap<String, String>,
    kubelet: LocalKubeletHandle,
    nodes: Api<Node>,
    _scratch: tempfile::TempDir,
}

impl Bed {
    async fn start(prefix: &str, n: usize) -> Result<Self> {
        let cluster = TestCluster::get().await?;
        let ns = cluster.namespace(prefix).await?;
        let scratch = tempfile::tempdir()?;
        let (hosts, work, payload) = (
            scratch.path().join("hosts"),
            scratch.path().join("work"),
            scratch.path().join("payload"),
        );
        let status = std::process::Command::new("bash")
            .arg(repo_root().join("hack/make-test-payload.sh"))
            .arg(&payload)
            .status()?;
        if !status.success() {
            bail!("hack/make-test-payload.sh failed");
        }
        // The chart's default payload is the Kata release image: its layout, at the path the
        // release-image containers read (they run the stage binary copy-stage put in an emptyDir).
        let release = scratch.path().join("release");
        let status = std::process::Command::new("timeout")
            .args(["120", "bash"])
            .arg(repo_root().join("hack/make-release-payload.sh"))
            .arg(&release)
            .status()?;
        if !status.success() {
            bail!("hack/make-release-payload.sh failed");
        }
        let group: BTreeMap<String, String> = [("kata-test/group".to_string(), ns.clone())].into();
        let local = cluster
            .local_nodes(&format!("{ns}-l"), n, &hosts, &ns, &group)
            .await?;
        let mut config = Config::new(cluster.kubeconfig(), hosts.clone(), work.clone());
        config.images = ImageMap::new([
            (
                "kata-deploy-job-dispatcher",
                workspace_bin("kata-deploy-job-dispatcher")?,
            ),
            ("kata-deploy-stage", workspace_bin("kata-deploy-stage")?),
        ]);
        config.binds = vec![
            parse_bind(&format!("{}=/opt/kata-payload:ro", payload.display()))
                .map_err(anyhow::Error::msg)?,
            parse_bind(&format!("{}=/opt/kata-artifacts:ro", release.display()))
                .map_err(anyhow::Error::msg)?,
        ];
        config.node_selector = format!("{LOCAL_LABEL}={ns}");
        config.heartbeat = Duration::from_secs(5);
        let kubelet = LocalKubelet::spawn(config).await?;
        let nodes: Api<Node> = Api::all(cluster.client.clone());
        for n in &local {
            wait_until(Duration::from_secs(30), "local node Ready", || async {
                let node = nodes.get(n).await?;
                Ok(node
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .await?;
        }
        Ok(Bed {
            cluster,
            ns,
            hosts,
            local,
            group,
            kubelet,
            nodes,
            _scratch: scratch,
        })
    }

    /// `--set` arguments that keep a release on this test's nodes (shared cluster) and off systemd.
    fn scope(&self) -> Vec<String> {
        let ns = &self.ns;
        [
            "--namespace",
            ns,
            "--set",
            "stage.restart=none",
            "--set-string",
            &format!("job.nodeSelector.kata-test/group={ns}"),
            "--set-string",
            &format!("job.cleanup.nodeSelector.kata-test/group={ns}"),
            "--set-string",
            &format!(
                "job.dispatcher.nodeSelector.{}={ns}",
                LOCAL_LABEL.replace('.', "\\.")
            ),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// Removes `node.kubernetes.io/not-ready` from the taints of Ready nodes, as the node-lifecycle
/// controller (not run by the test bed) would.
async fn lift_not_ready_taint(nodes: &Api<Node>, names: &[String]) -> Result<()> {
    for name in names {
        let node = nodes.get(name).await?;
        let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
        let kept: Vec<_> = taints
            .iter()
            .filter(|t| t.key != "node.kubernetes.io/not-ready")
            .collect();
        if kept.len() != taints.len() {
            // A merge patch of the whole list (no resourceVersion: kwok's heartbeats do not
            // make it conflict).
            let patch = serde_json::json!({"spec": {"taints": kept}});
            nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("lifting the not-ready taint of {name}"))?;
        }
    }
    Ok(())
}

/// The Node API as ServiceAccount `sa`: through a pod-bound token of a probe pod pinned to `node`
/// (what a pod of that ServiceAccount on that node would hold).
async fn nodes_as(
    cluster: &TestCluster,
    ns: &str,
    sa: &str,
    probe: &str,
    node: &str,
) -> Result<Api<Node>> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": probe},
        "spec": {"nodeName": node, "serviceAccountName": sa, "restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "probe"}]}}))?;
    let pod = pods.create(&PostParams::default(), &pod).await?;
    let token = request_pod_token(
        &cluster.client,
        ns,
        sa,
        probe,
        pod.metadata.uid.as_deref().unwrap_or_default(),
        None,
        600,
    )
    .await?;
    let kc = cluster.token_kubeconfig(&token, &format!("{probe}-{ns}"), None)?;
    Ok(Api::<Node>::all(client_from_kubeconfig(&kc).await?))
}

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
    // Install Jobs follow DaemonSet taint rules, and the test bed runs no node-lifecycle
    // controller: the not-ready taint the API server puts on every new Node is never lifted from
    // a simulated node (the local kubelet stand-in lifts it from its own nodes). Lift it as that
    // controller would once the node is Ready, or the dispatcher (rightly) never dispatches there.
    lift_not_ready_taint(nodes, &sim).await?;
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

/// The chart's per-node install Job template as rendered with `sets`, as JSON.
async fn rendered_install_template(
    cluster: &TestCluster,
    sets: &[&str],
) -> Result<serde_json::Value> {
    let chart = repo_root().join("chart/kata-deploy");
    let mut cmd = cluster.helm();
    cmd.args(["template", "kd", chart.to_str().expect("utf-8")])
        // --validate: the real API server's version and APIs (Capabilities), as helm install.
        .args(["--validate", "--show-only", "templates/job-templates.yaml"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .context("helm template timed out")??;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    let cm: serde_json::Value = serde_yaml::from_slice(&out.stdout)?;
    let text = cm["data"]["install-job.yaml"]
        .as_str()
        .context("install-job.yaml in the job-templates ConfigMap")?;
    Ok(serde_yaml::from_str(text)?)
}

/// Sets a pod's status as the kubelet does when it ends: phase Failed, its container terminated
/// with `exit`, and, for an eviction, the DisruptionTarget condition the eviction API adds.
async fn end_pod(pods: &Api<Pod>, name: &str, exit: i32, evicted: bool) -> Result<()> {
    let mut conditions = vec![serde_json::json!({"type": "Ready", "status": "False"})];
    if evicted {
        conditions.push(
            serde_json::json!({"type": "DisruptionTarget", "status": "True",
            "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}),
        );
    }
    let patch = serde_json::json!({"status": {"phase": "Failed", "conditions": conditions,
        "containerStatuses": [{"name": "label", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit, "reason": "Error"}}}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("ending pod {name}"))?;
    Ok(())
}

/// Pods of Job `job`, by name, oldest first.
async fn job_pods(pods: &Api<Pod>, job: &str) -> Result<Vec<Pod>> {
    let mut items = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await?
        .items;
    items.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
    Ok(items)
}

/// The chart's per-node Job spec on the real Job controller: an evicted pod (DisruptionTarget)
/// is replaced without spending backoffLimit (here 0), the replacement starts only once the pod
/// is terminal (podReplacementPolicy: Failed, kept by the API server), and a real failure still
/// fails the Job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_per_node_pod_is_replaced_without_spending_a_retry() -> Result<()> {
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("evict").await?;
    let sim = cluster
        .sim_nodes(&format!("{ns}-s"), 1, &SimNode::default())
        .await?;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    lift_not_ready_taint(&nodes, &sim).await?;
    let mut job = rendered_install_template(&cluster, &["job.backoffLimit=0"]).await?;
    job["metadata"]["name"] = "evict".into();
    let pod = &mut job["spec"]["template"];
    pod["metadata"]["annotations"] = serde_json::json!({"kata-testbed/duration": "1h"});
    pod["spec"]["nodeName"] = sim[0].clone().into();
    pod["spec"]["serviceAccountName"] = "default".into();
    pod["spec"]["tolerations"] = serde_json::json!([{"operator": "Exists"}]);
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &ns);
    let created = jobs
        .create(&PostParams::default(), &serde_json::from_value(job)?)
        .await
        .context("the API server admits the chart's per-node Job spec")?;
    let spec = created.spec.context("spec")?;
    assert_eq!(spec.pod_replacement_policy.as_deref(), Some("Failed"));
    let rules = spec.pod_failure_policy.context("podFailurePolicy")?.rules;
    assert_eq!(rules[0].action, "Ignore", "{rules:?}");
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    let running = |n: usize| {
        let pods = pods.clone();
        async move {
            let all = job_pods(&pods, "evict").await?;
            Ok(all.len() == n
                && all[n - 1].status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        }
    };
    wait_until(Duration::from_secs(60), "the first pod running", || {
        running(1)
    })
    .await?;
    let first = job_pods(&pods, "evict").await?[0]
        .metadata
        .name
        .clone()
        .unwrap_or_default();
    end_pod(&pods, &first, 137, true).await?;
    wait_until(
        Duration::from_secs(60),
        "a replacement pod after the eviction",
        || running(2),
    )
    .await?;
    let j = jobs.get("evict").await?;
    let failed_cond = |j: &Job| {
        j.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Failed" && c.status == "True"))
    };
    assert!(
        !failed_cond(&j),
        "an eviction must not fail a Job with backoffLimit 0: {:?}",
        j.status
    );
    // The control: the same Job, a real failure (exit 1, no disruption) fails it at once.
    let second = job_pods(&pods, "evict").await?[1]
        .metadata
        .name
        .clone()
        .unwrap_or_default();
    end_pod(&pods, &second, 1, false).await?;
    wait_until(
        Duration::from_secs(60),
        "the Job failed by a real failure",
        || {
            let jobs = jobs.clone();
            async move { Ok(failed_cond(&jobs.get("evict").await?)) }
        },
    )
    .await?;
    assert_eq!(
        job_pods(&pods, "evict").await?.len(),
        2,
        "no retry after a real failure with backoffLimit 0"
    );
    Ok(())
}

/// Every value the state label of each watched node took, in order (`None`: no label), as an
/// independent watcher of the Nodes saw them.
#[derive(Clone, Default)]
struct StateRecorder(std::sync::Arc<std::sync::Mutex<BTreeMap<String, Vec<Option<String>>>>>);

impl StateRecorder {
    fn start(nodes: Api<Node>, selector: &str, key: &str) -> Self {
        let key = key.to_owned();
        use futures::StreamExt;
        use kube::runtime::{watcher, WatchStreamExt};
        let me = Self::default();
        let seen = me.0.clone();
        let stream = watcher::watcher(nodes, watcher::Config::default().labels(selector))
            .default_backoff()
            .applied_objects();
        tokio::spawn(async move {
            let mut stream = Box::pin(stream);
            while let Some(Ok(node)) = stream.next().await {
                let name = node.metadata.name.clone().unwrap_or_default();
                let value = labels_of(&node).get(&key).cloned();
                let mut s = seen.lock().expect("recorder lock");
                let v = s.entry(name).or_default();
                if v.last() != Some(&value) {
                    v.push(value);
                }
            }
        });
        me
    }

    /// The values seen for `node`, `-` for no label.
    fn of(&self, node: &str) -> Vec<String> {
        let s = self.0.lock().expect("recorder lock");
        s.get(node)
            .into_iter()
            .flatten()
            .map(|v| v.clone().unwrap_or_else(|| "-".into()))
            .collect()
    }
}

/// `data[key]` of the release's rollout summary ConfigMap, parsed.
async fn rollout_summary(cluster: &TestCluster, ns: &str, key: &str) -> Result<serde_yaml::Value> {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(cluster.client.clone(), ns);
    let cm = cms.get("kata-deploy-rollout").await?;
    let text = cm
        .data
        .unwrap_or_default()
        .get(key)
        .cloned()
        .with_context(|| format!("no {key} summary in the rollout ConfigMap"))?;
    Ok(serde_yaml::from_str(&text)?)
}

/// The node state label and the rollout summary on the real API server, with the real stages on
/// local nodes: each node goes pending → installing → installed, a node whose host-check fails
/// goes pending → failed and the summary names it with the reason after the dispatcher's pod and
/// Job are gone; uninstall goes cleaning → no label on every node it cleans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_state_and_rollout_summary_follow_install_failure_and_uninstall() -> Result<()> {
    let bed = Bed::start("state", 2).await?;
    let (cluster, ns, local) = (&bed.cluster, bed.ns.as_str(), &bed.local);
    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let scope = bed.scope();
    // Its own suffix: RuntimeClasses are cluster-scoped and tests run side by side.
    let suffix = ns.replacen("state-", "st", 1);
    let key = format!("katacontainers.io/kata-deploy-state-{suffix}");
    let suffix_set = format!("env.multiInstallSuffix={suffix}");
    let mut args = vec!["install", "kata-deploy", chart];
    args.extend(scope.iter().map(String::as_str));
    args.extend([
        "--set",
        &suffix_set,
        "--set",
        "shims.disableAll=true",
        "--set",
        "shims.qemu.enabled=true",
        "--wait",
        "--timeout",
        "3m",
    ]);
    let recorder = StateRecorder::start(bed.nodes.clone(), &format!("kata-test/group={ns}"), &key);
    std::fs::remove_file(bed.hosts.join(&local[1]).join("dev/kvm"))?;
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(
        !ok,
        "the install must fail on the node without /dev/kvm: {out}"
    );
    assert_eq!(
        recorder.of(&local[0]),
        ["-", "pending", "installing", "installed"],
        "the healthy node"
    );
    assert_eq!(
        recorder.of(&local[1]),
        ["-", "pending", "failed"],
        "host-check fails before the claim"
    );
    // The dispatcher's Job (and its pod) gone: the summary still tells what happened and why.
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    jobs.delete(
        "kata-deploy-dispatch-install",
        &kube::api::DeleteParams::foreground(),
    )
    .await?;
    wait_until(
        Duration::from_secs(60),
        "the install dispatcher gone",
        || async {
            Ok(jobs
                .get_opt("kata-deploy-dispatch-install")
                .await?
                .is_none())
        },
    )
    .await?;
    let s = rollout_summary(cluster, ns, "install").await?;
    assert_eq!(s["phase"], "failed", "{s:?}");
    assert_eq!(s["total"], 2, "{s:?}");
    assert_eq!(s["counts"]["succeeded"], 1, "{s:?}");
    assert_eq!(s["counts"]["failed"], 1, "{s:?}");
    let reason = s["failedNodes"][local[1].as_str()]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("kvm"),
        "the failed node with its reason: {s:?}"
    );
    assert!(s["failedNodes"].get(local[0].as_str()).is_none(), "{s:?}");

    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "kata-deploy",
            "--namespace",
            ns,
            "--wait",
            "--timeout",
            "3m",
        ])
        .await?;
    assert!(ok, "helm uninstall failed: {out}");
    assert_eq!(
        recorder.of(&local[0]),
        [
            "-",
            "pending",
            "installing",
            "installed",
            "pending",
            "cleaning",
            "-"
        ],
        "the installed node through uninstall"
    );
    assert_eq!(
        recorder.of(&local[1]),
        ["-", "pending", "failed", "pending", "cleaning", "-"],
        "the failed node is cleaned of its state too"
    );
    bed.kubelet.shutdown().await;
    Ok(())
}

/// Taints of `node`.
async fn taints_of(
    nodes: &Api<Node>,
    node: &str,
) -> Result<Vec<k8s_openapi::api::core::v1::Taint>> {
    Ok(nodes
        .get(node)
        .await?
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default())
}

/// Sets the taints of `node` to exactly `taints` (a merge patch of the whole list).
async fn set_taints(
    nodes: &Api<Node>,
    node: &str,
    taints: &[k8s_openapi::api::core::v1::Taint],
) -> kube::Result<Node> {
    let patch = serde_json::json!({"spec": {"taints": taints}});
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

fn taint(key: &str, effect: &str) -> k8s_openapi::api::core::v1::Taint {
    k8s_openapi::api::core::v1::Taint {
        key: key.into(),
        effect: effect.into(),
        ..Default::default()
    }
}

/// startupTaints on the real API server: the real label stage lifts exactly the startup taint
/// from its own Node as the install's last step (another taint stays); with a per-node token,
/// removing the startup taint from its own Node is admitted, while adding a taint, removing
/// another taint, or removing the startup taint from another Node is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_taints_are_lifted_and_the_node_token_can_remove_nothing_else() -> Result<()> {
    const STARTUP: &str = "example.com/kata-not-ready";
    const KEEP: &str = "example.com/keep";
    let bed = Bed::start("taint", 1).await?;
    let (cluster, ns, local) = (&bed.cluster, bed.ns.as_str(), &bed.local);
    let nodes = &bed.nodes;
    let mut with_startup = taints_of(nodes, &local[0]).await?;
    with_startup.extend([
        taint(STARTUP, "NoSchedule"),
        taint(KEEP, "PreferNoSchedule"),
    ]);
    set_taints(nodes, &local[0], &with_startup).await?;
    let sim_spec = SimNode {
        labels: [("kata-test/none".to_string(), ns.to_string())].into(),
        taints: vec![(STARTUP.into(), String::new(), "NoSchedule".into())],
        ..Default::default()
    };
    let sim = cluster.sim_nodes(&format!("{ns}-s"), 2, &sim_spec).await?;
    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let suffix = ns.replacen("taint-", "tt", 1);
    let suffix_set = format!("env.multiInstallSuffix={suffix}");
    let startup_set = format!("startupTaints[0]={STARTUP}:NoSchedule");
    let tolerate = format!("job.dispatcher.tolerations[0].key={STARTUP}");
    let mut args = vec!["install", "kata-deploy", chart];
    let scope = bed.scope();
    args.extend(scope.iter().map(String::as_str));
    args.extend([
        "--set",
        &suffix_set,
        "--set",
        &startup_set,
        // The dispatcher pod runs on the local node, which carries the startup taint.
        "--set",
        &tolerate,
        "--set",
        "job.dispatcher.tolerations[0].operator=Exists",
        "--set",
        "shims.disableAll=true",
        "--set",
        "shims.qemu.enabled=true",
        "--wait",
        "--timeout",
        "3m",
    ]);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "helm install failed: {out}");
    let after: Vec<String> = taints_of(nodes, &local[0])
        .await?
        .iter()
        .map(|t| format!("{}:{}", t.key, t.effect))
        .collect();
    assert!(
        !after.contains(&format!("{STARTUP}:NoSchedule")),
        "lifted: {after:?}"
    );
    assert!(
        after.contains(&format!("{KEEP}:PreferNoSchedule")),
        "the other taint stays: {after:?}"
    );
    assert_eq!(
        labels_of(&nodes.get(&local[0]).await?)
            .get(KATA_LABEL)
            .map(String::as_str),
        Some("true"),
        "labelled before the taint was lifted"
    );

    // The per-node token on a simulated node (kwok's own taint + the startup taint).
    let node_sa = format!("kata-deploy-{suffix}-node");
    let node_sa = Api::<ServiceAccount>::namespaced(cluster.client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|sa| sa.metadata.name)
        .find(|n| n.ends_with("-node"))
        .with_context(|| format!("the per-node ServiceAccount ({node_sa})"))?;
    let as_node = nodes_as(cluster, ns, &node_sa, "taint-probe", &sim[0]).await?;
    let own = taints_of(nodes, &sim[0]).await?;
    assert!(
        own.iter().any(|t| t.key == STARTUP) && own.len() >= 2,
        "{own:?}"
    );
    let refused = |r: &kube::Result<Node>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422);
    let mut added = own.clone();
    added.push(taint("example.com/added", "NoSchedule"));
    let r = set_taints(&as_node, &sim[0], &added).await;
    assert!(refused(&r), "adding a taint must be refused: {r:?}");
    let other_removed: Vec<_> = own.iter().filter(|t| t.key == STARTUP).cloned().collect();
    let r = set_taints(&as_node, &sim[0], &other_removed).await;
    assert!(refused(&r), "removing another taint must be refused: {r:?}");
    let theirs: Vec<_> = taints_of(nodes, &sim[1])
        .await?
        .into_iter()
        .filter(|t| t.key != STARTUP)
        .collect();
    let r = set_taints(&as_node, &sim[1], &theirs).await;
    assert!(
        refused(&r),
        "another node's startup taint must be refused: {r:?}"
    );
    let lifted: Vec<_> = own.iter().filter(|t| t.key != STARTUP).cloned().collect();
    let r = set_taints(&as_node, &sim[0], &lifted).await;
    assert!(r.is_ok(), "its own node's startup taint: {r:?}");
    assert_eq!(taints_of(nodes, &sim[0]).await?, lifted);

    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "kata-deploy",
            "--namespace",
            ns,
            "--wait",
            "--timeout",
            "3m",
        ])
        .await?;
    assert!(ok, "helm uninstall failed: {out}");
    bed.kubelet.shutdown().await;
    Ok(())
}

/// Creates a Job from the CronJob's jobTemplate, as `kubectl create job --from=cronjob/<name>`
/// (a run now, outside the schedule).
async fn trigger(cluster: &TestCluster, ns: &str, cronjob: &str, name: &str) -> Result<()> {
    let cjs: Api<k8s_openapi::api::batch::v1::CronJob> =
        Api::namespaced(cluster.client.clone(), ns);
    let cj = cjs.get(cronjob).await?;
    let tpl = cj
        .spec
        .as_ref()
        .map(|s| s.job_template.clone())
        .context("jobTemplate")?;
    let mut meta = tpl.metadata.unwrap_or_default();
    meta.name = Some(name.into());
    meta.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "batch/v1".into(),
            kind: "CronJob".into(),
            name: cronjob.into(),
            uid: cj.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
    ]);
    let job = Job {
        metadata: meta,
        spec: tpl.spec,
        status: None,
    };
    Api::<Job>::namespaced(cluster.client.clone(), ns)
        .create(&PostParams::default(), &job)
        .await?;
    Ok(())
}

/// Waits until Job `name` finished; whether it succeeded.
async fn finished(cluster: &TestCluster, ns: &str, name: &str) -> Result<bool> {
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    let cond = |j: &Job, t: &str| {
        j.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
    };
    wait_until(
        Duration::from_secs(180),
        "the reconcile Job to finish",
        || {
            let jobs = jobs.clone();
            async move {
                let j = jobs.get(name).await?;
                Ok(cond(&j, "Complete") || cond(&j, "Failed"))
            }
        },
    )
    .await?;
    Ok(cond(&jobs.get(name).await?, "Complete"))
}

/// The reconcile CronJob on the real API server with the real stages: a node added after
/// install gets Kata from the CronJob's scheduled run within one period (no helm command), the
/// installed node gets no Job; a run yields while a hook dispatcher of the release is active; uninstall's cleanup
/// dispatcher deletes the CronJob itself (the audit log says who deleted it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_after_install_is_installed_by_the_reconcile_cronjob() -> Result<()> {
    let bed = Bed::start("recon", 1).await?;
    let (cluster, ns, local, hosts) = (&bed.cluster, bed.ns.as_str(), &bed.local, &bed.hosts);
    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let suffix = ns.replacen("recon-", "rc", 1);
    let suffix_set = format!("env.multiInstallSuffix={suffix}");
    let mut args = vec!["install", "kata-deploy", chart];
    let scope = bed.scope();
    args.extend(scope.iter().map(String::as_str));
    args.extend([
        "--set",
        &suffix_set,
        "--set",
        "job.reconcile.schedule=*/1 * * * *",
        "--set",
        "shims.disableAll=true",
        "--set",
        "shims.qemu.enabled=true",
        "--wait",
        "--timeout",
        "3m",
    ]);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "helm install failed: {out}");
    // Names derive from the release name (kata-deploy); the suffix only from labels and paths.
    let cronjob = "kata-deploy-reconcile".to_string();
    let cjs: Api<k8s_openapi::api::batch::v1::CronJob> =
        Api::namespaced(cluster.client.clone(), ns);
    assert!(
        cjs.get_opt(&cronjob).await?.is_some(),
        "the reconcile CronJob"
    );
    let marker = format!("katacontainers.io/kata-deploy-installed-{suffix}");

    // A node joins after install: no helm command, one run of the CronJob's Job.
    let added = cluster
        .local_nodes(&format!("{ns}-n"), 1, hosts, ns, &bed.group)
        .await?;
    wait_until(Duration::from_secs(60), "the added node Ready", || async {
        let node = bed.nodes.get(&added[0]).await?;
        Ok(node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await?;
    assert!(!labels_of(&bed.nodes.get(&added[0]).await?).contains_key(&marker));
    // The CronJob controller runs it on its schedule (every minute here): within one period
    // (plus the controller's own delay) a Job of the CronJob installs the added node. A run
    // scheduled before the node was there (right after install) does not count.
    let joined =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(1);
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    let scheduled = || async {
        Ok::<_, anyhow::Error>(
            jobs.list(&ListParams::default().labels("katacontainers.io/dispatcher-role=reconcile"))
                .await?
                .items
                .into_iter()
                .filter(|j| {
                    j.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.kind == "CronJob" && o.name == cronjob)
                        && j.metadata
                            .creation_timestamp
                            .as_ref()
                            .is_some_and(|t| t.0 >= joined)
                })
                .filter_map(|j| j.metadata.name)
                .collect::<Vec<_>>(),
        )
    };
    wait_until(
        Duration::from_secs(150),
        "a Job of the reconcile CronJob (the test bed's kube-controller-manager must run cronjob-controller: restart it with hack/testenv/start.sh)",
        || async { Ok(!scheduled().await?.is_empty()) },
    )
    .await?;
    let first = scheduled().await?.remove(0);
    assert!(
        finished(cluster, ns, &first).await?,
        "the scheduled reconcile run {first} failed"
    );
    let l = labels_of(&bed.nodes.get(&added[0]).await?);
    assert_eq!(l.get(KATA_LABEL).map(String::as_str), Some("true"), "{l:?}");
    assert_eq!(l.get(&marker).map(String::as_str), Some("true"), "{l:?}");
    assert!(
        hosts
            .join(&added[0])
            .join(format!("opt/kata-{suffix}"))
            .exists()
            || hosts.join(&added[0]).join("opt/kata").exists(),
        "payload installed on the added node"
    );
    let s = rollout_summary(cluster, ns, "reconcile").await?;
    assert_eq!(s["phase"], "succeeded", "{s:?}");
    assert_eq!(
        s["counts"]["succeeded"], 1,
        "only the added node ran: {s:?}"
    );
    assert_eq!(s["counts"]["already-installed"], 1, "{s:?}");

    // Single flight: while a hook dispatcher of the release is active, a run does nothing (nor
    // does a scheduled one meanwhile: every run yields).
    let hook: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hook-standin", "labels": {"app.kubernetes.io/instance": "kata-deploy", "katacontainers.io/dispatcher-role": "install"}},
        "spec": {"suspend": true, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "d", "image": "quay.io/kata-containers/kata-deploy-job-dispatcher:test"}]}}}
    }))?;
    jobs.create(&PostParams::default(), &hook).await?;
    // A scheduled run that passed its check before the stand-in existed may still be at work.
    for name in scheduled().await? {
        finished(cluster, ns, &name).await?;
    }
    let before = rollout_summary(cluster, ns, "reconcile").await?;
    trigger(cluster, ns, &cronjob, "reconcile-2").await?;
    assert!(
        finished(cluster, ns, "reconcile-2").await?,
        "a yielding run succeeds"
    );
    assert_eq!(
        rollout_summary(cluster, ns, "reconcile").await?["run"],
        before["run"],
        "the yielding run wrote nothing"
    );
    jobs.delete("hook-standin", &kube::api::DeleteParams::background())
        .await?;

    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "kata-deploy",
            "--namespace",
            ns,
            "--wait",
            "--timeout",
            "3m",
        ])
        .await?;
    assert!(ok, "helm uninstall failed: {out}");
    assert!(
        cjs.get_opt(&cronjob).await?.is_none(),
        "the CronJob is gone"
    );
    let dispatcher_sa = format!("system:serviceaccount:{ns}:kata-deploy-dispatcher");
    let by_dispatcher = kata_testbed::rollout::audit_by_resource(cluster, &dispatcher_sa)?;
    assert!(
        by_dispatcher
            .get(&("delete".to_string(), "cronjobs".to_string()))
            .is_some_and(|n| *n >= 1),
        "the cleanup dispatcher deleted the CronJob (before cleaning): {by_dispatcher:?}"
    );
    for n in [&local[0], &added[0]] {
        let l = labels_of(&bed.nodes.get(n).await?);
        assert!(!l.contains_key(&marker), "{n} cleaned: {l:?}");
    }
    bed.kubelet.shutdown().await;
    Ok(())
}
