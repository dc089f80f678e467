//! The cri stage against a real containerd (Debian's 1.6 here), started by the test as a
//! process with its own root, state and socket: containerd must load the configuration we
//! wrote and serve our handlers (CRI RuntimeService/Status over the socket, the CRI plugin's own
//! "Start cri plugin with config" log line), a runtime that does not come back is
//! rolled back, and revert restores the original byte-for-byte.
//!
//! Without containerd the tests skip with a message, except with CI=true, where they FAIL.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::ctd::*;
use common::*;
use kata_deploy_stage::config::NodeFacts;
use kata_deploy_stage::error::StageError;
use kata_deploy_stage::hostfs::HostFs;

fn find_bin(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Debian's containerd, or None (skip) outside CI; fails in CI so a missing binary is noticed.
fn debian_containerd() -> Option<CtdBin> {
    match find_bin("containerd") {
        Some(c) => {
            let runtime_version = real_version(&c);
            Some(CtdBin {
                label: runtime_version.trim_start_matches("containerd://").into(),
                containerd: c,
                runtime_version,
            })
        }
        None => {
            skip_or_fail("containerd not found in PATH (Debian: apt-get install containerd)");
            None
        }
    }
}

/// A host root whose /etc/containerd/config.toml is containerd's own default.
fn setup(bin: &CtdBin, work: &Path) -> PathBuf {
    let host = bare_host(work);
    std::fs::write(
        host.join("etc/containerd/config.toml"),
        bin.config_default(),
    )
    .unwrap();
    host
}

/// A running containerd on a fresh host root (fields drop in order: containerd stops before its
/// work directory goes).
struct Running {
    rt: RealContainerd,
    host: PathBuf,
    /// The host's config.toml before anything touched it.
    original: Vec<u8>,
    _work: tempfile::TempDir,
}

/// Starts containerd on a host root with its default configuration; None (skip) outside CI when
/// containerd is not installed.
fn running_containerd() -> Option<Running> {
    let bin = debian_containerd()?;
    let work = tempfile::Builder::new()
        .prefix("kata-ctd")
        .tempdir()
        .unwrap();
    let host = setup(&bin, work.path());
    let original = std::fs::read(host.join("etc/containerd/config.toml")).unwrap();
    let rt = RealContainerd::new(bin, &host, work.path());
    rt.start();
    rt.wait_ready();
    Some(Running {
        rt,
        host,
        original,
        _work: work,
    })
}

fn node(version: &str) -> NodeFacts {
    NodeFacts {
        name: Some("n".into()),
        uid: Some("u".into()),
        machine_id: Some("0123456789abcdef".into()),
        container_runtime_version: Some(version.into()),
        ..Default::default()
    }
}

/// Two custom runtimes: one with the derived handler (kata-my-gpu), one with its own handler.
const SHIMS: &str = "runtimeReadyTimeoutSeconds: 30\nshims:\n  - name: qemu\n  - name: my-gpu\n    baseConfig: qemu-nvidia-gpu\n    dropIn: |\n      [hypervisor.qemu]\n      default_memory = 4096\n  - name: cpu-two\n    baseConfig: qemu\n    handler: team-sandbox\n";

#[test]
fn real_containerd_loads_our_handlers_converges_and_reverts() {
    let Some(c) = running_containerd() else {
        return;
    };
    let (rt, host, original) = (&c.rt, c.host.clone(), c.original.clone());
    assert_eq!(rt.loaded_handlers().unwrap(), vec!["runc".to_string()]);
    let facts = node(&c.rt.bin.runtime_version);
    let cfg = config(SHIMS);

    install(&HostFs::new(&host, false), &cfg, &facts, rt).unwrap();
    assert_eq!(rt.restarts.load(Ordering::SeqCst), 1);
    let mut served = rt.loaded_handlers().unwrap();
    served.sort();
    assert_eq!(
        served,
        ["kata-my-gpu", "kata-qemu", "runc", "team-sandbox"],
        "running containerd must serve our handlers"
    );
    assert!(rt.cri_ok());
    // The CRI API of the running containerd (what the kubelet sees) lists them too.
    let report =
        kata_deploy_stage::cri_client::query_status(&rt.sock, Duration::from_secs(5)).unwrap();
    assert_eq!(
        report.handlers(),
        ["kata-my-gpu", "kata-qemu", "runc", "team-sandbox"],
        "{report:?}"
    );
    assert!(
        kata_deploy_stage::restart::cri_served_handlers(Some(&rt.sock))
            .unwrap()
            .unwrap()
            .contains(&"kata-qemu".to_string())
    );
    // What containerd itself reads from the file: our handler settings, runc kept.
    let dump = rt.dump().unwrap();
    let doc: toml_edit::DocumentMut = dump.parse().unwrap();
    let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    // containerd 1.6 ignores runtime_path when it starts a shim (containerd#8207): it runs the
    // absolute path given as runtime_type (the real-node probe pods prove which binary starts).
    let want_type = if kata_deploy_stage::containerd::honours_runtime_path(
        Some(&c.rt.bin.runtime_version),
        0,
    ) {
        "io.containerd.kata-qemu.v2"
    } else {
        "/opt/kata/bin/containerd-shim-kata-v2"
    };
    assert_eq!(
        runtimes["kata-qemu"]["runtime_type"].as_str(),
        Some(want_type)
    );
    assert_eq!(
        runtimes["kata-qemu"]["runtime_path"].as_str(),
        Some("/opt/kata/bin/containerd-shim-kata-v2")
    );
    assert_eq!(
        runtimes["kata-qemu"]["privileged_without_host_devices"].as_bool(),
        Some(true)
    );
    assert_eq!(
        runtimes["kata-my-gpu"]["options"]["ConfigPath"].as_str(),
        Some("/opt/kata/share/defaults/kata-containers/runtimes/my-gpu/configuration-my-gpu.toml")
    );
    assert_eq!(
        runtimes["kata-qemu"]["pod_annotations"]
            .as_array()
            .unwrap()
            .get(0)
            .and_then(|v| v.as_str()),
        Some("io.katacontainers.*")
    );
    let want_type = if want_type.starts_with('/') {
        want_type
    } else {
        "io.containerd.team-sandbox.v2"
    };
    assert_eq!(
        runtimes["team-sandbox"]["runtime_type"].as_str(),
        Some(want_type)
    );
    assert_eq!(
        runtimes["team-sandbox"]["options"]["ConfigPath"].as_str(),
        Some(
            "/opt/kata/share/defaults/kata-containers/runtimes/cpu-two/configuration-cpu-two.toml"
        )
    );
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
    assert_eq!(
        std::fs::read(host.join("etc/containerd/config.toml")).unwrap(),
        original
    );
    assert_eq!(rt.loaded_handlers().unwrap(), vec!["runc".to_string()]);
    assert_eq!(
        kata_deploy_stage::cri_client::query_status(&rt.sock, Duration::from_secs(5))
            .unwrap()
            .handlers(),
        ["runc"]
    );
    assert_eq!(rt.restarts.load(Ordering::SeqCst), 2);
    assert!(!host.join("opt/kata").exists() && !host.join("var/lib/kata-deploy").exists());
}

#[test]
fn real_containerd_that_does_not_come_back_is_rolled_back() {
    let Some(c) = running_containerd() else {
        return;
    };
    let (rt, host, original) = (&c.rt, c.host.clone(), c.original.clone());
    let facts = node(&c.rt.bin.runtime_version);
    let cfg = config(&SHIMS.replace(
        "runtimeReadyTimeoutSeconds: 30",
        "runtimeReadyTimeoutSeconds: 5",
    ));
    // Something corrupts the config right before the restart: containerd refuses to start.
    let path = host.join("etc/containerd/config.toml");
    *rt.before_restart.lock().unwrap() = Some(Box::new(move || {
        let mut t = std::fs::read_to_string(&path).unwrap();
        t.push_str("\n[plugins.\"io.containerd.grpc.v1.cri\"\nbroken = \n");
        std::fs::write(&path, t).unwrap();
    }));
    let e = install(&HostFs::new(&host, false), &cfg, &facts, rt).unwrap_err();
    assert!(matches!(e, StageError::Runtime { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("previous configuration was restored"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(host.join("etc/containerd/config.toml")).unwrap(),
        original,
        "previous config restored"
    );
    assert!(
        rt.alive() && rt.cri_ok(),
        "containerd must be running again"
    );
    assert_eq!(rt.loaded_handlers().unwrap(), vec!["runc".to_string()]);
}

#[test]
fn real_containerd_ignoring_our_dropin_is_rolled_back() {
    // The kubelet reports containerd 2.x but the node really runs 1.6: we write a v3 drop-in
    // and an import; containerd 1.6 starts but does not serve our handlers -> roll back.
    let Some(c) = running_containerd() else {
        return;
    };
    let (rt, host, original) = (&c.rt, c.host.clone(), c.original.clone());
    let cfg = config(&SHIMS.replace(
        "runtimeReadyTimeoutSeconds: 30",
        "runtimeReadyTimeoutSeconds: 5",
    ));
    let e = install(
        &HostFs::new(&host, false),
        &cfg,
        &node("containerd://2.0.5"),
        rt,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("previous configuration was restored"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(host.join("etc/containerd/config.toml")).unwrap(),
        original
    );
    assert!(!host.join("etc/containerd/conf.d/kata-deploy.toml").exists());
    assert_eq!(rt.loaded_handlers().unwrap(), vec!["runc".to_string()]);
    assert_eq!(rt.restarts.load(Ordering::SeqCst), 2);
}

#[test]
fn containerd_1_x_imports_replace_whole_plugin_sections() {
    // Why containerd < 2.0 gets an in-place edit, not a drop-in: an imported file that defines
    // the CRI plugin replaces the main file's whole CRI section (runc disappears).
    let Some(bin) = debian_containerd() else {
        return;
    };
    let work = tempfile::Builder::new()
        .prefix("kata-ctd")
        .tempdir()
        .unwrap();
    let host = setup(&bin, work.path());
    let rt = RealContainerd::new(bin, &host, work.path());
    let main = host.join("etc/containerd/config.toml");
    let dropin = host.join("etc/containerd/kata.toml");
    std::fs::write(&dropin, "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu]\n  runtime_type = \"io.containerd.kata-qemu.v2\"\n").unwrap();
    let text = std::fs::read_to_string(&main).unwrap().replacen(
        "imports = []",
        "imports = [\"/etc/containerd/kata.toml\"]",
        1,
    );
    std::fs::write(&main, text).unwrap();
    let dump = rt.dump().unwrap();
    let doc: toml_edit::DocumentMut = dump.parse().unwrap();
    let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert!(runtimes.get("kata-qemu").is_some());
    let version = rt.bin.runtime_version.clone();
    if version.starts_with("containerd://1.") {
        assert!(
            runtimes.get("runc").is_none(),
            "containerd {version} merged plugin sections deeply; drop-ins would be safe"
        );
    }
}

#[test]
fn stage_killed_by_the_restart_is_verified_by_the_retry_without_a_second_restart() {
    let Some(c) = running_containerd() else {
        return;
    };
    let (rt, host) = (&c.rt, c.host.clone());
    let facts = node(&c.rt.bin.runtime_version);
    let cfg = config(SHIMS);
    rt.kill_stage_on_next_restart.store(true, Ordering::SeqCst);
    let e = install(&HostFs::new(&host, false), &cfg, &facts, rt).unwrap_err();
    assert!(matches!(e, StageError::InjectedFault { .. }), "{e}");
    assert_eq!(rt.restarts.load(Ordering::SeqCst), 1);
    // The pending restart (with the previous files) was on disk before the restart.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(host.join("var/lib/kata-deploy/cri.json")).unwrap())
            .unwrap();
    assert!(
        state["pending"]["previous"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "{state}"
    );
    rt.wait_ready();
    install(&HostFs::new(&host, false), &cfg, &facts, rt).unwrap();
    assert_eq!(
        rt.restarts.load(Ordering::SeqCst),
        1,
        "the retry verified the running containerd instead of restarting it"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(host.join("var/lib/kata-deploy/cri.json")).unwrap())
            .unwrap();
    assert!(
        state["pending"].is_null() && state["loaded"].is_string(),
        "{state}"
    );
}

#[test]
fn stage_killed_by_a_restart_that_fails_is_rolled_back_by_the_retry() {
    // containerd refuses the new configuration AND the restart kills the stage: the only copy
    // of "what to go back to" is the pending record on disk.
    let Some(c) = running_containerd() else {
        return;
    };
    let (rt, host, original) = (&c.rt, c.host.clone(), c.original.clone());
    let facts = node(&c.rt.bin.runtime_version);
    let cfg = config(&SHIMS.replace(
        "runtimeReadyTimeoutSeconds: 30",
        "runtimeReadyTimeoutSeconds: 3",
    ));
    *rt.refuse_config_containing.lock().unwrap() = Some("kata-qemu".into());
    rt.kill_stage_on_next_restart.store(true, Ordering::SeqCst);
    let e = install(&HostFs::new(&host, false), &cfg, &facts, rt).unwrap_err();
    assert!(matches!(e, StageError::InjectedFault { .. }), "{e}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !rt.alive(),
        "containerd must have refused the new configuration"
    );
    // The retry: containerd is down with the unverified configuration -> restart, not back ->
    // restore the previous files from the pending record and bring containerd back with them.
    let e = install(&HostFs::new(&host, false), &cfg, &facts, rt).unwrap_err();
    assert!(
        e.to_string()
            .contains("previous configuration was restored"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(host.join("etc/containerd/config.toml")).unwrap(),
        original,
        "previous config restored"
    );
    assert!(
        rt.alive() && rt.cri_ok(),
        "containerd must be running again"
    );
    assert_eq!(rt.cri().unwrap().handlers(), ["runc"]);
}
