//! Making the runtime load what was written and verifying it did: restart unless it already
//! loaded this content (a pending record survives the stage's death), wait until it serves (or
//! no longer serves) the handlers, roll back to the recorded previous files otherwise.

use std::path::Path;
use std::time::{Duration, Instant};

use super::apply::write_state;
use super::CriContext;
use crate::config::RestartMode;
use crate::error::{Result, StageError};
use crate::restart::{boot_id, monotonic_now_us};
use crate::state::{CriState, PendingRestart, PreviousFile};

/// The unit among `candidates` that runs the runtime now. Waits (up to the ready timeout) for
/// one to be active, so a runtime still restarting after an earlier run is waited for; an
/// inactive unit is never started (a guessed one, e.g. k3s's server unit on an agent node, would
/// start a second runtime), and nothing is written. `ours_down`: the unit an earlier run
/// restarted with a configuration it did not verify; it may be down because of that, and is the
/// one to verify or roll back.
pub(super) fn running_unit(
    ctx: &CriContext,
    candidates: &[String],
    ours_down: Option<&str>,
) -> Result<String> {
    let active = |u: &str| ctx.restarter.status(u).is_ok_and(|s| s.active);
    if ctx.cfg.restart == RestartMode::None || ctx.fs.dry_run() {
        return Ok(super::choose_active_unit(candidates, &active));
    }
    if let Some(u) = ours_down.filter(|u| candidates.iter().any(|c| c == u)) {
        return Ok(u.to_string());
    }
    let deadline = Instant::now() + ctx.timeout();
    loop {
        if let Some(u) = candidates.iter().find(|u| active(u)) {
            return Ok(u.clone());
        }
        if Instant::now() >= deadline {
            return Err(StageError::Runtime {
                unit: candidates.join(" or "),
                message: format!("none of these units is active after {}s: the runtime does not run under systemd as this flavour's unit", ctx.timeout().as_secs()),
                hint: "Nothing was changed or started. Start the runtime, or set stage.cri (or k8sDistribution) to this node's CRI; for a runtime systemd does not manage, set stage.restart: none and restart it yourself".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the runtime must serve once it is back.
#[derive(Debug, Clone)]
pub(super) enum Expect {
    /// All of these handlers.
    Serves(Vec<String>),
    /// None of these handlers.
    Lacks(Vec<String>),
}

/// Restarts the runtime unless it already loaded `hash`, then verifies it is back. On failure,
/// restores the files to what they were before this run and restarts again.
#[allow(clippy::too_many_arguments)]
pub(super) fn converge_runtime(
    ctx: &CriContext,
    state: &mut CriState,
    state_path: &Path,
    unit: &str,
    hash: &str,
    wrote: bool,
    expect: Expect,
) -> Result<bool> {
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
        fs.plan(format!(
            "restart {unit}: no (the running runtime already loaded this configuration)"
        ));
        return Ok(false);
    }
    if !wrote && restarted_by_previous_run(ctx, state, unit, hash, &expect)? {
        tracing::info!(stage = "cri", unit, "runtime already restarted with this configuration by a previous run; not restarting again");
        fs.plan(format!(
            "restart {unit}: no (restarted by a previous run after the configuration was written)"
        ));
        state.loaded = Some(hash.to_string());
        state.pending = None;
        write_state(fs, state_path, state)?;
        return Ok(false);
    }
    if fs.dry_run() {
        fs.plan(format!(
            "restart {unit}: yes (the running runtime has not loaded this configuration)"
        ));
        return Ok(true);
    }
    let earlier = state.pending.as_ref();
    let stamp = PendingRestart {
        content: hash.to_string(),
        boot_id: boot_id(),
        requested_mono_us: monotonic_now_us(),
        previous: earlier.map(|p| p.previous.clone()).unwrap_or_default(),
        previous_state: earlier.and_then(|p| p.previous_state.clone()),
    };
    state.pending = Some(stamp.clone());
    write_state(fs, state_path, state)?;
    tracing::info!(
        stage = "cri",
        unit,
        "restarting the runtime to load the new configuration"
    );
    match restart_and_wait(ctx, unit, stamp.requested_mono_us, &expect) {
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
            let hint = match rollback(ctx, unit, &stamp.previous) {
                Ok(()) => {
                    restore_previous_state(ctx, state_path, state, stamp.previous_state)?;
                    "The previous configuration was restored and the runtime restarted with it. Check the runtime logs (journalctl -u <unit>) for why it rejected the new configuration".to_string()
                }
                Err(e @ StageError::InjectedFault { .. }) => return Err(e),
                Err(re) => format!("Restoring the previous configuration ALSO failed ({re}); restore it by hand from the backups in {}", ctx.cfg.install().state_dir().display()),
            };
            Err(StageError::Runtime {
                unit: unit.to_string(),
                message: format!("did not come back with the new configuration: {e}"),
                hint,
            })
        }
    }
}

/// Whether a previous run requested this very restart (and may have been killed by it) and the
/// runtime came back since, serving what is expected.
fn restarted_by_previous_run(
    ctx: &CriContext,
    state: &CriState,
    unit: &str,
    hash: &str,
    expect: &Expect,
) -> Result<bool> {
    let Some(p) = state.pending.as_ref().filter(|p| p.content == hash) else {
        return Ok(false);
    };
    let st = ctx.restarter.status(unit)?;
    let restarted_since = p.boot_id != boot_id()
        || st
            .active_since_mono_us
            .is_some_and(|t| t >= p.requested_mono_us);
    let served = ctx.restarter.served_handlers(unit);
    Ok(st.active && restarted_since && served.is_ok_and(|s| matches_expect(s, expect)))
}

/// Restarts the runtime and waits until it serves what is expected. A failed start is a runtime
/// refusing its configuration, or one that crashed while starting and that systemd brings back:
/// a short grace tells them apart without waiting the whole deadline for a refusal.
fn restart_and_wait(ctx: &CriContext, unit: &str, since_us: u64, expect: &Expect) -> Result<()> {
    match ctx.restarter.restart(unit) {
        Ok(()) => {
            crate::checkpoint("cri-restarted");
            wait_until_loaded(ctx, unit, since_us, expect, ctx.timeout())
        }
        Err(e @ StageError::UnitFailed { .. }) => {
            let grace = ctx.timeout().min(FAILED_START_GRACE);
            tracing::warn!(stage = "cri", unit, error = %e, grace_s = grace.as_secs(), "the runtime's start failed; giving systemd a moment to bring it back");
            wait_until_loaded(ctx, unit, since_us, expect, grace).map_err(|w| StageError::Runtime {
                unit: unit.to_string(),
                message: format!("{e}; then {w}"),
                hint: "see the runtime's logs".into(),
            })
        }
        Err(e) => Err(e),
    }
}

fn matches_expect(served: Option<Vec<String>>, expect: &Expect) -> bool {
    match (served, expect) {
        (None, _) => true,
        (Some(s), Expect::Serves(h)) => h.iter().all(|x| s.contains(x)),
        (Some(s), Expect::Lacks(h)) => !h.iter().any(|x| s.contains(x)),
    }
}

/// How long a runtime whose start failed may take to come back on its own (systemd's
/// `Restart=` brings a crashed containerd back within seconds; a refused configuration never).
const FAILED_START_GRACE: Duration = Duration::from_secs(30);

fn wait_until_loaded(
    ctx: &CriContext,
    unit: &str,
    since_us: u64,
    expect: &Expect,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut last: String;
    loop {
        match ctx.restarter.status(unit) {
            Ok(st) if st.active && st.active_since_mono_us.is_none_or(|t| t >= since_us) => {
                match ctx.restarter.served_handlers(unit) {
                    Ok(served) if matches_expect(served.clone(), expect) => return Ok(()),
                    Ok(served) => {
                        last = format!(
                            "active but serves {:?}, expected {:?}",
                            served.unwrap_or_default(),
                            expect
                        )
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            Ok(st) => last = format!("active={} since={:?}", st.active, st.active_since_mono_us),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(StageError::Runtime {
                unit: unit.into(),
                message: format!("not back within {}s: {last}", within.as_secs()),
                hint: "see the runtime's logs".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Puts the state record back to what it was before the rolled-back write: the runtime serves
/// those handlers from those files again. A first install leaves no record (nothing to revert);
/// a record of an older version (no previous state) only loses its pending restart.
fn restore_previous_state(
    ctx: &CriContext,
    state_path: &Path,
    state: &mut CriState,
    previous: Option<Box<CriState>>,
) -> Result<()> {
    let fs = ctx.fs;
    match previous {
        None => state.pending = None,
        Some(prev) => {
            // Directories this run created for files the rollback removed go when empty.
            let mut created: Vec<_> = state
                .created_dirs
                .iter()
                .filter(|d| !prev.created_dirs.contains(d))
                .collect();
            created.sort();
            for d in created.into_iter().rev() {
                fs.remove_dir_if_empty(d)?;
            }
            *state = CriState {
                pending: None,
                ..*prev
            };
        }
    }
    if state.files.is_empty() {
        fs.remove_file(state_path)?;
        return super::cleanup_state_leftovers(fs, &ctx.cfg.install());
    }
    write_state(fs, state_path, state)
}

/// Restores `previous` (rewritten files first, removed ones last: a drop-in goes only after the
/// import naming it), then restarts the runtime with it.
fn rollback(ctx: &CriContext, unit: &str, previous: &[PreviousFile]) -> Result<()> {
    let (rewrites, removals): (Vec<_>, Vec<_>) = previous.iter().partition(|p| p.content.is_some());
    for p in rewrites.into_iter().chain(removals) {
        match &p.content {
            Some(b) => ctx.fs.write_preserving(&p.path, b.as_bytes(), 0o644)?,
            None => {
                ctx.fs.remove_file(&p.path)?;
            }
        }
    }
    let since = monotonic_now_us();
    ctx.restarter.restart(unit)?;
    wait_until_loaded(ctx, unit, since, &Expect::Lacks(vec![]), ctx.timeout())
}
