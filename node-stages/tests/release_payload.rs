//! The official Kata release image's layout as the payload (hack/make-release-payload.sh builds
//! a synthetic one, 3.32 and 4.x, with upstream's own shim-components.json): only what the
//! enabled shims need is installed, an unchanged re-run writes nothing, an upgrade writes exactly
//! the changed files, uninstall restores the host; bad tarballs fail before any host change.
//! Also our own payload directory without a SYMLINKS file.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use kata_deploy_stage::hostfs::HostFs;
use kata_deploy_stage::stages::{self, NoClaims, StageEnv, StageReport};

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn artifacts(
    stage: &str,
    host: &Path,
    yaml: &str,
    payload: &Path,
) -> kata_deploy_stage::error::Result<StageReport> {
    let cfg = config(yaml);
    let f = flavour("containerd-2.0");
    let facts = facts(&f);
    let fs = HostFs::new(host, false);
    fs.set_durable(false);
    let rt = FakeRuntime::default();
    let env = StageEnv {
        cfg: &cfg,
        facts: &facts,
        fs: &fs,
        payload_dir: payload,
        restarter: &rt,
        claims: &NoClaims,
        lock_wait: Duration::from_secs(5),
    };
    match stage {
        "artifacts" => stages::run_artifacts(&env),
        "remove-artifacts" => stages::run_remove_artifacts(&env),
        other => panic!("{other}"),
    }
}

fn written(r: &StageReport) -> Vec<String> {
    let mut v: Vec<String> = r.details["written"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

const QEMU_BOTH: &str = "shims:\n  - name: qemu\n  - name: qemu-runtime-rs\n";

#[test]
fn release_4x_installs_only_what_the_shims_need_reruns_as_no_op_and_upgrades_exactly() {
    let host = make_host(&flavour("containerd-2.0"));
    let before = snapshot(host.path());
    let h = |p: &str| host.path().join(p.trim_start_matches('/'));
    let r = artifacts(
        "artifacts",
        host.path(),
        QEMU_BOTH,
        &release_payload("4.x", ""),
    )
    .unwrap();
    let files = written(&r);
    for want in [
        "/opt/kata/bin/containerd-shim-kata-v2",
        "/opt/kata/runtime-rs/bin/containerd-shim-kata-v2",
        "/opt/kata/bin/qemu-system-x86_64",
        "/opt/kata/share/kata-containers/vmlinux.container",
        "/opt/kata/share/kata-containers/kata-containers.img",
        "/opt/kata/share/kata-test-components/virtiofsd",
        "/opt/kata/share/kata-test-components/nydus",
        "/opt/kata/versions.yaml",
    ] {
        assert!(files.iter().any(|f| f == want), "{want} not in {files:?}");
    }
    // qemu on x86_64 needs no ovmf; nothing of another shim's components is installed.
    for absent in [
        "ovmf",
        "firecracker",
        "cloud-hypervisor",
        "rootfs-image-mariner",
    ] {
        let p = h(&format!("/opt/kata/share/kata-test-components/{absent}"));
        assert!(!p.exists(), "{absent} installed");
    }
    assert!(
        !files.iter().any(|f| f.contains("nydus-snapshotter")),
        "{files:?}"
    );
    assert_eq!(
        std::fs::read_link(h("/opt/kata/share/kata-containers/vmlinux.container")).unwrap(),
        PathBuf::from("vmlinux-6.12.47-kata-test.container")
    );
    let shim = h("/opt/kata/bin/containerd-shim-kata-v2");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&shim).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    assert!(h("/var/lib/kata-deploy/release-index.json").is_file());

    // Unchanged: nothing written, nothing removed.
    let again = artifacts(
        "artifacts",
        host.path(),
        QEMU_BOTH,
        &release_payload("4.x", ""),
    )
    .unwrap();
    assert_eq!(written(&again), Vec::<String>::new(), "{}", again.summary);
    assert_eq!(again.details["removed"].as_array().unwrap().len(), 0);

    // A second release that changes the Go shim (and versions.yaml): exactly those files.
    let up = artifacts(
        "artifacts",
        host.path(),
        QEMU_BOTH,
        &release_payload("4.x", "two"),
    )
    .unwrap();
    assert_eq!(
        written(&up),
        [
            "/opt/kata/bin/containerd-shim-kata-v2",
            "/opt/kata/versions.yaml"
        ],
        "{}",
        up.summary
    );
    assert!(std::fs::read_to_string(&shim)
        .unwrap()
        .contains("variant two"));

    // Dropping qemu-runtime-rs removes its shim and configuration, keeps the shared files.
    let one = artifacts(
        "artifacts",
        host.path(),
        "shims:\n  - name: qemu\n",
        &release_payload("4.x", "two"),
    )
    .unwrap();
    let removed: Vec<&str> = one.details["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        removed.contains(&"/opt/kata/runtime-rs/bin/containerd-shim-kata-v2"),
        "{removed:?}"
    );
    assert!(h("/opt/kata/bin/qemu-system-x86_64").is_file());

    artifacts(
        "remove-artifacts",
        host.path(),
        "shims:\n  - name: qemu\n",
        &release_payload("4.x", "two"),
    )
    .unwrap();
    let after = snapshot(host.path());
    assert!(
        after == before,
        "uninstall left:\n{}",
        snapshot_diff(&before, &after)
    );
}

#[test]
fn the_remote_shim_needs_only_its_shim_component() {
    // Upstream's remote configuration names a kernel and an image (the peer-pods VM's), yet its
    // components are only shim-v2-go: installed without them, not refused.
    let host = make_host(&flavour("containerd-2.0"));
    let r = artifacts(
        "artifacts",
        host.path(),
        "shims:\n  - name: remote\n",
        &release_payload("4.x", ""),
    )
    .unwrap();
    let files = written(&r);
    assert!(
        files
            .iter()
            .any(|f| f == "/opt/kata/bin/containerd-shim-kata-v2"),
        "{files:?}"
    );
    assert!(
        !files.iter().any(|f| f.contains("share/kata-containers/")),
        "{files:?}"
    );
}

#[test]
fn release_3_32_under_a_custom_prefix_and_suffix() {
    let host = make_host(&flavour("containerd-2.0"));
    let yaml = "installPrefix: /opt/kata-rel\nmultiInstallSuffix: t\nshims:\n  - name: qemu\n  - name: clh\n";
    let r = artifacts("artifacts", host.path(), yaml, &release_payload("3.32", "")).unwrap();
    let files = written(&r);
    assert!(
        files.iter().all(|f| f.starts_with("/opt/kata-rel-t/")),
        "{files:?}"
    );
    assert!(files
        .iter()
        .any(|f| f.ends_with("kata-test-components/cloud-hypervisor")));
    assert!(
        !files.iter().any(|f| f.ends_with("versions.yaml")),
        "3.32 has none: {files:?}"
    );
    let h = |p: &str| host.path().join(p.trim_start_matches('/'));
    // The link resolves inside the custom prefix; configurations point there.
    let link = h("/opt/kata-rel-t/share/kata-containers/kata-containers.img");
    assert!(
        std::fs::metadata(&link).unwrap().is_file(),
        "dangling {}",
        link.display()
    );
    let cfg = std::fs::read_to_string(h(
        "/opt/kata-rel-t/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml",
    ))
    .unwrap();
    assert!(
        cfg.contains("/opt/kata-rel-t/share/kata-containers/vmlinux.container"),
        "{cfg}"
    );
    assert!(!cfg.contains("\"/opt/kata/"), "{cfg}");
    // QEMU built for /opt/kata finds its firmware through upstream's -L wrapper.
    let wrapper = "/opt/kata-rel-t/bin/qemu-system-x86_64-installation-prefix";
    assert!(cfg.contains(&format!("path = \"{wrapper}\"")), "{cfg}");
    let script = std::fs::read_to_string(h(wrapper)).unwrap();
    assert!(
        script.ends_with(
            "exec /opt/kata-rel-t/bin/qemu-system-x86_64 \"$@\" -L /opt/kata-rel-t/share/kata-qemu/qemu/\n"
        ),
        "{script}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(h(wrapper)).unwrap().permissions().mode() & 0o777,
        0o755
    );
}

/// Runs the real binary's `install` and asserts: exit 2, every word in the error, host unchanged.
fn assert_refused(name: &str, payload: &Path, yaml: &str, words: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    let cfg = work.path().join("config.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let host = make_host(&flavour("containerd-2.0"));
    std::fs::write(host.path().join("dev/kvm"), "").unwrap();
    let before = snapshot(host.path());
    let out = run_stage_binary(host.path(), &cfg, payload, &["install"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{name}: expected exit 2\n{err}");
    for w in words {
        assert!(
            err.contains(w),
            "{name}: the error should name {w:?}:\n{err}"
        );
    }
    let after = snapshot(host.path());
    assert!(
        after == before,
        "{name}: the host changed:\n{}",
        snapshot_diff(&before, &after)
    );
}

/// A tar.zst whose single entry has a raw (unchecked) name and link name.
fn evil_tarball(path: &Path, name: &str, kind: tar::EntryType, link: &str) {
    let mut b = tar::Builder::new(Vec::new());
    let mut ok = tar::Header::new_gnu();
    ok.set_path("./opt/kata/bin/fine").unwrap();
    ok.set_size(2);
    ok.set_mode(0o755);
    ok.set_cksum();
    b.append(&ok, &b"ok"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(if kind == tar::EntryType::Regular {
        1
    } else {
        0
    });
    h.set_mode(0o644);
    h.set_cksum();
    let data: &[u8] = if kind == tar::EntryType::Regular {
        b"x"
    } else {
        b""
    };
    b.append(&h, data).unwrap();
    let tar = b.into_inner().unwrap();
    std::fs::write(path, zstd::encode_all(&tar[..], 3).unwrap()).unwrap();
}

#[test]
fn bad_release_tarballs_fail_before_any_host_change() {
    let work = tempfile::tempdir().unwrap();
    let good = release_payload("4.x", "");
    let variant = |name: &str| {
        let d = work.path().join(name);
        copy_dir(&good, &d);
        d
    };
    let kernel = "tarballs/kata-static-kernel.tar.zst";
    for (name, entry, kind, link) in [
        (
            "dotdot",
            "./opt/kata/../../etc/cron.d/x",
            tarball_regular(),
            "",
        ),
        ("absolute", "/opt/kata/bin/x", tarball_regular(), ""),
        (
            "link-out",
            "./opt/kata/share/kata-containers/vmlinux.container",
            tar::EntryType::Symlink,
            "/etc/shadow",
        ),
        (
            "link-up",
            "./opt/kata/share/x",
            tar::EntryType::Symlink,
            "../../../etc/shadow",
        ),
    ] {
        let d = variant(name);
        evil_tarball(&d.join(kernel), entry, kind, link);
        assert_refused(name, &d, QEMU_BOTH, &["kata-static-kernel.tar.zst", entry]);
    }
    // Truncated zstd: the image lost the end of a tarball.
    let d = variant("truncated");
    let bytes = std::fs::read(good.join("tarballs/kata-static-shim-v2-go.tar.zst")).unwrap();
    std::fs::write(
        d.join("tarballs/kata-static-shim-v2-go.tar.zst"),
        &bytes[..bytes.len() - 9],
    )
    .unwrap();
    assert_refused(
        "truncated",
        &d,
        QEMU_BOTH,
        &["kata-static-shim-v2-go.tar.zst", "truncated or corrupt"],
    );
    // A component the manifest names is not in the image.
    let d = variant("missing");
    std::fs::remove_file(d.join("tarballs/kata-static-virtiofsd.tar.zst")).unwrap();
    assert_refused(
        "missing component",
        &d,
        QEMU_BOTH,
        &["\"virtiofsd\"", "missing from the payload image"],
    );
    // A shim the release does not ship (3.32 has no openvmm).
    assert_refused(
        "shim not in release",
        &release_payload("3.32", ""),
        "shims:\n  - name: openvmm-azure-runtime-rs\n",
        &["openvmm-azure-runtime-rs", "shim-components.json"],
    );
    // A manifest that is not the release's.
    let d = variant("manifest");
    std::fs::write(d.join("shim-components.json"), "{\"shims\": [\"qemu\"]}").unwrap();
    assert_refused(
        "bad manifest",
        &d,
        QEMU_BOTH,
        &["shim-components.json", "component manifest"],
    );
}

fn tarball_regular() -> tar::EntryType {
    tar::EntryType::Regular
}

#[test]
fn payload_directory_without_symlinks_file_derives_the_links_or_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let d = work.path().join("payload");
    copy_dir(&payload_dir(), &d);
    std::fs::remove_file(d.join("SYMLINKS")).unwrap();
    let host = make_host(&flavour("containerd-2.0"));
    artifacts("artifacts", host.path(), "shims:\n  - name: qemu\n", &d).unwrap();
    assert_eq!(
        std::fs::read_link(
            host.path()
                .join("opt/kata/share/kata-containers/kata-containers.img")
        )
        .unwrap(),
        PathBuf::from("kata-containers-6.12.47-kata-test.img")
    );
    // Without the links too (a payload copied with cp -L lost them, or never had them).
    for l in ["vmlinux.container", "kata-containers.img"] {
        std::fs::remove_file(d.join("share/kata-containers").join(l)).unwrap();
    }
    assert_refused(
        "no links",
        &d,
        "shims:\n  - name: qemu\n",
        &[
            "configuration-qemu.toml",
            "/opt/kata/share/kata-containers/vmlinux.container",
            "SYMLINKS",
        ],
    );
}

/// Entries (name, type, link, data) as a tar.zst, names written raw.
fn tarball_of(path: &Path, entries: &[(&str, tar::EntryType, &str, &[u8])]) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    std::fs::write(path, zstd::encode_all(&tar[..], 3).unwrap()).unwrap();
}

#[test]
fn hard_links_and_duplicate_entries_install_as_tar_would() {
    let work = tempfile::tempdir().unwrap();
    let d = work.path().join("rel");
    copy_dir(&release_payload("4.x", ""), &d);
    tarball_of(
        &d.join("tarballs/kata-static-virtiofsd.tar.zst"),
        &[
            (
                "./opt/kata/libexec/virtiofsd",
                tar::EntryType::Regular,
                "",
                b"old",
            ),
            (
                "./opt/kata/libexec/virtiofsd",
                tar::EntryType::Regular,
                "",
                b"new",
            ),
            (
                "./opt/kata/libexec/virtiofsd-hl",
                tar::EntryType::Link,
                "./opt/kata/libexec/virtiofsd",
                b"",
            ),
            (
                "./opt/kata/libexec/virtiofsd-hl2",
                tar::EntryType::Link,
                "opt/kata/libexec/virtiofsd",
                b"",
            ),
        ],
    );
    let host = make_host(&flavour("containerd-2.0"));
    artifacts("artifacts", host.path(), QEMU_BOTH, &d).unwrap();
    for f in ["virtiofsd", "virtiofsd-hl", "virtiofsd-hl2"] {
        let p = host.path().join("opt/kata/libexec").join(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"new", "{f}");
    }
}

#[test]
fn an_unchanged_tarball_is_compared_from_the_cached_index_without_decompressing_it() {
    use kata_deploy_stage::release_io::{open_release, sha256_path, tarball_path};
    let dir = release_payload("4.x", "");
    let open = |cache: &BTreeMap<String, kata_deploy_stage::release::ComponentIndex>| {
        open_release(&dir, &["qemu"], "amd64", cache, false).unwrap()
    };
    let fresh = open(&BTreeMap::new());
    let mut cache = fresh.release.clone().unwrap();
    // A cached index whose digest matches its tarball is used as is (proved by an entry that
    // only the cache has); one whose digest does not is read again.
    let qemu = cache.get_mut("qemu").unwrap();
    assert_eq!(
        qemu.tarball_sha256,
        sha256_path(&tarball_path(&dir, "qemu")).unwrap()
    );
    let marker = kata_deploy_stage::release::IndexEntry::Symlink { target: "x".into() };
    qemu.entries.insert("bin/only-in-cache".into(), marker);
    assert!(open(&cache)
        .symlinks
        .contains_key(Path::new("bin/only-in-cache")));
    cache.get_mut("qemu").unwrap().tarball_sha256 = "0".repeat(64);
    assert!(!open(&cache)
        .symlinks
        .contains_key(Path::new("bin/only-in-cache")));
    assert_eq!(open(&cache).files, fresh.files);
}

#[test]
fn copy_self_writes_a_runnable_copy_without_reading_any_configuration() {
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("kata-deploy-stage");
    let out = Command::new(env!("CARGO_BIN_EXE_kata-deploy-stage"))
        .args([
            "--config",
            "/nonexistent/config.yaml",
            "copy-self",
            "--copy-to",
        ])
        .arg(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = Command::new(&dest).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("kata-deploy-stage "));
    let bad = Command::new(env!("CARGO_BIN_EXE_kata-deploy-stage"))
        .args(["copy-self", "--copy-to", "/nonexistent-dir/x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent-dir/x"));
}
