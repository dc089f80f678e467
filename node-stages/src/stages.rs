//! Stage orchestration: each stage validates input, checks identity, takes the host lock,
//! marks the node claimed before its first host change, then does its work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::artifacts;
use crate::config::{Install, NodeFacts, ValidConfig};
use crate::cri::{self, CriContext};
use crate::error::{Result, StageError};
use crate::hostcheck::{self, Finding, Severity};
use crate::hostfs::HostFs;
use crate::lock::{HostLock, LOCK_PATH};
use crate::payload::Payload;
use crate::restart::Restarter;
use crate::state::{read_json, ArtifactsManifest, CriState, ARTIFACTS_MANIFEST, CRI_STATE};

/// Marks/unmarks the node as claimed by this install (a kube client in production).
pub trait Claims {
    /// Set the claim label (idempotent).
    fn claim(&self) -> Result<()>;
    /// Remove the claim label (idempotent).
    fn unclaim(&self) -> Result<()>;
}

/// No claims (standalone runs without a cluster, tests).
pub struct NoClaims;

impl Claims for NoClaims {
    fn claim(&self) -> Result<()> {
        Ok(())
    }
    fn unclaim(&self) -> Result<()> {
        Ok(())
    }
}

/// Everything a host stage needs.
pub struct StageEnv<'a> {
    /// Validated configuration.
    pub cfg: &'a ValidConfig,
    /// Node facts from the dispatcher.
    pub facts: &'a NodeFacts,
    /// Host filesystem (dry-run aware).
    pub fs: &'a HostFs,
    /// Payload directory in the stage image.
    pub payload_dir: &'a Path,
    /// Service restarter.
    pub restarter: &'a dyn Restarter,
    /// Claim label.
    pub claims: &'a dyn Claims,
    /// How long to wait for the host lock.
    pub lock_wait: Duration,
}

/// What a stage reports.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub stage: String,
    /// Human summary.
    pub summary: String,
    /// Details for JSON output.
    pub details: Value,
    /// Dry run: the changes that would have been made.
    pub planned: Vec<String>,
}

impl StageReport {
    /// Text for humans.
    pub fn text(&self) -> String {
        let mut s = format!("{}: {}\n", self.stage, self.summary.trim_end());
        for p in &self.planned {
            s.push_str(p);
            if !p.ends_with('\n') {
                s.push('\n');
            }
        }
        s
    }
}

impl StageEnv<'_> {
    fn lock(&self) -> Result<Option<HostLock>> {
        if self.fs.dry_run() {
            return Ok(None);
        }
        HostLock::acquire(&self.fs.host(Path::new(LOCK_PATH)), self.lock_wait).map(Some)
    }

    /// Refuses to touch a host that is not the machine the dispatcher targeted.
    pub fn check_identity(&self) -> Result<()> {
        let Some(expected) = &self.facts.machine_id else {
            return Ok(());
        };
        let host = self
            .fs
            .read(Path::new("/etc/machine-id"))?
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_default();
        if &host != expected {
            return Err(StageError::IdentityMismatch {
                node: self.facts.display_name(),
                host,
                expected: expected.clone(),
            });
        }
        Ok(())
    }

    fn claim(&self) -> Result<()> {
        if self.fs.dry_run() {
            return Ok(());
        }
        self.claims.claim()
    }

    fn report(&self, stage: &str, summary: String, details: Value) -> StageReport {
        StageReport {
            stage: stage.into(),
            summary,
            details,
            planned: self.fs.planned(),
        }
    }
}

/// Result of host-check.
#[derive(Debug, Clone, Serialize)]
pub struct HostCheckReport {
    /// Node name.
    pub node: String,
    /// Findings, errors first.
    pub findings: Vec<Finding>,
    /// Collected facts.
    pub facts: hostcheck::HostFacts,
}

impl HostCheckReport {
    /// Blocking problems.
    pub fn errors(&self) -> Vec<&Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .collect()
    }

    /// The error to exit with, if any.
    pub fn into_result(&self) -> Result<()> {
        let errs = self.errors();
        if errs.is_empty() {
            return Ok(());
        }
        Err(StageError::HostCheck {
            node: self.node.clone(),
            count: errs.len(),
            summary: errs
                .iter()
                .map(|f| format!("[{}] {}", f.check, f.message))
                .collect::<Vec<_>>()
                .join("; "),
        })
    }
}

/// Whether the payload directory has the official release's layout (`shim-components.json`).
pub fn is_release_payload(dir: &Path) -> bool {
    dir.join(crate::release::SHIM_COMPONENTS).is_file()
}

fn node_arch(facts: &NodeFacts) -> String {
    facts
        .arch
        .clone()
        .unwrap_or_else(|| crate::shims::kube_arch(std::env::consts::ARCH).to_string())
}

fn base_shims(cfg: &ValidConfig) -> Vec<&str> {
    let mut v: Vec<&str> = cfg.cfg.shims.iter().map(|s| s.base()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Opens the payload: our directory (SHA256SUMS) or the release layout, where only the
/// components the enabled shims need on this architecture are read (indexes cached on the host).
pub fn open_payload(env: &StageEnv) -> Result<Payload> {
    if !is_release_payload(env.payload_dir) {
        return Payload::open(env.payload_dir);
    }
    let cache = read_json(
        env.fs,
        &env.cfg
            .install()
            .state_dir()
            .join(crate::release::RELEASE_INDEX),
    )
    .ok()
    .flatten()
    .unwrap_or_default(); // a corrupt cache is only a slower run
    crate::release_io::open_release(
        env.payload_dir,
        &base_shims(env.cfg),
        &node_arch(env.facts),
        &cache,
        env.cfg.uses_nydus(),
    )
}

/// host-check: read-only, lists every problem.
pub fn host_check(env: &StageEnv) -> HostCheckReport {
    // A release is only checked for its manifest and the tarballs the shims need (reading them
    // is the artifacts stage's first, still read-only, step): its unpacked size is not known
    // before that, so the space check uses the selected tarballs' size, a lower bound.
    let mut release_bytes = None;
    let payload = if is_release_payload(env.payload_dir) {
        crate::release_io::select_release(
            env.payload_dir,
            &base_shims(env.cfg),
            &node_arch(env.facts),
        )
        .map(|comps| {
            let size = |c: &String| {
                let p = crate::release_io::tarball_path(env.payload_dir, c);
                std::fs::metadata(p).map_or(0, |m| m.len())
            };
            release_bytes = Some(comps.iter().map(size).sum::<u64>());
            None
        })
    } else {
        Payload::open(env.payload_dir).map(Some)
    };
    let mut facts = hostcheck::collect_facts(
        env.fs,
        env.cfg,
        env.facts,
        payload.as_ref().ok().and_then(Option::as_ref),
    );
    if release_bytes.is_some() {
        facts.payload_bytes = release_bytes;
        facts.payload_is_compressed = true;
    }
    let mut findings = hostcheck::evaluate(env.cfg, &facts);
    if let Err(e) = &payload {
        findings.insert(
            0,
            Finding {
                severity: Severity::Error,
                check: "payload",
                message: e.to_string(),
                hint: "Use a complete stage image".into(),
            },
        );
    }
    HostCheckReport {
        node: env.facts.display_name(),
        findings,
        facts,
    }
}

/// artifacts stage.
pub fn run_artifacts(env: &StageEnv) -> Result<StageReport> {
    artifacts_report("artifacts", env)
}

/// prune-artifacts stage (after cri): removes what artifacts kept while the runtime still used
/// it (files of dropped shims, the nydus snapshotter), now that cri verified the runtime no
/// longer does. The same convergent install as artifacts: a no-op when nothing was kept.
pub fn run_prune_artifacts(env: &StageEnv) -> Result<StageReport> {
    artifacts_report("prune-artifacts", env)
}

fn artifacts_report(stage: &str, env: &StageEnv) -> Result<StageReport> {
    let payload = open_payload(env)?;
    artifacts::desired_files(env.cfg, &payload)?; // bad input fails before the lock/claim
    env.check_identity()?;
    let _lock = env.lock()?;
    env.claim()?;
    let out = artifacts::apply_artifacts(env.fs, env.cfg, &payload, env.restarter)?;
    let (w, r) = if env.fs.dry_run() {
        ("would be written", "would be removed")
    } else {
        ("written", "removed")
    };
    let summary = format!(
        "{} {w}, {} {r}, {} unchanged",
        out.written.len(),
        out.removed.len(),
        out.kept
    );
    Ok(env.report(
        stage,
        summary,
        json!({"written": out.written, "removed": out.removed, "unchanged": out.kept}),
    ))
}

fn cri_ctx<'a>(env: &'a StageEnv<'a>) -> CriContext<'a> {
    CriContext {
        fs: env.fs,
        cfg: env.cfg,
        facts: env.facts,
        restarter: env.restarter,
    }
}

/// cri stage.
pub fn run_cri(env: &StageEnv) -> Result<StageReport> {
    env.check_identity()?;
    let _lock = env.lock()?;
    env.claim()?;
    let out = cri::apply_cri(&cri_ctx(env))?;
    let summary = if env.fs.dry_run() {
        format!(
            "{} file(s) would change, runtime {} would {}be restarted",
            out.changed.len(),
            out.unit,
            if out.restarted { "" } else { "not " }
        )
    } else {
        format!(
            "{} file(s) changed, runtime {} {}",
            out.changed.len(),
            out.unit,
            if out.restarted {
                "restarted"
            } else {
                "not restarted"
            }
        )
    };
    Ok(env.report("cri", summary, json!({"changed": out.changed, "restarted": out.restarted, "unit": out.unit, "notes": out.notes})))
}

/// revert-cri stage.
pub fn run_revert_cri(env: &StageEnv) -> Result<StageReport> {
    let _lock = env.lock()?;
    let out = cri::revert_cri(&cri_ctx(env))?;
    let summary = if out.unit.is_empty() {
        "nothing to revert".to_string()
    } else {
        format!(
            "{} file(s) restored, runtime {} {}",
            out.changed.len(),
            out.unit,
            if out.restarted {
                "restarted"
            } else {
                "not restarted"
            }
        )
    };
    Ok(env.report(
        "revert-cri",
        summary,
        json!({"changed": out.changed, "restarted": out.restarted, "unit": out.unit}),
    ))
}

/// remove-artifacts stage; drops the claim once nothing of this install remains on the host.
pub fn run_remove_artifacts(env: &StageEnv) -> Result<StageReport> {
    let _lock = env.lock()?;
    let out = artifacts::remove_artifacts(env.fs, env.cfg, env.restarter)?;
    // Gone, or left empty because it is a mount point of this container (stage.hostMounts).
    let state_dir = env.cfg.install().state_dir();
    if !env.fs.dry_run() && env.fs.list_dir(&state_dir).is_empty() {
        env.claims.unclaim()?;
    }
    Ok(env.report(
        "remove-artifacts",
        format!("{} file(s) removed", out.removed.len()),
        json!({"removed": out.removed}),
    ))
}

/// status: what this install has on the host, stage by stage.
pub fn status(env: &StageEnv) -> Result<StageReport> {
    let install = env.cfg.install();
    let dir = install.state_dir();
    let mut lines = Vec::new();
    let artifacts = artifacts_status(env, &install, &mut lines)?;
    let cri = cri_record_status(env, &dir, &mut lines)?;
    let runtime = runtime_status(env, &install, &mut lines);
    lines.push(format!(
        "label: marker {} (query the node: kubectl get node {} --show-labels)",
        install.marker_label(),
        env.facts.display_name()
    ));
    Ok(StageReport {
        stage: "status".into(),
        summary: lines.join("\n") + "\n",
        details: json!({"artifacts": artifacts, "cri": cri, "runtime": runtime, "stateDir": dir}),
        planned: vec![],
    })
}

/// status, artifacts: the manifest's files against the host (missing, modified).
fn artifacts_status(env: &StageEnv, install: &Install, lines: &mut Vec<String>) -> Result<Value> {
    let path = install.state_dir().join(ARTIFACTS_MANIFEST);
    let Some(m) = read_json::<ArtifactsManifest>(env.fs, &path)? else {
        lines.push(format!(
            "artifacts: not installed ({} absent)",
            path.display()
        ));
        return Ok(json!({"installed": false}));
    };
    let (mut missing, mut modified) = (Vec::new(), Vec::new());
    for (p, f) in &m.files {
        match env.fs.sha256_file(p)? {
            None => missing.push(p.clone()),
            Some(h) if Some(&h) != f.sha256.as_ref() => modified.push(p.clone()),
            _ => {}
        }
    }
    let interrupted = if m.pending {
        " (install interrupted: re-run artifacts)"
    } else {
        ""
    };
    lines.push(format!(
        "artifacts: {} files in {}{interrupted}; {} missing, {} modified",
        m.files.len(),
        install.prefix.display(),
        missing.len(),
        modified.len()
    ));
    for p in missing.iter().chain(&modified).take(10) {
        lines.push(format!("  ! {}", p.display()));
    }
    Ok(
        json!({"installed": true, "files": m.files.len(), "pending": m.pending, "missing": missing, "modified": modified, "units": m.units}),
    )
}

/// status, cri: what the cri stage's record says it wrote and whether the runtime loaded it.
fn cri_record_status(env: &StageEnv, dir: &Path, lines: &mut Vec<String>) -> Result<Value> {
    let Some(s) = read_json::<CriState>(env.fs, &dir.join(CRI_STATE))? else {
        lines.push("cri: not configured".into());
        return Ok(json!({"configured": false}));
    };
    let files: Vec<String> = s
        .files
        .iter()
        .map(|f| f.path.display().to_string())
        .collect();
    let runtime = match (&s.loaded, &s.pending) {
        (_, Some(_)) => "restart requested, not yet verified (re-run cri)",
        (Some(_), None) => "loaded the current configuration",
        (None, None) => "not yet restarted",
    };
    lines.push(format!(
        "cri: {} via {}; handlers {}; runtime {runtime}",
        s.cri,
        files.join(", "),
        s.handlers.join(", ")
    ));
    Ok(serde_json::to_value(&s).unwrap_or(Value::Null))
}

/// status, runtime: the handlers the running runtime serves, asked over the CRI (the proof the
/// configuration is loaded), against the configured ones.
fn runtime_status(env: &StageEnv, install: &Install, lines: &mut Vec<String>) -> Value {
    let served = cri::resolve_cri(env.fs, env.cfg, env.facts)
        .ok()
        .map(|k| env.fs.host(Path::new(cri::cri_socket(k))))
        .filter(|s| s.exists())
        .map(|sock| {
            crate::cri_client::query_status(&sock, Duration::from_secs(3)).map(|r| r.handlers())
        });
    match served {
        None => {
            lines.push("runtime: CRI socket not found; cannot ask which handlers it serves".into());
            Value::Null
        }
        Some(Err(e)) => {
            lines.push(format!("runtime: {e}"));
            json!({"error": e})
        }
        Some(Ok(h)) => {
            let missing: Vec<String> = env
                .cfg
                .cfg
                .shims
                .iter()
                .map(|s| install.handler_of(s))
                .filter(|x| !h.contains(x))
                .collect();
            lines.push(format!(
                "runtime: serves {}; configured handlers missing: {missing:?}",
                h.join(", ")
            ));
            json!({"handlers": h, "missing": missing})
        }
    }
}

/// Default payload location in the stage image.
pub fn default_payload_dir() -> PathBuf {
    PathBuf::from("/opt/kata-payload")
}

/// The host directories each host stage writes under this configuration: all it needs writable
/// (the chart mounts exactly these with stage.hostMounts: precise; `writable-dirs` prints them).
pub fn writable_dirs(cfg: &ValidConfig) -> BTreeMap<&'static str, Vec<PathBuf>> {
    let install = cfg.install();
    let lock_dir = Path::new(LOCK_PATH)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    // The nydus unit file lives under the prefix; systemd links it (no /etc/systemd/system).
    let artifacts = vec![
        install.prefix.clone(),
        install.state_dir(),
        lock_dir.clone(),
    ];
    let cri = vec![cri::config_dir(cfg.cri), install.state_dir(), lock_dir];
    BTreeMap::from([
        ("artifacts", artifacts.clone()),
        ("prune-artifacts", artifacts.clone()),
        ("remove-artifacts", artifacts),
        ("cri", cri.clone()),
        ("revert-cri", cri),
    ])
}
