//! End to end: `helm install` of the real chart on the test bed. The real dispatcher (as its
//! ServiceAccount) creates per-node Jobs; on local nodes `kata-local-kubelet` runs the real stage
//! binary against fake host roots; simulated nodes complete through kwok.

use anyhow::{bail, Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kata_testbed::cluster::{client_from_kubeconfig, repo_root, wait_until, workspace_bin, SimNode, TestCluster};
use kata_testbed::hostroot::snapshot;
use kata_testbed::local_kubelet::{parse_bind, request_pod_token, Config, ImageMap, LocalKubelet, LOCAL_LABEL};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const KATA_LABEL: &str = "katacontainers.io/kata-runtime";

async fn helm(cluster: &TestCluster, args: &[&str]) -> Result<(bool, String)> {
    let out = cluster.helm().args(args).output().await.context("running helm")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("--- helm {args:?} -> {:?}\n{text}", out.status.code());
    Ok((out.status.success(), text))
}

/// Every file's content hash and mtime: equal before and after means nothing was written.
fn mtimes(root: &Path) -> Result<BTreeMap<String, (String, std::time::SystemTime)>> {
    let content = snapshot(root)?;
    content
        .into_iter()
        .map(|(rel, hash)| Ok((rel.clone(), (hash, std::fs::symlink_metadata(root.join(&rel))?.modified()?))))
        .collect()
}

fn labels_of(node: &Node) -> BTreeMap<String, String> {
    node.metadata.labels.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_upgrade_uninstall_on_local_and_simulated_nodes() -> Result<()> {
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("e2e").await?;
    let scratch = tempfile::tempdir()?;
    let (hosts, work, payload) = (scratch.path().join("hosts"), scratch.path().join("work"), scratch.path().join("payload"));
    let status = std::process::Command::new("bash").arg(repo_root().join("hack/make-test-payload.sh")).arg(&payload).status()?;
    if !status.success() {
        bail!("hack/make-test-payload.sh failed");
    }
    let group: BTreeMap<String, String> = [("kata-test/group".to_string(), ns.clone())].into();
    let local = cluster.local_nodes(&format!("{ns}-l"), 2, &hosts, &ns, &group).await?;
    let mut sim_spec = SimNode::default();
    sim_spec.labels = group.clone();
    let sim = cluster.sim_nodes(&format!("{ns}-s"), 2, &sim_spec).await?;

    let mut config = Config::new(cluster.kubeconfig(), hosts.clone(), work.clone());
    config.images = ImageMap::new([
        ("kata-deploy-job-dispatcher", workspace_bin("kata-deploy-job-dispatcher")?),
        ("kata-deploy-stage", workspace_bin("kata-deploy-stage")?),
    ]);
    config.binds = vec![parse_bind(&format!("{}=/opt/kata-payload:ro", payload.display())).map_err(anyhow::Error::msg)?];
    config.node_selector = format!("{LOCAL_LABEL}={ns}");
    config.heartbeat = Duration::from_secs(5);
    let kubelet = LocalKubelet::spawn(config).await?;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    for n in &local {
        wait_until(Duration::from_secs(30), "local node Ready", || async {
            let node = nodes.get(n).await?;
            Ok(node.status.and_then(|s| s.conditions).unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .await?;
    }
    let original: Vec<_> = local.iter().map(|n| snapshot(&hosts.join(n))).collect::<Result<_>>()?;

    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let group_sel = format!("job.nodeSelector.kata-test/group={ns}");
    // Tests share one cluster: the hook pods must land on this test's local nodes.
    let dispatcher_on = format!("job.dispatcher.nodeSelector.{}={ns}", LOCAL_LABEL.replace('.', "\\."));
    let common = [
        "--namespace", &ns, "--set", "stage.restart=none", "--set", "job.parallelism=2",
        "--set-string", &group_sel, "--set-string", &dispatcher_on, "--set", "shims.disableAll=true", "--set", "shims.qemu.enabled=true",
        "--set", "shims.qemu-runtime-rs.enabled=true", "--wait", "--timeout", "4m",
    ];

    // --- install ---
    let mut args = vec!["install", "kata-deploy", chart];
    args.extend(common);
    let (ok, out) = helm(&cluster, &args).await?;
    assert!(ok, "helm install failed: {out}");
    for n in local.iter() {
        let l = labels_of(&nodes.get(n).await?);
        assert_eq!(l.get(KATA_LABEL).map(String::as_str), Some("true"), "{n} labelled: {l:?}");
        let root = hosts.join(n);
        assert!(root.join("opt/kata/bin/containerd-shim-kata-v2").is_file(), "{n}: payload installed");
        assert_ne!(snapshot(&root)?.get("etc/containerd/config.toml"), None);
    }
    for n in &sim {
        assert!(labels_of(&nodes.get(n).await?).get(KATA_LABEL).is_none(), "simulated nodes run no stage");
    }
    let rcs: Api<RuntimeClass> = Api::all(cluster.client.clone());
    assert_eq!(rcs.get("kata-qemu").await?.handler, "kata-qemu");
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &ns);
    let per_node = jobs.list(&ListParams::default().labels("app.kubernetes.io/managed-by=kata-deploy-job-dispatcher")).await?;
    assert_eq!(per_node.items.len(), 4, "one Job per selected node");

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
    let probe: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "token-probe"},
        "spec": {"nodeName": sim[0], "serviceAccountName": node_sa, "restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "probe"}]}}))?;
    let probe = pods.create(&PostParams::default(), &probe).await?;
    let token = request_pod_token(&cluster.client, &ns, &node_sa, "token-probe", probe.metadata.uid.as_deref().unwrap_or_default(), None, 600).await?;
    let kc = cluster.token_kubeconfig(&token, &format!("probe-{ns}"), None)?;
    let as_node = Api::<Node>::all(client_from_kubeconfig(&kc).await?);
    let label = |k: &str| serde_json::json!({"metadata": {"labels": {k: "true"}}});
    let own = as_node.patch(&sim[0], &PatchParams::default(), &Patch::Merge(label(KATA_LABEL))).await;
    assert!(own.is_ok(), "own node, kata label: {own:?}");
    let other = as_node.patch(&sim[1], &PatchParams::default(), &Patch::Merge(label(KATA_LABEL))).await;
    assert!(matches!(&other, Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422), "another node must be refused: {other:?}");
    let foreign = as_node.patch(&sim[0], &PatchParams::default(), &Patch::Merge(label("example.com/other"))).await;
    assert!(matches!(&foreign, Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422), "non-kata label must be refused: {foreign:?}");
    let remove = serde_json::json!({"metadata": {"labels": {KATA_LABEL: null}}});
    nodes.patch(&sim[0], &PatchParams::default(), &Patch::Merge(remove)).await?;

    // --- upgrade after adding a node: only the new node does real work ---
    let before: Vec<_> = local.iter().map(|n| mtimes(&hosts.join(n))).collect::<Result<_>>()?;
    let added = cluster.local_nodes(&format!("{ns}-n"), 1, &hosts, &ns, &group).await?;
    let added_original = snapshot(&hosts.join(&added[0]))?;
    let mut args = vec!["upgrade", "kata-deploy", chart, "--reuse-values"];
    args.extend(common);
    let (ok, out) = helm(&cluster, &args).await?;
    assert!(ok, "helm upgrade failed: {out}");
    assert_eq!(labels_of(&nodes.get(&added[0]).await?).get(KATA_LABEL).map(String::as_str), Some("true"));
    for (n, b) in local.iter().zip(&before) {
        assert_eq!(&mtimes(&hosts.join(n))?, b, "{n}: an installed node must see no write on upgrade");
    }

    // --- uninstall: every host back to its original bytes, labels, Jobs and RBAC gone ---
    let (ok, out) = helm(&cluster, &["uninstall", "kata-deploy", "--namespace", &ns, "--wait", "--timeout", "4m"]).await?;
    assert!(ok, "helm uninstall failed: {out}");
    let all_local: Vec<&String> = local.iter().chain(&added).collect();
    let originals: Vec<&BTreeMap<String, String>> = original.iter().chain([&added_original]).collect();
    for (n, orig) in all_local.iter().zip(originals) {
        assert_eq!(&snapshot(&hosts.join(n))?, orig, "{n}: host restored byte for byte");
        let l = labels_of(&nodes.get(n).await?);
        assert!(!l.keys().any(|k| k.starts_with("katacontainers.io/")), "{n}: kata labels removed: {l:?}");
    }
    // Hook Jobs go with the uninstall; their per-node Jobs follow through garbage collection.
    wait_until(Duration::from_secs(60), "no Job left behind after uninstall", || async { Ok(jobs.list(&ListParams::default()).await?.items.is_empty()) }).await?;
    let crs: Api<ClusterRole> = Api::all(cluster.client.clone());
    let left: Vec<String> = crs.list(&ListParams::default()).await?.items.into_iter().filter_map(|c| c.metadata.name).filter(|n| n.starts_with(&ns)).collect();
    assert!(left.is_empty(), "no RBAC left behind: {left:?}");
    assert!(rcs.get_opt("kata-qemu").await?.is_none(), "RuntimeClasses removed");

    // --- a node whose stage fails makes helm install fail and is named ---
    std::fs::remove_file(hosts.join(&local[1]).join("dev/kvm"))?;
    let mut args = vec!["install", "kata-deploy", chart];
    args.extend(common);
    let (ok, out) = helm(&cluster, &args).await?;
    assert!(!ok, "install must fail when a node cannot take Kata: {out}");
    let dispatchers = pods.list(&ListParams::default().labels("katacontainers.io/dispatcher-role=install")).await?;
    let message: String = dispatchers
        .items
        .iter()
        .flat_map(|p| p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()))
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .collect();
    assert!(message.contains(&local[1]) && message.contains("kvm"), "the dispatcher's termination message names the node and why: {message:?}");
    assert!(!message.contains(&format!("{}:", local[0])), "the healthy node is not reported failed: {message}");
    helm(&cluster, &["uninstall", "kata-deploy", "--namespace", &ns, "--wait", "--timeout", "4m"]).await?;
    kubelet.shutdown().await;
    Ok(())
}
