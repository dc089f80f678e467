//! Day-2 transitions on fake host roots: what a change between two configurations, a failed
//! restart or a crash in the middle of one leaves on the node. Each test reproduces a defect a
//! review found (issue 20) and failed before its fix.

mod common;

use std::path::Path;

use common::*;
use kata_deploy_stage::error::StageError;
use kata_deploy_stage::hostfs::HostFs;
use kata_deploy_stage::state::CriState;

fn hfs(root: &Path) -> HostFs {
    HostFs::new(root, false)
}

fn cri_state(root: &Path) -> Option<CriState> {
    let p = root.join("var/lib/kata-deploy/cri.json");
    std::fs::read(p)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

const COCO: &str = "kata-qemu-coco-dev";
const COCO_CONFIG: &str = "opt/kata/share/defaults/kata-containers/runtimes/qemu-coco-dev/configuration-qemu-coco-dev.toml";

/// A restart that fails is rolled back to the files of before the run, and the state record goes
/// back with them: it names the handlers the runtime serves again, so the next run neither
/// deletes their files nor saves our old handler into the "pristine" backup of an in-place edit
/// (which uninstall would then restore, leaving a handler of ours behind for good).
#[test]
fn a_rolled_back_upgrade_restores_the_state_record_too() {
    for name in ["containerd-1.7", "containerd-2.0", "k3s"] {
        let f = flavour(name);
        let host = make_host(&f);
        let original = snapshot(host.path());
        let facts = facts(&f);
        let rt = FakeRuntime::default();
        install(&hfs(host.path()), &config(TWO_SHIMS), &facts, &rt).unwrap();
        let before_upgrade = cri_state(host.path()).unwrap();
        // The upgrade drops the coco shim; the runtime comes back without our handlers.
        *rt.served.lock().unwrap() = Some(vec!["runc".into()]);
        let e = install(&hfs(host.path()), &config(ONE_SHIM), &facts, &rt).unwrap_err();
        assert!(matches!(e, StageError::Runtime { .. }), "{name}: {e}");
        let after = cri_state(host.path()).unwrap();
        assert!(
            after.handlers.iter().any(|h| h == COCO),
            "{name}: after the rollback the runtime serves {COCO} again but the state records {:?}",
            after.handlers
        );
        assert_eq!(
            after.files, before_upgrade.files,
            "{name}: the state's files must be those of before the failed run"
        );
        assert!(after.pending.is_none(), "{name}: rollback verified");
        assert!(
            host.path().join(COCO_CONFIG).exists(),
            "{name}: the served handler's files must stay"
        );
        // The next run converges, and uninstall restores every byte.
        *rt.served.lock().unwrap() = None;
        install(&hfs(host.path()), &config(ONE_SHIM), &facts, &rt).unwrap();
        uninstall(&hfs(host.path()), &config(ONE_SHIM), &facts, &rt).unwrap();
        let end = snapshot(host.path());
        assert!(
            end == original,
            "{name}: uninstall after a rolled-back upgrade left:\n{}",
            snapshot_diff(&original, &end)
        );
    }
}

/// A first install whose restart fails leaves no state: the host is as before, nothing to revert.
#[test]
fn a_rolled_back_first_install_leaves_no_state_record() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let facts = facts(&f);
    let rt = FakeRuntime::default();
    *rt.served.lock().unwrap() = Some(vec!["runc".into()]);
    let before = std::fs::read(host.path().join("etc/containerd/config.toml")).unwrap();
    install(&hfs(host.path()), &config(ONE_SHIM), &facts, &rt).unwrap_err();
    assert!(
        cri_state(host.path()).is_none(),
        "{:?}",
        cri_state(host.path())
    );
    assert_eq!(
        std::fs::read(host.path().join("etc/containerd/config.toml")).unwrap(),
        before
    );
    assert!(!host.path().join("etc/containerd/conf.d").exists());
}

/// The explicit imports of containerd's config.toml (containerd refuses to start when an
/// explicitly imported file is missing).
fn missing_imports(root: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(root.join("etc/containerd/config.toml")) else {
        return vec![];
    };
    let doc: toml_edit::DocumentMut = text.parse().unwrap();
    let Some(imports) = doc.get("imports").and_then(|i| i.as_array()) else {
        return vec![];
    };
    imports
        .iter()
        .filter_map(|v| v.as_str())
        .filter(|p| !p.contains('*'))
        .filter(|p| !root.join(p.trim_start_matches('/')).exists())
        .map(str::to_string)
        .collect()
}

/// Revert and rollback remove a drop-in only after the import naming it is gone: a crash (or a
/// reboot) at any point in between never leaves a config.toml importing a missing file.
#[test]
fn a_crash_anywhere_in_revert_never_leaves_an_import_of_a_missing_file() {
    let f = flavour("containerd-2.0");
    let facts = facts(&f);
    let cfg = config(TWO_SHIMS);
    let mut points = 0;
    for n in 0.. {
        let host = make_host(&f);
        let rt = FakeRuntime::default();
        install(&hfs(host.path()), &cfg, &facts, &rt).unwrap();
        assert!(missing_imports(host.path()).is_empty());
        let fs = hfs(host.path());
        fs.fail_at_op(Some(n));
        match uninstall(&fs, &cfg, &facts, &rt) {
            Ok(_) => break,
            Err(StageError::InjectedFault { .. }) => points += 1,
            Err(e) => panic!("crash at op {n}: unexpected error {e}"),
        }
        let missing = missing_imports(host.path());
        assert!(
            missing.is_empty(),
            "crash at op {n} of the uninstall: config.toml imports missing {missing:?}"
        );
    }
    assert!(points > 3, "only {points} crash points");
}

/// A rollback of a first install on containerd 2 restores config.toml before removing the
/// drop-in it imported: a crash between the two leaves a runtime that still starts.
#[test]
fn a_crash_in_a_rollback_never_leaves_an_import_of_a_missing_file() {
    let f = flavour("containerd-2.0");
    let facts = facts(&f);
    let cfg = config(ONE_SHIM);
    for n in 0.. {
        let host = make_host(&f);
        let rt = FakeRuntime::default();
        *rt.served.lock().unwrap() = Some(vec!["runc".into()]);
        let fs = hfs(host.path());
        fs.fail_at_op(Some(n));
        match install(&fs, &cfg, &facts, &rt) {
            Err(StageError::InjectedFault { .. }) => {}
            Err(StageError::Runtime { .. }) => break,
            other => panic!("crash at op {n}: unexpected {:?}", other.map(drop)),
        }
        let missing = missing_imports(host.path());
        assert!(
            missing.is_empty(),
            "crash at op {n} of a rolled-back install: config.toml imports missing {missing:?}"
        );
    }
}

/// The coco shim stays but stops pulling images in the guest (no nydus snapshotter).
const COCO_WITHOUT_GUEST_PULL: &str = "runtimeReadyTimeoutSeconds: 2\nshims:\n  - name: qemu\n  - name: qemu-coco-dev\n    dropIn: |\n      [agent.kata]\n      dial_timeout = 90\n";
const NYDUS_BIN: &str = "opt/kata/nydus-snapshotter/containerd-nydus-grpc";

fn nydus_enabled(rt: &FakeRuntime) -> bool {
    rt.enabled
        .lock()
        .unwrap()
        .iter()
        .any(|u| u.contains("nydus"))
}

fn stage_env<'a>(
    fs: &'a HostFs,
    cfg: &'a kata_deploy_stage::config::ValidConfig,
    facts: &'a kata_deploy_stage::config::NodeFacts,
    payload: &'a Path,
    rt: &'a FakeRuntime,
) -> kata_deploy_stage::stages::StageEnv<'a> {
    kata_deploy_stage::stages::StageEnv {
        cfg,
        facts,
        fs,
        payload_dir: payload,
        restarter: rt,
        claims: &kata_deploy_stage::stages::NoClaims,
        lock_wait: std::time::Duration::from_secs(5),
    }
}

/// Guest pull turned off for a shim that stays: the runtime routes that handler to nydus until
/// cri rewrote and reloaded its configuration, so artifacts keeps nydus running and installed;
/// prune-artifacts removes it after cri.
#[test]
fn guest_pull_turned_off_keeps_nydus_until_the_runtime_no_longer_routes_to_it() {
    use kata_deploy_stage::stages::{run_artifacts, run_cri, run_prune_artifacts};
    for name in ["containerd-1.7", "containerd-2.0", "k3s"] {
        let f = flavour(name);
        let host = make_host(&f);
        let original = snapshot(host.path());
        let facts = facts(&f);
        let rt = FakeRuntime::default();
        install(&hfs(host.path()), &config(TWO_SHIMS), &facts, &rt).unwrap();
        assert!(nydus_enabled(&rt) && host.path().join(NYDUS_BIN).exists());
        let cfg = config(COCO_WITHOUT_GUEST_PULL);
        let payload = payload_dir();
        let fs = hfs(host.path());
        let env = stage_env(&fs, &cfg, &facts, &payload, &rt);
        run_artifacts(&env).unwrap();
        assert!(
            nydus_enabled(&rt),
            "{name}: nydus stopped while the runtime still routes {COCO} to it"
        );
        assert!(host.path().join(NYDUS_BIN).exists(), "{name}");
        run_cri(&env).unwrap();
        run_prune_artifacts(&env).unwrap();
        assert!(!nydus_enabled(&rt), "{name}: nydus still enabled");
        assert!(
            !host.path().join("opt/kata/nydus-snapshotter").exists(),
            "{name}: nydus left behind"
        );
        assert!(host.path().join(COCO_CONFIG).exists(), "{name}");
        uninstall(&hfs(host.path()), &cfg, &facts, &rt).unwrap();
        let end = snapshot(host.path());
        assert!(
            end == original,
            "{name}:\n{}",
            snapshot_diff(&original, &end)
        );
    }
}

/// nydus is restarted when its binary or configuration changes, not only its unit file: an
/// upgraded snapshotter is used at once, not after the next reboot.
#[test]
fn a_changed_nydus_binary_restarts_nydus() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let facts = facts(&f);
    let rt = FakeRuntime::default();
    let cfg = config(TWO_SHIMS);
    install(&hfs(host.path()), &cfg, &facts, &rt).unwrap();
    let unit = "nydus-for-kata-tee.service";
    let first = rt.restart_count(unit);
    // Another payload version's binary (the install converges it back to the payload's).
    let bin = host.path().join(NYDUS_BIN);
    std::fs::remove_file(&bin).unwrap();
    std::fs::write(&bin, b"#!/bin/sh\n# an older nydus\n").unwrap();
    install(&hfs(host.path()), &cfg, &facts, &rt).unwrap();
    assert_eq!(
        rt.restart_count(unit),
        first + 1,
        "nydus must be restarted to run its new binary ({:?})",
        rt.restarts.lock().unwrap()
    );
    // Unchanged: no restart.
    install(&hfs(host.path()), &cfg, &facts, &rt).unwrap();
    assert_eq!(rt.restart_count(unit), first + 1);
}

/// With no active unit among a flavour's candidates, the cri stage starts nothing (a guessed
/// k3s server unit on an agent node would start a second runtime) and changes nothing: it fails
/// with a message naming the units and what to set.
#[test]
fn no_active_runtime_unit_is_an_error_and_nothing_is_started_or_written() {
    let f = flavour("k3s");
    let host = make_host(&f);
    let facts = facts(&f);
    let rt = FakeRuntime::default();
    rt.inactive
        .lock()
        .unwrap()
        .extend(["k3s.service".to_string(), "k3s-agent.service".to_string()]);
    let cfg = config(&ONE_SHIM.replace(
        "runtimeReadyTimeoutSeconds: 2",
        "runtimeReadyTimeoutSeconds: 1",
    ));
    let payload = payload_dir();
    let fs = hfs(host.path());
    let env = stage_env(&fs, &cfg, &facts, &payload, &rt);
    kata_deploy_stage::stages::run_artifacts(&env).unwrap();
    let before = snapshot(host.path());
    let e = kata_deploy_stage::stages::run_cri(&env).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("k3s.service")
            && msg.contains("k3s-agent.service")
            && msg.contains("stage.cri"),
        "{msg}"
    );
    assert!(rt.restarts.lock().unwrap().is_empty(), "a unit was started");
    let after = snapshot(host.path());
    assert!(after == before, "{}", snapshot_diff(&before, &after));
}

/// The per-flavour restart deadlines: a k3s/rke2/microk8s restart is the whole agent's.
#[test]
fn restart_deadlines_follow_the_flavour_unless_configured() {
    use kata_deploy_stage::config::CriKind;
    use std::time::Duration;
    let auto = config("shims:\n  - name: qemu\n");
    for k in [
        CriKind::K3s,
        CriKind::K3sAgent,
        CriKind::Rke2,
        CriKind::Microk8s,
    ] {
        assert_eq!(
            auto.runtime_ready_timeout(Some(k)),
            Duration::from_secs(300),
            "{k:?}"
        );
    }
    for k in [CriKind::Containerd, CriKind::Crio, CriKind::K0s] {
        assert_eq!(
            auto.runtime_ready_timeout(Some(k)),
            Duration::from_secs(120),
            "{k:?}"
        );
    }
    let set = config("runtimeReadyTimeoutSeconds: 45\nshims:\n  - name: qemu\n");
    assert_eq!(
        set.runtime_ready_timeout(Some(CriKind::K3s)),
        Duration::from_secs(45)
    );
}

fn running(name: &str, handler: &str) -> kata_deploy_stage::cri_client::Sandbox {
    kata_deploy_stage::cri_client::Sandbox {
        namespace: "team".into(),
        name: name.into(),
        handler: handler.into(),
        ready: true,
    }
}

/// A shim disabled (or uninstalled) while pods still run on its handler: the stage waits, then
/// fails naming them and changes nothing; once they are gone (or with force) it goes ahead.
/// Pods of handlers that stay, and stopped sandboxes, do not hold it.
#[test]
fn a_handler_is_never_removed_under_running_pods_unless_forced() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let facts = facts(&f);
    let rt = FakeRuntime::default();
    let two = TWO_SHIMS.replace(
        "runtimeReadyTimeoutSeconds: 2",
        "runtimeReadyTimeoutSeconds: 2\nrunningPodsWaitSeconds: 1",
    );
    let one = ONE_SHIM.replace(
        "runtimeReadyTimeoutSeconds: 2",
        "runtimeReadyTimeoutSeconds: 2\nrunningPodsWaitSeconds: 1",
    );
    install(&hfs(host.path()), &config(&two), &facts, &rt).unwrap();
    *rt.sandboxes.lock().unwrap() = Some(vec![
        running("confidential", COCO),
        running("web", "kata-qemu"),
        kata_deploy_stage::cri_client::Sandbox {
            ready: false,
            ..running("done", COCO)
        },
    ]);
    let restarts = rt.restart_count("containerd.service");
    let before = snapshot(host.path());
    let e = install(&hfs(host.path()), &config(&one), &facts, &rt).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, StageError::HandlersInUse { .. })
            && msg.contains("team/confidential")
            && !msg.contains("team/web")
            && !msg.contains("team/done")
            && msg.contains(COCO)
            && msg.contains("stage.runningKataPods.force"),
        "{msg}"
    );
    assert_eq!(
        rt.restart_count("containerd.service"),
        restarts,
        "no restart"
    );
    let cri_before: std::collections::BTreeMap<_, _> = before
        .iter()
        .filter(|(p, _)| p.contains("etc/containerd") || p.contains("cri.json"))
        .collect();
    let after = snapshot(host.path());
    let cri_after: std::collections::BTreeMap<_, _> = after
        .iter()
        .filter(|(p, _)| p.contains("etc/containerd") || p.contains("cri.json"))
        .collect();
    assert_eq!(
        cri_before, cri_after,
        "the runtime configuration must not change"
    );
    assert!(
        host.path().join(COCO_CONFIG).exists(),
        "the served shim's files stay"
    );
    // The pod goes: the upgrade proceeds.
    *rt.sandboxes.lock().unwrap() = Some(vec![running("web", "kata-qemu")]);
    install(&hfs(host.path()), &config(&one), &facts, &rt).unwrap();
    assert!(!host.path().join(COCO_CONFIG).exists());
    // Uninstall under a running pod fails the same way; forced, it goes ahead.
    let e = uninstall(&hfs(host.path()), &config(&one), &facts, &rt).unwrap_err();
    assert!(e.to_string().contains("team/web"), "{e}");
    assert!(cri_state(host.path()).is_some(), "nothing reverted");
    let forced = format!("{one}forceHandlerRemoval: true\n");
    uninstall(&hfs(host.path()), &config(&forced), &facts, &rt).unwrap();
    assert!(cri_state(host.path()).is_none());
}

/// k3s moving from containerd 1.7 to 2.x switches the file we manage (config.toml.tmpl to
/// config-v3.toml.tmpl): the old file stays recorded until it is restored, so a crash at any
/// operation of that run still leaves an uninstall that restores every byte.
#[test]
fn a_crash_anywhere_in_a_version_switch_still_uninstalls_to_the_original() {
    let f = flavour("k3s");
    let cfg = config(ONE_SHIM);
    let mut points = 0;
    for n in 0.. {
        let host = make_host(&f);
        let original = snapshot(host.path());
        let rt = FakeRuntime::default();
        install(&hfs(host.path()), &cfg, &facts(&f), &rt).unwrap();
        let mut v2 = facts(&f);
        v2.container_runtime_version = Some("containerd://2.0.5-k3s1".into());
        let fs = hfs(host.path());
        fs.fail_at_op(Some(n));
        match install(&fs, &cfg, &v2, &rt) {
            Ok(_) => break,
            Err(StageError::InjectedFault { .. }) => points += 1,
            Err(e) => panic!("crash at op {n}: unexpected error {e}"),
        }
        uninstall(&hfs(host.path()), &cfg, &v2, &rt)
            .unwrap_or_else(|e| panic!("uninstall after a crash at op {n}: {e}"));
        let after = snapshot(host.path());
        assert!(
            after == original,
            "crash at op {n} of the version switch, then uninstall:\n{}",
            snapshot_diff(&original, &after)
        );
    }
    assert!(points > 3, "only {points} crash points");
}

/// k0s restarts the containerd it supervises when a file in containerd.d changes; restarting the
/// k0s unit would restart the whole worker (kubelet included). The stage writes the drop-in,
/// never restarts k0s, and waits for k0s's own reload (a new containerd process, k0s's pid file)
/// before it calls the configuration loaded; when k0s never reloads, the node fails and the
/// drop-in is rolled back. (Before: `k0sworker.service` was restarted.)
#[test]
fn k0s_reloads_its_containerd_itself_and_the_stage_waits_for_it() {
    use kata_deploy_stage::selfreload::SelfReloading;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let f = flavour("k0s");
    let host = make_host(&f);
    let root = host.path().to_path_buf();
    let hz = rustix::param::clock_ticks_per_second();
    // The supervised containerd: pid file and /proc/<pid>/stat with a start time (ticks).
    let start_process = move |root: &Path, pid: u32, ticks: u64| {
        let dir = root.join(format!("proc/{pid}"));
        std::fs::create_dir_all(&dir).unwrap();
        let stat =
            format!("{pid} (containerd) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {ticks} 0 0");
        std::fs::write(dir.join("stat"), stat).unwrap();
        std::fs::create_dir_all(root.join("run/k0s")).unwrap();
        std::fs::write(root.join("run/k0s/containerd.pid"), format!("{pid}\n")).unwrap();
    };
    start_process(&root, 100, 1);
    // k0s's watcher: on a change in containerd.d, after its debounce, a new containerd.
    let watching = Arc::new(AtomicBool::new(true));
    let reloads = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let k0s = {
        let (root, watching, reloads, stop) = (
            root.clone(),
            watching.clone(),
            reloads.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let dropin = root.join("etc/k0s/containerd.d/kata-deploy.toml");
            let mut seen = std::fs::read(&dropin).ok();
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(20));
                let now = std::fs::read(&dropin).ok();
                if now == seen || !watching.load(Ordering::SeqCst) {
                    continue;
                }
                seen = now;
                std::thread::sleep(std::time::Duration::from_millis(300));
                let n = reloads.fetch_add(1, Ordering::SeqCst) as u32 + 1;
                let ticks = kata_deploy_stage::restart::monotonic_now_us() * hz / 1_000_000 + 1;
                start_process(&root, 100 + n, ticks);
            }
        })
    };
    let rt = Arc::new(FakeRuntime::default());
    let k0s_rt = SelfReloading::k0s(Box::new(SharedRuntime(rt.clone())), &root);
    let facts = facts(&f);

    install(&hfs(&root), &config(TWO_SHIMS), &facts, &k0s_rt).unwrap();
    assert_eq!(
        rt.restart_count("k0sworker.service"),
        0,
        "k0s is never restarted"
    );
    assert!(
        reloads.load(Ordering::SeqCst) >= 1,
        "the stage returned before k0s reloaded its containerd"
    );
    let dropin = root.join("etc/k0s/containerd.d/kata-deploy.toml");
    assert!(dropin.exists());

    // k0s stops watching (a user-managed containerd.toml): the upgrade is not loaded in time,
    // fails, and the drop-in goes back to what it was.
    watching.store(false, Ordering::SeqCst);
    let before = std::fs::read(&dropin).unwrap();
    let e = install(&hfs(&root), &config(ONE_SHIM), &facts, &k0s_rt).unwrap_err();
    assert!(matches!(e, StageError::Runtime { .. }), "{e}");
    assert!(e.to_string().contains("not back within"), "{e}");
    assert_eq!(std::fs::read(&dropin).unwrap(), before, "rolled back");
    assert_eq!(rt.restart_count("k0sworker.service"), 0);
    stop.store(true, Ordering::SeqCst);
    k0s.join().unwrap();
}
