//! Shared helpers for the host-stage integration tests: fake host roots built from real
//! default configs, a synthetic payload, tree snapshots and a fake runtime restarter.
#![allow(dead_code)]

pub mod ctd;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kata_deploy_stage::config::{parse_config, NodeFacts, ValidConfig};
use kata_deploy_stage::error::{Result, StageError};
use kata_deploy_stage::hostfs::HostFs;
use kata_deploy_stage::restart::{monotonic_now_us, Restarter, UnitStatus};
use kata_deploy_stage::stages::{self, NoClaims, StageEnv, StageReport};

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// Builds the synthetic payload once per test binary with hack/make-test-payload.sh, under
/// cargo's target tmp dir (nothing left in /tmp); payloads of dead test processes are removed.
pub fn payload_dir() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_payloads_of_dead_processes(root);
        let dir = root.join(format!("test-payload-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/make-test-payload.sh");
        let st = std::process::Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .arg("--size-mib")
            .arg("0")
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "make-test-payload.sh failed: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        dir
    })
    .clone()
}

fn remove_payloads_of_dead_processes(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("test-payload-") else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A release payload built once per (layout, variant) for this test binary.
pub fn release_payload(layout: &str, variant: &str) -> PathBuf {
    static DIRS: std::sync::Mutex<BTreeMap<String, PathBuf>> =
        std::sync::Mutex::new(BTreeMap::new());
    let key = format!("{layout}-{variant}");
    let mut dirs = DIRS.lock().unwrap();
    dirs.entry(key.clone())
        .or_insert_with(|| {
            // Under target/tmp (cargo's scratch for integration tests), not /tmp: nothing is
            // left on the host (hack/test.sh checks /tmp for leftovers).
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("kata-release-{}-{key}", std::process::id()));
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/make-release-payload.sh");
            let out = std::process::Command::new("timeout")
                .args(["120", "bash"])
                .arg(&script)
                .arg(&dir)
                .args(["--layout", layout, "--variant", variant])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "make-release-payload.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        })
        .clone()
}

/// A node flavour: which files exist before the install and what the kubelet reports.
#[derive(Clone, Debug)]
pub struct Flavour {
    pub name: &'static str,
    pub runtime_version: &'static str,
    pub files: Vec<(&'static str, Vec<u8>)>,
    pub dirs: Vec<&'static str>,
    /// Where our handlers must end up (file whose TOML must mention the handler).
    pub handler_file: &'static str,
}

pub fn flavours() -> Vec<Flavour> {
    vec![
        Flavour {
            name: "containerd-1.6",
            runtime_version: "containerd://1.6.20",
            files: vec![(
                "/etc/containerd/config.toml",
                fixture("containerd-1.6-default.toml"),
            )],
            dirs: vec![],
            handler_file: "/etc/containerd/config.toml",
        },
        Flavour {
            name: "containerd-1.7",
            runtime_version: "containerd://1.7.27",
            files: vec![(
                "/etc/containerd/config.toml",
                fixture("containerd-1.7-default.toml"),
            )],
            dirs: vec![],
            handler_file: "/etc/containerd/config.toml",
        },
        Flavour {
            name: "containerd-2.0",
            runtime_version: "containerd://2.0.5",
            files: vec![(
                "/etc/containerd/config.toml",
                fixture("containerd-2.0-default.toml"),
            )],
            dirs: vec![],
            handler_file: "/etc/containerd/conf.d/kata-deploy.toml",
        },
        Flavour {
            name: "containerd-2.0-no-config",
            runtime_version: "containerd://2.1.1",
            files: vec![],
            dirs: vec!["/etc/containerd"],
            handler_file: "/etc/containerd/conf.d/kata-deploy.toml",
        },
        Flavour {
            name: "containerd-noversion",
            runtime_version: "containerd://1.6.20",
            files: vec![(
                "/etc/containerd/config.toml",
                fixture("containerd-noversion.toml"),
            )],
            dirs: vec![],
            handler_file: "/etc/containerd/config.toml",
        },
        Flavour {
            name: "k3s",
            runtime_version: "containerd://1.7.27-k3s1",
            files: vec![
                (
                    "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
                    fixture("k3s-generated-config.toml"),
                ),
                ("/etc/systemd/system/k3s.service", b"[Service]\n".to_vec()),
            ],
            dirs: vec![],
            handler_file: "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
        },
        Flavour {
            name: "k3s-agent-user-template",
            runtime_version: "containerd://1.7.27-k3s1",
            files: vec![
                (
                    "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
                    fixture("k3s-generated-config.toml"),
                ),
                (
                    "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
                    fixture("k3s-config.toml.tmpl"),
                ),
                (
                    "/etc/systemd/system/k3s-agent.service",
                    b"[Service]\n".to_vec(),
                ),
            ],
            dirs: vec![],
            handler_file: "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
        },
        Flavour {
            name: "rke2-containerd-2",
            runtime_version: "containerd://2.0.5-k3s1",
            files: vec![],
            dirs: vec!["/var/lib/rancher/rke2/agent/etc/containerd"],
            handler_file: "/var/lib/rancher/rke2/agent/etc/containerd/config-v3.toml.tmpl",
        },
        Flavour {
            name: "k0s",
            runtime_version: "containerd://1.7.24",
            files: vec![("/etc/k0s/containerd.toml", fixture("k0s-containerd.toml"))],
            dirs: vec!["/etc/k0s/containerd.d"],
            handler_file: "/etc/k0s/containerd.d/kata-deploy.toml",
        },
        Flavour {
            name: "microk8s",
            runtime_version: "containerd://1.6.28",
            files: vec![(
                "/var/snap/microk8s/current/args/containerd-template.toml",
                fixture("microk8s-containerd-template.toml"),
            )],
            dirs: vec![],
            handler_file: "/var/snap/microk8s/current/args/containerd-template.toml",
        },
        Flavour {
            name: "crio",
            runtime_version: "cri-o://1.31.2",
            files: vec![("/etc/crio/crio.conf", fixture("crio.conf"))],
            dirs: vec!["/etc/crio/crio.conf.d"],
            handler_file: "/etc/crio/crio.conf.d/50-kata-deploy.toml",
        },
    ]
}

pub fn flavour(name: &str) -> Flavour {
    flavours().into_iter().find(|f| f.name == name).unwrap()
}

/// Creates a fake host root for a flavour.
pub fn make_host(f: &Flavour) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for base in ["etc/systemd/system", "opt", "var/lib", "run", "dev"] {
        std::fs::create_dir_all(d.path().join(base)).unwrap();
    }
    std::fs::write(d.path().join("etc/machine-id"), "0123456789abcdef\n").unwrap();
    for dir in &f.dirs {
        std::fs::create_dir_all(d.path().join(dir.trim_start_matches('/'))).unwrap();
    }
    for (p, content) in &f.files {
        let full = d.path().join(p.trim_start_matches('/'));
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }
    d
}

/// Every file (bytes + mode) and directory under a root, except the host lock file (it lives
/// on tmpfs /run and persists by design).
pub fn snapshot(root: &Path) -> BTreeMap<String, Option<(u32, Vec<u8>)>> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Option<(u32, Vec<u8>)>>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            // The host lock (and /run/lock, present on every systemd host) is runtime scratch.
            if rel == "run/lock" || rel == "run/lock/kata-deploy.lock" {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                out.insert(rel + "/", None);
                walk(root, &p, out);
            } else if rel.ends_with("/installed-stamps.json") {
                // A stat cache (inode numbers, times): compared by presence and mode only.
                out.insert(
                    rel,
                    Some((md.permissions().mode() & 0o7777, b"<stamp cache>".to_vec())),
                );
            } else {
                out.insert(
                    rel,
                    Some((md.permissions().mode() & 0o7777, std::fs::read(&p).unwrap())),
                );
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// Diff of two snapshots, for assertion messages.
pub fn snapshot_diff(
    a: &BTreeMap<String, Option<(u32, Vec<u8>)>>,
    b: &BTreeMap<String, Option<(u32, Vec<u8>)>>,
) -> String {
    let mut s = String::new();
    for k in a
        .keys()
        .chain(b.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(_), Some(_)) => s.push_str(&format!("changed {k}\n")),
            (Some(_), None) => s.push_str(&format!("only before: {k}\n")),
            (None, Some(_)) => s.push_str(&format!("only after: {k}\n")),
            _ => {}
        }
    }
    s
}

/// A fake runtime: records restarts, reports active since its last restart, optionally
/// "kills the stage" (returns an error after restarting) or serves a fixed handler list.
#[derive(Default)]
pub struct FakeRuntime {
    pub restarts: Mutex<Vec<String>>,
    pub started_at: AtomicUsize,
    pub kill_stage_on_next_restart: AtomicBool,
    pub served: Mutex<Option<Vec<String>>>,
    pub enabled: Mutex<Vec<String>>,
    /// Units reported inactive (all others are active).
    pub inactive: Mutex<Vec<String>>,
    /// What the runtime reports to ListPodSandbox (None: it cannot be asked).
    pub sandboxes: Mutex<Option<Vec<kata_deploy_stage::cri_client::Sandbox>>>,
}

impl FakeRuntime {
    pub fn restart_count(&self, unit: &str) -> usize {
        self.restarts
            .lock()
            .unwrap()
            .iter()
            .filter(|u| *u == unit)
            .count()
    }
}

impl Restarter for FakeRuntime {
    fn restart(&self, unit: &str) -> Result<()> {
        self.restarts.lock().unwrap().push(unit.to_string());
        std::thread::sleep(Duration::from_millis(1));
        self.started_at
            .store(monotonic_now_us() as usize, Ordering::SeqCst);
        if self
            .kill_stage_on_next_restart
            .swap(false, Ordering::SeqCst)
        {
            // The stage container dies with the runtime: simulated as a crash.
            return Err(StageError::InjectedFault { after: 0 });
        }
        Ok(())
    }
    fn status(&self, unit: &str) -> Result<UnitStatus> {
        let t = self.started_at.load(Ordering::SeqCst) as u64;
        Ok(UnitStatus {
            active: !self.inactive.lock().unwrap().iter().any(|u| u == unit),
            active_since_mono_us: Some(t),
        })
    }
    fn enable_now(&self, unit: &str, unit_file: &Path) -> Result<()> {
        assert!(
            unit_file.ends_with(unit),
            "the unit file {} is not named {unit}",
            unit_file.display()
        );
        self.enabled.lock().unwrap().push(unit.to_string());
        Ok(())
    }
    fn disable_now(&self, unit: &str) -> Result<()> {
        self.enabled.lock().unwrap().retain(|u| u != unit);
        Ok(())
    }
    fn served_handlers(&self, _unit: &str) -> Result<Option<Vec<String>>> {
        Ok(self.served.lock().unwrap().clone())
    }
    fn sandboxes(&self) -> Result<Option<Vec<kata_deploy_stage::cri_client::Sandbox>>> {
        Ok(self.sandboxes.lock().unwrap().clone())
    }
}

/// A shared [`FakeRuntime`] as a boxed restarter (wrappers own their inner restarter; the test
/// keeps reading the fake's record).
pub struct SharedRuntime(pub std::sync::Arc<FakeRuntime>);

impl Restarter for SharedRuntime {
    fn restart(&self, unit: &str) -> Result<()> {
        self.0.restart(unit)
    }
    fn status(&self, unit: &str) -> Result<UnitStatus> {
        self.0.status(unit)
    }
    fn enable_now(&self, unit: &str, unit_file: &Path) -> Result<()> {
        self.0.enable_now(unit, unit_file)
    }
    fn disable_now(&self, unit: &str) -> Result<()> {
        self.0.disable_now(unit)
    }
    fn served_handlers(&self, unit: &str) -> Result<Option<Vec<String>>> {
        self.0.served_handlers(unit)
    }
    fn sandboxes(&self) -> Result<Option<Vec<kata_deploy_stage::cri_client::Sandbox>>> {
        self.0.sandboxes()
    }
}

pub fn config(yaml: &str) -> ValidConfig {
    parse_config(yaml, Path::new("test-config.yaml")).unwrap()
}

pub const TWO_SHIMS: &str = "runtimeReadyTimeoutSeconds: 2\nshims:\n  - name: qemu\n  - name: qemu-coco-dev\n    containerdSnapshotter: nydus\n    crioPullType: guest-pull\n    dropIn: |\n      [agent.kata]\n      dial_timeout = 90\n";
pub const ONE_SHIM: &str = "runtimeReadyTimeoutSeconds: 2\nshims:\n  - name: qemu\n";

pub fn facts(f: &Flavour) -> NodeFacts {
    NodeFacts {
        name: Some("node-1".into()),
        uid: Some("uid-1".into()),
        machine_id: Some("0123456789abcdef".into()),
        container_runtime_version: Some(f.runtime_version.into()),
        kubelet_version: Some("v1.34.1".into()),
        arch: Some("amd64".into()),
        active_units: None,
        cri_unknown: None,
    }
}

/// The environment the tests run stages in: no claim label, a short host-lock wait.
pub fn stage_env<'a>(
    cfg: &'a ValidConfig,
    facts: &'a NodeFacts,
    fs: &'a HostFs,
    payload_dir: &'a Path,
    restarter: &'a dyn Restarter,
) -> StageEnv<'a> {
    StageEnv {
        cfg,
        facts,
        fs,
        payload_dir,
        restarter,
        claims: &NoClaims,
        lock_wait: Duration::from_secs(5),
    }
}

/// Runs the install host stages (artifacts, cri, prune-artifacts) against a host root.
pub fn install(
    fs: &HostFs,
    cfg: &ValidConfig,
    facts: &NodeFacts,
    rt: &dyn Restarter,
) -> Result<Vec<StageReport>> {
    let payload = payload_dir();
    let env = stage_env(cfg, facts, fs, &payload, rt);
    Ok(vec![
        stages::run_artifacts(&env)?,
        stages::run_cri(&env)?,
        stages::run_prune_artifacts(&env)?,
    ])
}

/// Runs the uninstall host stages (revert-cri, remove-artifacts).
pub fn uninstall(
    fs: &HostFs,
    cfg: &ValidConfig,
    facts: &NodeFacts,
    rt: &dyn Restarter,
) -> Result<Vec<StageReport>> {
    let payload = payload_dir();
    let env = stage_env(cfg, facts, fs, &payload, rt);
    Ok(vec![
        stages::run_revert_cri(&env)?,
        stages::run_remove_artifacts(&env)?,
    ])
}

/// Runs the real stage binary standalone (no node name, so no claim) on `host` with `config`
/// and `payload`, as an amd64 containerd 2.0.5 node.
#[allow(dead_code)]
pub fn run_stage_binary(
    host: &Path,
    config: &Path,
    payload: &Path,
    args: &[&str],
) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kata-deploy-stage"))
        .arg("--config")
        .arg(config)
        .arg("--host-root")
        .arg(host)
        .arg("--payload")
        .arg(payload)
        .args(args)
        .env_remove("KATA_NODE_NAME")
        .env("KATA_NODE_MACHINE_ID", "0123456789abcdef")
        .env("KATA_NODE_CONTAINER_RUNTIME_VERSION", "containerd://2.0.5")
        .env("KATA_NODE_ARCH", "amd64")
        .env("KATA_STAGE_LOG", "warn")
        .output()
        .unwrap()
}

/// Whether missing prerequisites must fail a test (CI) rather than skip it; the same rule as
/// the test bed's `in_ci` (any value but empty, "false" or "0").
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Skips a test whose prerequisite (`what`) is missing, loudly; in CI, fails it instead.
#[allow(dead_code)]
pub fn skip_or_fail(what: &str) {
    if in_ci() {
        panic!("{what}, and CI is set: install or permit it (hack/install-deps.sh), a CI run never skips");
    }
    eprintln!("SKIPPED: {what} (set CI=true to make this a failure)");
}

/// Records what a test measured for RELIABILITY.md's generated results (hack/gen-reliability.py;
/// the same format as kata_testbed::figures::record): `test<TAB>figure` appended to
/// `KATA_FIGURES_FILE`, also printed.
pub fn figure(test: &str, text: &str) {
    use std::io::Write;
    eprintln!("figure: {test}\t{text}");
    if let Some(path) = std::env::var_os("KATA_FIGURES_FILE") {
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .and_then(|mut f| f.write_all(format!("{test}\t{text}\n").as_bytes()));
    }
}
