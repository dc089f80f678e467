//! A real containerd run by a test as a process with its own root, state and socket (command
//! line flags, so the host's config.toml stays exactly what the case put there), managed like a
//! systemd unit through the [`Restarter`] trait; and the binaries of the runtime matrix.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kata_deploy_stage::cri_client::{query_status, RuntimeReport};
use kata_deploy_stage::error::Result;
use kata_deploy_stage::hostfs::HostFs;
use kata_deploy_stage::restart::{monotonic_now_us, Restarter, UnitStatus};

use super::skip_or_fail;

/// One containerd of the matrix.
#[derive(Debug, Clone)]
pub struct CtdBin {
    /// Matrix label (`1.6.20`, `2.0.5`).
    pub label: String,
    /// The containerd binary.
    pub containerd: PathBuf,
    /// What the kubelet would report (`containerd://2.0.5`).
    pub runtime_version: String,
}

impl CtdBin {
    /// (major, minor) of this containerd.
    pub fn major_minor(&self) -> (u64, u64) {
        kata_deploy_stage::containerd::parse_runtime_version(&self.runtime_version).unwrap()
    }

    /// `containerd config default` of this binary.
    pub fn config_default(&self) -> String {
        let out = Command::new(&self.containerd)
            .args(["config", "default"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} config default: {}",
            self.label,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The merged, migrated configuration the daemon runs with for that file and its imports:
    /// `config dump`, except on containerd 2.0-2.2, whose `config dump` prints a version-2
    /// document without the daemon's 2→3 plugin migration (the runtimes vanish from it) while
    /// `config migrate` runs the same loader and the same plugin migrations as the daemon.
    pub fn config_dump(&self, config: &Path) -> std::result::Result<String, String> {
        let verb = if self.major_minor().0 == 2 && self.major_minor().1 < 3 {
            "migrate"
        } else {
            "dump"
        };
        let out = Command::new(&self.containerd)
            .arg("--config")
            .arg(config)
            .args(["config", verb])
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "containerd {} config dump failed: {}",
                self.label,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8(out.stdout).unwrap())
    }
}

/// The version containerd reports, as the kubelet shows it (`containerd://1.6.20`).
pub fn real_version(bin: &Path) -> String {
    let out = Command::new(bin).arg("--version").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let v = s
        .split_whitespace()
        .nth(2)
        .unwrap_or("0.0.0")
        .trim_start_matches('v')
        .split('~')
        .next()
        .unwrap()
        .to_string();
    format!("containerd://{v}")
}

fn testenv_bin() -> PathBuf {
    match std::env::var_os("KATA_TESTENV_CACHE") {
        Some(c) => PathBuf::from(c).join("bin"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/kata-deploy-testenv/bin"),
    }
}

/// `CONTAINERD_VERSIONS` of hack/testenv/versions.env.
pub fn pinned_containerd_versions() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/testenv/versions.env");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CONTAINERD_VERSIONS="))
        .unwrap_or_else(|| panic!("no CONTAINERD_VERSIONS in {}", path.display()));
    line.trim_matches('"')
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Debian's containerd (1.6) and every pinned containerd build of the test bed. A missing one
/// is skipped with a message outside CI and FAILS the test in CI.
pub fn matrix_bins() -> Vec<CtdBin> {
    let mut out = Vec::new();
    let mut candidates = vec![PathBuf::from("/usr/bin/containerd")];
    for v in pinned_containerd_versions() {
        candidates.push(
            testenv_bin()
                .join(format!("containerd-{v}"))
                .join("containerd"),
        );
    }
    for c in candidates {
        if !c.is_file() {
            skip_or_fail(&format!("containerd {} missing (Debian: hack/install-deps.sh; builds: hack/testenv/build.sh)", c.display()));
            continue;
        }
        let runtime_version = real_version(&c);
        let label = runtime_version
            .trim_start_matches("containerd://")
            .to_string();
        out.push(CtdBin {
            label,
            containerd: c,
            runtime_version,
        });
    }
    out
}

/// A containerd process managed like a systemd unit: `restart` stops and starts it with the
/// host's /etc/containerd/config.toml (imports mapped under the fake host root).
pub struct RealContainerd {
    pub bin: CtdBin,
    pub host: PathBuf,
    pub work: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
    child: Mutex<Option<Child>>,
    started_us: AtomicU64,
    pub restarts: AtomicU64,
    /// Run just before the next restart (simulates a config containerd refuses).
    pub before_restart: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// The next restart restarts containerd, then "kills the stage" (returns an injected fault),
    /// as when the stage runs inside the runtime it restarts.
    pub kill_stage_on_next_restart: std::sync::atomic::AtomicBool,
    /// containerd refuses to start (exits with an error: an unknown command line flag) while
    /// the host's config or a file it imports contains this text.
    pub refuse_config_containing: Mutex<Option<String>>,
}

pub const MAIN_CONFIG: &str = "/etc/containerd/config.toml";

impl RealContainerd {
    pub fn new(bin: CtdBin, host: &Path, work: &Path) -> Self {
        RealContainerd {
            bin,
            host: host.to_path_buf(),
            work: work.to_path_buf(),
            sock: work.join("containerd.sock"),
            log: work.join("containerd.log"),
            child: Mutex::new(None),
            started_us: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            before_restart: Mutex::new(None),
            kill_stage_on_next_restart: false.into(),
            refuse_config_containing: Mutex::new(None),
        }
    }

    /// The host's main config as containerd on that host reads it: the file behind any link,
    /// `imports` mapped under the fake host root (what a chroot would do). A missing config
    /// maps to an empty file: containerd runs on its defaults either way (its daemon ignores a
    /// missing file, but `config dump` of 1.x refuses one).
    pub fn effective(&self) -> PathBuf {
        let out = self.work.join("effective-config.toml");
        let fs = HostFs::new(&self.host, false);
        let Some(bytes) = fs.read(Path::new(MAIN_CONFIG)).unwrap() else {
            let mut doc = toml_edit::DocumentMut::new();
            self.confine_listeners(&mut doc);
            std::fs::write(&out, doc.to_string()).unwrap();
            return out;
        };
        let text = String::from_utf8(bytes).unwrap();
        let mapped = match text.parse::<toml_edit::DocumentMut>() {
            Ok(mut doc) => {
                if let Some(arr) = doc.get_mut("imports").and_then(|i| i.as_array_mut()) {
                    let m: Vec<String> = arr
                        .iter()
                        .filter_map(|v| v.as_str())
                        .map(|p| {
                            self.host
                                .join(p.trim_start_matches('/'))
                                .display()
                                .to_string()
                        })
                        .collect();
                    arr.clear();
                    for x in m {
                        arr.push(x);
                    }
                }
                self.confine_listeners(&mut doc);
                doc.to_string()
            }
            Err(_) => text,
        };
        std::fs::write(&out, mapped).unwrap();
        out
    }

    /// Points the sockets a config names (containerd 2.4's `config default` names its ttrpc
    /// socket; 1.7+ name NRI's) at this instance's work dir, as `--address` does for the gRPC
    /// one: cases running at once must not share a host path.
    fn confine_listeners(&self, doc: &mut toml_edit::DocumentMut) {
        let sock = self.sock.display().to_string();
        if self.bin.major_minor().0 >= 2 {
            // NRI is on by default since 2.0, at /var/run/nri/nri.sock when no config names it
            // (the full plugin ID is honoured in every config version).
            let implicit = || {
                let mut t = toml_edit::Table::new();
                t.set_implicit(true);
                toml_edit::Item::Table(t)
            };
            let nri = doc
                .entry("plugins")
                .or_insert_with(implicit)
                .as_table_like_mut()
                .and_then(|p| {
                    p.entry("io.containerd.nri.v1.nri")
                        .or_insert(toml_edit::table())
                        .as_table_like_mut()
                });
            if let Some(nri) = nri.filter(|n| n.get("socket_path").is_none()) {
                nri.insert("socket_path", toml_edit::value(format!("{sock}.nri")));
            }
        }
        let plugins = doc.get_mut("plugins").and_then(|p| p.as_table_like_mut());
        let Some(plugins) = plugins else { return };
        for (plugin, key, suffix) in [
            ("io.containerd.server.v1.grpc", "address", ""),
            ("io.containerd.server.v1.ttrpc", "address", ".ttrpc"),
            ("io.containerd.server.v1.debug", "address", ".debug"),
            ("io.containerd.nri.v1.nri", "socket_path", ".nri"),
        ] {
            let Some(addr) = plugins
                .get_mut(plugin)
                .and_then(|t| t.as_table_like_mut())
                .and_then(|t| t.get_mut(key))
            else {
                continue;
            };
            if addr.as_str().is_some_and(|a| !a.is_empty()) {
                *addr = toml_edit::value(format!("{sock}{suffix}"));
            }
        }
    }

    /// `config dump` of what the host's config makes containerd load now.
    pub fn dump(&self) -> std::result::Result<String, String> {
        self.bin.config_dump(&self.effective())
    }

    fn refuses(&self) -> bool {
        let Some(needle) = self.refuse_config_containing.lock().unwrap().clone() else {
            return false;
        };
        let eff = std::fs::read_to_string(self.effective()).unwrap_or_default();
        let mut texts = vec![eff.clone()];
        if let Ok(doc) = eff.parse::<toml_edit::DocumentMut>() {
            for i in doc
                .get("imports")
                .and_then(|i| i.as_array())
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
            {
                texts.push(std::fs::read_to_string(i).unwrap_or_default());
            }
        }
        texts.iter().any(|t| t.contains(&needle))
    }

    pub fn start(&self) {
        // Appended: a failed start stays readable after the rollback's start.
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        use std::io::Write;
        let _ = writeln!(
            log,
            "---- start {} ----",
            self.restarts.load(Ordering::SeqCst)
        );
        let mut cmd = Command::new(&self.bin.containerd);
        if self.refuses() {
            cmd.arg("--refused-by-test");
        }
        let child = cmd
            .arg("--config")
            .arg(self.effective())
            .arg("--root")
            .arg(self.work.join("root"))
            .arg("--state")
            .arg(self.work.join("state"))
            .arg("--address")
            .arg(&self.sock)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.started_us.store(monotonic_now_us(), Ordering::SeqCst);
        *self.child.lock().unwrap() = Some(child);
    }

    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(c.id() as i32).unwrap(),
                rustix::process::Signal::TERM,
            );
            for _ in 0..200 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    pub fn alive(&self) -> bool {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The CRI Status of the running process (what the kubelet sees).
    pub fn cri(&self) -> std::result::Result<RuntimeReport, String> {
        query_status(&self.sock, Duration::from_secs(5))
    }

    pub fn cri_ok(&self) -> bool {
        self.alive() && self.cri().is_ok()
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.cri_ok() {
                return;
            }
            if !self.alive() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "containerd {} did not become ready:\n{}",
            self.bin.label,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Runtime handler names from the running process's own "Start cri plugin with config" log
    /// line (containerd 1.x).
    pub fn loaded_handlers(&self) -> Option<Vec<String>> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        // The log is appended across restarts: the last start's report.
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("Start cri plugin with config"))?;
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
        if self
            .kill_stage_on_next_restart
            .swap(false, Ordering::SeqCst)
        {
            return Err(kata_deploy_stage::error::StageError::InjectedFault { after: 0 });
        }
        Ok(())
    }
    fn status(&self, _unit: &str) -> Result<UnitStatus> {
        Ok(UnitStatus {
            active: self.cri_ok(),
            active_since_mono_us: Some(self.started_us.load(Ordering::SeqCst)),
        })
    }
    fn enable_now(&self, _unit: &str, _unit_file: &Path) -> Result<()> {
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

/// A fresh host root (the directories the stages expect, a machine id).
pub fn bare_host(work: &Path) -> PathBuf {
    let host = work.join("host");
    for d in [
        "etc/containerd",
        "opt",
        "var/lib",
        "run",
        "etc/systemd/system",
    ] {
        std::fs::create_dir_all(host.join(d)).unwrap();
    }
    std::fs::write(host.join("etc/machine-id"), "0123456789abcdef\n").unwrap();
    host
}

/// TOML (a `config dump`) as JSON, for whole-document comparisons.
pub fn toml_to_json(text: &str) -> serde_json::Value {
    let doc: toml_edit::DocumentMut = text
        .parse()
        .unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"));
    item_json(doc.as_item())
}

fn item_json(item: &toml_edit::Item) -> serde_json::Value {
    use serde_json::Value;
    match item {
        toml_edit::Item::None => Value::Null,
        toml_edit::Item::Value(v) => value_json(v),
        toml_edit::Item::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.to_string(), item_json(v)))
                .collect(),
        ),
        toml_edit::Item::ArrayOfTables(a) => Value::Array(
            a.iter()
                .map(|t| item_json(&toml_edit::Item::Table(t.clone())))
                .collect(),
        ),
    }
}

fn value_json(v: &toml_edit::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        toml_edit::Value::String(s) => Value::String(s.value().clone()),
        toml_edit::Value::Integer(i) => Value::from(*i.value()),
        toml_edit::Value::Float(f) => Value::from(*f.value()),
        toml_edit::Value::Boolean(b) => Value::Bool(*b.value()),
        toml_edit::Value::Datetime(d) => Value::String(d.value().to_string()),
        toml_edit::Value::Array(a) => Value::Array(a.iter().map(value_json).collect()),
        toml_edit::Value::InlineTable(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.to_string(), value_json(v)))
                .collect(),
        ),
    }
}

/// Differences between two JSON documents, as `path: before -> after` lines.
pub fn json_diff(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = format!("{path}.{k}");
                    match (x.get(k), y.get(k)) {
                        (Some(u), Some(v)) => walk(&p, u, v, out),
                        (Some(u), None) => out.push(format!("{p}: {u} -> (absent)")),
                        (None, Some(v)) => out.push(format!("{p}: (absent) -> {v}")),
                        (None, None) => {}
                    }
                }
            }
            _ if a != b => out.push(format!("{path}: {a} -> {b}")),
            _ => {}
        }
    }
    walk("", a, b, &mut out);
    out
}
