//! Bad-input corpus for the stage binary: every case runs the real `install` on a fake host
//! root, must exit 2 with an error naming the problem, and must leave the host byte-for-byte as
//! it was (asserted with a snapshot of the whole root).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const GOOD_SHIM: &str = "shims:\n  - name: qemu\n";

/// (case, config YAML, words the error must contain).
const CONFIG_CASES: &[(&str, &str, &[&str])] = &[
    ("YAML syntax error", "shims: [\n", &["config.yaml"]),
    (
        "unknown top-level field",
        "snapshotter: nydus\nshims: [{name: qemu}]\n",
        &["snapshotter"],
    ),
    (
        "unknown shim field (typo)",
        "shims: [{name: qemu, dropin: x}]\n",
        &["dropin"],
    ),
    (
        "wrong type",
        "imagePullTimeoutSeconds: soon\nshims: [{name: qemu}]\n",
        &["imagePullTimeoutSeconds"],
    ),
    (
        "unknown shim",
        "shims: [{name: qemu-nvidia-gpus}]\n",
        &["qemu-nvidia-gpus", "known shims"],
    ),
    (
        "shim listed twice",
        "shims: [{name: qemu}, {name: qemu}]\n",
        &["listed twice"],
    ),
    ("no shim", "shims: []\n", &["no shim is enabled"]),
    (
        "suffix not a DNS label",
        "multiInstallSuffix: CI_run\nshims: [{name: qemu}]\n",
        &["multiInstallSuffix", "DNS label"],
    ),
    (
        "relative install prefix",
        "installPrefix: opt/kata\nshims: [{name: qemu}]\n",
        &["installPrefix", "absolute"],
    ),
    (
        "zero image-pull timeout",
        "imagePullTimeoutSeconds: 0\nshims: [{name: qemu}]\n",
        &["imagePullTimeoutSeconds", "greater than 0"],
    ),
    (
        "unknown CRI",
        "cri: docker\nshims: [{name: qemu}]\n",
        &["cri", "docker"],
    ),
    (
        "unknown restart mode",
        "restart: reboot\nshims: [{name: qemu}]\n",
        &["restart", "reboot"],
    ),
    (
        "dropIn that is not TOML",
        "shims:\n  - name: qemu\n    dropIn: \"[hypervisor.qemu\"\n",
        &["dropIn", "not valid TOML"],
    ),
    (
        "bad annotation name",
        "shims:\n  - name: qemu\n    allowedHypervisorAnnotations: [\"not an annotation!\"]\n",
        &["allowedHypervisorAnnotations"],
    ),
    (
        "unknown snapshotter",
        "shims:\n  - name: qemu\n    containerdSnapshotter: overlay\n",
        &["containerdSnapshotter", "overlay"],
    ),
    (
        "unknown CRI-O pull type",
        "shims:\n  - name: qemu\n    crioPullType: host\n",
        &["crioPullType"],
    ),
    (
        "unknown architecture",
        "shims:\n  - name: qemu\n    supportedArches: [x86]\n",
        &["supportedArches", "x86"],
    ),
    (
        "no shim for this node's arch",
        "shims:\n  - name: qemu\n    supportedArches: [arm64]\n",
        &["none of the enabled shims", "amd64"],
    ),
    (
        "custom runtime on an unknown base",
        "shims:\n  - name: mine\n    baseConfig: qemu-nope\n",
        &["baseConfig", "qemu-nope"],
    ),
];

/// Runs `install` and asserts: exit 2, every word in the error, host unchanged.
fn assert_refused(name: &str, config: &Path, payload: &Path, words: &[&str]) {
    let host = make_host(&flavour("containerd-2.0"));
    std::fs::write(host.path().join("dev/kvm"), "").unwrap();
    let before = snapshot(host.path());
    let out = run_stage_binary(host.path(), config, payload, &["install"]);
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

#[test]
fn every_bad_configuration_is_refused_by_name_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    for (name, yaml, words) in CONFIG_CASES {
        let cfg = work.path().join("config.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        assert_refused(name, &cfg, &payload_dir(), words);
    }
    eprintln!("{} bad configurations refused", CONFIG_CASES.len());
}

#[test]
fn missing_config_missing_payload_and_corrupt_payload_change_nothing() {
    let work = tempfile::tempdir().unwrap();
    let cfg = work.path().join("config.yaml");
    std::fs::write(&cfg, GOOD_SHIM).unwrap();
    assert_refused(
        "config file missing",
        &work.path().join("nope.yaml"),
        &payload_dir(),
        &["nope.yaml"],
    );
    assert_refused(
        "payload directory missing",
        &cfg,
        &work.path().join("no-payload"),
        &["no-payload", "--payload"],
    );
    // A payload whose file does not match SHA256SUMS: verified while copying, nothing kept.
    let corrupt = work.path().join("payload");
    let st = Command::new("cp")
        .arg("-a")
        .arg(payload_dir())
        .arg(&corrupt)
        .status()
        .unwrap();
    assert!(st.success());
    let victim = std::fs::read_to_string(corrupt.join("SHA256SUMS"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_owned();
    let mut bytes = std::fs::read(corrupt.join(&victim)).unwrap();
    bytes.push(b'!');
    std::fs::write(corrupt.join(&victim), bytes).unwrap();
    assert_refused(
        "corrupt payload file",
        &cfg,
        &corrupt,
        &["corrupt", &victim],
    );
}
