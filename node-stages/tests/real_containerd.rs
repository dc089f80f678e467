//! The cri stage against a real containerd (Debian's 1.6 here), started by the test as a
//! process with its own root, state and socket: containerd must load the configuration we
//! wrote and serve our handlers (CRI RuntimeService/Status over the socket, the CRI plugin's own
//! "Start cri plugin with config" log line, `ctr plugins ls`), a runtime that does not come back is
//! rolled back, and revert restores the original byte-for-byte.
//!
//! Without containerd the tests skip with a message, except with CI=true, where they FAIL.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use kata_deploy_stage::config::NodeFacts;
use kata_deploy_stage::error::{Result, StageError};
use kata_deploy_stage::hostfs::HostFs;
use kata_deploy_stage::restart::{monotonic_now_us, Restarter, UnitStatus};

fn find_bin(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// containerd and ctr, or None (skip) outside CI; fails in CI so a missing binary is noticed.
fn containerd_bins() -> Option<(PathBuf, PathBuf)> {
    match (find_bin("containerd"), find_bin("ctr")) {
        (Some(c), Some(t)) => Some((c, t)),
        _ => {
            skip_or_fail("containerd/ctr not found in PATH (Debian: apt-get install containerd)");
            None
        }
    }
}

/// A containerd process managed like a systemd unit.
struct RealContainerd {
    host: PathBuf,
    work: PathBuf,
    bin: PathBuf,
    ctr: PathBuf,
    config: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    child: Mutex<Option<Child>>,
    started_us: AtomicU64,
    restarts: AtomicU64,
    /// Run just before the next restart (simulates a config containerd refuses).
    before_restart: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl RealContainerd {
    fn new(bin: PathBuf, ctr: PathBuf, host: &Path, work: &Path) -> Self {
        RealContainerd {
            host: host.to_path_buf(),
            work: work.to_path_buf(),
            bin,
            ctr,
            config: host.join("etc/containerd/config.toml"),
            sock: work.join("containerd.sock"),
            log: work.join("containerd.log"),
            child: Mutex::new(None),
            started_us: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            before_restart: Mutex::new(None),
        }
    }

    /// The host's config as containerd on that host sees it: `imports` are host paths, which
    /// live under the fake host root here (what a chroot would do).
    fn effective(&self, config: &Path) -> PathBuf {
        let text = std::fs::read_to_string(config).unwrap_or_default();
        let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else { return config.to_path_buf() };
        if let Some(arr) = doc.get_mut("imports").and_then(|i| i.as_array_mut()) {
            let mapped: Vec<String> = arr.iter().filter_map(|v| v.as_str()).map(|p| self.host.join(p.trim_start_matches('/')).display().to_string()).collect();
            arr.clear();
            for m in mapped {
                arr.push(m);
            }
        }
        let out = self.work.join("effective-config.toml");
        std::fs::write(&out, doc.to_string()).unwrap();
        out
    }

    fn start(&self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let child = Command::new(&self.bin).arg("--config").arg(self.effective(&self.config)).stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null()).spawn().unwrap();
        self.started_us.store(monotonic_now_us(), Ordering::SeqCst);
        *self.child.lock().unwrap() = Some(child);
    }

    fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            for _ in 0..100 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    fn alive(&self) -> bool {
        self.child.lock().unwrap().as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn cri_ok(&self) -> bool {
        let out = Command::new(&self.ctr).arg("--address").arg(&self.sock).args(["plugins", "ls"]).output();
        out.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).lines().any(|l| l.contains("io.containerd.grpc.v1") && l.contains(" cri ") && l.trim_end().ends_with("ok")))
    }

    fn wait_ready(&self) {
        for _ in 0..200 {
            if self.alive() && self.cri_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("containerd did not become ready:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
    }

    /// Runtime handler names from the running process's own CRI config report.
    fn loaded_handlers(&self) -> Option<Vec<String>> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        let line = log.lines().find(|l| l.contains("Start cri plugin with config"))?;
        let start = line.find("Runtimes:map[")? + "Runtimes:map[".len();
        let mut names = Vec::new();
        let (mut depth, mut name) = (0usize, String::new());
        for c in line[start..].chars() {
            match c {
                '{' | '[' => depth += 1,
                '}' if depth > 0 => depth -= 1,
                ']' if depth == 0 => break,
                ']' => depth -= 1,
                ':' if depth == 0 => names.push(std::mem::take(&mut name).trim().to_string()),
                c if depth == 0 => name.push(c),
                _ => {}
            }
        }
        Some(names)
    }

    /// `containerd config dump`: the merged configuration containerd would load (imports too).
    fn config_dump(&self, config: &Path) -> String {
        let out = Command::new(&self.bin).arg("--config").arg(self.effective(config)).args(["config", "dump"]).output().unwrap();
        assert!(out.status.success(), "config dump failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for RealContainerd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Restarter for RealContainerd {
    fn restart(&self, _unit: &str) -> Result<()> {
        if let Some(f) = self.before_restart.lock().unwrap().take() {
            f();
        }
        self.stop();
        self.restarts.fetch_add(1, Ordering::SeqCst);
        self.start();
        Ok(())
    }
    fn status(&self, _unit: &str) -> Result<UnitStatus> {
        let active = self.alive() && self.cri_ok();
        Ok(UnitStatus { active, active_since_mono_us: Some(self.started_us.load(Ordering::SeqCst)) })
    }
    fn enable_now(&self, _unit: &str) -> Result<()> {
        Ok(())
    }
    fn disable_now(&self, _unit: &str) -> Result<()> {
        Ok(())
    }
    fn served_handlers(&self, _unit: &str) -> Result<Option<Vec<String>>> {
        // The production path: ask the running runtime over the CRI API.
        kata_deploy_stage::restart::cri_served_handlers(Some(&self.sock))
    }
}

/// A host root whose /etc/containerd/config.toml is containerd's own default, pointed at a
/// private root, state and socket.
fn setup(bin: &Path, work: &Path) -> PathBuf {
    let host = work.join("host");
    std::fs::create_dir_all(host.join("etc/containerd")).unwrap();
    for d in ["opt", "var/lib", "run", "etc/systemd/system"] {
        std::fs::create_dir_all(host.join(d)).unwrap();
    }
    std::fs::write(host.join("etc/machine-id"), "0123456789abcdef\n").unwrap();
    let out = Command::new(bin).args(["config", "default"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    // Point root, state and the socket at the work dir, keeping everything else byte-stable.
    let mut doc: toml_edit::DocumentMut = text.parse().unwrap();
    let set = |item: &mut toml_edit::Item, v: &Path| {
        let decor = item.as_value().map(|x| x.decor().clone()).unwrap_or_default();
        *item = toml_edit::value(v.display().to_string());
        *item.as_value_mut().unwrap().decor_mut() = decor;
    };
    set(&mut doc["root"], &work.join("root"));
    set(&mut doc["state"], &work.join("state"));
    set(&mut doc["grpc"]["address"], &work.join("containerd.sock"));
    let text = doc.to_string();
    std::fs::write(host.join("etc/containerd/config.toml"), text).unwrap();
    host
}

/// A running containerd on a fresh host root (fields drop in order: containerd stops before its
/// work directory goes).
struct Running {
    rt: RealContainerd,
    host: PathBuf,
    /// The host's config.toml before anything touched it.
    original: Vec<u8>,
    bin: PathBuf,
    _work: tempfile::TempDir,
}

/// Starts containerd on a host root with its default configuration; None (skip) outside CI when
/// containerd is not installed.
fn running_containerd() -> Option<Running> {
    let (bin, ctr) = containerd_bins()?;
    let work = tempfile::Builder::new().prefix("kata-ctd").tempdir().unwrap();
    let host = setup(&bin, work.path());
    let original = std::fs::read(host.join("etc/containerd/config.toml")).unwrap();
    let rt = RealContainerd::new(bin.clone(), ctr, &host, work.path());
    rt.start();
    rt.wait_ready();
    Some(Running { rt, host, original, bin, _work: work })
}

fn node(version: &str) -> NodeFacts {
    NodeFacts { name: Some("n".into()), uid: Some("u".into()), machine_id: Some("0123456789abcdef".into()), container_runtime_version: Some(version.into()), ..Default::default() }
}

fn real_version(bin: &Path) -> String {
    let out = Command::new(bin).arg("--version").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let v = s.split_whitespace().nth(2).unwrap_or("1.6.0").trim_start_matches('v').split('~').next().unwrap().to_string();
    format!("containerd://{v}")
}

const SHIMS: &str = "runtimeReadyTimeoutSeconds: 30\nshims:\n  - name: qemu\n  - name: my-gpu\n    baseConfig: qemu-nvidia-gpu\n    dropIn: |\n      [hypervisor.qemu]\n      default_memory = 4096\n";

#[test]
fn real_containerd_loads_our_handlers_converges_and_reverts() {
    let Some(c) = running_containerd() else { return };
    let (rt, host, original) = (&c.rt, c.host.clone(), c.original.clone());
    let bin = c.bin.clone();
    assert_eq!(rt.loaded_handlers().unwrap(), vec!["runc".to_string()]);
    let facts = node(&real_version(&bin));
    let cfg = config(SHIMS);

    install(&HostFs::new(&host, false), &cfg, &facts, rt).unwrap();
    assert_eq!(rt.restarts.load(Ordering::SeqCst), 1);
    let mut served = rt.loaded_handlers().unwrap();
    served.sort();
    assert_eq!(served, ["kata-my-gpu", "kata-qemu", "runc"], "running containerd must serve our handlers");
    assert!(rt.cri_ok());
    // The CRI API of the running containerd (what the kubelet sees) lists them too.
    let report = kata_deploy_stage::cri_client::query_status(&rt.sock, Duration::from_secs(5)).unwrap();
    assert_eq!(report.handlers(), ["kata-my-gpu", "kata-qemu", "runc"], "{report:?}");
    assert!(kata_deploy_stage::restart::cri_served_handlers(Some(&rt.sock)).unwrap().unwrap().contains(&"kata-qemu".to_string()));
    // What containerd itself reads from the file: our handler settings, runc kept.
    let dump = rt.config_dump(&host.join("etc/containerd/config.toml"));
    let doc: toml_edit::DocumentMut = dump.parse().unwrap();
    let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert_eq!(runtimes["kata-qemu"]["runtime_type"].as_str(), Some("io.containerd.kata-qemu.v2"));
    assert_eq!(runtimes["kata-qemu"]["runtime_path"].as_str(), Some("/opt/kata/bin/containerd-shim-kata-v2"));
    assert_eq!(runtimes["kata-qemu"]["privileged_without_host_devices"].as_bool(), Some(true));
    assert_eq!(runtimes["kata-my-gpu"]["options"]["ConfigPath"].as_str(), Some("/opt/kata/share/defaults/kata-containers/runtimes/my-gpu/configuration-my-gpu.toml"));
    assert_eq!(runtimes["kata-qemu"]["pod_annotations"].as_array().unwrap().get(0).and_then(|v| v.as_str()), Some("io.katacontainers.*"));
    assert!(runtimes.get("runc").is_some());

    // Re-run: nothing written, containerd not restarted (same process).
    let pid = rt.pid();
    let fs = HostFs::new(&host, false);
    install(&fs, &cfg, &facts, rt).unwrap();
    assert_eq!(fs.ops_done(), 0);
    assert_eq!(rt.pid(), pid);
    assert_eq!(rt.restarts.load(Ordering::SeqCst), 1);

    // Revert: byte-for-byte original, containerd restarted and no longer serving our handlers.
    uninstall(&HostFs::new(&host, false), &cfg, &facts, rt).unwrap();
    assert_eq!(std::fs::read(host.join("etc/containerd/config.toml")).unwrap(), original);
    assert_eq!(rt.loaded_handlers().unwrap(), vec!["runc".to_string()]);
    assert_eq!(kata_deploy_stage::cri_client::query_status(&rt.sock, Duration::from_secs(5)).unwrap().handlers(), ["runc"]);
    assert_eq!(rt.restarts.load(Ordering::SeqCst), 2);
    assert!(!host.join("opt/kata").exists() && !host.join("var/lib/kata-deploy").exists());
}

#[test]
fn real_containerd_that_does_not_come_back_is_rolled_back() {
    let Some(c) = running_containerd() else { return };
    let (rt, host, original) = (&c.rt, c.host.clone(), c.original.clone());
    let bin = c.bin.clone();
    let facts = node(&real_version(&bin));
    let cfg = config(&SHIMS.replace("runtimeReadyTimeoutSeconds: 30", "runtimeReadyTimeoutSeconds: 5"));
    // Something corrupts the config right before the restart: containerd refuses to start.
    let path = host.join("etc/containerd/config.toml");
    *rt.before_restart.lock().unwrap() = Some(Box::new(move || {
        let mut t = std::fs::read_to_string(&path).unwrap();
        t.push_str("\n[plugins.\"io.containerd.grpc.v1.cri\"\nbroken = \n");
        std::fs::write(&path, t).unwrap();
    }));
    let e = install(&HostFs::new(&host, false), &cfg, &facts, rt).unwrap_err();
    assert!(matches!(e, StageError::Runtime { .. }), "{e}");
    assert!(e.to_string().contains("previous configuration was restored"), "{e}");
    assert_eq!(std::fs::read(host.join("etc/containerd/config.toml")).unwrap(), original, "previous config restored");
    assert!(rt.alive() && rt.cri_ok(), "containerd must be running again");
    assert_eq!(rt.loaded_handlers().unwrap(), vec!["runc".to_string()]);
}

#[test]
fn real_containerd_ignoring_our_dropin_is_rolled_back() {
    // The kubelet reports containerd 2.x but the node really runs 1.6: we write a v3 drop-in
    // and an import; containerd 1.6 starts but does not serve our handlers -> roll back.
    let Some(c) = running_containerd() else { return };
    let (rt, host, original) = (&c.rt, c.host.clone(), c.original.clone());
    let cfg = config(&SHIMS.replace("runtimeReadyTimeoutSeconds: 30", "runtimeReadyTimeoutSeconds: 5"));
    let e = install(&HostFs::new(&host, false), &cfg, &node("containerd://2.0.5"), rt).unwrap_err();
    assert!(e.to_string().contains("previous configuration was restored"), "{e}");
    assert_eq!(std::fs::read(host.join("etc/containerd/config.toml")).unwrap(), original);
    assert!(!host.join("etc/containerd/conf.d/kata-deploy.toml").exists());
    assert_eq!(rt.loaded_handlers().unwrap(), vec!["runc".to_string()]);
    assert_eq!(rt.restarts.load(Ordering::SeqCst), 2);
}

#[test]
fn containerd_1_x_imports_replace_whole_plugin_sections() {
    // Why containerd < 2.0 gets an in-place edit, not a drop-in: an imported file that defines
    // the CRI plugin replaces the main file's whole CRI section (runc disappears).
    let Some((bin, ctr)) = containerd_bins() else { return };
    let work = tempfile::Builder::new().prefix("kata-ctd").tempdir().unwrap();
    let host = setup(&bin, work.path());
    let rt = RealContainerd::new(bin.clone(), ctr, &host, work.path());
    let main = host.join("etc/containerd/config.toml");
    let dropin = host.join("etc/containerd/kata.toml");
    std::fs::write(&dropin, "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu]\n  runtime_type = \"io.containerd.kata-qemu.v2\"\n").unwrap();
    let text = std::fs::read_to_string(&main).unwrap().replacen("imports = []", "imports = [\"/etc/containerd/kata.toml\"]", 1);
    std::fs::write(&main, text).unwrap();
    let dump = rt.config_dump(&main);
    let doc: toml_edit::DocumentMut = dump.parse().unwrap();
    let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert!(runtimes.get("kata-qemu").is_some());
    let version = real_version(&bin);
    if version.starts_with("containerd://1.") {
        assert!(runtimes.get("runc").is_none(), "containerd {version} merged plugin sections deeply; drop-ins would be safe");
    }
}

/// containerd 2.x (config version 3): our drop-in in conf.d plus an `imports` entry. Runs when
/// KATA_TEST_CONTAINERD2 points at a containerd 2.x binary (e.g. built from the Go module proxy:
/// `go build -tags "no_btrfs no_devmapper no_zfs no_aufs" ./cmd/containerd` in containerd v2.0.5).
#[test]
fn real_containerd_2_merges_our_v3_dropin() {
    let Some(bin) = std::env::var_os("KATA_TEST_CONTAINERD2").map(PathBuf::from) else {
        eprintln!("SKIPPED: set KATA_TEST_CONTAINERD2=<containerd 2.x binary> to run");
        return;
    };
    let Some((_, ctr)) = containerd_bins() else { return };
    let work = tempfile::Builder::new().prefix("kata-ctd2").tempdir().unwrap();
    let host = setup(&bin, work.path());
    let original = std::fs::read(host.join("etc/containerd/config.toml")).unwrap();
    let rt = RealContainerd::new(bin.clone(), ctr, &host, work.path());
    rt.start();
    rt.wait_ready();
    let facts = node(&real_version(&bin));
    assert!(facts.container_runtime_version.as_deref().unwrap().starts_with("containerd://2."), "{:?}", facts.container_runtime_version);
    let cfg = config(&format!("{SHIMS}  - name: qemu-coco-dev\n    containerdSnapshotter: nydus\n"));
    install(&HostFs::new(&host, false), &cfg, &facts, &rt).unwrap();
    assert!(host.join("etc/containerd/conf.d/kata-deploy.toml").exists());
    let report = kata_deploy_stage::cri_client::query_status(&rt.sock, Duration::from_secs(5)).unwrap();
    let handlers = report.handlers();
    for h in ["kata-qemu", "kata-my-gpu", "kata-qemu-coco-dev", "runc"] {
        assert!(handlers.contains(&h.to_string()), "{h} not served: {report:?}");
    }
    // The merged config keeps the main file's settings (deep merge of plugin sections in 2.x).
    let dump = rt.config_dump(&host.join("etc/containerd/config.toml"));
    let doc: toml_edit::DocumentMut = dump.parse().unwrap();
    let runtimes = &doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"];
    assert_eq!(runtimes["kata-qemu-coco-dev"]["snapshotter"].as_str(), Some("nydus"));
    assert!(runtimes.get("runc").is_some());
    let images = &doc["plugins"]["io.containerd.cri.v1.images"];
    assert_eq!(images["disable_snapshot_annotations"].as_bool(), Some(false));
    assert!(images.get("pinned_images").is_some(), "main file's image settings lost: {dump}");
    assert_eq!(doc["proxy_plugins"]["nydus"]["address"].as_str(), Some("/run/containerd-nydus/containerd-nydus-grpc.sock"));
    // No-op re-run, then revert byte-for-byte.
    let pid = rt.pid();
    install(&HostFs::new(&host, false), &cfg, &facts, &rt).unwrap();
    assert_eq!(rt.pid(), pid);
    uninstall(&HostFs::new(&host, false), &cfg, &facts, &rt).unwrap();
    assert_eq!(std::fs::read(host.join("etc/containerd/config.toml")).unwrap(), original);
    assert!(!host.join("etc/containerd/conf.d").exists());
    let report = kata_deploy_stage::cri_client::query_status(&rt.sock, Duration::from_secs(5)).unwrap();
    assert!(!report.handlers().iter().any(|h| h.starts_with("kata-")), "{report:?}");
}
