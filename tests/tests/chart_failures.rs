//! What a failed hook run leaves, end to end (issue 24): a node whose install failed after its
//! claim is cleaned by `helm uninstall` back to its original bytes; a failed cleanup or retire
//! dispatcher Job stays, with its failed per-node Job, for inspection, and fails helm; once the
//! cause is fixed, running helm again finishes the work. Real helm, real API server and Job
//! controller, the real dispatcher and stage binaries on local nodes.

mod common;

use anyhow::{Context, Result};
use common::{helm_uninstall, labels_of, Bed};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kata_testbed::cluster::{repo_root, wait_until, TestCluster};
use kata_testbed::hostroot::snapshot;
use kube::api::{Api, Patch, PatchParams};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A guest kernel outside the install prefix, named by the qemu shim's drop-in: present on the
/// nodes where a test puts it, missing elsewhere (the cri stage refuses to route a handler to
/// it, after the artifacts stage and the claim).
const CUSTOM_KERNEL: &str = "opt/custom-kernel/vmlinux";

/// Puts [`CUSTOM_KERNEL`] on a node's host root; returns its path.
fn put_custom_kernel(host: &Path) -> Result<PathBuf> {
    let kernel = host.join(CUSTOM_KERNEL);
    std::fs::create_dir_all(kernel.parent().expect("has a parent"))?;
    std::fs::write(&kernel, b"a guest kernel")?;
    Ok(kernel)
}

/// The chart's arguments for this test's release: its own suffix (RuntimeClasses are
/// cluster-scoped), qemu only, with the drop-in naming [`CUSTOM_KERNEL`].
fn release_args(bed: &Bed, suffix: &str) -> Vec<String> {
    let mut args = bed.scope();
    args.extend(
        [
            "--set",
            &format!("env.multiInstallSuffix={suffix}"),
            "--set",
            "shims.disableAll=true",
            "--set",
            "shims.qemu.enabled=true",
            "--set-string",
            &format!("shims.qemu.dropIn=[hypervisor.qemu]\nkernel = \"/{CUSTOM_KERNEL}\"\n"),
            "--wait",
            "--timeout",
            "3m",
        ]
        .map(String::from),
    );
    args
}

/// Runs `helm <verb> kata-deploy [chart] <args>`: (succeeded, output).
async fn helm(
    cluster: &TestCluster,
    verb: &str,
    with_chart: bool,
    args: &[String],
) -> Result<(bool, String)> {
    let chart = repo_root().join("chart/kata-deploy");
    let mut all = vec![verb.to_string(), "kata-deploy".into()];
    if with_chart {
        all.push(chart.to_str().expect("utf-8").into());
    }
    all.extend(args.iter().cloned());
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    cluster.run_helm(&all).await
}

/// The install's file manifest on a node's host root.
fn manifest(host: &Path, suffix: &str) -> PathBuf {
    host.join(format!("var/lib/kata-deploy-{suffix}/installed-files.json"))
}

/// Corrupts the install manifest under `host`; returns its path and bytes (putting them back is
/// the fix). Every cleanup of that node then fails: the stage refuses a corrupt state file.
fn corrupt_manifest(host: &Path, suffix: &str) -> Result<(PathBuf, Vec<u8>)> {
    let path = manifest(host, suffix);
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, b"{ not json")?;
    Ok((path, bytes))
}

/// Asserts that the failed dispatcher Job and the failed cleanup Job of `node` both stay.
async fn assert_kept_for_inspection(jobs: &Api<Job>, dispatcher: &str, node: &str) -> Result<()> {
    assert!(
        job_failed(jobs, dispatcher).await?,
        "the failed dispatcher Job {dispatcher} stays for inspection"
    );
    let node_job = format!("kata-deploy-cleanup-{node}");
    assert!(
        job_failed(jobs, &node_job).await?,
        "{node_job} stays, failed, with its pod's log"
    );
    Ok(())
}

/// Whether Job `name` exists with a `Failed=True` condition.
async fn job_failed(jobs: &Api<Job>, name: &str) -> Result<bool> {
    Ok(jobs.get_opt(name).await?.is_some_and(|j| {
        j.status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Failed" && c.status == "True")
    }))
}

/// The node's (kata-runtime, claim, state) labels of this install.
async fn marks(bed: &Bed, node: &str, suffix: &str) -> Result<(bool, bool, Option<String>)> {
    let l = labels_of(&bed.nodes.get(node).await?);
    Ok((
        l.contains_key(common::KATA_LABEL),
        l.contains_key(&format!("katacontainers.io/kata-deploy-claimed-{suffix}")),
        l.get(&format!("katacontainers.io/kata-deploy-state-{suffix}"))
            .cloned(),
    ))
}

/// Waits (60 s at most) until Job `name` is gone.
async fn wait_job_gone(jobs: &Api<Job>, name: &str) -> Result<()> {
    wait_until(
        Duration::from_secs(60),
        &format!("Job {name} gone"),
        || async { Ok(jobs.get_opt(name).await?.is_none()) },
    )
    .await
}

/// A node whose cri stage failed after its claim and artifacts (a half-installed node) is cleaned
/// by `helm uninstall` back to its original bytes, with no label left. A node whose cleanup fails
/// (its install manifest corrupt) fails `helm uninstall`, and the cleanup dispatcher Job and that
/// node's cleanup Job stay for inspection; fixed, `helm uninstall` again cleans it and removes
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_installed_node_is_cleaned_on_uninstall_and_a_failed_cleanup_stays_for_inspection(
) -> Result<()> {
    let bed = Bed::start("halfinst", 2).await?;
    let (cluster, ns, local) = (&bed.cluster, bed.ns.as_str(), &bed.local);
    let suffix = ns.replacen("halfinst-", "hi", 1);
    let (good, half) = (&local[0], &local[1]);
    let kernel = put_custom_kernel(&bed.hosts.join(good))?;
    let originals = [
        snapshot(&bed.hosts.join(good))?,
        snapshot(&bed.hosts.join(half))?,
    ];

    let args = release_args(&bed, &suffix);
    let (ok, out) = helm(cluster, "install", true, &args).await?;
    assert!(
        !ok,
        "the install must fail on {half} (kernel missing): {out}"
    );
    assert_eq!(
        marks(&bed, half, &suffix).await?,
        (false, true, Some("failed".into())),
        "{half}: claimed and failed, no Kata label"
    );
    let half_host = bed.hosts.join(half);
    assert!(
        manifest(&half_host, &suffix).is_file(),
        "the artifacts stage ran on {half} before cri failed: it is half-installed"
    );
    assert!(marks(&bed, good, &suffix).await?.0, "{good}");

    // --- a cleanup that fails on `good` (its manifest corrupt): helm fails, the Jobs stay ---
    let (good_manifest, manifest_bytes) = corrupt_manifest(&bed.hosts.join(good), &suffix)?;
    let uninstall_args: Vec<String> = ["--namespace", ns, "--wait", "--timeout", "3m"]
        .map(String::from)
        .to_vec();
    let (ok, out) = helm(cluster, "uninstall", false, &uninstall_args).await?;
    assert!(
        !ok,
        "helm uninstall must fail while a node's cleanup fails: {out}"
    );
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    assert_kept_for_inspection(&jobs, "kata-deploy-dispatch-cleanup", good).await?;
    // The half-installed node was cleaned in the same run: its host back to its bytes.
    assert_eq!(
        marks(&bed, half, &suffix).await?,
        (false, false, None),
        "{half}"
    );
    assert_eq!(
        snapshot(&half_host)?,
        originals[1],
        "{half}: every byte as before the install"
    );
    assert!(
        std::fs::exists(&kernel)?,
        "a file the install did not write stays"
    );

    // --- fixed: helm uninstall again finishes, and removes the Jobs ---
    std::fs::write(&good_manifest, &manifest_bytes)?;
    let (ok, out) = helm(cluster, "uninstall", false, &uninstall_args).await?;
    assert!(ok, "helm uninstall after the fix: {out}");
    wait_job_gone(&jobs, "kata-deploy-dispatch-cleanup").await?;
    wait_job_gone(&jobs, &format!("kata-deploy-cleanup-{good}")).await?;
    assert_eq!(
        marks(&bed, good, &suffix).await?,
        (false, false, None),
        "{good}"
    );
    assert_eq!(
        snapshot(&bed.hosts.join(good))?,
        originals[0],
        "{good}: every byte as before the install"
    );
    bed.kubelet.shutdown().await;
    Ok(())
}

/// The `selection` the rollout ConfigMap records.
async fn recorded_selection(cluster: &TestCluster, ns: &str) -> Result<String> {
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), ns);
    cms.get("kata-deploy-rollout")
        .await?
        .data
        .unwrap_or_default()
        .get("selection")
        .cloned()
        .context("no recorded selection")
}

/// A retire that fails on the node a narrowing upgrade dropped (its install manifest corrupt)
/// fails the upgrade; the retire dispatcher Job and that node's cleanup Job stay for inspection,
/// the recorded selection stays the old one, and the node keeps its claim. Fixed, the next
/// upgrade retries: the node is cleaned back to its bytes and the narrowed selection recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_retire_fails_the_upgrade_stays_for_inspection_and_the_next_upgrade_retries(
) -> Result<()> {
    let bed = Bed::start("retfail", 2).await?;
    let (cluster, ns, local) = (&bed.cluster, bed.ns.as_str(), &bed.local);
    let suffix = ns.replacen("retfail-", "rf", 1);
    let (kept, dropped) = (&local[0], &local[1]);
    for n in local {
        put_custom_kernel(&bed.hosts.join(n))?;
    }
    let dropped_host = bed.hosts.join(dropped);
    let original = snapshot(&dropped_host)?;
    let args = release_args(&bed, &suffix);
    let (ok, out) = helm(cluster, "install", true, &args).await?;
    assert!(ok, "helm install: {out}");
    let first = recorded_selection(cluster, ns).await?;

    // --- narrowed to tier=b, which drops `dropped`; its retire fails ---
    let patch = serde_json::json!({"metadata": {"labels": {"kata-test/tier": "b"}}});
    bed.nodes
        .patch(kept, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let (dropped_manifest, manifest_bytes) = corrupt_manifest(&dropped_host, &suffix)?;
    let mut narrowed = args.clone();
    narrowed.extend([
        "--set-string".into(),
        "job.nodeSelector.kata-test/tier=b".into(),
    ]);
    let (ok, out) = helm(cluster, "upgrade", true, &narrowed).await?;
    assert!(!ok, "the upgrade must fail with its retire: {out}");
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    assert_kept_for_inspection(&jobs, "kata-deploy-dispatch-retire", dropped).await?;
    assert_eq!(
        recorded_selection(cluster, ns).await?,
        first,
        "a failed retire keeps the recorded selection, so the next upgrade retires again"
    );
    assert!(
        marks(&bed, dropped, &suffix).await?.1,
        "{dropped} keeps its claim"
    );

    // --- fixed: the next upgrade retries the retire and finishes it ---
    std::fs::write(&dropped_manifest, &manifest_bytes)?;
    let (ok, out) = helm(cluster, "upgrade", true, &narrowed).await?;
    assert!(ok, "the upgrade after the fix: {out}");
    wait_job_gone(&jobs, "kata-deploy-dispatch-retire").await?;
    assert_eq!(
        marks(&bed, dropped, &suffix).await?,
        (false, false, None),
        "{dropped}"
    );
    assert_eq!(
        snapshot(&dropped_host)?,
        original,
        "{dropped}: every byte as before the install"
    );
    let now = recorded_selection(cluster, ns).await?;
    assert!(
        now.contains("kata-test/tier=b"),
        "the narrowed selection recorded: {now}"
    );
    assert!(marks(&bed, kept, &suffix).await?.0, "{kept} keeps Kata");

    helm_uninstall(cluster, ns).await?;
    bed.kubelet.shutdown().await;
    Ok(())
}
