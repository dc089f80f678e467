//! What the chart tests share: a test's share of the test bed (namespace, local nodes running the
//! real stage binary on fake host roots, the local kubelet) and Node helpers.
#![allow(dead_code)] // each test target uses a part

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::{Node, Pod};
use kata_testbed::cluster::{
    client_from_kubeconfig, repo_root, wait_until, workspace_bin, TestCluster,
};
use kata_testbed::local_kubelet::{
    parse_bind, request_pod_token, Config, ImageMap, LocalKubelet, LocalKubeletHandle, LOCAL_LABEL,
};
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;
use std::time::Duration;

/// The shared Kata label.
pub const KATA_LABEL: &str = "katacontainers.io/kata-runtime";

pub fn labels_of(node: &Node) -> BTreeMap<String, String> {
    node.metadata.labels.clone().unwrap_or_default()
}

/// One test's share of the test bed: a namespace, `n` local nodes (real stage binary on fake host
/// roots under `hosts`) labelled `kata-test/group=<ns>`, and the local kubelet running their pods.
pub struct Bed {
    pub cluster: TestCluster,
    pub ns: String,
    pub hosts: std::path::PathBuf,
    pub local: Vec<String>,
    pub group: BTreeMap<String, String>,
    pub kubelet: LocalKubeletHandle,
    pub nodes: Api<Node>,
    _scratch: tempfile::TempDir,
}

impl Bed {
    pub async fn start(prefix: &str, n: usize) -> Result<Self> {
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
    pub fn scope(&self) -> Vec<String> {
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

/// The Node API as ServiceAccount `sa`: through a pod-bound token of a probe pod pinned to `node`
/// (what a pod of that ServiceAccount on that node would hold).
pub async fn nodes_as(
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

/// Every file's content hash and mtime: equal before and after means nothing was written.
pub fn mtimes(root: &std::path::Path) -> Result<BTreeMap<String, (String, std::time::SystemTime)>> {
    let content = kata_testbed::hostroot::snapshot(root)?;
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

/// `helm uninstall kata-deploy --wait` in `ns` (3 minutes at most); fails with helm's output.
pub async fn helm_uninstall(cluster: &TestCluster, ns: &str) -> Result<()> {
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
    anyhow::ensure!(ok, "helm uninstall failed: {out}");
    Ok(())
}
