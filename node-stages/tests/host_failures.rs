//! Host failures the stages must survive with a clear error and the host exactly as it was:
//! a read-only host path and a full disk. Needs root and mount(2) (bind/tmpfs); skips with a
//! message when mounting is not permitted, except with CI=true, where it fails.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use kata_deploy_stage::config::{NodeFacts, ValidConfig};
use kata_deploy_stage::hostfs::HostFs;
use kata_deploy_stage::stages::{
    run_artifacts, run_cri, run_prune_artifacts, run_remove_artifacts, run_revert_cri,
    writable_dirs, NoClaims, StageEnv, StageReport,
};

/// Mounts with `mount <args> <target>`; unmounted on drop, also when a test panics (lazily if
/// busy, so no mount outlives the test). A remount changes a mount and has nothing to unmount.
struct Mount(Option<std::path::PathBuf>);

impl Mount {
    fn new(args: &[&str], target: &Path) -> Option<Mount> {
        let ok = Command::new("mount")
            .args(args)
            .arg(target)
            .status()
            .is_ok_and(|s| s.success());
        let remount = args.iter().any(|a| a.contains("remount"));
        ok.then(|| Mount((!remount).then(|| target.to_path_buf())))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let Some(target) = &self.0 else { return };
        let quiet = |args: &[&str]| {
            Command::new("umount")
                .args(args)
                .arg(target)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !quiet(&[]) && !quiet(&["--lazy"]) {
            eprintln!("could not unmount {}", target.display());
        }
    }
}

fn run(host: &Path, payload: &Path) -> kata_deploy_stage::error::Result<()> {
    let f = flavour("containerd-2.0");
    let cfg = config(ONE_SHIM);
    let facts = facts(&f);
    let fs = HostFs::new(host, false);
    let rt = FakeRuntime::default();
    let env = stage_env(&cfg, &facts, &fs, payload, &rt);
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
        let run = |name: &str, stage: StageFn| {
            run_precise(host.path(), &cfg, &facts, &rt, name, stage)
                .unwrap_or_else(|e| panic!("{}: {name} with precise mounts: {e}", f.name))
        };
        if !run("artifacts", run_artifacts) {
            return skip_or_fail("cannot bind-mount (needs root and mount permission)");
        }
        run("cri", run_cri);
        run("prune-artifacts", run_prune_artifacts);
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

type StageFn = fn(&StageEnv) -> kata_deploy_stage::error::Result<StageReport>;

/// Runs the host stage `name` of `cfg` with only its writable directories (the chart's precise
/// mounts for that configuration) writable. Ok(false): mounting is not permitted here.
fn run_precise(
    host: &Path,
    cfg: &ValidConfig,
    facts: &NodeFacts,
    rt: &FakeRuntime,
    name: &str,
    stage: StageFn,
) -> kata_deploy_stage::error::Result<bool> {
    let dirs = writable_dirs(cfg);
    for d in dirs.values().flatten() {
        std::fs::create_dir_all(host.join(d.strip_prefix("/").unwrap())).unwrap();
    }
    let payload = payload_dir();
    let fs = HostFs::new(host, false);
    let env = StageEnv {
        cfg,
        facts,
        fs: &fs,
        payload_dir: &payload,
        restarter: rt,
        claims: &NoClaims,
        lock_wait: std::time::Duration::from_secs(5),
    };
    match with_precise_mounts(host, &dirs[name], || stage(&env)) {
        None => Ok(false),
        Some(r) => r.map(|_| true),
    }
}

/// The coco shim stays but stops pulling images in the guest.
const COCO_WITHOUT_GUEST_PULL: &str =
    "runtimeReadyTimeoutSeconds: 2\nshims:\n  - name: qemu\n  - name: qemu-coco-dev\n";

/// Day-2 transitions with the default precise mounts, each stage mounted as the chart mounts it
/// for the NEW configuration: a shim (with guest pull) dropped, guest pull turned off for a shim
/// that stays, guest pull turned on. Every stage succeeds on its first run (no retry hides a
/// read-only error), the runtime ends up serving exactly the new shims, nothing of a dropped
/// shim or of nydus stays, and uninstall restores the host.
#[test]
fn precise_mounts_suffice_for_day_two_transitions() {
    let transitions = [
        ("shim dropped", TWO_SHIMS, ONE_SHIM),
        ("guest pull off", TWO_SHIMS, COCO_WITHOUT_GUEST_PULL),
        ("guest pull on", COCO_WITHOUT_GUEST_PULL, TWO_SHIMS),
    ];
    for fname in ["containerd-1.7", "containerd-2.0", "k3s", "crio"] {
        for (what, from, to) in transitions {
            let f = flavour(fname);
            let (a, b) = (
                config(&format!("cri: {}\n{from}", cri_of(fname))),
                config(&format!("cri: {}\n{to}", cri_of(fname))),
            );
            let host = make_host(&f);
            for c in [&a, &b] {
                for d in writable_dirs(c).values().flatten() {
                    std::fs::create_dir_all(host.path().join(d.strip_prefix("/").unwrap()))
                        .unwrap();
                }
            }
            let before = snapshot(host.path());
            let facts = facts(&f);
            let rt = FakeRuntime::default();
            let run = |cfg: &ValidConfig, name: &str, stage: StageFn| {
                run_precise(host.path(), cfg, &facts, &rt, name, stage)
                    .unwrap_or_else(|e| panic!("{fname}, {what}: {name} with precise mounts: {e}"))
            };
            if !run(&a, "artifacts", run_artifacts) {
                return skip_or_fail("cannot bind-mount (needs root and mount permission)");
            }
            run(&a, "cri", run_cri);
            run(&a, "prune-artifacts", run_prune_artifacts);
            // The upgrade, each stage once.
            run(&b, "artifacts", run_artifacts);
            run(&b, "cri", run_cri);
            run(&b, "prune-artifacts", run_prune_artifacts);
            let coco = host
                .path()
                .join("opt/kata/share/defaults/kata-containers/runtimes/qemu-coco-dev");
            assert_eq!(
                coco.exists(),
                to.contains("qemu-coco-dev"),
                "{fname}, {what}: the coco shim's files"
            );
            let nydus = host.path().join("opt/kata/nydus-snapshotter");
            let nydus_enabled = rt
                .enabled
                .lock()
                .unwrap()
                .iter()
                .any(|u| u.contains("nydus"));
            let wants_nydus = to.contains("nydus");
            assert_eq!(nydus.exists(), wants_nydus, "{fname}, {what}: nydus files");
            assert_eq!(nydus_enabled, wants_nydus, "{fname}, {what}: nydus unit");
            run(&b, "revert-cri", run_revert_cri);
            run(&b, "remove-artifacts", run_remove_artifacts);
            let after = snapshot(host.path());
            assert!(
                after == before,
                "{fname}, {what}: uninstall left differences:\n{}",
                snapshot_diff(&before, &after)
            );
        }
    }
}

/// host-check counts a release payload against the free space too (before, its size was unknown
/// until the artifacts stage read the tarballs, so a full disk was only found mid-install): the
/// selected tarballs' compressed size, a lower bound, said as such.
#[test]
fn host_check_counts_a_release_payload_against_free_space() {
    let f = flavour("containerd-2.0");
    let host = make_host(&f);
    let dir = release_payload("4.x", "");
    let (cfg, facts, rt) = (config(ONE_SHIM), facts(&f), FakeRuntime::default());
    let fs = HostFs::new(host.path(), false);
    let env = stage_env(&cfg, &facts, &fs, &dir, &rt);
    let disk = |env: &StageEnv| {
        kata_deploy_stage::stages::host_check(env)
            .findings
            .into_iter()
            .find(|f| f.check == "disk-space")
    };
    assert!(disk(&env).is_none(), "plenty of space: no finding");
    let opt = host.path().join("opt");
    let Some(_tmpfs) = Mount::new(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"], &opt) else {
        return skip_or_fail("cannot mount a tmpfs (needs root and mount permission)");
    };
    // The test tarballs are a few hundred bytes each: fill the filesystem.
    let mut filler = std::fs::File::create(opt.join("filler")).unwrap();
    while std::io::Write::write_all(&mut filler, &[0u8; 4096]).is_ok() {}
    let found = disk(&env).expect("a disk-space finding on a full filesystem");
    assert!(
        found.message.contains("more than") && found.message.contains("compressed size"),
        "{}",
        found.message
    );
}
