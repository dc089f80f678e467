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
//!
//! Layout: [`detect`] (which CRI, which unit, what the host has), [`plan`] (pure: what to write
//! and restart), [`apply`] (backups, state, files), [`verify`] (restart, check, roll back).

use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod apply;
pub mod detect;
pub mod plan;
pub mod verify;

pub use detect::*;
pub use plan::*;

use crate::config::{CriKind, Install, NodeFacts, ValidConfig};
use crate::error::{Result, StageError};
use crate::hostfs::{sha256_hex, HostFs};
use crate::inuse;
use crate::restart::{boot_id, monotonic_now_us, Restarter};
use crate::state::{
    read_json, CriFile, CriState, Original, PendingRestart, PreviousFile, CRI_STATE,
};
use apply::{
    backup_path, restore_change, strip_ours, whole_paths_imported, write_changes, write_state,
    Change,
};
use verify::{converge_runtime, Expect};

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
        self.cfg
            .runtime_ready_timeout(resolve_cri(self.fs, self.cfg, self.facts).ok())
    }
}

fn content_hash(changes: &[Change]) -> String {
    let mut items: Vec<(String, Option<&Vec<u8>>)> = changes
        .iter()
        .map(|c| (c.path.display().to_string(), c.new.as_ref()))
        .collect();
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
    let state_path = ctx.state_path();
    let mut state: CriState = read_json(fs, &state_path)?.unwrap_or_default();
    let (kind, target) = resolve_target(ctx, &state)?;

    // 1. Compute every change first (parsing everything) so bad input changes nothing.
    let changes = plan_changes(ctx, &state, &target)?;
    // Never under running pods: the handlers this run drops must run none (nothing written yet).
    if !fs.dry_run() {
        // Never route a handler to a configuration whose kernel, image or hypervisor is missing
        // (a dry run wrote no artifacts to check).
        let shims: Vec<&str> = ctx.cfg.cfg.shims.iter().map(|s| s.name.as_str()).collect();
        let node = ctx.facts.display_name();
        crate::guestassets::check_guest_assets(fs, &install, &shims, &node)?;
        let dropped: Vec<String> = state
            .handlers
            .iter()
            .filter(|h| !target.handlers.contains(h))
            .cloned()
            .collect();
        inuse::ensure_unused(ctx.restarter, ctx.cfg, &ctx.facts.display_name(), &dropped)?;
    }

    // 2. Record originals (backups first) and what we are about to write, then write.
    let hash = content_hash(&changes);
    let kept = record_intent(ctx, &mut state, kind, &target, &changes, &hash);
    let changed = write_changes(ctx, &mut state, &state_path, &changes, &install)?;
    state.files = kept;
    state.handlers = target.handlers.clone();
    state.nydus = Some(ctx.cfg.uses_nydus());
    write_state(fs, &state_path, &state)?;

    // 3. Make the runtime load it (or verify it already has).
    let restarted = converge_runtime(
        ctx,
        &mut state,
        &state_path,
        &target.unit,
        &hash,
        !changed.is_empty(),
        Expect::Serves(target.handlers.clone()),
    )?;
    Ok(CriOutcome {
        changed,
        restarted,
        unit: target.unit,
        notes: target.notes,
    })
}

/// The CRI flavour and what to write for it, with the unit that runs the runtime now (an rke2
/// agent may also have rke2-server's unit file). A unit we restarted with a configuration not yet
/// verified may be down because of it: that one is ours to bring back, active or not.
fn resolve_target(ctx: &CriContext, state: &CriState) -> Result<(CriKind, CriTarget)> {
    let kind = resolve_cri(ctx.fs, ctx.cfg, ctx.facts)?;
    let mut target = plan_cri_target(ctx.fs, ctx.cfg, ctx.facts, kind)?;
    let ours_down = state.pending.as_ref().map(|_| state.unit.as_str());
    target.unit = verify::running_unit(ctx, &unit_candidates(&target.unit, kind), ours_down)?;
    for n in &target.notes {
        tracing::warn!(stage = "cri", "{n}");
    }
    Ok((kind, target))
}

/// Every file change of this run: each target file rendered on its pristine base, and the files
/// we managed before but no longer want (flavour or version changed) restored.
fn plan_changes(ctx: &CriContext, state: &CriState, target: &CriTarget) -> Result<Vec<Change>> {
    let proxy_name = ctx.cfg.install().nydus_snapshotter();
    let old_imports = whole_paths_imported(state);
    let mut changes = Vec::new();
    for (path, desired) in &target.files {
        let Pristine {
            base,
            original,
            backup,
        } = pristine_base(ctx, state, path, desired, &old_imports, &proxy_name)?;
        let current = ctx.fs.read(path)?;
        let new = render_desired(path, desired, base.as_deref(), &target.kata)?;
        let entry = CriFile {
            path: path.clone(),
            original,
            written_sha256: Some(sha256_hex(&new)),
            whole_file: matches!(desired, Desired::Whole(_)),
        };
        changes.push(Change {
            path: path.clone(),
            current,
            new: Some(new),
            entry: Some(entry),
            backup,
        });
    }
    for old in state
        .files
        .iter()
        .filter(|f| !target.files.iter().any(|(p, _)| p == &f.path))
    {
        changes.push(restore_change(
            ctx.fs,
            state,
            old,
            &old_imports,
            &proxy_name,
        )?);
    }
    Ok(changes)
}

/// A file's base to render ours on, its original as recorded, and the backup to take: the file
/// as found (first run), the recorded original (unchanged since we wrote it, or a file we own
/// whole), or the file with our part stripped when someone changed it since (their change kept).
fn pristine_base(
    ctx: &CriContext,
    state: &CriState,
    path: &Path,
    desired: &Desired,
    old_imports: &[String],
    proxy_name: &str,
) -> Result<Pristine> {
    let (fs, install) = (ctx.fs, ctx.cfg.install());
    let current = fs.read(path)?;
    let cur_sha = current.as_deref().map(sha256_hex);
    let Some(e) = state.files.iter().find(|f| f.path == path) else {
        let original = match &current {
            None => Original::Absent,
            Some(b) => Original::Backup {
                backup: backup_path(&install, path),
                sha256: sha256_hex(b),
            },
        };
        let backup = current.clone().map(|b| (backup_path(&install, path), b));
        return Ok(Pristine {
            base: current,
            original,
            backup,
        });
    };
    let orig_sha = match &e.original {
        Original::Absent => None,
        Original::Backup { sha256, .. } => Some(sha256.clone()),
    };
    let pristine = cur_sha == orig_sha || (cur_sha.is_some() && cur_sha == e.written_sha256);
    if pristine || matches!(desired, Desired::Whole(_)) {
        let base = match &e.original {
            Original::Absent => None,
            Original::Backup { backup, .. } => Some(fs.read(backup)?.ok_or_else(|| {
                StageError::bad_input(backup, "backup recorded in the state but missing", "Restore the original runtime configuration by hand, delete the state directory and re-run")
            })?),
        };
        return Ok(Pristine {
            base,
            original: e.original.clone(),
            backup: None,
        });
    }
    // Someone changed the file since we wrote it: keep their change, drop ours, and make that
    // the new pristine base.
    let cur = current.unwrap_or_default();
    let stripped = strip_ours(path, &cur, state, old_imports, Some(proxy_name))?;
    tracing::warn!(stage = "cri", file = %path.display(), "file changed since kata-deploy wrote it; keeping those changes");
    let bp = backup_path(&install, path);
    let original = Original::Backup {
        backup: bp.clone(),
        sha256: sha256_hex(&stripped),
    };
    Ok(Pristine {
        base: Some(stripped.clone()),
        original,
        backup: Some((bp, stripped)),
    })
}

/// What [`pristine_base`] found for a file.
struct Pristine {
    /// The bytes ours is rendered on (None: no file).
    base: Option<Vec<u8>>,
    /// The original as the state records it.
    original: Original,
    /// A backup to take before writing (path, bytes).
    backup: Option<(PathBuf, Vec<u8>)>,
}

/// Puts into `state` (written before any file changes) what this run is about to do: the files
/// it manages (a file being restored stays recorded until it is), the directories it will create,
/// the handlers of either configuration, and the pending restart with what to go back to. Returns
/// the files recorded once the writes are done.
fn record_intent(
    ctx: &CriContext,
    state: &mut CriState,
    kind: CriKind,
    target: &CriTarget,
    changes: &[Change],
    hash: &str,
) -> Vec<CriFile> {
    let prev_state = state.clone();
    state.cri = kind.as_str().into();
    state.unit = target.unit.clone();
    state.handlers = union(&prev_state.handlers, &target.handlers);
    // While the files change, the runtime may route to nydus under either configuration.
    state.nydus = Some(prev_state.nydus.unwrap_or(false) || ctx.cfg.uses_nydus());
    let kept: Vec<CriFile> = changes.iter().filter_map(|c| c.entry.clone()).collect();
    let restoring = prev_state
        .files
        .iter()
        .filter(|f| !kept.iter().any(|k| k.path == f.path))
        .cloned();
    state.files = kept.iter().cloned().chain(restoring).collect();
    // Record the directories we are about to create before creating them (crash safety).
    for c in changes
        .iter()
        .filter(|c| c.new.is_some() && c.current != c.new)
    {
        let mut cur = c.path.parent();
        while let Some(d) = cur {
            if d == Path::new("/") || ctx.fs.exists(d) {
                break;
            }
            if !state.created_dirs.iter().any(|x| x == d) {
                state.created_dirs.push(d.to_path_buf());
            }
            cur = d.parent();
        }
    }
    // The runtime has not loaded what we are about to write: record, in the same state write as
    // the intent, what to go back to if it does not come back with it. A previous unverified
    // write keeps its record (its "previous" is the last known good).
    if changes.iter().any(|c| c.current != c.new) {
        state.pending = Some(pending_restart(
            state.pending.as_ref(),
            hash,
            changes,
            &prev_state,
        ));
    }
    kept
}

/// The pending-restart record for writing `changes`: the files and the state record as they were
/// before, unless an earlier unverified write already recorded them (then those are the last
/// known good).
fn pending_restart(
    earlier: Option<&PendingRestart>,
    hash: &str,
    changes: &[Change],
    before: &CriState,
) -> PendingRestart {
    let mut previous = earlier.map(|p| p.previous.clone()).unwrap_or_default();
    for c in changes.iter().filter(|c| c.current != c.new) {
        if !previous.iter().any(|p| p.path == c.path) {
            previous.push(PreviousFile {
                path: c.path.clone(),
                content: c
                    .current
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned()),
            });
        }
    }
    PendingRestart {
        content: hash.to_string(),
        boot_id: boot_id(),
        requested_mono_us: monotonic_now_us(),
        previous,
        previous_state: match earlier {
            Some(p) => p.previous_state.clone(),
            None => Some(Box::new(CriState {
                pending: None,
                ..before.clone()
            })),
        },
    }
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
        tracing::info!(
            stage = "revert-cri",
            "nothing recorded: the runtime configuration was never changed by this install"
        );
        cleanup_state_leftovers(fs, &install)?;
        return Ok(CriOutcome::default());
    };
    if !fs.dry_run() {
        inuse::ensure_unused(
            ctx.restarter,
            ctx.cfg,
            &ctx.facts.display_name(),
            &state.handlers,
        )?;
    }
    let imports = whole_paths_imported(&state);
    let proxy = install.nydus_snapshotter();
    let mut changes = Vec::new();
    for f in &state.files {
        changes.push(restore_change(fs, &state, f, &imports, &proxy)?);
    }
    // Rewrites before removals: a drop-in goes only once no file imports it any more (containerd
    // refuses to start with an explicit import of a missing file; a crash in between must not
    // leave that).
    changes.sort_by_key(|c| c.new.is_none());
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
    let unit = if state.unit.is_empty() {
        runtime_unit(fs, resolve_cri(fs, ctx.cfg, ctx.facts)?)
    } else {
        state.unit.clone()
    };
    let handlers = state.handlers.clone();
    // A failed revert keeps the state so a re-run finishes the job.
    // Reverting has nothing to roll back to: an install's unverified record does not apply.
    if state.pending.as_ref().is_some_and(|p| p.content != hash) {
        state.pending = None;
    }
    let restarted = converge_runtime(
        ctx,
        &mut state,
        &state_path,
        &unit,
        &hash,
        !changed.is_empty(),
        Expect::Lacks(handlers),
    )?;
    // Done. Order matters for crash safety: directories we created (now empty), then the state
    // file, then the backups (a re-run without state cleans leftover backups).
    let mut dirs = state.created_dirs.clone();
    dirs.sort();
    for d in dirs.iter().rev() {
        fs.remove_dir_if_empty(d)?;
    }
    fs.remove_file(&state_path)?;
    cleanup_state_leftovers(fs, &install)?;
    Ok(CriOutcome {
        changed,
        restarted,
        unit,
        notes: vec![],
    })
}
