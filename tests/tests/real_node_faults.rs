//! Faults on a REAL node (systemd + containerd 1.6 + kubelet, hack/testenv/realnode/): the stage
//! binary runs on the node itself, as an operator debugging a node would run it, and restarts the
//! node's containerd through systemd over D-Bus while containerd is killed, refuses to start, or
//! the stage itself is killed mid-restart.

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kata_testbed::cluster::wait_until;
use kata_testbed::cluster::{repo_root, workspace_bin, TestCluster};
use kata_testbed::realnode::{
    claims_of, client_via_service_ip, file_identity, real_node_lock, require_real_nodes,
    rules_of_run, RealNode,
};
use kube::api::Api;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = "multiInstallSuffix: \"\"
debug: false
installPrefix: /opt/kata
imagePullTimeoutSeconds: 1200
cri: auto
restart: systemd
runtimeReadyTimeoutSeconds: 40
labelReadyTimeoutSeconds: 30
shims:
  - {name: qemu, baseConfig: qemu, supportedArches: [], dropIn: \"\", allowedHypervisorAnnotations: [], containerdSnapshotter: \"\", crioPullType: \"\"}
";

/// The stage binary, a test payload and a config, put on the node.
fn provision(node: &RealNode, runtime_ready_timeout: u32) -> Result<()> {
    let bin = node.path("/usr/local/bin/kata-deploy-stage");
    std::fs::copy(workspace_bin("kata-deploy-stage")?, &bin)
        .context("copying the stage binary into the node")?;
    let payload = node.path("/opt/kata-payload");
    let ok = Command::new("bash")
        .arg(repo_root().join("hack/make-test-payload.sh"))
        .arg(&payload)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(ok.success(), "hack/make-test-payload.sh failed");
    std::fs::create_dir_all(node.path("/etc/kata-deploy"))?;
    let config = CONFIG.replace(
        "runtimeReadyTimeoutSeconds: 40",
        &format!("runtimeReadyTimeoutSeconds: {runtime_ready_timeout}"),
    );
    std::fs::write(node.path("/etc/kata-deploy/config.yaml"), config)?;
    Ok(())
}

/// The stage run on the node as an operator would, with the facts the dispatcher would pass.
fn stage_command(node: &RealNode, version: &str, stage: &str) -> Command {
    let version = format!("KATA_NODE_CONTAINER_RUNTIME_VERSION={version}");
    node.command(&[
        "env",
        &version,
        "KATA_NODE_ARCH=amd64",
        // A bound on every run; also the stage's parent inside the node, so a stage stopped at
        // its KATA_STAGE_STOP_AT checkpoint does not stop nsenter with it.
        "timeout",
        "600",
        "kata-deploy-stage",
        "--host-root",
        "/",
        stage,
    ])
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run_stage(node: &RealNode, version: &str, stage: &str) -> Result<Output> {
    let out = stage_command(node, version, stage).output()?;
    eprintln!(
        "--- {stage} on {} -> {:?}\n{}",
        node.name,
        out.status.code(),
        text(&out)
    );
    Ok(out)
}

/// Handlers the node's containerd serves, from its effective config.
fn served(node: &RealNode) -> Result<String> {
    node.exec(&["containerd", "config", "dump"])
}

fn containerd_active(node: &RealNode) -> bool {
    node.exec(&["systemctl", "is-active", "containerd"])
        .map(|s| s.trim() == "active")
        .unwrap_or(false)
}

/// containerd active again (systemd restarts it RestartSec=5 after a crash), within a deadline.
fn wait_active(node: &RealNode) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !containerd_active(node) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "containerd not active again within 30s:\n{}",
            node.journal("containerd").unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_stage_on_a_real_node_survives_runtime_faults() -> Result<()> {
    if !require_real_nodes(&["debian"]) {
        return Ok(());
    }
    let _serial = real_node_lock().await;
    let cluster = TestCluster::private().await?;
    let node = RealNode::start(&cluster, "rn-faults", "debian").await?;
    provision(&node, 40)?;
    let version = node.exec(&["containerd", "--version"])?;
    let version = format!(
        "containerd://{}",
        version
            .split_whitespace()
            .nth(2)
            .context("containerd --version")?
    );
    let config = node.path("/etc/containerd/config.toml");
    let original = file_identity(&config)?;
    let out = run_stage(&node, &version, "artifacts")?;
    assert!(out.status.success(), "artifacts: {}", text(&out));

    // --- 1. containerd's main process is killed while the cri stage waits for it ---
    // A slow start (ExecStartPost) holds the restart job open for a few seconds, so the kill lands
    // while the stage is waiting for the runtime to come back, every time.
    let slow = node.path("/etc/systemd/system/containerd.service.d/80-slow-start.conf");
    std::fs::create_dir_all(slow.parent().unwrap())?;
    std::fs::write(&slow, "[Service]\nExecStartPost=/bin/sleep 4\n")?;
    node.exec(&["systemctl", "daemon-reload"])?;
    let stage = stage_command(&node, &version, "cri")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while node
        .exec(&[
            "systemctl",
            "show",
            "-p",
            "SubState",
            "--value",
            "containerd",
        ])?
        .trim()
        != "start-post"
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cri stage never restarted containerd"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The restart is under way and the stage waits: a crash of containerd itself (not its shims).
    node.exec(&[
        "systemctl",
        "kill",
        "--kill-whom=main",
        "--signal=KILL",
        "containerd",
    ])?;
    let out = stage.wait_with_output()?;
    eprintln!(
        "--- cri with containerd killed -> {:?}\n{}",
        out.status.code(),
        text(&out)
    );
    std::fs::remove_file(&slow)?;
    node.exec(&["systemctl", "daemon-reload"])?;
    assert!(
        out.status.success(),
        "the cri stage converges once systemd brought containerd back: {}",
        text(&out)
    );
    wait_active(&node)?;
    assert!(
        served(&node)?.contains("kata-qemu"),
        "containerd serves kata-qemu after the fault"
    );
    // A re-run finds everything loaded: no restart.
    let since = node.unit_active_since("containerd")?;
    let out = run_stage(&node, &version, "cri")?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        node.unit_active_since("containerd")?,
        since,
        "an unchanged re-run must not restart containerd"
    );
    let out = run_stage(&node, &version, "revert-cri")?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        file_identity(&config)?,
        original,
        "revert restores the config exactly"
    );

    // --- 2. containerd refuses to start with the new config: rolled back and serving ---
    // A unit drop-in makes containerd's start fail whenever its config names a kata handler, as a
    // containerd that rejects the file would (real systemd, real restart, real failure).
    let dropin = node.path("/etc/systemd/system/containerd.service.d/90-reject-kata.conf");
    std::fs::create_dir_all(dropin.parent().unwrap())?;
    std::fs::write(
        &dropin,
        "[Service]\nExecStartPre=/bin/sh -c '! grep -rqs kata-qemu /etc/containerd'\n",
    )?;
    node.exec(&["systemctl", "daemon-reload"])?;
    provision(&node, 10)?;
    let out = run_stage(&node, &version, "cri")?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "the cri stage fails: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("restored"),
        "it says the previous configuration was restored: {}",
        text(&out)
    );
    assert_eq!(
        file_identity(&config)?,
        original,
        "the previous config is back, byte for byte"
    );
    wait_active(&node)?;
    assert!(!served(&node)?.contains("kata-qemu"));
    std::fs::remove_file(&dropin)?;
    node.exec(&["systemctl", "daemon-reload"])?;
    provision(&node, 40)?;

    // --- 3. the stage is killed right after the restart, before it verified it; the retry converges ---
    // KATA_STAGE_STOP_AT stops the stage there (state T), so the kill provably lands before the
    // stage verified the runtime or recorded it as loaded.
    let since = node.unit_active_since("containerd")?;
    let mut stage = stage_command(&node, &version, "cri")
        .env("KATA_STAGE_STOP_AT", "cri-restarted")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        if let Some(pid) = node.stopped_stage_pid()? {
            break pid;
        }
        anyhow::ensure!(
            stage.try_wait()?.is_none(),
            "the cri stage ended before its restart checkpoint"
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cri stage never reached its restart checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(
        node.unit_active_since("containerd")?,
        since,
        "the restart happened before the checkpoint"
    );
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    anyhow::ensure!(killed.success(), "kill -KILL {pid}");
    let st = stage.wait()?;
    assert!(
        !st.success(),
        "the stage killed at its checkpoint cannot have succeeded"
    );
    let state = std::fs::read_to_string(node.path("/var/lib/kata-deploy/cri.json"))?;
    assert!(
        state.contains("\"pending\":{") || state.contains("\"pending\": {"),
        "the killed stage left its restart unverified (pending): {state}"
    );
    let out = run_stage(&node, &version, "cri")?;
    assert!(
        out.status.success(),
        "the retry verifies what the killed stage left: {}",
        text(&out)
    );
    assert!(served(&node)?.contains("kata-qemu"));
    let out = run_stage(&node, &version, "revert-cri")?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        file_identity(&config)?,
        original,
        "after the killed run and its retry, revert still restores the exact original"
    );
    wait_active(&node)?;
    let out = run_stage(&node, &version, "remove-artifacts")?;
    assert!(out.status.success(), "{}", text(&out));
    Ok(())
}

/// SIGKILLs a whole test bed, as a machine or session restart does: its control plane, the node's
/// nspawn and every process in the node's cgroups. Its mounts, bridge and rules stay behind.
fn kill_test_bed(cluster: &TestCluster, node: &RealNode) -> Result<()> {
    let script = r#"
        state=$1 name=$2 cgroup=$3
        for p in $(awk '{print $1}' "$state/pids"); do kill -KILL -- "-$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; done
        kill -KILL "$(cat "$state/nodes/$name/nspawn.pid")" 2>/dev/null
        for _ in 1 2 3; do
          find /sys/fs/cgroup/*/"$cgroup" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null
          sleep 0.3
        done
        true"#;
    let st = Command::new("bash")
        .args(["-c", script, "kill"])
        .arg(cluster.state())
        .arg(&node.name)
        .arg(&node.cgroup)
        .status()?;
    anyhow::ensure!(st.success(), "killing the test bed failed");
    Ok(())
}

/// A run killed mid-test leaves its real node's overlay root, bridge, Service mapping and claims on
/// the machine (CI once inherited them and every real-node suite refused to start). The next real
/// node started on the machine reaps what dead test beds left, and nothing of a live one. While the
/// live node runs, the containment rules match only the test bed's own bridges and addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runs_real_node_is_reaped_when_the_next_one_starts() -> Result<()> {
    if !require_real_nodes(&["debian"]) {
        return Ok(());
    }
    let _serial = real_node_lock().await;
    let dead = TestCluster::private().await?;
    let node = RealNode::start(&dead, "rn-killed", "debian").await?;
    let dead_run = dead.run_id()?;
    kill_test_bed(&dead, &node)?;
    assert!(
        !kata_testbed::realnode::leftovers().is_empty(),
        "the kill leaves the node's mounts, bridge and rules behind"
    );
    let live = TestCluster::private().await?;
    let next = RealNode::start(&live, "rn-after-kill", "debian").await?;
    assert!(
        !dead.state().exists(),
        "the dead test bed's state directory is reaped"
    );
    assert!(live.state().exists(), "the live test bed is left alone");
    // Its slot may already serve the live node: what is left is what still names the dead one.
    let mut kept: Vec<String> = kata_testbed::realnode::leftovers()
        .into_iter()
        .filter(|l| l.contains(&node.cgroup) || (node.slot != next.slot && *l == node.bridge()))
        .collect();
    kept.extend(rules_of_run(dead_run));
    kept.extend(claims_of(dead.state()));
    assert!(kept.is_empty(), "left of the killed node: {kept:?}");
    assert!(
        Path::new("/sys/class/net").join(next.bridge()).exists(),
        "the live node keeps its bridge"
    );
    let unconfined = kata_testbed::realnode::unconfined_rules();
    assert!(
        unconfined.is_empty(),
        "while real nodes run, every test-bed rule matches only the test bed's bridges or \
         addresses (the host's own traffic is never touched): {unconfined:?}"
    );
    drop(next);
    drop(node);
    let after = kata_testbed::realnode::leftovers();
    assert!(
        after.is_empty(),
        "after both tests beds are gone: {after:?}"
    );
    Ok(())
}

/// The uid of node `name` as the API server behind `client` has it.
async fn node_uid(client: kube::Client, name: &str) -> Result<String> {
    let node = Api::<Node>::all(client).get(name).await?;
    node.metadata.uid.context("a node without uid")
}

/// When the kubelet of `name` last renewed its node Lease (every 10 s while it reaches its API).
async fn lease_renewed(cluster: &TestCluster, name: &str) -> Result<Option<Timestamp>> {
    let lease = Api::<Lease>::namespaced(cluster.client.clone(), "kube-node-lease")
        .get_opt(name)
        .await?;
    Ok(lease
        .and_then(|l| l.spec)
        .and_then(|s| s.renew_time)
        .map(|t| t.0))
}

/// What the machine sees of a real node is per run: two test beds run a node of the same name side
/// by side, each with its own run id, Service IP, rules, slot (bridge, pod subnet, kubelet port)
/// and cgroup, and each Service IP leads to its own API server. Stopping one test bed removes its
/// rules, bridge and claims and leaves the other's node Ready, its Service IP still answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_test_beds_run_real_nodes_of_the_same_name_side_by_side() -> Result<()> {
    if !require_real_nodes(&["debian"]) {
        return Ok(());
    }
    let _serial = real_node_lock().await;
    let a = TestCluster::private().await?;
    let b = TestCluster::private().await?;
    let node_a = RealNode::start(&a, "rn-twin", "debian").await?;
    let node_b = RealNode::start(&b, "rn-twin", "debian").await?;
    let (run_a, run_b) = (a.run_id()?, b.run_id()?);
    assert_ne!(run_a, run_b, "each test bed has a run id of its own");
    assert_ne!(node_a.slot, node_b.slot, "each node has a slot of its own");
    assert_ne!(
        node_a.cgroup, node_b.cgroup,
        "each node has a cgroup of its own"
    );
    for (cluster, node, run) in [(&a, &node_a, run_a), (&b, &node_b, run_b)] {
        assert_eq!(
            rules_of_run(run).len(),
            5,
            "run {run}: {:?}",
            rules_of_run(run)
        );
        let direct = node_uid(cluster.client.clone(), &node.name).await?;
        let via_service = node_uid(client_via_service_ip(cluster).await?, &node.name)
            .await
            .with_context(|| format!("reaching run {run}'s API server through its Service IP"))?;
        assert_eq!(
            direct, via_service,
            "run {run}'s Service IP leads to its own API server"
        );
    }
    let (bridge_b, cgroup_b, state_b) =
        (node_b.bridge(), node_b.cgroup.clone(), b.state().to_owned());
    drop(node_b);
    drop(b);
    let stopped = Timestamp::now();
    let mut left = rules_of_run(run_b);
    left.extend(claims_of(&state_b));
    left.extend(
        kata_testbed::realnode::leftovers()
            .into_iter()
            .filter(|l| l.contains(&cgroup_b) || *l == bridge_b),
    );
    assert!(
        left.is_empty(),
        "left of the stopped test bed (rules, claims, cgroup, bridge): {left:?}"
    );
    assert_eq!(
        rules_of_run(run_a).len(),
        5,
        "the other run keeps its rules"
    );
    assert!(
        Path::new("/sys/class/net").join(node_a.bridge()).exists(),
        "the other node keeps its bridge"
    );
    let direct = node_uid(a.client.clone(), &node_a.name).await?;
    let via_service = node_uid(client_via_service_ip(&a).await?, &node_a.name).await?;
    assert_eq!(
        direct, via_service,
        "the other run's Service IP still answers"
    );
    wait_until(
        Duration::from_secs(60),
        "the other node's kubelet renewing its Lease after the stop",
        || async {
            Ok(lease_renewed(&a, &node_a.name)
                .await?
                .is_some_and(|t| t > stopped))
        },
    )
    .await?;
    drop(node_a);
    drop(a);
    let after = kata_testbed::realnode::leftovers();
    assert!(after.is_empty(), "after both test beds are gone: {after:?}");
    Ok(())
}
