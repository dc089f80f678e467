//! The test bed itself: the real Job controller, garbage collector and TTL controller work on
//! simulated nodes. (Local-node processes and 403s are covered by tests/local_kubelet.rs.)

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use kata_testbed::cluster::{repo_root, wait_until, SimNode, TestCluster, TESTBED_REGISTRY};
use kube::api::{Api, PostParams};
use std::path::Path;
use std::process::Command;
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

/// The claim of run id `run` in the machine's registry: the state directory it names, if any.
fn run_claim(run: u32) -> Option<String> {
    std::fs::read_to_string(Path::new(TESTBED_REGISTRY).join(format!("runs/{run}/state")))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The ClusterIP of the `kubernetes` Service: the first address of the test bed's Service range.
async fn kubernetes_service_ip(cluster: &TestCluster) -> Result<String> {
    let svc = Api::<Service>::namespaced(cluster.client.clone(), "default")
        .get("kubernetes")
        .await?;
    svc.spec
        .and_then(|s| s.cluster_ip)
        .context("the kubernetes Service has no ClusterIP")
}

/// Each test bed claims a run id of its own from the machine's registry, and its Service range
/// (so its `kubernetes` Service IP, which real nodes map) derives from it. A test bed killed
/// mid-run keeps its claim until hack/testenv/reap.sh frees it, along with its state directory,
/// and leaves a live test bed's claim alone; a stopped test bed gives its claim back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_test_bed_claims_its_own_run_id_and_a_killed_ones_claim_is_reaped() -> Result<()> {
    let a = TestCluster::private().await?;
    let b = TestCluster::private().await?;
    let (run_a, run_b) = (a.run_id()?, b.run_id()?);
    assert_ne!(run_a, run_b, "two test beds at once have distinct run ids");
    for (cluster, run) in [(&a, run_a), (&b, run_b)] {
        assert_eq!(
            kubernetes_service_ip(cluster).await?,
            format!("198.18.{run}.1")
        );
        let state = cluster.state().display().to_string();
        assert_eq!(
            run_claim(run),
            Some(state),
            "the registry names the claim's test bed"
        );
    }
    // SIGKILL b's control plane, as a machine or session restart would: its claim stays.
    let killed = Command::new("bash")
        .args(["-c", r#"for p in $(awk '{print $1}' "$1/pids"); do kill -KILL -- "-$p" "$p" 2>/dev/null; done
            . "$2"; for _ in $(seq 100); do alive=0; for p in $(awk '{print $1}' "$1/pids"); do pid_alive "$p" && alive=1; done; [ $alive = 0 ] && exit 0; sleep 0.1; done; exit 1"#, "kill"])
        .arg(b.state())
        .arg(repo_root().join("hack/testenv/lib.sh"))
        .status()?;
    anyhow::ensure!(
        killed.success(),
        "test bed b's control plane still ran 10 s after SIGKILL"
    );
    let b_state = b.state().display().to_string();
    assert_eq!(
        run_claim(run_b).as_ref(),
        Some(&b_state),
        "a killed test bed cannot give its claim back"
    );
    let reap = Command::new("bash")
        .arg(repo_root().join("hack/testenv/reap.sh"))
        .output()?;
    anyhow::ensure!(reap.status.success(), "reap.sh failed: {reap:?}");
    // (Another test bed starting now may claim the freed id: only b's claim must be gone.)
    assert_ne!(
        run_claim(run_b),
        Some(b_state),
        "the reaper frees the dead test bed's run id"
    );
    assert!(
        !b.state().exists(),
        "the reaper removes the dead test bed's state directory"
    );
    assert_eq!(
        run_claim(run_a),
        Some(a.state().display().to_string()),
        "the live test bed keeps its claim"
    );
    let a_state = a.state().to_path_buf();
    drop(a);
    assert!(!a_state.exists());
    assert_ne!(
        run_claim(run_a),
        Some(a_state.display().to_string()),
        "a stopped test bed gives its run id back"
    );
    Ok(())
}
