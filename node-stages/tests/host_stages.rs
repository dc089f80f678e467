//! Install / re-install / reconfigure / revert / crash-recovery of the host stages against
//! fake host roots built from real default configurations of every supported distribution.

mod common;

use std::path::Path;

use common::*;
use kata_deploy_stage::error::StageError;
use kata_deploy_stage::hostfs::HostFs;
use kata_deploy_stage::restart::Restarter;

/// A host filesystem without fsync (tests simulate crashes, not power loss).
fn hfs(root: &Path, dry_run: bool) -> HostFs {
    let fs = HostFs::new(root, dry_run);
    fs.set_durable(false);
    fs
}

fn handler_in(root: &Path, file: &str, handler: &str) -> bool {
    let text = std::fs::read_to_string(root.join(file.trim_start_matches('/'))).unwrap_or_default();
    text.contains(&format!(".{handler}]")) || text.contains(&format!(".\"{handler}\"]"))
}

#[test]
fn install_twice_then_revert_restores_every_byte_on_every_flavour() {
    for f in flavours() {
        let host = make_host(&f);
        let before = snapshot(host.path());
        let cfg = config(TWO_SHIMS);
        let facts = facts(&f);
        let rt = FakeRuntime::default();
        let fs = hfs(host.path(), false);
        install(&fs, &cfg, &facts, &rt).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        for h in ["kata-qemu", "kata-qemu-coco-dev"] {
            assert!(
                handler_in(host.path(), f.handler_file, h),
                "{}: {h} missing from {}",
                f.name,
                f.handler_file
            );
        }
        let unit_restarts = rt
            .restarts
            .lock()
            .unwrap()
            .iter()
            .filter(|u| !u.contains("nydus"))
            .count();
        assert_eq!(
            unit_restarts,
            1,
            "{}: {:?}",
            f.name,
            rt.restarts.lock().unwrap()
        );
        let installed = snapshot(host.path());

        // Second run: no write at all, no restart.
        let fs2 = hfs(host.path(), false);
        let before_restarts = rt.restarts.lock().unwrap().len();
        install(&fs2, &cfg, &facts, &rt).unwrap();
        assert_eq!(
            fs2.ops_done(),
            0,
            "{}: second install wrote something",
            f.name
        );
        assert_eq!(
            rt.restarts.lock().unwrap().len(),
            before_restarts,
            "{}: second install restarted",
            f.name
        );
        assert_eq!(snapshot(host.path()), installed);

        // Revert: byte-for-byte original, runtime restarted once more; then a no-op.
        uninstall(&fs, &cfg, &facts, &rt).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let after = snapshot(host.path());
        assert!(
            after == before,
            "{}: revert left differences:\n{}",
            f.name,
            snapshot_diff(&before, &after)
        );
        let fs3 = hfs(host.path(), false);
        uninstall(&fs3, &cfg, &facts, &rt).unwrap();
        assert_eq!(
            fs3.ops_done(),
            0,
            "{}: second uninstall wrote something",
            f.name
        );
    }
}

#[test]
fn uninstall_on_a_clean_node_is_a_noop() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let before = snapshot(host.path());
    let rt = FakeRuntime::default();
    let fs = hfs(host.path(), false);
    uninstall(&fs, &config(ONE_SHIM), &facts(&f), &rt).unwrap();
    assert_eq!(fs.ops_done(), 0);
    assert!(rt.restarts.lock().unwrap().is_empty());
    assert_eq!(snapshot(host.path()), before);
}

#[test]
fn configuration_change_removes_what_is_no_longer_wanted() {
    for name in ["containerd-1.7", "containerd-2.0", "crio", "k3s"] {
        let f = flavour(name);
        let host = make_host(&f);
        let before = snapshot(host.path());
        let facts = facts(&f);
        let rt = FakeRuntime::default();
        let fs = hfs(host.path(), false);
        install(&fs, &config(TWO_SHIMS), &facts, &rt).unwrap();
        assert!(host
            .path()
            .join("opt/kata/nydus-snapshotter/containerd-nydus-grpc")
            .exists());
        let fresh = make_host(&f);
        install(
            &hfs(fresh.path(), false),
            &config(ONE_SHIM),
            &facts,
            &FakeRuntime::default(),
        )
        .unwrap();
        let want = snapshot(fresh.path());

        let restarts = rt.restart_count(if name == "crio" {
            "crio.service"
        } else if name == "k3s" {
            "k3s.service"
        } else {
            "containerd.service"
        });
        install(&hfs(host.path(), false), &config(ONE_SHIM), &facts, &rt).unwrap();
        assert!(
            !handler_in(host.path(), f.handler_file, "kata-qemu-coco-dev"),
            "{name}: stale handler left"
        );
        assert!(handler_in(host.path(), f.handler_file, "kata-qemu"));
        let got = snapshot(host.path());
        // Same files as a fresh one-shim install (state files record history, compare the rest).
        let strip = |s: &std::collections::BTreeMap<String, Option<(u32, Vec<u8>)>>| {
            s.iter()
                .filter(|(k, _)| !k.starts_with("var/lib/kata-deploy/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert!(
            strip(&got) == strip(&want),
            "{name}: reconfigured host differs from a fresh install:\n{}",
            snapshot_diff(&strip(&want), &strip(&got))
        );
        assert!(
            !rt.enabled
                .lock()
                .unwrap()
                .iter()
                .any(|u| u.contains("nydus")),
            "{name}: nydus unit still enabled"
        );
        let unit = if name == "crio" {
            "crio.service"
        } else if name == "k3s" {
            "k3s.service"
        } else {
            "containerd.service"
        };
        assert_eq!(
            rt.restart_count(unit),
            restarts + 1,
            "{name}: the runtime must reload the smaller config"
        );

        uninstall(&hfs(host.path(), false), &config(ONE_SHIM), &facts, &rt).unwrap();
        let after = snapshot(host.path());
        assert!(
            after == before,
            "{name}: {}",
            snapshot_diff(&before, &after)
        );
    }
}

#[test]
fn two_installs_share_nothing_and_uninstall_independently() {
    let f = flavour("containerd-2.0");
    let facts = facts(&f);
    let a = config(TWO_SHIMS);
    let b = config(&format!("multiInstallSuffix: cicd\n{TWO_SHIMS}"));
    for lifo in [true, false] {
        let host = make_host(&f);
        let before = snapshot(host.path());
        let rt = FakeRuntime::default();
        install(&hfs(host.path(), false), &a, &facts, &rt).unwrap();
        install(&hfs(host.path(), false), &b, &facts, &rt).unwrap();
        assert!(host
            .path()
            .join("opt/kata-cicd/bin/containerd-shim-kata-v2")
            .exists());
        assert!(handler_in(
            host.path(),
            "/etc/containerd/conf.d/kata-deploy-cicd.toml",
            "kata-qemu-cicd"
        ));
        let dropin_b = std::fs::read_to_string(
            host.path()
                .join("etc/containerd/conf.d/kata-deploy-cicd.toml"),
        )
        .unwrap();
        assert!(
            dropin_b.contains("/run/nydus-for-kata-tee-cicd/containerd-nydus-grpc.sock")
                && dropin_b.contains("/opt/kata-cicd/")
        );
        assert!(rt
            .enabled
            .lock()
            .unwrap()
            .contains(&"nydus-for-kata-tee-cicd.service".to_string()));
        let (first, second) = if lifo { (&b, &a) } else { (&a, &b) };
        uninstall(&hfs(host.path(), false), first, &facts, &rt).unwrap();
        // The other install is intact.
        let other = if lifo {
            "opt/kata/bin/containerd-shim-kata-v2"
        } else {
            "opt/kata-cicd/bin/containerd-shim-kata-v2"
        };
        assert!(host.path().join(other).exists(), "lifo={lifo}");
        let main = std::fs::read_to_string(host.path().join("etc/containerd/config.toml")).unwrap();
        let other_dropin = if lifo {
            "conf.d/kata-deploy.toml"
        } else {
            "conf.d/kata-deploy-cicd.toml"
        };
        assert!(main.contains(other_dropin), "lifo={lifo}: {main}");
        uninstall(&hfs(host.path(), false), second, &facts, &rt).unwrap();
        let after = snapshot(host.path());
        if lifo {
            assert!(after == before, "{}", snapshot_diff(&before, &after));
        } else {
            // Out-of-order removal edits the shared main config surgically: semantically the
            // original (no kata import left); `imports = []` and the empty conf.d may remain.
            let diff = snapshot_diff(&before, &after);
            assert!(
                diff.lines()
                    .all(|l| l == "changed etc/containerd/config.toml"
                        || l == "only after: etc/containerd/conf.d/"),
                "{diff}"
            );
            let main =
                std::fs::read_to_string(host.path().join("etc/containerd/config.toml")).unwrap();
            assert!(!main.contains("kata"), "{main}");
            let orig: toml_edit::DocumentMut =
                String::from_utf8(fixture("containerd-2.0-default.toml"))
                    .unwrap()
                    .parse()
                    .unwrap();
            let now: toml_edit::DocumentMut = main.parse().unwrap();
            assert_eq!(
                now.to_string().replace(' ', ""),
                orig.to_string().replace(' ', "")
            );
        }
    }
}

/// Crash after every mutating host operation of install (artifacts + cri), then re-run: the
/// host converges to exactly the installed state; and revert after the crash restores the
/// original byte-for-byte.
#[test]
fn crash_at_every_step_then_rerun_converges_and_revert_restores() {
    // One thread per flavour: hundreds of crash points each.
    std::thread::scope(|scope| {
        for name in [
            "containerd-1.6",
            "containerd-2.0",
            "containerd-2.0-no-config",
            "crio",
            "k3s-agent-user-template",
        ] {
            scope.spawn(move || crash_install_flavour(name));
        }
    });
}

fn crash_install_flavour(name: &'static str) {
    {
        let f = flavour(name);
        let facts = facts(&f);
        let cfg = config(TWO_SHIMS);
        let reference = {
            let h = make_host(&f);
            install(&hfs(h.path(), false), &cfg, &facts, &FakeRuntime::default()).unwrap();
            snapshot(h.path())
        };
        let mut crash_points = 0;
        for n in 0.. {
            let host = make_host(&f);
            let original = snapshot(host.path());
            let fs = hfs(host.path(), false);
            fs.fail_at_op(Some(n));
            let rt = FakeRuntime::default();
            match install(&fs, &cfg, &facts, &rt) {
                Ok(_) => break,
                Err(StageError::InjectedFault { .. }) => crash_points += 1,
                Err(e) => panic!("{name} crash at op {n}: unexpected error {e}"),
            }
            // Re-run converges to the exact installed state.
            let rerun = make_host(&f);
            copy_tree(host.path(), rerun.path());
            install(&hfs(rerun.path(), false), &cfg, &facts, &rt)
                .unwrap_or_else(|e| panic!("{name} rerun after crash at op {n}: {e}"));
            let got = snapshot(rerun.path());
            assert!(
                got == reference,
                "{name}: crash at op {n}, re-run differs:\n{}",
                snapshot_diff(&reference, &got)
            );
            // Revert after the crash restores the original.
            uninstall(&hfs(host.path(), false), &cfg, &facts, &rt)
                .unwrap_or_else(|e| panic!("{name} revert after crash at op {n}: {e}"));
            let after = snapshot(host.path());
            assert!(
                after == original,
                "{name}: crash at op {n}, revert differs:\n{}",
                snapshot_diff(&original, &after)
            );
        }
        assert!(
            crash_points > 20,
            "{name}: only {crash_points} crash points enumerated"
        );
        figure(
            "crash_at_every_step_then_rerun_converges_and_revert_restores",
            &format!("{name}: {crash_points} crash points"),
        );
    }
}

/// Crash after every mutating operation of the uninstall, then re-run the uninstall.
#[test]
fn crash_during_uninstall_then_rerun_restores_original() {
    for name in ["containerd-1.7", "containerd-2.0", "k3s"] {
        let f = flavour(name);
        let facts = facts(&f);
        let cfg = config(TWO_SHIMS);
        for n in 0.. {
            let host = make_host(&f);
            let original = snapshot(host.path());
            let rt = FakeRuntime::default();
            install(&hfs(host.path(), false), &cfg, &facts, &rt).unwrap();
            let fs = hfs(host.path(), false);
            fs.fail_at_op(Some(n));
            match uninstall(&fs, &cfg, &facts, &rt) {
                Ok(_) => break,
                Err(StageError::InjectedFault { .. }) => {}
                Err(e) => panic!("{name} crash at op {n}: unexpected error {e}"),
            }
            uninstall(&hfs(host.path(), false), &cfg, &facts, &rt)
                .unwrap_or_else(|e| panic!("{name} re-run after crash at {n}: {e}"));
            let after = snapshot(host.path());
            assert!(
                after == original,
                "{name}: uninstall crash at op {n}:\n{}",
                snapshot_diff(&original, &after)
            );
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn restart_that_kills_the_stage_is_not_repeated_on_retry() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let facts = facts(&f);
    let cfg = config(ONE_SHIM);
    let rt = FakeRuntime::default();
    rt.kill_stage_on_next_restart
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = install(&hfs(host.path(), false), &cfg, &facts, &rt).unwrap_err();
    assert!(matches!(e, StageError::InjectedFault { .. }), "{e}");
    assert_eq!(rt.restart_count("containerd.service"), 1);
    // The Job retries: the runtime already restarted after our stamp, so no second restart.
    let fs = hfs(host.path(), false);
    install(&fs, &cfg, &facts, &rt).unwrap();
    assert_eq!(
        rt.restart_count("containerd.service"),
        1,
        "restarted again on retry"
    );
    let fs = hfs(host.path(), false);
    install(&fs, &cfg, &facts, &rt).unwrap();
    assert_eq!(fs.ops_done(), 0);
}

#[test]
fn runtime_without_our_handlers_is_rolled_back() {
    let f = flavour("containerd-1.7");
    let host = make_host(&f);
    let facts = facts(&f);
    let cfg = config(ONE_SHIM);
    let rt = FakeRuntime::default();
    *rt.served.lock().unwrap() = Some(vec!["runc".into()]);
    let original_cfg = std::fs::read(host.path().join("etc/containerd/config.toml")).unwrap();
    let e = install(&hfs(host.path(), false), &cfg, &facts, &rt).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StageError::Runtime { .. }), "{msg}");
    assert!(msg.contains("previous configuration was restored"), "{msg}");
    assert_eq!(
        std::fs::read(host.path().join("etc/containerd/config.toml")).unwrap(),
        original_cfg
    );
    assert_eq!(
        rt.restart_count("containerd.service"),
        2,
        "restart with new config, then with the restored one"
    );
    // Uninstall still cleans everything up.
    *rt.served.lock().unwrap() = None;
    uninstall(&hfs(host.path(), false), &cfg, &facts, &rt).unwrap();
    assert!(!host.path().join("var/lib/kata-deploy").exists());
    assert!(!host.path().join("opt/kata").exists());
}

#[test]
fn malformed_runtime_config_is_bad_input_and_changes_nothing() {
    for (name, path) in [
        ("containerd-1.7", "etc/containerd/config.toml"),
        ("crio", "etc/crio/crio.conf"),
        (
            "microk8s",
            "var/snap/microk8s/current/args/containerd-template.toml",
        ),
    ] {
        let f = flavour(name);
        let host = make_host(&f);
        std::fs::write(
            host.path().join(path),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"\nbroken",
        )
        .unwrap();
        let rt = FakeRuntime::default();
        let fs = hfs(host.path(), false);
        let payload = payload_dir();
        let cfg = config(ONE_SHIM);
        let facts = facts(&f);
        let before = snapshot(host.path());
        let env = stage_env(&cfg, &facts, &fs, &payload, &rt);
        let e = kata_deploy_stage::stages::run_cri(&env).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{name}: {e}");
        assert!(
            e.to_string().contains(path.rsplit('/').next().unwrap()),
            "{name}: error must name the file: {e}"
        );
        assert_eq!(snapshot(host.path()), before, "{name}: host changed");
        assert!(rt.restarts.lock().unwrap().is_empty());
    }
}

#[test]
fn corrupt_payload_is_bad_input_and_changes_nothing() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let payload = tempfile::tempdir().unwrap();
    copy_tree(&payload_dir(), payload.path());
    // Flip one byte of a listed file (the image behind the kata-containers.img link): detected
    // while copying, after other files were staged.
    let victim = payload
        .path()
        .join("share/kata-containers/kata-containers-6.12.47-kata-test.img");
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let before = snapshot(host.path());
    let fs = hfs(host.path(), false);
    let cfg = config(ONE_SHIM);
    let facts = facts(&f);
    let rt = FakeRuntime::default();
    let env = stage_env(&cfg, &facts, &fs, payload.path(), &rt);
    let e = kata_deploy_stage::stages::run_artifacts(&env).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(
        e.to_string()
            .contains("kata-containers-6.12.47-kata-test.img")
            && e.to_string().contains("corrupt"),
        "{e}"
    );
    let after = snapshot(host.path());
    assert!(after == before, "{}", snapshot_diff(&before, &after));
}

#[test]
fn reused_node_name_is_never_mutated() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let before = snapshot(host.path());
    let mut facts = facts(&f);
    facts.machine_id = Some("another-machine".into());
    let e = install(
        &hfs(host.path(), false),
        &config(ONE_SHIM),
        &facts,
        &FakeRuntime::default(),
    )
    .unwrap_err();
    assert!(matches!(e, StageError::IdentityMismatch { .. }), "{e}");
    assert_eq!(snapshot(host.path()), before);
}

#[test]
fn dry_run_prints_diffs_and_restart_decision_and_changes_nothing() {
    let f = flavour("containerd-1.7");
    let host = make_host(&f);
    let before = snapshot(host.path());
    let fs = hfs(host.path(), true);
    let rt = FakeRuntime::default();
    let reports = install(&fs, &config(TWO_SHIMS), &facts(&f), &rt).unwrap();
    assert_eq!(snapshot(host.path()), before);
    assert!(rt.restarts.lock().unwrap().is_empty() && rt.enabled.lock().unwrap().is_empty());
    let text: String = reports.iter().map(|r| r.text()).collect();
    assert!(
        text.contains("+[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu]"),
        "{text}"
    );
    assert!(
        text.contains("-      disable_snapshot_annotations = true"),
        "{text}"
    );
    assert!(text.contains("restart containerd.service: yes"), "{text}");
    assert!(
        text.contains("install /opt/kata/bin/containerd-shim-kata-v2"),
        "{text}"
    );
    // After a real install, a dry run says nothing would change and no restart.
    install(
        &hfs(host.path(), false),
        &config(TWO_SHIMS),
        &facts(&f),
        &rt,
    )
    .unwrap();
    let fs = hfs(host.path(), true);
    let text: String = install(&fs, &config(TWO_SHIMS), &facts(&f), &rt)
        .unwrap()
        .iter()
        .map(|r| r.text())
        .collect();
    assert!(text.contains("restart containerd.service: no"), "{text}");
    assert!(
        !text.contains("modify") && !text.contains("install /opt"),
        "{text}"
    );
}

#[test]
fn remove_artifacts_refuses_before_revert_cri() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let rt = FakeRuntime::default();
    let cfg = config(ONE_SHIM);
    let facts = facts(&f);
    install(&hfs(host.path(), false), &cfg, &facts, &rt).unwrap();
    let fs = hfs(host.path(), false);
    let e = kata_deploy_stage::artifacts::remove_artifacts(&fs, &cfg, &rt as &dyn Restarter)
        .unwrap_err();
    assert!(e.to_string().contains("revert-cri first"), "{e}");
    assert!(host
        .path()
        .join("opt/kata/bin/containerd-shim-kata-v2")
        .exists());
}

#[test]
fn upgrade_drops_a_removed_shims_handler_before_its_files() {
    use kata_deploy_stage::stages::{self, NoClaims, StageEnv};
    for name in ["containerd-1.7", "containerd-2.0", "crio", "k3s"] {
        let f = flavour(name);
        let host = make_host(&f);
        let facts = facts(&f);
        let rt = FakeRuntime::default();
        install(&hfs(host.path(), false), &config(TWO_SHIMS), &facts, &rt).unwrap();
        let coco = host.path().join("opt/kata/share/defaults/kata-containers/runtimes/qemu-coco-dev/configuration-qemu-coco-dev.toml");
        assert!(coco.exists(), "{name}");
        let payload = payload_dir();
        let one = config(ONE_SHIM);
        let fs = hfs(host.path(), false);
        let env = StageEnv {
            cfg: &one,
            facts: &facts,
            fs: &fs,
            payload_dir: &payload,
            restarter: &rt,
            claims: &NoClaims,
            lock_wait: std::time::Duration::from_secs(5),
        };
        // The artifacts stage of the upgrade runs first: the runtime still has the handler, so
        // its shim configuration and the nydus snapshotter must still be there.
        stages::run_artifacts(&env).unwrap();
        assert!(
            handler_in(host.path(), f.handler_file, "kata-qemu-coco-dev"),
            "{name}: the handler is dropped by cri, not artifacts"
        );
        assert!(
            coco.exists(),
            "{name}: files of a shim whose handler the runtime still serves were removed"
        );
        assert!(
            host.path()
                .join("opt/kata/nydus-snapshotter/containerd-nydus-grpc")
                .exists(),
            "{name}: nydus removed while a handler uses it"
        );
        assert!(
            rt.enabled
                .lock()
                .unwrap()
                .iter()
                .any(|u| u.contains("nydus")),
            "{name}: nydus unit disabled while a handler uses it"
        );
        // cri drops the handler (runtime restarted without it); it writes nothing under the
        // prefix (read-only there with precise mounts), so the files are still there.
        stages::run_cri(&env).unwrap();
        assert!(
            !handler_in(host.path(), f.handler_file, "kata-qemu-coco-dev"),
            "{name}"
        );
        assert!(coco.exists(), "{name}: cri must not write under the prefix");
        // prune-artifacts, after cri, removes them.
        stages::run_prune_artifacts(&env).unwrap();
        assert!(
            !coco.exists(),
            "{name}: files of the dropped shim left behind"
        );
        assert!(
            !host.path().join("opt/kata/nydus-snapshotter").exists(),
            "{name}: nydus left behind"
        );
        assert!(
            !rt.enabled
                .lock()
                .unwrap()
                .iter()
                .any(|u| u.contains("nydus")),
            "{name}: nydus unit still enabled"
        );
        // Uninstall still removes everything.
        uninstall(&hfs(host.path(), false), &one, &facts, &rt).unwrap();
        assert!(!host.path().join("opt/kata").exists(), "{name}");
    }
}

#[test]
fn release_layout_installs_links_as_links_and_runtime_rs_configs_from_their_directory() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let rt = FakeRuntime::default();
    let cfg =
        config("shims:\n  - name: qemu\n  - name: qemu-runtime-rs\n  - name: clh-runtime-rs\n");
    install(&hfs(host.path(), false), &cfg, &facts(&f), &rt).unwrap();
    let share = host.path().join("opt/kata/share/kata-containers");
    for (link, target) in [
        ("vmlinux.container", "vmlinux-6.12.47-kata-test.container"),
        (
            "kata-containers.img",
            "kata-containers-6.12.47-kata-test.img",
        ),
    ] {
        assert_eq!(
            std::fs::read_link(share.join(link)).unwrap(),
            Path::new(target),
            "{link} must stay a link"
        );
        assert!(share.join(target).is_file());
    }
    // runtime-rs shims start from the release's runtime-rs base configs ([agent.kata] timeout).
    let rs = std::fs::read_to_string(host.path().join("opt/kata/share/defaults/kata-containers/runtimes/qemu-runtime-rs/configuration-qemu-runtime-rs.toml")).unwrap();
    let base = std::fs::read_to_string(
        payload_dir()
            .join("share/defaults/kata-containers/runtime-rs/configuration-qemu-runtime-rs.toml"),
    )
    .unwrap();
    assert_eq!(rs, base);
    let dropin = std::fs::read_to_string(host.path().join("opt/kata/share/defaults/kata-containers/runtimes/clh-runtime-rs/config.d/10-kata-deploy.toml")).unwrap();
    assert!(
        dropin.contains("[agent.kata]") && dropin.contains("create_container_timeout"),
        "{dropin}"
    );
    // Re-run: links recognised as installed (nothing rewritten); uninstall removes them.
    let fs = hfs(host.path(), false);
    install(&fs, &cfg, &facts(&f), &rt).unwrap();
    assert_eq!(fs.ops_done(), 0, "a re-run rewrote something");
    uninstall(&hfs(host.path(), false), &cfg, &facts(&f), &rt).unwrap();
    assert!(!host.path().join("opt/kata").exists());
}

#[test]
fn k3s_multi_install_keeps_both_installs_handlers_across_reruns_and_uninstalls() {
    for name in ["k3s", "rke2-containerd-2", "k3s-agent-user-template"] {
        let f = flavour(name);
        let host = make_host(&f);
        let before = snapshot(host.path());
        let facts = facts(&f);
        let rt = FakeRuntime::default();
        let a = config("multiInstallSuffix: a\nshims:\n  - name: qemu\n");
        let b = config("multiInstallSuffix: b\nshims:\n  - name: qemu\n");
        let has = |h: &str| handler_in(host.path(), f.handler_file, h);
        install(&hfs(host.path(), false), &a, &facts, &rt).unwrap();
        install(&hfs(host.path(), false), &b, &facts, &rt).unwrap();
        assert!(
            has("kata-qemu-a") && has("kata-qemu-b"),
            "{name}: after both installs"
        );
        install(&hfs(host.path(), false), &a, &facts, &rt).unwrap();
        assert!(
            has("kata-qemu-a") && has("kata-qemu-b"),
            "{name}: re-running install a wiped install b's handlers"
        );
        install(&hfs(host.path(), false), &b, &facts, &rt).unwrap();
        assert!(
            has("kata-qemu-a") && has("kata-qemu-b"),
            "{name}: re-running install b wiped install a's handlers"
        );
        uninstall(&hfs(host.path(), false), &a, &facts, &rt).unwrap();
        assert!(
            !has("kata-qemu-a") && has("kata-qemu-b"),
            "{name}: uninstalling a"
        );
        install(&hfs(host.path(), false), &b, &facts, &rt).unwrap();
        assert!(
            has("kata-qemu-b"),
            "{name}: re-running b after a's uninstall"
        );
        uninstall(&hfs(host.path(), false), &b, &facts, &rt).unwrap();
        let after = snapshot(host.path());
        assert!(
            after == before,
            "{name}: {}\n{}",
            snapshot_diff(&before, &after),
            std::fs::read_to_string(host.path().join(f.handler_file.trim_start_matches('/')))
                .unwrap_or_default()
        );
    }
}

#[test]
fn rke2_agent_with_a_server_unit_file_restarts_the_active_agent() {
    let mut f = flavour("rke2-containerd-2");
    f.files.push((
        "/etc/systemd/system/rke2-server.service",
        b"[Service]\n".to_vec(),
    ));
    f.files.push((
        "/etc/systemd/system/rke2-agent.service",
        b"[Service]\n".to_vec(),
    ));
    let host = make_host(&f);
    let rt = FakeRuntime::default();
    rt.inactive
        .lock()
        .unwrap()
        .push("rke2-server.service".into());
    install(&hfs(host.path(), false), &config(ONE_SHIM), &facts(&f), &rt).unwrap();
    assert_eq!(
        rt.restart_count("rke2-agent.service"),
        1,
        "{:?}",
        rt.restarts.lock().unwrap()
    );
    assert_eq!(
        rt.restart_count("rke2-server.service"),
        0,
        "the inactive server unit was restarted"
    );
    uninstall(&hfs(host.path(), false), &config(ONE_SHIM), &facts(&f), &rt).unwrap();
    assert_eq!(rt.restart_count("rke2-agent.service"), 2);
}

/// With `cri: auto` the dispatcher mounts each node's own CRI directory writable; a node whose CRI
/// it cannot tell gets none and the reason (KATA_NODE_CRI_UNKNOWN): host-check fails on it naming
/// what to set, and the cri stage refuses before writing anything.
#[test]
fn a_node_whose_cri_directory_the_dispatcher_cannot_tell_fails_before_any_change() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let before = snapshot(host.path());
    let mut facts = facts(&f);
    facts.cri_unknown =
        Some("its runtime \"docker://24.0.7\" is neither containerd nor CRI-O".into());
    let fs = hfs(host.path(), false);
    let cfg = config(ONE_SHIM);
    let payload = payload_dir();
    let rt = FakeRuntime::default();
    let env = stage_env(&cfg, &facts, &fs, &payload, &rt);
    let report = kata_deploy_stage::stages::host_check(&env);
    let errors: Vec<String> = report.errors().iter().map(|f| format!("{f:?}")).collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("docker://24.0.7") && e.contains("stage.cri")),
        "{errors:?}"
    );
    let e = kata_deploy_stage::stages::run_cri(&env).unwrap_err();
    assert!(matches!(e, StageError::Config { .. }), "{e}");
    assert!(e.to_string().contains("stage.cri"), "{e}");
    assert_eq!(snapshot(host.path()), before);
    assert_eq!(rt.restarts.lock().unwrap().len(), 0);
}

/// containerd is never pointed at a handler whose configuration names a guest asset missing on
/// the host (the node would be labelled for Kata and every pod of that handler would fail at
/// sandbox start): the cri stage refuses before it writes anything, naming the key, the path and
/// the file that named it. Both ways it happens: a drop-in naming a kernel not on the node, and
/// a payload that did not install the image.
#[test]
fn cri_refuses_a_handler_whose_kernel_or_image_is_missing_and_changes_nothing() {
    let f = flavour("containerd-2.0");
    let facts = facts(&f);
    let rt = FakeRuntime::default();
    let cases = [
        (
            "a drop-in names a kernel that is not on the node",
            "runtimeReadyTimeoutSeconds: 2\nshims:\n  - name: qemu\n    dropIn: |\n      [hypervisor.qemu]\n      kernel = \"/srv/kernels/vmlinux-custom\"\n",
            "kernel = \"/srv/kernels/vmlinux-custom\"",
            "50-user-overrides.toml",
        ),
        (
            "the payload did not install the image",
            ONE_SHIM,
            "image = \"/opt/kata/share/kata-containers/kata-containers.img\"",
            "configuration-qemu.toml",
        ),
    ];
    for (what, yaml, names, file) in cases {
        let host = make_host(&f);
        let fs = HostFs::new(host.path(), false);
        let cfg = config(yaml);
        let payload = payload_dir();
        let env = stage_env(&cfg, &facts, &fs, &payload, &rt);
        kata_deploy_stage::stages::run_artifacts(&env).unwrap();
        if names.starts_with("image") {
            // What a release image without the rootfs component leaves: no image at all.
            let img = host.path().join("opt/kata/share/kata-containers");
            for e in std::fs::read_dir(&img).unwrap() {
                let p = e.unwrap().path();
                if p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("kata-containers")
                {
                    std::fs::remove_file(p).unwrap();
                }
            }
        }
        let before = snapshot(host.path());
        let e = kata_deploy_stage::stages::run_cri(&env).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, StageError::BadInput { .. }) && msg.contains(names) && msg.contains(file),
            "{what}: {msg}"
        );
        assert!(msg.contains("Nothing was changed"), "{what}: {msg}");
        assert_eq!(
            snapshot_diff(&before, &snapshot(host.path())),
            "",
            "{what}: the host is exactly as before the cri stage"
        );
        assert!(rt.restarts.lock().unwrap().is_empty(), "{what}: no restart");
    }
}
