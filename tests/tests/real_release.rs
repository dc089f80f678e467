//! The official Kata release image as the payload, on a REAL node (containerd 2.x, real kubelet):
//! `helm install` with upstream's values (`image.reference: quay.io/kata-containers/kata-deploy`,
//! `image.tag`) installs from a TEST image in upstream's layout (hack/build-release-test-image.sh:
//! kata-static-<component>.tar.zst tarballs, upstream's shim-components.json, no shell). A broken
//! release (a truncated tarball) fails the node with the tarball named and nothing on the host;
//! then the 3.32 layout; containerd serves the handler and starts the installed test shim; an upgrade to
//! the 4.x layout adds exactly versions.yaml, one to a second 4.x version replaces exactly the
//! changed files; uninstall restores the node. The images are built and imported by
//! hack/testenv/realnode/images.sh (`:3.32.0`, `:<tag>`, `:<tag>-two`, `:<tag>-broken`).

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod};
use kata_testbed::cluster::{repo_root, wait_until, TestCluster};
use kata_testbed::realnode::{
    build_images, file_identity, real_node_lock, require_real_nodes, RealNode,
};
use kube::api::{Api, DeleteParams, PostParams};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CONTAINERD2: &str = "v2.4.2";
const RELEASE: &str = "quay.io/kata-containers/kata-deploy";
const SHIM_RECORD: &str = "/run/kata-deploy-test-payload.log";

/// The chart's default release tag (payload.image.tag).
fn default_tag() -> Result<String> {
    let v: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo_root().join("chart/kata-deploy/values.yaml"),
    )?)?;
    v["payload"]["image"]["tag"]
        .as_str()
        .map(str::to_string)
        .context("payload.image.tag in values.yaml")
}

/// Every entry under `root`: relative path -> (inode, link target or size).
fn tree(root: &Path) -> Result<BTreeMap<PathBuf, (u64, String)>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = e?.path();
            let md = std::fs::symlink_metadata(&p)?;
            let rel = p.strip_prefix(root)?.to_path_buf();
            if md.is_dir() {
                stack.push(p);
            } else if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p)?.display().to_string();
                out.insert(rel, (md.ino(), t));
            } else {
                out.insert(rel, (md.ino(), md.size().to_string()));
            }
        }
    }
    Ok(out)
}

/// (added, replaced, removed) between two trees; a file is replaced when its inode changed (the
/// stage renames a new file over the old one, so a rewrite always shows).
fn changes(
    a: &BTreeMap<PathBuf, (u64, String)>,
    b: &BTreeMap<PathBuf, (u64, String)>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let s = |p: &PathBuf| p.display().to_string();
    let added = b.keys().filter(|k| !a.contains_key(*k)).map(s).collect();
    let replaced = b
        .iter()
        .filter(|(k, v)| a.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| s(k))
        .collect();
    let removed = a.keys().filter(|k| !b.contains_key(*k)).map(s).collect();
    (added, replaced, removed)
}

async fn handlers(nodes: &Api<Node>, name: &str) -> Result<BTreeSet<String>> {
    Ok(nodes
        .get(name)
        .await?
        .status
        .and_then(|s| s.runtime_handlers)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|h| h.name)
        .collect())
}

/// A pod with RuntimeClass kata-qemu on the node: containerd must start OUR installed shim (the
/// test shim records "$0 $@" and cannot start a VM, so the sandbox then fails).
async fn shim_reached(cluster: &TestCluster, node: &RealNode, tag: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let name = format!("probe-{tag}");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node.name, "runtimeClassName": "kata-qemu", "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "imagePullPolicy": "Never"}]}
    }))?;
    let before = node.exec(&[
        "sh",
        "-c",
        &format!("cat {SHIM_RECORD} 2>/dev/null || true"),
    ])?;
    pods.create(&PostParams::default(), &pod).await?;
    let shim = "/opt/kata/bin/containerd-shim-kata-v2";
    let found = wait_until(
        Duration::from_secs(60),
        "containerd starts our shim",
        || async {
            let rec = node.exec(&[
                "sh",
                "-c",
                &format!("cat {SHIM_RECORD} 2>/dev/null || true"),
            ])?;
            Ok(rec.len() > before.len()
                && rec[before.len()..]
                    .lines()
                    .any(|l| l.starts_with(shim) && l.contains(" start")))
        },
    )
    .await;
    let _ = pods
        .delete(&name, &DeleteParams::default().grace_period(0))
        .await;
    found?;
    let rec = node.exec(&["cat", SHIM_RECORD])?;
    Ok(rec[before.len()..]
        .lines()
        .find(|l| l.starts_with(shim))
        .unwrap_or_default()
        .to_string())
}

/// The termination message of the failed artifacts container of a per-node install pod (exit 2).
async fn artifacts_failure(cluster: &TestCluster) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "kata-system");
    for p in pods.list(&Default::default()).await?.items {
        let statuses = p
            .status
            .and_then(|s| s.init_container_statuses)
            .unwrap_or_default();
        for st in statuses.into_iter().filter(|s| s.name == "artifacts") {
            if let Some(t) = st.state.and_then(|s| s.terminated) {
                if t.exit_code == 2 {
                    return Ok(t.message.unwrap_or_default());
                }
            }
        }
    }
    bail!("no install pod whose artifacts container failed with exit code 2")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_image_install_upgrade_uninstall_on_a_real_node() -> Result<()> {
    if !require_real_nodes(&[CONTAINERD2]) {
        return Ok(());
    }
    let _serial = real_node_lock().await;
    build_images()?;
    let tag = default_tag()?;
    let cluster = TestCluster::private().await?;
    let node = RealNode::start(&cluster, "rn-release", CONTAINERD2).await?;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let config_before = file_identity(&node.path("/etc/containerd/config.toml"))?;
    let prefix = node.path("/opt/kata");
    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let helm = |verb: &'static str, image_tag: String| {
        let mut a: Vec<String> = [verb, "kata-deploy", chart, "--namespace", "kata-system"]
            .map(String::from)
            .into();
        if verb == "install" {
            a.extend(
                [
                    "--create-namespace",
                    "--set",
                    "shims.disableAll=true",
                    "--set",
                    "shims.qemu.enabled=true",
                    "--set-string",
                    "job.nodeSelector.kata-testbed/real=true",
                    "--set-string",
                    "job.dispatcher.nodeSelector.kata-testbed/real=true",
                ]
                .map(String::from),
            );
        } else {
            a.push("--reuse-values".into());
        }
        // Upstream's spelling of the release: image.reference / image.tag.
        a.extend([
            "--set".into(),
            format!("image.reference={RELEASE}"),
            "--set".into(),
            format!("image.tag={image_tag}"),
        ]);
        a.extend(["--wait", "--timeout", "5m"].map(String::from));
        a
    };
    let run = |args: Vec<String>| {
        let cluster = &cluster;
        let node = &node;
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, out) = cluster.run_helm(&refs).await?;
            if !ok {
                bail!(
                    "helm {} failed: {out}\nkubelet:\n{}",
                    args[0],
                    node.journal("kubelet").unwrap_or_default()
                );
            }
            Ok(out)
        }
    };

    // --- a broken release (a truncated tarball) fails the node before any host change ---
    let (ok, out) = {
        let args = helm("install", format!("{tag}-broken"));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster.run_helm(&refs).await?
    };
    assert!(!ok, "helm install of a broken release must fail: {out}");
    let message = artifacts_failure(&cluster).await?;
    assert!(
        message.contains("kata-static-shim-v2-go.tar.zst")
            && message.contains("truncated or corrupt"),
        "the node's failure names the tarball: {message}"
    );
    assert!(
        tree(&prefix).unwrap_or_default().is_empty(),
        "nothing installed"
    );
    assert_eq!(
        file_identity(&node.path("/etc/containerd/config.toml"))?,
        config_before,
        "containerd config untouched by the failed install"
    );
    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "kata-deploy",
            "--namespace",
            "kata-system",
            "--wait",
            "--timeout",
            "5m",
        ])
        .await?;
    assert!(ok, "helm uninstall of the failed release: {out}");

    // --- 3.32 layout, named as upstream's values name it ---
    let out = run(helm("install", "3.32.0".into())).await?;
    assert!(
        out.contains(&format!(
            "Kata release installed on the nodes: {RELEASE}:3.32.0"
        )),
        "{out}"
    );
    wait_until(Duration::from_secs(90), "kata-qemu served", || async {
        Ok(handlers(&nodes, &node.name).await?.contains("kata-qemu"))
    })
    .await?;
    let t1 = tree(&prefix)?;
    for want in [
        "bin/containerd-shim-kata-v2",
        "bin/qemu-system-x86_64",
        "share/kata-containers/vmlinux.container",
        "share/kata-test-components/virtiofsd",
        "share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml",
    ] {
        assert!(
            t1.contains_key(Path::new(want)),
            "3.32: {want} installed: {:?}",
            t1.keys()
        );
    }
    for absent in [
        "versions.yaml",
        "runtime-rs/bin/containerd-shim-kata-v2",
        "share/kata-test-components/firecracker",
        "share/kata-test-components/ovmf",
    ] {
        assert!(
            !t1.contains_key(Path::new(absent)),
            "3.32: {absent} NOT installed (not needed by qemu on x86_64)"
        );
    }
    let call = shim_reached(&cluster, &node, "332").await?;
    eprintln!("3.32 layout: containerd started {call}");

    // --- the 4.x layout of the chart's release: exactly versions.yaml more ---
    run(helm("upgrade", tag.clone())).await?;
    let t2 = tree(&prefix)?;
    assert_eq!(
        changes(&t1, &t2),
        (vec!["versions.yaml".to_string()], vec![], vec![]),
        "3.32 -> {tag}"
    );

    // --- a second version whose Go shim differs: exactly that file and versions.yaml replaced ---
    run(helm("upgrade", format!("{tag}-two"))).await?;
    let t3 = tree(&prefix)?;
    assert_eq!(
        changes(&t2, &t3),
        (
            vec![],
            vec![
                "bin/containerd-shim-kata-v2".to_string(),
                "versions.yaml".to_string()
            ],
            vec![]
        ),
        "{tag} -> {tag}-two"
    );
    assert!(
        std::fs::read_to_string(prefix.join("bin/containerd-shim-kata-v2"))?
            .contains("variant two")
    );
    assert!(handlers(&nodes, &node.name).await?.contains("kata-qemu"));
    let call = shim_reached(&cluster, &node, "two").await?;
    eprintln!("{tag}-two: containerd started {call}");

    // --- uninstall restores the node ---
    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "kata-deploy",
            "--namespace",
            "kata-system",
            "--wait",
            "--timeout",
            "5m",
        ])
        .await?;
    assert!(ok, "helm uninstall failed: {out}");
    let left = tree(&prefix).unwrap_or_default();
    assert!(
        left.is_empty(),
        "uninstall left files in the prefix: {:?}",
        left.keys()
    );
    assert_eq!(
        file_identity(&node.path("/etc/containerd/config.toml"))?,
        config_before,
        "containerd config restored"
    );
    wait_until(
        Duration::from_secs(90),
        "kata-qemu no longer served",
        || async { Ok(!handlers(&nodes, &node.name).await?.contains("kata-qemu")) },
    )
    .await?;
    Ok(())
}
