//! The test bed itself: the real Job controller, garbage collector and TTL controller work on
//! simulated nodes. (Local-node processes and 403s are covered by tests/local_kubelet.rs.)

use anyhow::Result;
use k8s_openapi::api::batch::v1::Job;
use kata_testbed::cluster::{wait_until, SimNode, TestCluster};
use kube::api::{Api, PostParams};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_job_completes_and_ttl_deletes_it() -> Result<()> {
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("testbed").await?;
    let node = cluster
        .sim_nodes(&ns, 1, &SimNode::default())
        .await?
        .remove(0);
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &ns);
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pinned"},
        "spec": {"ttlSecondsAfterFinished": 2, "backoffLimit": 0, "template": {
            "metadata": {"annotations": {"kata-testbed/duration": "1s"}},
            "spec": {"nodeName": node, "restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}
    }))?;
    jobs.create(&PostParams::default(), &job).await?;
    wait_until(
        Duration::from_secs(30),
        "the Job controller to mark the Job Complete",
        || async {
            let j = jobs.get_opt("pinned").await?;
            Ok(j.and_then(|j| j.status)
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True"))
        },
    )
    .await?;
    wait_until(
        Duration::from_secs(60),
        "ttlSecondsAfterFinished to delete the Job",
        || async { Ok(jobs.get_opt("pinned").await?.is_none()) },
    )
    .await
}

/// Simulated nodes report exactly the status the test asked for, every time: kwok's node stages
/// must never overwrite `status.nodeInfo` (they once did, about one node in a thousand, and a
/// dispatcher test read kwok's runtime version instead of the test's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_nodes_report_the_requested_node_info() -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    use kata_testbed::cluster::test_machine_id;
    const COUNT: usize = 300;
    let cluster = TestCluster::get().await?;
    let prefix = cluster.namespace("nodeinfo").await?;
    let spec = SimNode {
        container_runtime_version: "containerd://1.7.35".into(),
        ..SimNode::default()
    };
    let names = cluster.sim_nodes(&prefix, COUNT, &spec).await?;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let mut wrong = Vec::new();
    for name in &names {
        let info = nodes
            .get(name)
            .await?
            .status
            .and_then(|s| s.node_info)
            .unwrap_or_default();
        if info.container_runtime_version != spec.container_runtime_version
            || info.machine_id != test_machine_id(name)
        {
            wrong.push(format!(
                "{name}: {:?} / {:?}",
                info.container_runtime_version, info.machine_id
            ));
        }
    }
    for name in &names {
        nodes.delete(name, &Default::default()).await?;
    }
    assert_eq!(names.len(), COUNT);
    assert!(
        wrong.is_empty(),
        "{} of {COUNT} nodes report another nodeInfo: {wrong:?}",
        wrong.len()
    );
    Ok(())
}
