//! Host failures the stages must survive with a clear error and the host exactly as it was:
//! a read-only host path and a full disk. Needs root and mount(2) (bind/tmpfs); skips with a
//! message when mounting is not permitted, except with CI=true, where it fails.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use kata_deploy_stage::hostfs::HostFs;
use kata_deploy_stage::stages::{
    run_artifacts, run_cri, run_remove_artifacts, run_revert_cri, writable_dirs, NoClaims, StageEnv,
};

/// Mounts with `mount <args> <target>`; unmounted on drop.
struct Mount(std::path::PathBuf);

impl Mount {
    fn new(args: &[&str], target: &Path) -> Option<Mount> {
        let ok = Command::new("mount")
            .args(args)
            .arg(target)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Mount(target.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn run(host: &Path, payload: &Path) -> kata_deploy_stage::error::Result<()> {
    let f = flavour("containerd-2.0");
    let cfg = config(ONE_SHIM);
    let facts = facts(&f);
    let fs = HostFs::new(host, false);
    let rt = FakeRuntime::default();
    let env = StageEnv {
        cfg: &cfg,
        facts: &facts,
        fs: &fs,
        payload_dir: payload,
        restarter: &rt,
        claims: &NoClaims,
        lock_wait: std::time::Duration::from_secs(1),
    };
    run_artifacts(&env).map(drop)
}

#[test]
fn read_only_install_prefix_is_a_clear_error_and_changes_nothing() {
    let host = make_host(&flavour("containerd-2.0"));
    let opt = host.path().join("opt");
    let Some(_bind) = Mount::new(&["--bind", opt.to_str().unwrap()], &opt) else {
        return skip_or_fail("cannot bind-mount (needs root and mount permission)");
    };
    let Some(_ro) = Mount::new(&["-o", "remount,ro,bind"], &opt) else {
        return skip_or_fail("cannot remount read-only (needs root and mount permission)");
    };
    let before = snapshot(host.path());
    let e = run(host.path(), &payload_dir()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("/opt/kata")
            && msg.contains("read-only")
            && msg.contains("stage.hostMounts")
            && msg.contains("mount the host root read-write"),
        "{msg}"
    );
    let after = snapshot(host.path());
    assert!(after == before, "{}", snapshot_diff(&before, &after));
}

#[test]
fn disk_full_is_a_clear_error_and_changes_nothing() {
    let host = make_host(&flavour("containerd-2.0"));
    // A payload bigger than the filesystem it is installed into.
    let payload = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/make-test-payload.sh");
    assert!(Command::new("bash")
        .arg(script)
        .arg(payload.path())
        .args(["--size-mib", "2"])
        .output()
        .unwrap()
        .status
        .success());
    let opt = host.path().join("opt");
    let Some(_tmpfs) = Mount::new(&["-t", "tmpfs", "-o", "size=1m", "tmpfs"], &opt) else {
        return skip_or_fail("cannot mount a tmpfs (needs root and mount permission)");
    };
    let before = snapshot(host.path());
    let e = run(host.path(), payload.path()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("full") && msg.contains("/opt/kata/"), "{msg}");
    let after = snapshot(host.path());
    assert!(after == before, "{}", snapshot_diff(&before, &after));
}

/// The CRI of a test flavour, as the chart's stage.cri names it.
fn cri_of(flavour: &str) -> &str {
    match flavour {
        n if n.starts_with("containerd") => "containerd",
        "k3s-agent-user-template" => "k3s-agent",
        "rke2-containerd-2" => "rke2",
        other => other,
    }
}

/// Runs `stage` with the host root read-only and only `dirs` writable: the mounts the chart
/// gives a host stage with stage.hostMounts: precise. None when mounting is not permitted.
fn with_precise_mounts<T>(
    host: &Path,
    dirs: &[std::path::PathBuf],
    stage: impl FnOnce() -> T,
) -> Option<T> {
    let root = host.to_str().unwrap();
    let mut held = vec![
        Mount::new(&["--bind", root], host)?,
        Mount::new(&["-o", "remount,ro,bind"], host)?,
    ];
    for d in dirs {
        let p = host.join(d.strip_prefix("/").unwrap());
        let s = p.to_str().unwrap();
        held.push(Mount::new(&["--bind", s], &p)?);
        held.push(Mount::new(&["-o", "remount,rw,bind"], &p)?);
    }
    let out = stage();
    while let Some(m) = held.pop() {
        drop(m);
    }
    Some(out)
}

/// What the chart mounts writable (`stages::writable_dirs`) is all each host stage needs, on
/// every CRI flavour: install and uninstall succeed with everything else of the host read-only,
/// and uninstall restores the host (the mount points, created first as the kubelet does, stay).
#[test]
fn precise_mounts_suffice_on_every_flavour() {
    for f in flavours() {
        let cfg = config(&format!("cri: {}\n{TWO_SHIMS}", cri_of(f.name)));
        let dirs = writable_dirs(&cfg);
        let host = make_host(&f);
        for d in dirs.values().flatten() {
            std::fs::create_dir_all(host.path().join(d.strip_prefix("/").unwrap())).unwrap();
        }
        let before = snapshot(host.path());
        let facts = facts(&f);
        let rt = FakeRuntime::default();
        let payload = payload_dir();
        let run = |name: &str, stage: fn(&StageEnv) -> kata_deploy_stage::error::Result<_>| {
            let fs = HostFs::new(host.path(), false);
            let env = StageEnv {
                cfg: &cfg,
                facts: &facts,
                fs: &fs,
                payload_dir: &payload,
                restarter: &rt,
                claims: &NoClaims,
                lock_wait: std::time::Duration::from_secs(5),
            };
            let Some(r) = with_precise_mounts(host.path(), &dirs[name], || stage(&env)) else {
                return false;
            };
            r.map(drop)
                .unwrap_or_else(|e| panic!("{}: {name} with precise mounts: {e}", f.name));
            true
        };
        if !run("artifacts", run_artifacts) {
            return skip_or_fail("cannot bind-mount (needs root and mount permission)");
        }
        run("cri", run_cri);
        assert!(
            handler_written(host.path(), f.handler_file),
            "{}: the cri stage wrote {}",
            f.name,
            f.handler_file
        );
        run("revert-cri", run_revert_cri);
        run("remove-artifacts", run_remove_artifacts);
        let after = snapshot(host.path());
        assert!(
            after == before,
            "{}: uninstall left differences:\n{}",
            f.name,
            snapshot_diff(&before, &after)
        );
    }
}

fn handler_written(root: &Path, file: &str) -> bool {
    std::fs::read_to_string(root.join(file.trim_start_matches('/')))
        .is_ok_and(|t| t.contains("kata-qemu"))
}
