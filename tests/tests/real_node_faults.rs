//! Faults on a REAL node (systemd + containerd 1.6 + kubelet, hack/testenv/realnode/): the stage
//! binary runs on the node itself, as an operator debugging a node would run it, and restarts the
//! node's containerd through systemd over D-Bus while containerd is killed, refuses to start, or
//! the stage itself is killed mid-restart.

use anyhow::{Context, Result};
use kata_testbed::cluster::{repo_root, workspace_bin, TestCluster};
use kata_testbed::realnode::{
    file_identity, real_node_lock, require_real_nodes, stopped_stage_pid, RealNode,
};
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
    let node = RealNode::start(&cluster, "rn-faults", 21, "debian").await?;
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
        if let Some(pid) = stopped_stage_pid()? {
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
        state=$1 name=$2
        for p in $(awk '{print $1}' "$state/pids"); do kill -KILL -- "-$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; done
        kill -KILL "$(cat "$state/nodes/$name/nspawn.pid")" 2>/dev/null
        for _ in 1 2 3; do
          find /sys/fs/cgroup/*/"kata-node-$name" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null
          sleep 0.3
        done
        true"#;
    let st = Command::new("bash")
        .args(["-c", script, "kill"])
        .arg(cluster.state())
        .arg(&node.name)
        .status()?;
    anyhow::ensure!(st.success(), "killing the test bed failed");
    Ok(())
}

/// A run killed mid-test leaves its real node's overlay root, bridge and Service mapping on the
/// machine (CI once inherited them and every real-node suite refused to start). The next real node
/// started on the machine reaps what dead test beds left, and nothing of a live one. While the live
/// node runs, the containment rules match only the test bed's own bridges and addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runs_real_node_is_reaped_when_the_next_one_starts() -> Result<()> {
    if !require_real_nodes(&["debian"]) {
        return Ok(());
    }
    let _serial = real_node_lock().await;
    let dead = TestCluster::private().await?;
    let node = RealNode::start(&dead, "rn-killed", 22, "debian").await?;
    kill_test_bed(&dead, &node)?;
    assert!(
        !kata_testbed::realnode::leftovers().is_empty(),
        "the kill leaves the node's mounts, bridge and rules behind"
    );
    let live = TestCluster::private().await?;
    let next = RealNode::start(&live, "rn-after-kill", 23, "debian").await?;
    assert!(
        !dead.state().exists(),
        "the dead test bed's state directory is reaped"
    );
    assert!(live.state().exists(), "the live test bed is left alone");
    let kept: Vec<String> = kata_testbed::realnode::leftovers()
        .into_iter()
        .filter(|l| l.contains("rn-killed") || l == "kbr22")
        .collect();
    assert!(kept.is_empty(), "left of the killed node: {kept:?}");
    assert!(
        std::path::Path::new("/sys/class/net/kbr23").exists(),
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
