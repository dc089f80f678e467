//! The reconcile CronJob on REAL nodes (containerd 2.x, real kubelet, our images as real
//! containers): after `helm install` with `job.reconcile.schedule`, a node that joins the
//! cluster gets Kata from the CronJob's own scheduled run (the test bed runs the CronJob
//! controller) within one period, with no helm command; the first node is not touched again;
//! uninstall removes the CronJob and cleans both nodes.

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Node;
use kata_testbed::cluster::{repo_root, wait_until, TestCluster};
use kata_testbed::realnode::{build_images, real_node_lock, require_real_nodes, RealNode};
use kube::api::{Api, ListParams};
use std::collections::BTreeMap;
use std::time::Duration;

const CONTAINERD2: &str = "v2.4.2";
const KATA_LABEL: &str = "katacontainers.io/kata-runtime";

async fn labels(nodes: &Api<Node>, name: &str) -> Result<BTreeMap<String, String>> {
    Ok(nodes.get(name).await?.metadata.labels.unwrap_or_default())
}

/// The name of the dispatcher Job that owns node `node`'s per-node install Job.
async fn owner_of_node_job(jobs: &Api<Job>, node: &str) -> Result<Option<String>> {
    let per_node = jobs
        .list(&ListParams::default().labels("katacontainers.io/dispatcher=kata-deploy-install"))
        .await?;
    Ok(per_node
        .items
        .iter()
        .find(|j| {
            j.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("katacontainers.io/node-name"))
                .is_some_and(|n| n == node)
        })
        .and_then(|j| j.metadata.owner_references.as_ref()?.first().cloned())
        .map(|o| o.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_node_added_after_install_gets_kata_from_the_reconcile_cronjob() -> Result<()> {
    if !require_real_nodes(&[CONTAINERD2]) {
        return Ok(());
    }
    let _serial = real_node_lock().await;
    build_images()?;
    let cluster = TestCluster::private().await?;
    let first = RealNode::start(&cluster, "rn-rec-a", CONTAINERD2).await?;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let chart = repo_root().join("chart/kata-deploy");
    let (ok, out) = cluster
        .run_helm(&[
            "install",
            "kata-deploy",
            chart.to_str().expect("utf-8"),
            "--namespace",
            "kata-system",
            "--create-namespace",
            "--set",
            "shims.disableAll=true",
            "--set",
            "shims.qemu.enabled=true",
            "--set-string",
            "job.nodeSelector.kata-testbed/real=true",
            "--set-string",
            "job.dispatcher.nodeSelector.kata-testbed/real=true",
            "--set",
            "job.reconcile.schedule=*/1 * * * *",
            "--wait",
            "--timeout",
            "5m",
        ])
        .await?;
    assert!(ok, "helm install failed: {out}");
    assert_eq!(
        labels(&nodes, &first.name)
            .await?
            .get(KATA_LABEL)
            .map(String::as_str),
        Some("true")
    );
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), "kata-system");
    let first_owner = owner_of_node_job(&jobs, &first.name).await?;

    // A node joins; nobody runs helm. One schedule period (1 min) plus the run itself.
    let joined = std::time::Instant::now();
    let second = RealNode::start(&cluster, "rn-rec-b", CONTAINERD2).await?;
    wait_until(
        Duration::from_secs(240),
        "the added real node labelled by the reconcile CronJob's run",
        || async {
            Ok(labels(&nodes, &second.name)
                .await?
                .get(KATA_LABEL)
                .is_some_and(|v| v == "true"))
        },
    )
    .await?;
    eprintln!(
        "added node installed {:.0}s after it started to join",
        joined.elapsed().as_secs_f64()
    );
    let owner = owner_of_node_job(&jobs, &second.name)
        .await?
        .context("the added node's per-node Job")?;
    let owner_job = jobs.get(&owner).await?;
    let by_cronjob = owner_job
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "CronJob" && o.name == "kata-deploy-reconcile");
    assert!(
        by_cronjob,
        "{owner} was created by the CronJob: {:?}",
        owner_job.metadata
    );
    let handlers: Vec<String> = nodes
        .get(&second.name)
        .await?
        .status
        .and_then(|s| s.runtime_handlers)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|h| h.name)
        .collect();
    assert!(
        handlers.iter().any(|h| h == "kata-qemu"),
        "containerd serves kata-qemu: {handlers:?}"
    );
    assert_eq!(
        owner_of_node_job(&jobs, &first.name).await?,
        first_owner,
        "the first node was not run again"
    );

    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "kata-deploy",
            "--namespace",
            "kata-system",
            "--wait",
            "--timeout",
            "5m",
        ])
        .await?;
    assert!(ok, "helm uninstall failed: {out}");
    let cjs: Api<CronJob> = Api::namespaced(cluster.client.clone(), "kata-system");
    assert!(cjs.get_opt("kata-deploy-reconcile").await?.is_none());
    for n in [&first.name, &second.name] {
        let l = labels(&nodes, n).await?;
        assert!(
            !l.keys().any(|k| k.starts_with("katacontainers.io/")),
            "{n} cleaned: {l:?}"
        );
    }
    Ok(())
}
