//! Host failures the stages must survive with a clear error and the host exactly as it was:
//! a read-only host path and a full disk. Needs root and mount(2) (bind/tmpfs); skips with a
//! message when mounting is not permitted, except with CI=true, where it fails.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use kata_deploy_stage::hostfs::HostFs;
use kata_deploy_stage::stages::{run_artifacts, NoClaims, StageEnv};

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
