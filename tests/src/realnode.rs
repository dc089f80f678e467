//! Real nodes: systemd (PID 1 in systemd-nspawn) running containerd + runc and a real kubelet,
//! registered to a [`TestCluster`] (`hack/testenv/realnode/`). The chart's images are imported
//! into each node's containerd, so pods run our real binaries as real containers.
//!
//! What the machine sees of a node is per run (`hack/testenv/lib.sh`): its slot (bridge, pod
//! subnet, kubelet port) is claimed from a machine-wide registry, its cgroup subtree names its test
//! bed's run id, and each test bed has its own Service IP and rules. Two test beds may run nodes of
//! the same name side by side. Tests still take [`real_node_lock`] first: on two cores, real nodes
//! of two tests at once only make both slower.

pub use crate::cluster::TESTBED_REGISTRY;
use crate::cluster::{
    config_from_kubeconfig, in_ci, repo_root, testenv_bin, wait_until, TestCluster,
};
use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One real node of a test cluster; stopped and removed (mounts, cgroups, bridge) on drop.
pub struct RealNode {
    /// Node name (hostname, Node object).
    pub name: String,
    /// `debian` (containerd 1.6, config version 2) or a containerd version such as `v2.4.2`.
    pub flavour: String,
    /// The machine-wide slot node.sh claimed: bridge `kbr<slot>`, pods in 198.19.<slot>.0/24.
    pub slot: u32,
    /// The node's cgroup subtree in every v1 hierarchy (`kata-node-r<run id>-<name>`).
    pub cgroup: String,
    state: PathBuf,
}

/// The machine-wide lock file of the real-node tests (taken by the tests themselves: a shell
/// `flock` on this path around a test run would deadlock with it).
pub const REAL_NODE_LOCK_FILE: &str = "/run/lock/kata-deploy-realnode-tests.lock";

/// Held while a test runs real nodes: the in-process mutex and the machine-wide file lock.
pub struct RealNodeLock {
    _in_process: tokio::sync::MutexGuard<'static, ()>,
    _machine: std::fs::File,
}

/// Serialises the tests that start real nodes, within this process and across processes: they
/// would not collide (their state is per run), but on this machine's two cores booting nodes of
/// several tests at once makes each slower than running them in turn. The file lock dies with
/// the process, so a killed run never blocks.
pub async fn real_node_lock() -> RealNodeLock {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let in_process = LOCK.lock().await;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(REAL_NODE_LOCK_FILE)
        .unwrap_or_else(|e| panic!("opening {REAL_NODE_LOCK_FILE}: {e}"));
    let file = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .expect("the lock task")
        .unwrap_or_else(|e| panic!("locking {REAL_NODE_LOCK_FILE}: {e}"));
    RealNodeLock {
        _in_process: in_process,
        _machine: file,
    }
}

/// What is missing to run real nodes here, if anything (None: everything is there).
pub fn missing_prerequisites(flavours: &[&str]) -> Option<String> {
    let rootfs = testenv_bin("")
        .parent()
        .map(|c| c.join("realnode/rootfs/lib/systemd/systemd"))
        .unwrap_or_default();
    if !rootfs.exists() {
        return Some(format!(
            "{} is missing: run hack/testenv/realnode/build-rootfs.sh",
            rootfs.display()
        ));
    }
    if !testenv_bin("kubelet").exists() {
        return Some("the kubelet is not built: run hack/testenv/build.sh".into());
    }
    for f in flavours.iter().filter(|f| **f != "debian") {
        if !testenv_bin(&format!("containerd-{f}/containerd")).exists() {
            return Some(format!("containerd {f} is not built: add it to CONTAINERD_VERSIONS and run hack/testenv/build.sh"));
        }
    }
    for tool in ["systemd-nspawn", "iptables", "buildah"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Some(format!("{tool} is missing: run hack/install-deps.sh"));
        }
    }
    None
}

/// Skips (outside CI) or fails (in CI) when real nodes cannot run here; true means "go on".
pub fn require_real_nodes(flavours: &[&str]) -> bool {
    match missing_prerequisites(flavours) {
        None => true,
        Some(why) if in_ci() => panic!("real nodes are required in CI: {why}"),
        Some(why) => {
            eprintln!("SKIPPED (not in CI): {why}");
            false
        }
    }
}

fn script(name: &str) -> PathBuf {
    repo_root().join("hack/testenv/realnode").join(name)
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the pause image and the project's images as OCI archives (once per test run).
pub fn build_images() -> Result<()> {
    run(
        Command::new("bash").arg(script("images.sh")).arg("build"),
        "hack/testenv/realnode/images.sh build",
    )
    .map(drop)
}

impl RealNode {
    /// Boots node `name` into `cluster` (node.sh claims its slot); node.sh imports the images
    /// and returns once the kubelet reports it Ready and it is schedulable.
    pub async fn start(cluster: &TestCluster, name: &str, flavour: &str) -> Result<Self> {
        let t0 = Instant::now();
        let state = cluster.state().to_path_buf();
        let mut node = RealNode {
            name: name.to_string(),
            flavour: flavour.to_string(),
            slot: 0,
            cgroup: String::new(),
            state,
        };
        // From here on a failure drops `node`, which stops whatever node.sh had started.
        run(
            Command::new("bash")
                .arg(script("node.sh"))
                .args(["start"])
                .arg(&node.state)
                .args([name, flavour]),
            &format!("starting real node {name} ({flavour})"),
        )?;
        (node.slot, node.cgroup) = node.read_meta()?;
        let nodes: Api<Node> = Api::all(cluster.client.clone());
        wait_until(
            Duration::from_secs(120),
            &format!("real node {name} Ready"),
            || async {
                let ready = nodes
                    .get_opt(name)
                    .await?
                    .and_then(|n| n.status)
                    .and_then(|s| s.conditions)
                    .unwrap_or_default();
                Ok(ready
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True"))
            },
        )
        .await
        .with_context(|| {
            format!(
                "kubelet log of {name}:\n{}",
                node.journal("kubelet").unwrap_or_default()
            )
        })?;
        eprintln!(
            "real node {name} ({flavour}) Ready in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        Ok(node)
    }

    /// The slot and cgroup node.sh recorded in the node's `meta` ("SLOT FLAVOUR CGROUP").
    fn read_meta(&self) -> Result<(u32, String)> {
        let path = self.state.join("nodes").join(&self.name).join("meta");
        let meta = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        match meta.split_whitespace().collect::<Vec<_>>()[..] {
            [slot, _, cgroup] => Ok((
                slot.parse()
                    .with_context(|| format!("slot in {}", path.display()))?,
                cgroup.to_owned(),
            )),
            _ => bail!(
                "{} is not \"SLOT FLAVOUR CGROUP\": {meta:?}",
                path.display()
            ),
        }
    }

    /// The bridge of the node's pods.
    pub fn bridge(&self) -> String {
        format!("kbr{}", self.slot)
    }

    /// The host PID of this node's `kata-deploy-stage` stopped at its `KATA_STAGE_STOP_AT`
    /// checkpoint (state T), if any: a fault test kills it there. Only processes in the node's
    /// own mount namespace count (`exec` enters it), so a stage stopped on another test bed's
    /// node is never taken.
    pub fn stopped_stage_pid(&self) -> Result<Option<u32>> {
        let own = std::fs::read_link(format!("/proc/{}/ns/mnt", self.leader_pid()?))?;
        for e in std::fs::read_dir("/proc")? {
            let e = e?;
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            if !stat.contains("(kata-deploy-sta") || process_state(&stat) != Some("T") {
                continue;
            }
            if std::fs::read_link(e.path().join("ns/mnt")).is_ok_and(|ns| ns == own) {
                return Ok(Some(pid));
            }
        }
        Ok(None)
    }

    /// The host PID of the node's systemd (PID 1 inside): the child of its systemd-nspawn.
    fn leader_pid(&self) -> Result<u32> {
        let dir = self.state.join("nodes").join(&self.name);
        let nspawn = std::fs::read_to_string(dir.join("nspawn.pid"))
            .with_context(|| format!("node {} is not running (no nspawn.pid)", self.name))?;
        let nspawn = nspawn.trim();
        let children = std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children"))
            .with_context(|| format!("node {}: its systemd-nspawn is gone", self.name))?;
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("node {}: systemd-nspawn has no child", self.name))
    }

    /// A command that runs `args` inside the node (its mount, PID, UTS and IPC namespaces).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(script("node.sh"))
            .arg("exec")
            .arg(&self.state)
            .arg(&self.name)
            .args(args);
        c
    }

    /// Runs a command inside the node; its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        run(
            &mut self.command(args),
            &format!("{} on node {}", args.join(" "), self.name),
        )
    }

    /// A path of the node's filesystem as seen from this machine (its overlay root).
    pub fn path(&self, in_node: &str) -> PathBuf {
        self.state
            .join("nodes")
            .join(&self.name)
            .join("merged")
            .join(in_node.trim_start_matches('/'))
    }

    /// The journal of one unit of the node (for failure messages).
    pub fn journal(&self, unit: &str) -> Result<String> {
        self.exec(&["journalctl", "--no-pager", "-n", "80", "-u", unit])
    }

    /// systemd's `ActiveEnterTimestampMonotonic` of a unit: changes exactly when it (re)started.
    pub fn unit_active_since(&self, unit: &str) -> Result<u64> {
        let out = self.exec(&[
            "systemctl",
            "show",
            "-p",
            "ActiveEnterTimestampMonotonic",
            "--value",
            unit,
        ])?;
        out.trim().parse().with_context(|| {
            format!(
                "ActiveEnterTimestampMonotonic of {unit} on {}: {out:?}",
                self.name
            )
        })
    }

    /// `ctr` of the node's containerd flavour, talking to its socket.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let ctr = if self.flavour == "debian" {
            PathBuf::from("/usr/bin/ctr")
        } else {
            testenv_bin(&format!("containerd-{}/ctr", self.flavour))
        };
        let sock = self
            .state
            .join("nodes")
            .join(&self.name)
            .join("run-containerd/containerd.sock");
        run(
            Command::new(ctr)
                .arg("--address")
                .arg(sock)
                .args(["-n", "k8s.io"])
                .args(args),
            &format!("ctr {} on {}", args.join(" "), self.name),
        )
    }

    /// Powers the node off and boots it again on the same root: its files stay, its processes
    /// and /run start afresh (what a reboot does). Returns once containerd answers again.
    pub fn reboot(&self) -> Result<()> {
        run(
            Command::new("bash")
                .arg(script("node.sh"))
                .arg("reboot")
                .arg(&self.state)
                .arg(&self.name),
            &format!("rebooting real node {}", self.name),
        )
        .map(drop)
    }

    fn stop(&self) -> Result<()> {
        run(
            Command::new("bash")
                .arg(script("node.sh"))
                .arg("stop")
                .arg(&self.state)
                .arg(&self.name),
            &format!("stopping real node {}", self.name),
        )
        .map(drop)
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("{e:#}");
        }
    }
}

/// The state letter of a `/proc/PID/stat` line (after the command's closing parenthesis).
fn process_state(stat: &str) -> Option<&str> {
    stat.rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next()
}

/// A client of `cluster` that goes through its `kubernetes` Service IP (198.18.<run id>.1:443),
/// as the real nodes' pods do: it answers only while the run's mapping (net.sh) is in place, and
/// the TLS check against the cluster's own CA fails if the mapping leads to another API server.
pub async fn client_via_service_ip(cluster: &TestCluster) -> Result<kube::Client> {
    let mut config = config_from_kubeconfig(&cluster.kubeconfig()).await?;
    config.cluster_url = format!("https://198.18.{}.1:443", cluster.run_id()?).parse()?;
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(10));
    Ok(kube::Client::try_from(config)?)
}

/// The claims of the machine's registry (run ids, node slots) that name the test bed `state`.
pub fn claims_of(state: &Path) -> Vec<String> {
    let state = state.display().to_string();
    let mut found = Vec::new();
    for (kind, file) in [("runs", "state"), ("nodes", "owner")] {
        let Ok(slots) = std::fs::read_dir(Path::new(TESTBED_REGISTRY).join(kind)) else {
            continue;
        };
        for slot in slots.flatten() {
            let owner = std::fs::read_to_string(slot.path().join(file)).unwrap_or_default();
            if owner.split_whitespace().next() == Some(state.as_str()) {
                found.push(format!("{} ({})", slot.path().display(), owner.trim()));
            }
        }
    }
    found
}

/// The iptables rules of one run (comment `kata-testbed-r<run id>`).
pub fn rules_of_run(run_id: u32) -> Vec<String> {
    let tag = format!("kata-testbed-r{run_id}");
    testbed_rules()
        .into_iter()
        .filter(|(_, rule)| rule.split_whitespace().any(|w| w == tag))
        .map(|(table, rule)| format!("{table}: {rule}"))
        .collect()
}

/// The test bed's iptables rules (comment kata-testbed) that could touch the host's own traffic:
/// each must match only the test bed's bridges or addresses ([`rule_is_confined`]).
pub fn unconfined_rules() -> Vec<String> {
    testbed_rules()
        .into_iter()
        .filter(|(_, rule)| !rule_is_confined(rule))
        .map(|(table, rule)| format!("{table}: {rule}"))
        .collect()
}

/// The test bed's rules (comment kata-testbed) of the filter and nat tables, as `iptables -S`
/// prints them, with their table.
fn testbed_rules() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for table in ["filter", "nat"] {
        if let Ok(o) = Command::new("iptables")
            .args(["-w", "-t", table, "-S"])
            .output()
        {
            out.extend(
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.contains("kata-testbed"))
                    .map(|l| (table, l.to_owned())),
            );
        }
    }
    out
}

/// Whether an `iptables -S` rule matches only packets from the test bed's bridges (`-i kbr…`)
/// or to its own addresses (a `-d` inside 198.18.0.0/15, hack/testenv/lib.sh).
pub fn rule_is_confined(rule: &str) -> bool {
    let words: Vec<&str> = rule.split_whitespace().collect();
    // A flag's value, unless the match is negated (`! -o kbr+`).
    let arg = |flag: &str| {
        (0..words.len().saturating_sub(1))
            .find(|&i| words[i] == flag && (i == 0 || words[i - 1] != "!"))
            .map(|i| words[i + 1])
    };
    if arg("-i").is_some_and(|i| i.starts_with("kbr")) {
        return true;
    }
    let Some((ip, len)) = arg("-d").and_then(|d| d.split_once('/')) else {
        return false;
    };
    let (Ok(ip), Ok(len)) = (ip.parse::<std::net::Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    len >= 15 && u32::from(ip) >> 17 == u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) >> 17
}

/// What real nodes left on the machine: node mounts, cgroups, bridges, test-bed firewall rules
/// and slot claims (empty after teardown).
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
        found.extend(
            m.lines()
                .filter(|l| l.contains("kata-node-"))
                .map(str::to_owned),
        );
    }
    if let Ok(dirs) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in dirs.flatten() {
            if let Ok(sub) = std::fs::read_dir(h.path()) {
                found.extend(
                    sub.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with("kata-node-"))
                        .map(|e| e.path().display().to_string()),
                );
            }
        }
    }
    if let Ok(links) = std::fs::read_dir("/sys/class/net") {
        found.extend(
            links
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("kbr")),
        );
    }
    found.extend(testbed_rules().into_iter().map(|(_, rule)| rule));
    if let Ok(slots) = std::fs::read_dir(Path::new(TESTBED_REGISTRY).join("nodes")) {
        found.extend(
            slots
                .flatten()
                .map(|e| format!("real-node slot claim {}", e.path().display())),
        );
    }
    found
}

/// A file's bytes, mode and owner (what "restored exactly" compares).
pub fn file_identity(path: &Path) -> Result<(Vec<u8>, u32, u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((std::fs::read(path)?, meta.mode(), meta.uid(), meta.gid()))
}

#[cfg(test)]
mod confinement_tests {
    use super::rule_is_confined;

    #[test]
    fn only_rules_on_the_test_beds_bridges_or_addresses_are_confined() {
        for r in [
            "-A OUTPUT -d 198.18.0.0/24 -m comment --comment kata-testbed -j REJECT",
            "-A FORWARD -i kbr+ ! -o kbr+ -m comment --comment kata-testbed -j DROP",
            "-A OUTPUT -d 198.18.0.1/32 -p tcp -m tcp --dport 443 -j DNAT --to-destination 127.0.0.1:1",
            "-A FORWARD -d 198.19.3.0/24 -j DROP",
        ] {
            assert!(rule_is_confined(r), "{r}");
        }
        for r in [
            "-A OUTPUT -d 10.0.0.0/24 -m comment --comment kata-testbed -j REJECT",
            "-A FORWARD -s 10.244.0.0/16 ! -o kbr+ -m comment --comment kata-testbed -j DROP",
            "-A FORWARD ! -i kbr+ -j DROP",
            "-A OUTPUT -d 198.0.0.0/8 -j REJECT",
            "-A OUTPUT -j REJECT",
        ] {
            assert!(!rule_is_confined(r), "{r}");
        }
    }
}
