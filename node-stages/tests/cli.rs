//! The binary end to end: standalone install/status/uninstall on a fake host root with an
//! `exec:` restarter, exit codes, JSON output.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn stage(host: &Path, config: &Path, args: &[&str]) -> std::process::Output {
    run_stage_binary(host, config, &payload_dir(), args)
}

#[test]
fn standalone_install_status_uninstall() {
    let work = tempfile::tempdir().unwrap();
    let host = make_host(&flavour("containerd-2.0"));
    std::fs::write(host.path().join("dev/kvm"), "").unwrap();
    let before = snapshot(host.path());
    let log = work.path().join("restarts.log");
    let script = work.path().join("restarter.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ncase \"$1\" in\n  status) awk '{{printf \"active %.0f\\n\", $1*1000000}}' /proc/uptime ;;\n  *) echo \"$1 $2\" >> {} ;;\nesac\n", log.display()),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let cfg = work.path().join("config.yaml");
    std::fs::write(&cfg, format!("restart: exec:{}\nruntimeReadyTimeoutSeconds: 5\nshims:\n  - name: qemu\n  - name: qemu-coco-dev\n    containerdSnapshotter: nydus\n", script.display())).unwrap();

    let out = stage(host.path(), &cfg, &["install"]);
    assert!(
        out.status.success(),
        "install failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(host
        .path()
        .join("etc/containerd/conf.d/kata-deploy.toml")
        .exists());
    let restarts = std::fs::read_to_string(&log).unwrap();
    assert!(
        restarts.contains("restart containerd.service")
            && restarts.contains("enable nydus-for-kata-tee.service"),
        "{restarts}"
    );

    let out = stage(host.path(), &cfg, &["--output", "json", "status"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["details"]["artifacts"]["installed"], true);
    assert_eq!(
        v["details"]["artifacts"]["missing"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(v["details"]["cri"]["cri"], "containerd");

    // Re-running the install restarts nothing.
    let out = stage(host.path(), &cfg, &["cri"]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("restart containerd.service")
            .count(),
        1
    );

    let out = stage(host.path(), &cfg, &["uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = snapshot(host.path());
    assert!(after == before, "{}", snapshot_diff(&before, &after));
}

#[test]
fn exit_codes_and_json_host_check() {
    let work = tempfile::tempdir().unwrap();
    let host = make_host(&flavour("containerd-2.0"));
    let bad = work.path().join("bad.yaml");
    std::fs::write(&bad, "shims: [{name: qemu}]\nsnapshotter: nydus\n").unwrap();
    let out = stage(host.path(), &bad, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("snapshotter"));

    // No /dev/kvm and a GPU shim without IOMMU: host-check fails with 2 (deterministic, so the
    // Job is failed at once), blocks on kvm and warns about IOMMU (non-GPU pods still work).
    let cfg = work.path().join("config.yaml");
    std::fs::write(&cfg, "shims: [{name: qemu-nvidia-gpu}]\n").unwrap();
    let out = stage(host.path(), &cfg, &["--output", "json", "host-check"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let of = |sev: &str| -> Vec<String> {
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["severity"] == sev)
            .map(|f| f["check"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(of("error"), ["kvm"]);
    assert!(of("warning").contains(&"iommu".to_owned()), "{v}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[kvm] /dev/kvm is missing"),
        "the error carries the reason"
    );
    // Mutating stages on the bad host still work (host-check is advisory per stage); a wrong
    // machine is refused with exit 1 and nothing changed.
    let before = snapshot(host.path());
    let out = Command::new(env!("CARGO_BIN_EXE_kata-deploy-stage"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--host-root",
            host.path().to_str().unwrap(),
            "--payload",
            payload_dir().to_str().unwrap(),
            "artifacts",
        ])
        .env_remove("KATA_NODE_NAME")
        .env("KATA_NODE_MACHINE_ID", "someone-else")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reused"));
    assert_eq!(snapshot(host.path()), before);
}

/// In a per-node Job, a host stage holds no token: with `--claims external` it makes no API call
/// (the claim container marked the node), while the default (inline) claims first and so fails
/// without API access, before touching the host.
#[test]
fn external_claims_keep_the_host_stages_off_the_api() {
    let work = tempfile::tempdir().unwrap();
    let host = make_host(&flavour("containerd-2.0"));
    let cfg = work.path().join("config.yaml");
    std::fs::write(&cfg, "restart: none\nshims:\n  - name: qemu\n").unwrap();
    let run = |claims: &str| {
        Command::new(env!("CARGO_BIN_EXE_kata-deploy-stage"))
            .args(["--config", cfg.to_str().unwrap(), "--host-root"])
            .arg(host.path())
            .arg("--payload")
            .arg(payload_dir())
            .args(["--claims", claims, "artifacts"])
            .env("KATA_NODE_NAME", "n1")
            .env("KATA_NODE_MACHINE_ID", "0123456789abcdef")
            .env("KATA_NODE_CONTAINER_RUNTIME_VERSION", "containerd://2.0.5")
            .env("KATA_NODE_ARCH", "amd64")
            .env("KATA_STAGE_LOG", "warn")
            .env("KUBECONFIG", work.path().join("no-such-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap()
    };
    let before = snapshot(host.path());
    let out = run("inline");
    assert!(!out.status.success(), "inline claims need the API");
    assert!(
        snapshot(host.path()) == before,
        "the failed claim came before any host change"
    );
    let out = run("external");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(host
        .path()
        .join("opt/kata/bin/containerd-shim-kata-v2")
        .exists());
}
