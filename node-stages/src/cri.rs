//! The cri and revert-cri stages: register (or remove) our handlers with the node's runtime.
//!
//! * Drop-ins where the runtime merges them (containerd ≥ 2.0 `imports`, k3s/rke2 templates
//!   extending `{{ template "base" . }}`, k0s `containerd.d`, CRI-O `crio.conf.d`); an in-place
//!   edit with a byte-exact backup otherwise (containerd 1.x replaces whole plugin sections on
//!   import, proven against the real containerd 1.6 in tests/real_containerd.rs).
//! * Drop-ins are rendered whole from the current configuration; in-place edits are recomputed
//!   from the pristine backup, so whatever is no longer configured disappears.
//! * Files are written only when their content changes. The runtime is restarted only when it
//!   has not loaded the current content: a pending stamp (content hash, boot id, monotonic time)
//!   is recorded before the restart, and a retry after the restart killed this stage sees that
//!   the runtime (re)started after the stamp and does not restart again.
//! * If the runtime does not come back (or comes back without our handlers), the previous files
//!   are restored and the runtime restarted again: a node is never left without a runtime.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{CriKind, Install, NodeFacts, RestartMode, ValidConfig};
use crate::containerd::{self, ConfigVersion, KataContainerd, KataHandler, ProxySnapshotter};
use crate::crio::{render_crio_dropin, CrioHandler};
use crate::error::{Result, StageError};
use crate::hostfs::{sha256_hex, HostFs};
use crate::restart::{boot_id, monotonic_now_us, Restarter};
use crate::state::{read_json, write_json, CriFile, CriState, Original, PendingRestart, PreviousFile, CRI_STATE};

/// Plain containerd's main configuration file.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// Plain containerd's drop-in directory (containerd ≥ 2.0).
pub const CONTAINERD_CONF_D: &str = "/etc/containerd/conf.d";
/// CRI-O's main configuration file.
pub const CRIO_CONFIG: &str = "/etc/crio/crio.conf";
/// CRI-O drop-in directory.
pub const CRIO_CONF_D: &str = "/etc/crio/crio.conf.d";
/// microk8s containerd template.
pub const MICROK8S_TEMPLATE: &str = "/var/snap/microk8s/current/args/containerd-template.toml";
/// k0s containerd drop-in directory.
pub const K0S_CONTAINERD_D: &str = "/etc/k0s/containerd.d";

/// Detects the CRI from the runtime version the kubelet reports and host paths.
pub fn detect_cri_from(runtime_version: Option<&str>, exists: &dyn Fn(&str) -> bool) -> std::result::Result<CriKind, String> {
    let v = runtime_version.unwrap_or("");
    if v.starts_with("cri-o://") {
        return Ok(CriKind::Crio);
    }
    // rke2's containerd also reports "-k3s" versions: check rke2's tree first.
    if exists("/var/lib/rancher/rke2/agent/etc/containerd") || exists("/etc/rancher/rke2") {
        return Ok(CriKind::Rke2);
    }
    if exists("/var/lib/rancher/k3s/agent/etc/containerd") || exists("/etc/rancher/k3s") {
        let agent = ["/etc/systemd/system/k3s-agent.service", "/usr/lib/systemd/system/k3s-agent.service"].iter().any(|p| exists(p));
        let server = ["/etc/systemd/system/k3s.service", "/usr/lib/systemd/system/k3s.service"].iter().any(|p| exists(p));
        return Ok(if agent && !server { CriKind::K3sAgent } else { CriKind::K3s });
    }
    if exists("/var/snap/microk8s/current/args") {
        return Ok(CriKind::Microk8s);
    }
    if exists("/etc/k0s") || exists("/var/lib/k0s") {
        return Ok(CriKind::K0s);
    }
    if v.starts_with("containerd://") || exists("/etc/containerd") {
        return Ok(CriKind::Containerd);
    }
    if exists("/etc/crio") {
        return Ok(CriKind::Crio);
    }
    Err(format!(
        "cannot tell which CRI this node runs (runtime version {v:?}; none of /etc/containerd, /etc/crio, /var/lib/rancher/{{k3s,rke2}}, /etc/k0s, /var/snap/microk8s exist). Set `cri:` in the configuration"
    ))
}

/// The CRI configured or detected on this host.
pub fn resolve_cri(fs: &HostFs, cfg: &ValidConfig, facts: &NodeFacts) -> Result<CriKind> {
    if let Some(k) = cfg.cri {
        return Ok(k);
    }
    detect_cri_from(facts.container_runtime_version.as_deref(), &|p| fs.exists(Path::new(p)))
        .map_err(|m| StageError::config(&cfg.file, "cri", m))
}

/// The systemd unit that (re)loads the runtime configuration.
pub fn runtime_unit(fs: &HostFs, kind: CriKind) -> String {
    let has_unit = |name: &str| {
        ["/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system", "/usr/local/lib/systemd/system"]
            .iter()
            .any(|d| fs.exists(&Path::new(d).join(name)))
    };
    match kind {
        CriKind::Containerd => "containerd.service".into(),
        CriKind::K3s => "k3s.service".into(),
        CriKind::K3sAgent => "k3s-agent.service".into(),
        CriKind::Rke2 => if has_unit("rke2-agent.service") && !has_unit("rke2-server.service") { "rke2-agent.service" } else { "rke2-server.service" }.into(),
        CriKind::K0s => if has_unit("k0scontroller.service") { "k0scontroller.service" } else { "k0sworker.service" }.into(),
        CriKind::Microk8s => "snap.microk8s.daemon-containerd.service".into(),
        CriKind::Crio => "crio.service".into(),
    }
}

/// Units that may run a flavour's runtime: the one guessed from unit files first.
pub fn unit_candidates(guess: &str, kind: CriKind) -> Vec<String> {
    let all: &[&str] = match kind {
        CriKind::K3s | CriKind::K3sAgent => &["k3s.service", "k3s-agent.service"],
        CriKind::Rke2 => &["rke2-server.service", "rke2-agent.service"],
        CriKind::K0s => &["k0scontroller.service", "k0sworker.service"],
        _ => &[],
    };
    let mut out = vec![guess.to_string()];
    out.extend(all.iter().filter(|u| **u != guess).map(|u| u.to_string()));
    out
}

/// The first active unit among `candidates`, else the first candidate (pure).
pub fn choose_active_unit(candidates: &[String], active: &dyn Fn(&str) -> bool) -> String {
    candidates.iter().find(|u| active(u)).unwrap_or(&candidates[0]).clone()
}

/// The CRI socket of a runtime flavour (host path).
pub fn cri_socket(kind: CriKind) -> &'static str {
    match kind {
        CriKind::Containerd => "/run/containerd/containerd.sock",
        CriKind::K3s | CriKind::K3sAgent | CriKind::Rke2 => "/run/k3s/containerd/containerd.sock",
        CriKind::K0s => "/run/k0s/containerd.sock",
        CriKind::Microk8s => "/var/snap/microk8s/common/run/containerd.sock",
        CriKind::Crio => "/var/run/crio/crio.sock",
    }
}

/// The containerd major version: from the node's reported runtime version, else guessed from
/// the existing configuration (version 3 means containerd 2.x).
pub fn containerd_major(facts: &NodeFacts, existing_config: Option<&str>) -> u64 {
    if let Some((major, _)) = facts.container_runtime_version.as_deref().and_then(containerd::parse_runtime_version) {
        return major;
    }
    match existing_config.and_then(|t| containerd::parse(t).ok()).map(|d| containerd::detect_version(&d)) {
        Some(v) if v.split_cri_plugins() => 2,
        _ => 1,
    }
}

/// Kata handlers for containerd from the configuration.
pub fn kata_containerd(cfg: &ValidConfig, install: &Install, containerd_major: u64, arch: Option<&str>) -> KataContainerd {
    let snapshotter = install.nydus_snapshotter();
    let arch = arch.map(str::to_string).unwrap_or_else(|| crate::shims::kube_arch(std::env::consts::ARCH).to_string());
    KataContainerd {
        image_platform: (containerd_major >= 2).then(|| format!("linux/{arch}")),
        handlers: cfg
            .cfg
            .shims
            .iter()
            .map(|s| KataHandler {
                name: install.handler(&s.name),
                runtime_type: install.runtime_type(&s.name),
                runtime_path: install.shim_binary(s).display().to_string(),
                config_path: install.shim_config_path(&s.name).display().to_string(),
                snapshotter: (s.containerd_snapshotter == "nydus").then(|| snapshotter.clone()),
            })
            .collect(),
        proxy: cfg.uses_nydus().then(|| ProxySnapshotter { name: snapshotter.clone(), address: install.nydus_socket() }),
    }
}

/// How one CRI file should look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// A file we own entirely.
    Whole(Vec<u8>),
    /// Add our handlers to an existing (or new) containerd config or template.
    EditKata {
        /// Whether to set the guest-pull flags (false when a base template owns those tables).
        set_flags: bool,
        /// Schema for a file that does not exist yet.
        new_version: ConfigVersion,
        /// A k3s/rke2 config template: a new one extends the distribution's base template, and
        /// one left with nothing but that is removed on revert (several installs share it).
        template: bool,
    },
    /// Make a containerd config import our drop-in.
    AddImport {
        /// The drop-in path to import.
        import: String,
        /// Schema for a file that does not exist yet.
        new_version: ConfigVersion,
    },
}

/// What the cri stage will configure on this host.
#[derive(Debug, Clone)]
pub struct CriTarget {
    /// The runtime flavour.
    pub kind: CriKind,
    /// Unit restarted to load the configuration.
    pub unit: String,
    /// Files and how they should look.
    pub files: Vec<(PathBuf, Desired)>,
    /// Our handlers.
    pub handlers: Vec<String>,
    /// Containerd handlers and proxy plugin (for edits).
    pub kata: KataContainerd,
    /// Remarks for the operator.
    pub notes: Vec<String>,
}

/// Decides which files to write for this host (pure apart from reading existing files).
pub fn plan_cri_target(fs: &HostFs, cfg: &ValidConfig, facts: &NodeFacts, kind: CriKind) -> Result<CriTarget> {
    let install = cfg.install();
    let k3s_dir = |dist: &str| PathBuf::from(format!("/var/lib/rancher/{dist}/agent/etc/containerd"));
    let read_text = |p: &Path| -> Result<Option<String>> { Ok(fs.read(p)?.map(|b| String::from_utf8_lossy(&b).into_owned())) };
    // The configuration containerd runs from (tells its version when the kubelet does not).
    let existing = match kind {
        CriKind::Containerd => read_text(Path::new(CONTAINERD_CONFIG))?,
        CriKind::K3s | CriKind::K3sAgent => read_text(&k3s_dir("k3s").join("config.toml"))?,
        CriKind::Rke2 => read_text(&k3s_dir("rke2").join("config.toml"))?,
        _ => None,
    };
    let major = containerd_major(facts, existing.as_deref());
    let kata = kata_containerd(cfg, &install, if kind.is_containerd() { major } else { 0 }, facts.arch.as_deref());
    let handlers: Vec<String> = kata.handlers.iter().map(|h| h.name.clone()).collect();
    let dropin = install.dropin_file_name();
    let mut notes = Vec::new();
    let files = match kind {
        CriKind::Containerd => {
            let main = PathBuf::from(CONTAINERD_CONFIG);
            if major >= 2 {
                let path = Path::new(CONTAINERD_CONF_D).join(&dropin);
                let root_version = existing.as_deref().and_then(|t| containerd::parse(t).ok()).map(|d| containerd::detect_version(&d));
                let version = containerd::dropin_version_for_root(root_version);
                vec![
                    (path.clone(), Desired::Whole(containerd::render_containerd_dropin(version, &kata, true).into_bytes())),
                    (main, Desired::AddImport { import: path.display().to_string(), new_version: ConfigVersion::V3 }),
                ]
            } else {
                if !install.suffix.is_empty() {
                    notes.push("containerd 1.x has no usable drop-ins: the shared config.toml is edited in place (multi-install is only fully isolated on containerd >= 2.0)".into());
                }
                vec![(main, Desired::EditKata { set_flags: true, new_version: ConfigVersion::V2, template: false })]
            }
        }
        CriKind::K3s | CriKind::K3sAgent | CriKind::Rke2 => {
            let dist = if kind == CriKind::Rke2 { "rke2" } else { "k3s" };
            let dir = k3s_dir(dist);
            let version = ConfigVersion::for_containerd_major(major);
            let tmpl = dir.join(if major >= 2 { "config-v3.toml.tmpl" } else { "config.toml.tmpl" });
            if cfg.uses_nydus() {
                notes.push(format!("{dist}: the base template owns the CRI image settings; disable_snapshot_annotations/discard_unpacked_layers are left to {dist}"));
            }
            // Always an edit, never a file we own whole: another install (multi-install suffix)
            // may have its handlers in the same template.
            vec![(tmpl, Desired::EditKata { set_flags: false, new_version: version, template: true })]
        }
        CriKind::K0s => {
            let version = ConfigVersion::for_containerd_major(major);
            vec![(Path::new(K0S_CONTAINERD_D).join(&dropin), Desired::Whole(containerd::render_containerd_dropin(version, &kata, true).into_bytes()))]
        }
        CriKind::Microk8s => vec![(PathBuf::from(MICROK8S_TEMPLATE), Desired::EditKata { set_flags: true, new_version: ConfigVersion::V2, template: false })],
        CriKind::Crio => {
            // CRI-O refuses to start with a malformed main config; say so before touching anything.
            if let Some(b) = fs.read(Path::new(CRIO_CONFIG))? {
                if let Err(e) = String::from_utf8_lossy(&b).parse::<toml_edit::DocumentMut>() {
                    return Err(StageError::bad_input(CRIO_CONFIG, format!("is not valid TOML: {}", e.to_string().trim()), "Fix the CRI-O configuration (CRI-O cannot start with it either) and re-run; nothing was changed"));
                }
            }
            let crio: Vec<CrioHandler> = cfg
                .cfg
                .shims
                .iter()
                .map(|s| CrioHandler {
                    name: install.handler(&s.name),
                    runtime_path: install.shim_binary(s).display().to_string(),
                    config_path: install.shim_config_path(&s.name).display().to_string(),
                    guest_pull: s.crio_pull_type == "guest-pull",
                })
                .collect();
            vec![(Path::new(CRIO_CONF_D).join(format!("50-{dropin}")), Desired::Whole(render_crio_dropin(&crio).into_bytes()))]
        }
    };
    Ok(CriTarget { kind, unit: runtime_unit(fs, kind), files, handlers, kata, notes })
}

fn parse_existing(path: &Path, bytes: &[u8]) -> Result<toml_edit::DocumentMut> {
    let text = std::str::from_utf8(bytes).map_err(|_| StageError::bad_input(path, "is not UTF-8 text", "Fix or restore the file and re-run; nothing was changed"))?;
    containerd::parse(text).map_err(|e| {
        StageError::bad_input(path, format!("is not valid TOML: {}", e.0), "Fix the syntax (the runtime cannot load it either) and re-run; nothing was changed")
    })
}

/// A k3s/rke2 config template that only extends the distribution's base template (what k3s
/// renders without any template).
pub const K3S_BASE_TEMPLATE: &str = "{{ template \"base\" . }}\n";

/// Whether a k3s/rke2 template is nothing but the base template (comments and blank lines aside).
pub fn is_bare_k3s_template(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    lines.next() == Some(K3S_BASE_TEMPLATE.trim()) && lines.next().is_none()
}

/// Renders the desired content of one file from its base (pristine) content.
pub fn render_desired(path: &Path, desired: &Desired, base: Option<&[u8]>, kata: &KataContainerd) -> Result<Vec<u8>> {
    match desired {
        Desired::Whole(b) => Ok(b.clone()),
        Desired::EditKata { set_flags, new_version, template } => {
            let mut doc = match base {
                Some(b) => parse_existing(path, b)?,
                None if *template => parse_existing(path, K3S_BASE_TEMPLATE.as_bytes())?,
                None => {
                    let mut d = toml_edit::DocumentMut::new();
                    if let Some(n) = new_version.number() {
                        d.insert("version", toml_edit::value(n));
                    }
                    d
                }
            };
            let version = if base.is_some() { containerd::detect_version(&doc) } else { *new_version };
            // A template extending a distribution's base already has the base's runtimes.
            let is_template = *template || base.is_some_and(|b| b.windows(2).any(|w| w == b"{{"));
            if !version.split_cri_plugins() && !is_template {
                containerd::keep_default_runtime(&mut doc, version);
            }
            containerd::apply_kata(&mut doc, version, kata, *set_flags);
            Ok(containerd::serialize(&doc).into_bytes())
        }
        Desired::AddImport { import, new_version } => {
            let mut doc = match base {
                Some(b) => parse_existing(path, b)?,
                None => {
                    let mut d = toml_edit::DocumentMut::new();
                    d.insert("version", toml_edit::value(new_version.number().unwrap_or(3)));
                    d
                }
            };
            containerd::add_import(&mut doc, import);
            Ok(containerd::serialize(&doc).into_bytes())
        }
    }
}

/// Removes what we added from a file someone else changed since we wrote it.
fn strip_ours(path: &Path, current: &[u8], state: &CriState, imports: &[String], proxy: Option<&str>) -> Result<Vec<u8>> {
    let mut doc = parse_existing(path, current)?;
    containerd::strip_kata(&mut doc, &state.handlers, proxy);
    for i in imports {
        containerd::remove_import(&mut doc, i);
    }
    Ok(containerd::serialize(&doc).into_bytes())
}

fn backup_path(install: &Install, path: &Path) -> PathBuf {
    let name = path.display().to_string().trim_start_matches('/').replace('/', "%");
    install.state_dir().join("backups").join(name)
}

fn whole_paths_imported(state: &CriState) -> Vec<String> {
    state.files.iter().filter(|f| f.whole_file).map(|f| f.path.display().to_string()).collect()
}

/// One file change computed for this run.
#[derive(Debug, Clone)]
struct Change {
    path: PathBuf,
    /// What is on disk now (restored on rollback).
    current: Option<Vec<u8>>,
    /// What it should be (None: removed).
    new: Option<Vec<u8>>,
    /// Updated state entry (None: drop it from the state).
    entry: Option<CriFile>,
    /// A new or refreshed pristine backup to write before anything else.
    backup: Option<(PathBuf, Vec<u8>)>,
}

/// What a cri/revert-cri run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriOutcome {
    /// Files written or removed.
    pub changed: Vec<PathBuf>,
    /// Whether the runtime was restarted.
    pub restarted: bool,
    /// The unit.
    pub unit: String,
    /// Remarks for the operator.
    pub notes: Vec<String>,
}

/// Everything the cri stages need.
pub struct CriContext<'a> {
    /// Host filesystem.
    pub fs: &'a HostFs,
    /// Validated configuration.
    pub cfg: &'a ValidConfig,
    /// Node facts.
    pub facts: &'a NodeFacts,
    /// Service restarter.
    pub restarter: &'a dyn Restarter,
}

impl CriContext<'_> {
    fn state_path(&self) -> PathBuf {
        self.cfg.install().state_dir().join(CRI_STATE)
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.cfg.runtime_ready_timeout_seconds)
    }
}

fn content_hash(changes: &[Change]) -> String {
    let mut items: Vec<(String, Option<&Vec<u8>>)> = changes.iter().map(|c| (c.path.display().to_string(), c.new.as_ref())).collect();
    items.sort();
    let mut buf = Vec::new();
    for (p, c) in items {
        buf.extend_from_slice(p.as_bytes());
        buf.push(0);
        match c {
            Some(c) => buf.extend_from_slice(&sha256_hex(c).into_bytes()),
            None => buf.extend_from_slice(b"absent"),
        }
        buf.push(0);
    }
    sha256_hex(&buf)
}

/// The cri stage: write our runtime configuration and make the runtime load it.
pub fn apply_cri(ctx: &CriContext) -> Result<CriOutcome> {
    let fs = ctx.fs;
    let install = ctx.cfg.install();
    let kind = resolve_cri(fs, ctx.cfg, ctx.facts)?;
    let state_path = ctx.state_path();
    let mut state: CriState = read_json(fs, &state_path)?.unwrap_or_default();
    let mut target = plan_cri_target(fs, ctx.cfg, ctx.facts, kind)?;
    // The unit that runs the runtime now (an rke2 agent may also have rke2-server's unit file).
    target.unit = choose_active_unit(&unit_candidates(&target.unit, kind), &|u| ctx.restarter.status(u).is_ok_and(|s| s.active));
    for n in &target.notes {
        tracing::warn!(stage = "cri", "{n}");
    }
    let proxy_name = install.nydus_snapshotter();
    let old_imports = whole_paths_imported(&state);

    // 1. Compute every change first (parsing everything) so bad input changes nothing.
    let mut changes = Vec::new();
    for (path, desired) in &target.files {
        let current = fs.read(path)?;
        let cur_sha = current.as_deref().map(sha256_hex);
        let entry = state.files.iter().find(|f| &f.path == path).cloned();
        let whole = matches!(desired, Desired::Whole(_));
        let (base, original, backup) = match &entry {
            None => {
                let original = match &current {
                    None => Original::Absent,
                    Some(b) => Original::Backup { backup: backup_path(&install, path), sha256: sha256_hex(b) },
                };
                let backup = current.clone().map(|b| (backup_path(&install, path), b));
                (current.clone(), original, backup)
            }
            Some(e) => {
                let orig_sha = match &e.original {
                    Original::Absent => None,
                    Original::Backup { sha256, .. } => Some(sha256.clone()),
                };
                let pristine = cur_sha == orig_sha || (cur_sha.is_some() && cur_sha == e.written_sha256);
                if pristine || whole {
                    let base = match &e.original {
                        Original::Absent => None,
                        Original::Backup { backup, .. } => Some(fs.read(backup)?.ok_or_else(|| {
                            StageError::bad_input(backup, "backup recorded in the state but missing", "Restore the original runtime configuration by hand, delete the state directory and re-run")
                        })?),
                    };
                    (base, e.original.clone(), None)
                } else {
                    // Someone changed the file since we wrote it: keep their change, drop ours,
                    // and make that the new pristine base.
                    let cur = current.clone().unwrap_or_default();
                    let stripped = strip_ours(path, &cur, &state, &old_imports, Some(&proxy_name))?;
                    tracing::warn!(stage = "cri", file = %path.display(), "file changed since kata-deploy wrote it; keeping those changes");
                    let bp = backup_path(&install, path);
                    let original = Original::Backup { backup: bp.clone(), sha256: sha256_hex(&stripped) };
                    (Some(stripped.clone()), original, Some((bp, stripped)))
                }
            }
        };
        let new = render_desired(path, desired, base.as_deref(), &target.kata)?;
        let entry = CriFile { path: path.clone(), original, written_sha256: Some(sha256_hex(&new)), whole_file: whole };
        changes.push(Change { path: path.clone(), current, new: Some(new), entry: Some(entry), backup });
    }
    // Files we managed before but no longer want (flavour or version changed): restore them.
    for old in state.files.iter().filter(|f| !target.files.iter().any(|(p, _)| p == &f.path)) {
        changes.push(restore_change(fs, &state, old, &old_imports, &proxy_name)?);
    }

    // 2. Record originals (backups first) and what we are about to write, then write.
    let prev_state = state.clone();
    state.cri = kind.as_str().into();
    state.unit = target.unit.clone();
    state.handlers = union(&prev_state.handlers, &target.handlers);
    state.files = changes.iter().filter_map(|c| c.entry.clone()).collect();
    // Record the directories we are about to create before creating them (crash safety).
    for c in changes.iter().filter(|c| c.new.is_some() && c.current != c.new) {
        let mut cur = c.path.parent();
        while let Some(d) = cur {
            if d == Path::new("/") || fs.exists(d) {
                break;
            }
            if !state.created_dirs.iter().any(|x| x == d) {
                state.created_dirs.push(d.to_path_buf());
            }
            cur = d.parent();
        }
    }
    // The runtime has not loaded what we are about to write: record, in the same state write as
    // the intent (before any file changes), what to go back to if it does not come back with it.
    // A previous unverified write keeps its record (its "previous" is the last known good).
    let hash = content_hash(&changes);
    if changes.iter().any(|c| c.current != c.new) {
        state.pending = Some(pending_restart(state.pending.as_ref(), &hash, &changes));
    }
    let result = write_changes(ctx, &mut state, &state_path, &changes, &install);
    let changed = result?;
    state.handlers = target.handlers.clone();
    write_state(fs, &state_path, &state)?;

    // 3. Make the runtime load it (or verify it already has).
    let restarted = converge_runtime(ctx, &mut state, &state_path, &target.unit, &hash, !changed.is_empty(), Expect::Serves(target.handlers.clone()))?;
    Ok(CriOutcome { changed, restarted, unit: target.unit, notes: target.notes })
}

/// The pending-restart record for writing `changes`: the files as they were before, unless an
/// earlier unverified write already recorded them (then those are the last known good).
fn pending_restart(earlier: Option<&PendingRestart>, hash: &str, changes: &[Change]) -> PendingRestart {
    let mut previous = earlier.map(|p| p.previous.clone()).unwrap_or_default();
    for c in changes.iter().filter(|c| c.current != c.new) {
        if !previous.iter().any(|p| p.path == c.path) {
            previous.push(PreviousFile { path: c.path.clone(), content: c.current.as_deref().map(|b| String::from_utf8_lossy(b).into_owned()) });
        }
    }
    PendingRestart { content: hash.to_string(), boot_id: boot_id(), requested_mono_us: monotonic_now_us(), previous }
}

fn union(a: &[String], b: &[String]) -> Vec<String> {
    let mut v = a.to_vec();
    for x in b {
        if !v.contains(x) {
            v.push(x.clone());
        }
    }
    v
}

fn restore_change(fs: &HostFs, state: &CriState, f: &CriFile, imports: &[String], proxy: &str) -> Result<Change> {
    let current = fs.read(&f.path)?;
    let cur_sha = current.as_deref().map(sha256_hex);
    let new = match &f.original {
        Original::Absent => {
            if f.whole_file || current.is_none() || cur_sha == f.written_sha256 {
                None
            } else {
                Some(strip_ours(&f.path, current.as_deref().unwrap(), state, imports, Some(proxy))?)
            }
        }
        Original::Backup { sha256, .. } if cur_sha.as_deref() == Some(sha256.as_str()) => current.clone(),
        Original::Backup { backup, sha256 } => {
            if f.whole_file || cur_sha == f.written_sha256 || cur_sha.as_deref() == Some(sha256.as_str()) || current.is_none() {
                Some(fs.read(backup)?.ok_or_else(|| {
                    StageError::bad_input(backup, "backup recorded in the state but missing", "Restore the original runtime configuration by hand, then delete the state file and re-run")
                })?)
            } else {
                tracing::warn!(stage = "revert-cri", file = %f.path.display(), "file changed since kata-deploy wrote it; removing only our entries");
                Some(strip_ours(&f.path, current.as_deref().unwrap(), state, imports, Some(proxy))?)
            }
        }
    };
    // A k3s/rke2 template left with nothing of anyone's: as if none existed (k3s renders its
    // base), which is what the node had unless its owner kept a bare one.
    let new = new.filter(|b| !(is_k3s_template(&f.path) && is_bare_k3s_template(b)));
    Ok(Change { path: f.path.clone(), current, new, entry: None, backup: None })
}

fn is_k3s_template(p: &Path) -> bool {
    p.starts_with("/var/lib/rancher") && p.extension().is_some_and(|e| e == "tmpl")
}

fn write_state(fs: &HostFs, path: &Path, state: &CriState) -> Result<()> {
    write_json(fs, path, state)
}

/// Writes backups, the state (intent), then the files whose content changes.
fn write_changes(ctx: &CriContext, state: &mut CriState, state_path: &Path, changes: &[Change], install: &Install) -> Result<Vec<PathBuf>> {
    let fs = ctx.fs;
    for c in changes.iter().filter(|_| !fs.dry_run()) {
        if let Some((bp, bytes)) = &c.backup {
            if fs.read(bp)?.as_deref() != Some(bytes.as_slice()) {
                fs.create_dir_all(bp.parent().unwrap())?;
                fs.write_atomic(bp, bytes, 0o600)?;
            }
        }
    }
    fs.create_dir_all(&install.state_dir())?;
    write_state(fs, state_path, state)?;
    let mut changed = Vec::new();
    for c in changes {
        if c.current == c.new {
            continue;
        }
        match &c.new {
            Some(bytes) => {
                let created = fs.create_dir_all(c.path.parent().unwrap())?;
                if !created.is_empty() {
                    tracing::debug!(stage = "cri", dirs = ?created, "created directories");
                }
                fs.write_preserving(&c.path, bytes, 0o644)?;
            }
            None => {
                fs.remove_file(&c.path)?;
            }
        }
        tracing::info!(stage = "cri", file = %c.path.display(), "wrote");
        changed.push(c.path.clone());
    }
    Ok(changed)
}

/// What the runtime must serve once it is back.
#[derive(Debug, Clone)]
enum Expect {
    /// All of these handlers.
    Serves(Vec<String>),
    /// None of these handlers.
    Lacks(Vec<String>),
}

/// Restarts the runtime unless it already loaded `hash`, then verifies it is back. On failure,
/// restores the files to what they were before this run and restarts again.
#[allow(clippy::too_many_arguments)]
fn converge_runtime(ctx: &CriContext, state: &mut CriState, state_path: &Path, unit: &str, hash: &str, wrote: bool, expect: Expect) -> Result<bool> {
    let fs = ctx.fs;
    if ctx.cfg.restart == RestartMode::None {
        if state.loaded.as_deref() != Some(hash) {
            fs.plan(format!("restart {unit}: skipped (restart: none); restart it yourself to load the new configuration"));
            tracing::warn!(stage = "cri", unit, "restart: none: not restarting; the runtime loads the new configuration on its next restart");
        }
        state.loaded = Some(hash.to_string());
        state.pending = None;
        write_state(fs, state_path, state)?;
        return Ok(false);
    }
    if !wrote && state.loaded.as_deref() == Some(hash) {
        fs.plan(format!("restart {unit}: no (the running runtime already loaded this configuration)"));
        return Ok(false);
    }
    if !wrote {
        if let Some(p) = state.pending.clone().filter(|p| p.content == hash) {
            // A previous run requested this restart and may have been killed by it.
            let st = ctx.restarter.status(unit)?;
            let restarted_since = p.boot_id != boot_id() || st.active_since_mono_us.is_some_and(|t| t >= p.requested_mono_us);
            let served = ctx.restarter.served_handlers(unit);
            if st.active && restarted_since && served.is_ok_and(|s| matches_expect(s, &expect)) {
                tracing::info!(stage = "cri", unit, "runtime already restarted with this configuration by a previous run; not restarting again");
                fs.plan(format!("restart {unit}: no (restarted by a previous run after the configuration was written)"));
                state.loaded = Some(hash.to_string());
                state.pending = None;
                write_state(fs, state_path, state)?;
                return Ok(false);
            }
        }
    }
    if fs.dry_run() {
        fs.plan(format!("restart {unit}: yes (the running runtime has not loaded this configuration)"));
        return Ok(true);
    }
    let previous = state.pending.as_ref().map(|p| p.previous.clone()).unwrap_or_default();
    let stamp = PendingRestart { content: hash.to_string(), boot_id: boot_id(), requested_mono_us: monotonic_now_us(), previous };
    state.pending = Some(stamp.clone());
    write_state(fs, state_path, state)?;
    tracing::info!(stage = "cri", unit, "restarting the runtime to load the new configuration");
    let outcome = ctx.restarter.restart(unit).and_then(|()| wait_until_loaded(ctx, unit, stamp.requested_mono_us, &expect));
    match outcome {
        Ok(()) => {
            state.loaded = Some(hash.to_string());
            state.pending = None;
            write_state(fs, state_path, state)?;
            Ok(true)
        }
        // A simulated crash (tests) means this process is gone: nothing else runs.
        Err(e @ StageError::InjectedFault { .. }) => Err(e),
        Err(e) => {
            tracing::error!(stage = "cri", unit, error = %e, "runtime did not come back with the new configuration; restoring the previous one");
            let restored = rollback(ctx, unit, &stamp.previous);
            let hint = match restored {
                Ok(()) => {
                    state.pending = None;
                    write_state(fs, state_path, state)?;
                    "The previous configuration was restored and the runtime restarted with it. Check the runtime logs (journalctl -u <unit>) for why it rejected the new configuration".to_string()
                }
                Err(re) => format!("Restoring the previous configuration ALSO failed ({re}); restore it by hand from the backups in {}", ctx.cfg.install().state_dir().display()),
            };
            Err(StageError::Runtime { unit: unit.to_string(), message: format!("did not come back with the new configuration within {}s: {e}", ctx.cfg.cfg.runtime_ready_timeout_seconds), hint })
        }
    }
}

fn matches_expect(served: Option<Vec<String>>, expect: &Expect) -> bool {
    match (served, expect) {
        (None, _) => true,
        (Some(s), Expect::Serves(h)) => h.iter().all(|x| s.contains(x)),
        (Some(s), Expect::Lacks(h)) => !h.iter().any(|x| s.contains(x)),
    }
}

fn wait_until_loaded(ctx: &CriContext, unit: &str, since_us: u64, expect: &Expect) -> Result<()> {
    let deadline = Instant::now() + ctx.timeout();
    let mut last: String;
    loop {
        match ctx.restarter.status(unit) {
            Ok(st) if st.active && st.active_since_mono_us.is_none_or(|t| t >= since_us) => match ctx.restarter.served_handlers(unit) {
                Ok(served) if matches_expect(served.clone(), expect) => return Ok(()),
                Ok(served) => last = format!("active but serves {:?}, expected {:?}", served.unwrap_or_default(), expect),
                Err(e) => last = e.to_string(),
            },
            Ok(st) => last = format!("active={} since={:?}", st.active, st.active_since_mono_us),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(StageError::Runtime { unit: unit.into(), message: format!("not back: {last}"), hint: "see the runtime's logs".into() });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rollback(ctx: &CriContext, unit: &str, previous: &[PreviousFile]) -> Result<()> {
    for p in previous {
        match &p.content {
            Some(b) => ctx.fs.write_preserving(&p.path, b.as_bytes(), 0o644)?,
            None => {
                ctx.fs.remove_file(&p.path)?;
            }
        }
    }
    let since = monotonic_now_us();
    ctx.restarter.restart(unit)?;
    wait_until_loaded(ctx, unit, since, &Expect::Lacks(vec![]))
}

/// Removes what a crashed cri/revert-cri run may have left in the state directory: backups no
/// longer referenced by a state file and temp files of the state file.
fn cleanup_state_leftovers(fs: &HostFs, install: &Install) -> Result<()> {
    let dir = install.state_dir();
    fs.remove_file(&HostFs::temp_for(&dir.join(CRI_STATE)))?;
    let backups = dir.join("backups");
    for name in fs.list_dir(&backups) {
        fs.remove_file(&backups.join(name))?;
    }
    fs.remove_dir_if_empty(&backups)?;
    fs.remove_dir_if_empty(&dir)
}

/// The revert-cri stage: restore every file we touched byte-for-byte (or remove our drop-ins),
/// restart the runtime and verify it no longer serves our handlers. A no-op on a clean node.
pub fn revert_cri(ctx: &CriContext) -> Result<CriOutcome> {
    let fs = ctx.fs;
    let install = ctx.cfg.install();
    let state_path = ctx.state_path();
    let Some(mut state) = read_json::<CriState>(fs, &state_path)? else {
        tracing::info!(stage = "revert-cri", "nothing recorded: the runtime configuration was never changed by this install");
        cleanup_state_leftovers(fs, &install)?;
        return Ok(CriOutcome::default());
    };
    let imports = whole_paths_imported(&state);
    let proxy = install.nydus_snapshotter();
    let mut changes = Vec::new();
    for f in &state.files {
        changes.push(restore_change(fs, &state, f, &imports, &proxy)?);
    }
    let mut changed = Vec::new();
    for c in &changes {
        // A crash between writing a temp file and renaming it leaves the temp beside the file.
        fs.remove_file(&HostFs::temp_for(&c.path))?;
        if c.current == c.new {
            continue;
        }
        match &c.new {
            Some(b) => fs.write_preserving(&c.path, b, 0o644)?,
            None => {
                fs.remove_file(&c.path)?;
            }
        }
        changed.push(c.path.clone());
    }
    let hash = content_hash(&changes);
    let unit = if state.unit.is_empty() { runtime_unit(fs, resolve_cri(fs, ctx.cfg, ctx.facts)?) } else { state.unit.clone() };
    let handlers = state.handlers.clone();
    // A failed revert keeps the state so a re-run finishes the job.
    // Reverting has nothing to roll back to: an install's unverified record does not apply.
    if state.pending.as_ref().is_some_and(|p| p.content != hash) {
        state.pending = None;
    }
    let restarted = converge_runtime(ctx, &mut state, &state_path, &unit, &hash, !changed.is_empty(), Expect::Lacks(handlers))?;
    // Done. Order matters for crash safety: directories we created (now empty), then the state
    // file, then the backups (a re-run without state cleans leftover backups).
    let mut dirs = state.created_dirs.clone();
    dirs.sort();
    for d in dirs.iter().rev() {
        fs.remove_dir_if_empty(d)?;
    }
    fs.remove_file(&state_path)?;
    cleanup_state_leftovers(fs, &install)?;
    Ok(CriOutcome { changed, restarted, unit, notes: vec![] })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exists_in(paths: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |p| paths.contains(&p)
    }

    #[test]
    fn detects_distributions() {
        assert_eq!(detect_cri_from(Some("cri-o://1.31.0"), &exists_in(&[])).unwrap(), CriKind::Crio);
        assert_eq!(detect_cri_from(Some("containerd://1.7.27-k3s1"), &exists_in(&["/var/lib/rancher/rke2/agent/etc/containerd"])).unwrap(), CriKind::Rke2);
        assert_eq!(detect_cri_from(Some("containerd://1.7.27-k3s1"), &exists_in(&["/var/lib/rancher/k3s/agent/etc/containerd", "/etc/systemd/system/k3s-agent.service"])).unwrap(), CriKind::K3sAgent);
        assert_eq!(detect_cri_from(Some("containerd://1.7.27-k3s1"), &exists_in(&["/var/lib/rancher/k3s/agent/etc/containerd", "/etc/systemd/system/k3s.service"])).unwrap(), CriKind::K3s);
        assert_eq!(detect_cri_from(None, &exists_in(&["/var/snap/microk8s/current/args"])).unwrap(), CriKind::Microk8s);
        assert_eq!(detect_cri_from(Some("containerd://1.7.2"), &exists_in(&["/etc/k0s"])).unwrap(), CriKind::K0s);
        assert_eq!(detect_cri_from(Some("containerd://2.0.5"), &exists_in(&[])).unwrap(), CriKind::Containerd);
        assert!(detect_cri_from(None, &exists_in(&[])).unwrap_err().contains("cri:"));
    }

    #[test]
    fn the_active_unit_is_restarted() {
        let c = unit_candidates("rke2-server.service", CriKind::Rke2);
        assert_eq!(c, ["rke2-server.service", "rke2-agent.service"]);
        assert_eq!(choose_active_unit(&c, &|u| u == "rke2-agent.service"), "rke2-agent.service");
        assert_eq!(choose_active_unit(&c, &|_| true), "rke2-server.service");
        assert_eq!(choose_active_unit(&c, &|_| false), "rke2-server.service", "nothing active: the unit-file guess");
        assert_eq!(unit_candidates("containerd.service", CriKind::Containerd), ["containerd.service"]);
    }

    #[test]
    fn bare_k3s_templates_are_recognised() {
        assert!(is_bare_k3s_template(K3S_BASE_TEMPLATE.as_bytes()));
        assert!(is_bare_k3s_template(b"{{ template \"base\" . }}\n\n# comment\n"));
        assert!(!is_bare_k3s_template(b"{{ template \"base\" . }}\n[plugins.x]\n"));
        assert!(!is_bare_k3s_template(b""));
    }

    #[test]
    fn containerd_major_prefers_reported_version() {
        let facts = NodeFacts { container_runtime_version: Some("containerd://2.1.0".into()), ..Default::default() };
        assert_eq!(containerd_major(&facts, Some("version = 2\n")), 2);
        assert_eq!(containerd_major(&NodeFacts::default(), Some("version = 3\n")), 2);
        assert_eq!(containerd_major(&NodeFacts::default(), None), 1);
    }
}
