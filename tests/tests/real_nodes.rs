//! End to end on REAL nodes: systemd + containerd + runc + a real kubelet per node
//! (hack/testenv/realnode/), one with Debian's containerd 1.6 (config version 2) and one with a
//! containerd 2.x built from the Go module proxy (config version 3). `helm install` of the real
//! chart: the dispatcher and every stage run as real containers of our images; the cri stage
//! restarts, through systemd over D-Bus, the containerd that runs its own pod.

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kata_testbed::cluster::{repo_root, wait_until, TestCluster};
use kata_testbed::helmsteps::{check_release, upgrade_to, ReleaseShape, NARROW_LABEL};
use kata_testbed::probe::{probe_handlers, Reach};
use kata_testbed::realnode::{
    build_images, file_identity, leftovers, real_node_lock, require_real_nodes, RealNode,
};
use kube::api::{Api, ListParams, LogParams, Patch, PatchParams, PostParams};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const KATA_LABEL: &str = "katacontainers.io/kata-runtime";
/// containerd 2.x flavour of the test (the newest pinned build).
const CONTAINERD2: &str = "v2.4.2";
const INSTALL_PREFIX: &str = "/opt/kata";

async fn runtime_handlers(nodes: &Api<Node>, name: &str) -> Result<BTreeSet<String>> {
    let node = nodes.get(name).await?;
    Ok(node
        .status
        .and_then(|s| s.runtime_handlers)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|h| h.name)
        .filter(|n| !n.is_empty())
        .collect())
}

async fn wait_handlers(
    nodes: &Api<Node>,
    name: &str,
    what: &str,
    want: impl Fn(&BTreeSet<String>) -> bool,
) -> Result<()> {
    let waited = wait_until(
        Duration::from_secs(90),
        &format!("{name}: {what}"),
        || async { Ok(want(&runtime_handlers(nodes, name).await?)) },
    )
    .await;
    if let Err(e) = waited {
        bail!(
            "{e:#}; runtimeHandlers now: {:?}",
            runtime_handlers(nodes, name).await.unwrap_or_default()
        );
    }
    Ok(())
}

/// A pod that just runs (the pause image sleeps forever), to see it survive runtime restarts.
fn sleeper(name: &str, node: &str) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "sleep", "image": "registry.k8s.io/pause:3.10", "imagePullPolicy": "Never"}]}
    }))?)
}

/// The ordinary pod on `node` still runs the very container it had before (same ID, no restart).
async fn assert_sleeper_kept(
    pods: &Api<Pod>,
    node: &RealNode,
    before: &(String, i32),
    across: &str,
) -> Result<()> {
    let p = pods.get(&format!("sleeper-{}", node.name)).await?;
    assert_eq!(
        container_id(&p).as_ref(),
        Some(before),
        "{}: the ordinary pod kept its container across {across}",
        node.name
    );
    assert_eq!(
        p.status.and_then(|s| s.phase).as_deref(),
        Some("Running"),
        "{}: the ordinary pod still runs",
        node.name
    );
    Ok(())
}

/// Per real node: the run label of its install Job, which must have succeeded.
async fn install_job_runs(
    cluster: &TestCluster,
    ns: &str,
    real: &[&RealNode],
) -> Result<Vec<String>> {
    install_job_runs_if_any(cluster, ns, real)
        .await?
        .into_iter()
        .zip(real)
        .map(|(run, n)| run.with_context(|| format!("{}: no install Job", n.name)))
        .collect()
}

/// Per real node: the run label of its install Job if it has one (which must have succeeded). A
/// node an upgrade skipped has none: Helm deleted the previous dispatcher Job before the hook
/// (before-hook-creation) and its per-node Jobs went with it (ownerReference).
async fn install_job_runs_if_any(
    cluster: &TestCluster,
    ns: &str,
    real: &[&RealNode],
) -> Result<Vec<Option<String>>> {
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    let mut out = Vec::new();
    for n in real {
        let lp = ListParams::default().labels(&format!(
            "katacontainers.io/dispatcher=kata-deploy-install,katacontainers.io/node={}",
            n.name
        ));
        let list = jobs.list(&lp).await?;
        let Some(job) = list.items.first() else {
            out.push(None);
            continue;
        };
        let succeeded = job.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0);
        anyhow::ensure!(succeeded == 1, "{}: install Job not succeeded", n.name);
        let run = job
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("katacontainers.io/run"));
        out.push(Some(run.cloned().unwrap_or_default()));
    }
    Ok(out)
}

fn container_id(pod: &Pod) -> Option<(String, i32)> {
    let cs = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    Some((cs.container_id.clone()?, cs.restart_count))
}

/// Day-2 transitions through `helm` (the release starts at {qemu}, 4 revisions so far): debug
/// and a custom runtime added; the selection narrowed to the 2.x node (the 1.6 node is retired)
/// with guest pull on; guest pull off with its shim kept; shims swapped; the selection widened
/// again; a shim dropped; `helm rollback` to the widened revision. After each: every node serves
/// exactly its shape ([`check_release`]).
async fn day_two_through_helm(
    cluster: &TestCluster,
    real: &[&RealNode],
    chart: &str,
) -> Result<()> {
    let (n2, _) = (real[1], real[0]);
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    nodes
        .patch(
            &n2.name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {NARROW_LABEL: "true"}}})),
        )
        .await?;
    let base = ReleaseShape {
        qemu: true,
        ..Default::default()
    };
    let s1 = ReleaseShape {
        custom: true,
        debug: true,
        ..base
    };
    let s2 = ReleaseShape {
        narrowed: true,
        coco: true,
        guest_pull: true,
        ..s1
    };
    let s3 = ReleaseShape {
        guest_pull: false,
        ..s2
    };
    let s4 = ReleaseShape {
        runtime_rs: true,
        custom: false,
        ..s3
    };
    let s5 = ReleaseShape {
        narrowed: false,
        ..s4
    };
    let s6 = ReleaseShape {
        qemu: false,
        debug: false,
        ..s5
    };
    let steps = [
        ("debug and a custom runtime added", s1),
        ("selection narrowed, guest pull on", s2),
        ("guest pull off, its shim kept", s3),
        ("runtime-rs added, the custom runtime removed", s4),
        ("selection widened", s5),
        ("qemu removed, debug off", s6),
    ];
    let selected =
        |shape: ReleaseShape| move |n: &RealNode| !shape.narrowed || n.name == real[1].name;
    let mut times = Vec::new();
    for (what, shape) in steps {
        let t = std::time::Instant::now();
        upgrade_to(cluster, chart, &shape).await?;
        check_release(cluster, real, &selected(shape), &shape, what).await?;
        eprintln!("helm step: {what} ok in {:.1}s", t.elapsed().as_secs_f64());
        times.push(format!("{what} {:.0} s", t.elapsed().as_secs_f64()));
    }
    // Revisions: install 1, reinstall 2, node lost 3, shim disabled 4, then 5..10 above.
    let t = std::time::Instant::now();
    let (ok, out) = cluster
        .run_helm(&[
            "rollback",
            "kata-deploy",
            "9",
            "--namespace",
            "kata-system",
            "--wait",
            "--timeout",
            "5m",
        ])
        .await?;
    ensure!(ok, "helm rollback to revision 9 failed: {out}");
    check_release(
        cluster,
        real,
        &selected(s5),
        &s5,
        "rollback to the widened revision",
    )
    .await?;
    times.push(format!("rollback {:.0} s", t.elapsed().as_secs_f64()));
    kata_testbed::figures::record(
        "helm_install_upgrade_uninstall_on_real_nodes",
        format!(
            "helm steps, each checked on both nodes: {}",
            times.join(", ")
        ),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_upgrade_uninstall_on_real_nodes() -> Result<()> {
    if !require_real_nodes(&["debian", CONTAINERD2]) {
        return Ok(());
    }
    let _serial = real_node_lock().await;
    build_images()?;
    let cluster = TestCluster::private().await?;
    let t0 = std::time::Instant::now();
    let (n1, n2) = ("rn-ctrd16", "rn-ctrd2");
    let node16 = RealNode::start(&cluster, n1, "debian").await?;
    let node2 = RealNode::start(&cluster, n2, CONTAINERD2).await?;
    eprintln!("two real nodes Ready in {:.1}s", t0.elapsed().as_secs_f64());
    let real = [&node16, &node2];
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let ns = "kata-system";
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let default_pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");

    // Before: the node's own containerd config (bytes, mode, owner) and what 2.x serves.
    let config_before: Vec<_> = real
        .iter()
        .map(|n| file_identity(&n.path("/etc/containerd/config.toml")))
        .collect::<Result<_>>()?;
    let handlers_before = runtime_handlers(&nodes, n2).await?;
    assert!(
        handlers_before.contains("runc"),
        "a containerd 2.x node reports its handlers: {handlers_before:?}"
    );
    for n in &real {
        default_pods
            .create(
                &PostParams::default(),
                &sleeper(&format!("sleeper-{}", n.name), &n.name)?,
            )
            .await?;
    }
    let mut sleepers = Vec::new();
    for n in &real {
        let name = format!("sleeper-{}", n.name);
        wait_until(
            Duration::from_secs(60),
            &format!("{name} Running"),
            || async {
                Ok(default_pods
                    .get(&name)
                    .await?
                    .status
                    .and_then(|s| s.phase)
                    .as_deref()
                    == Some("Running"))
            },
        )
        .await?;
        sleepers
            .push(container_id(&default_pods.get(&name).await?).context("sleeper container id")?);
    }
    let containerd_since: Vec<u64> = real
        .iter()
        .map(|n| n.unit_active_since("containerd"))
        .collect::<Result<_>>()?;

    // --- install ---
    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let common = [
        "--namespace",
        ns,
        "--create-namespace",
        "--set",
        "shims.disableAll=true",
        "--set",
        "shims.qemu.enabled=true",
        "--set",
        "shims.qemu-runtime-rs.enabled=true",
        "--set-string",
        "job.nodeSelector.kata-testbed/real=true",
        "--set-string",
        "job.dispatcher.nodeSelector.kata-testbed/real=true",
        "--wait",
        "--timeout",
        "5m",
    ];
    let mut args = vec!["install", "kata-deploy", chart];
    args.extend(common);
    let (ok, out) = cluster.run_helm(&args).await?;
    if !ok {
        for n in &real {
            eprintln!(
                "--- {} kubelet:\n{}",
                n.name,
                n.journal("kubelet").unwrap_or_default()
            );
        }
        bail!("helm install on real nodes failed: {out}");
    }
    let kata_handlers: BTreeSet<String> = ["kata-qemu", "kata-qemu-runtime-rs"]
        .map(String::from)
        .into();

    // The dispatcher ran as a real container on a real node, non-root with a read-only root:
    // what runc was given (the OCI spec containerd wrote), not only what the pod asked for.
    let dispatcher = pods
        .list(&ListParams::default().labels("katacontainers.io/dispatcher-role=install"))
        .await?
        .items;
    let dispatcher = dispatcher.first().context("the install dispatcher pod")?;
    let on = dispatcher
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .context("dispatcher scheduled")?;
    let host = real
        .iter()
        .find(|n| n.name == on)
        .context("the dispatcher runs on a real node")?;
    let cid = container_id(dispatcher)
        .context("dispatcher container id")?
        .0;
    let spec: serde_json::Value = serde_json::from_str(&host.ctr(&[
        "containers",
        "info",
        cid.trim_start_matches("containerd://"),
    ])?)?;
    assert_ne!(
        spec["Spec"]["process"]["user"]["uid"],
        serde_json::json!(0),
        "dispatcher runs as non-root: {}",
        spec["Spec"]["process"]["user"]
    );
    assert_eq!(
        spec["Spec"]["root"]["readonly"],
        serde_json::json!(true),
        "dispatcher root filesystem is read-only"
    );
    let log = pods
        .logs(
            dispatcher.metadata.name.as_deref().unwrap_or_default(),
            &LogParams::default(),
        )
        .await?;
    assert!(
        log.contains(n1) && log.contains(n2),
        "kubectl logs of the dispatcher works and names both nodes: {log}"
    );

    // Every per-node Job ran its stages as real containers, each with logs.
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    let per_node = jobs
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/managed-by=kata-deploy-job-dispatcher"),
        )
        .await?
        .items;
    assert_eq!(per_node.len(), 2, "one Job per real node");
    let job_names: BTreeSet<String> = per_node
        .iter()
        .filter_map(|j| j.metadata.name.clone())
        .collect();
    let stage_pods: Vec<Pod> = pods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "Job" && job_names.contains(&o.name))
        })
        .collect();
    assert_eq!(
        stage_pods.len(),
        2,
        "one stage pod per node (no retry was needed)"
    );
    for p in &stage_pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref().context("pod spec")?;
        // Least privilege (chart default): no hostPID, no privileged container, yet containerd
        // was restarted through systemd (below): the system bus under the host root is enough.
        assert_ne!(spec.host_pid, Some(true), "{name}: no hostPID");
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            let privileged = c.security_context.as_ref().and_then(|s| s.privileged);
            assert_ne!(privileged, Some(true), "{name}/{}: not privileged", c.name);
        }
        // What runc was given for the host stages (stage.hostMounts: precise): the host root
        // read-only, and writable exactly the directories each stage writes; the stages still
        // installed (checked below), so nothing more was needed. No token next to the host.
        let on = spec.node_name.clone().context("stage pod scheduled")?;
        let node = real
            .iter()
            .find(|n| n.name == on)
            .context("stage pod on a real node")?;
        let want: BTreeMap<&str, BTreeSet<&str>> = [
            (
                "artifacts",
                [
                    "/host/opt/kata",
                    "/host/var/lib/kata-deploy",
                    "/host/run/lock",
                ],
            ),
            // stage.cri auto: the dispatcher mounts the node's own CRI directory, not /etc.
            (
                "cri",
                [
                    "/host/etc/containerd",
                    "/host/var/lib/kata-deploy",
                    "/host/run/lock",
                ],
            ),
        ]
        .into_iter()
        .map(|(c, d)| (c, d.into_iter().collect()))
        .collect();
        let host_stages: Vec<_> = p
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter(|cs| want.contains_key(cs.name.as_str()))
            .collect();
        assert_eq!(
            host_stages.len(),
            want.len(),
            "{name}: both host stages ran"
        );
        for cs in host_stages {
            let cid = cs
                .container_id
                .as_deref()
                .context("host stage container id")?;
            let info: serde_json::Value = serde_json::from_str(&node.ctr(&[
                "containers",
                "info",
                cid.trim_start_matches("containerd://"),
            ])?)?;
            let mounts = info["Spec"]["mounts"].as_array().context("OCI mounts")?;
            let has = |m: &serde_json::Value, opt: &str| {
                m["options"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|x| x == opt))
            };
            let ro = |m: &serde_json::Value| has(m, "ro") || has(m, "rro");
            let host_mounts: Vec<&serde_json::Value> = mounts
                .iter()
                .filter(|m| {
                    m["destination"]
                        .as_str()
                        .is_some_and(|d| d == "/host" || d.starts_with("/host/"))
                })
                .collect();
            assert!(
                host_mounts
                    .iter()
                    .any(|m| m["destination"] == "/host" && ro(m)),
                "{name}/{}: the host root is read-only: {host_mounts:?}",
                cs.name
            );
            // containerd 2.x (with runc >= 1.1 on Linux >= 5.12) makes it recursively read-only,
            // the host's submounts (/run, kubelet's pod volumes...) included; 1.6 cannot.
            assert_eq!(
                host_mounts
                    .iter()
                    .any(|m| m["destination"] == "/host" && has(m, "rro")),
                on == n2,
                "{name}/{}: recursively read-only where the runtime can: {host_mounts:?}",
                cs.name
            );
            let writable: BTreeSet<&str> = host_mounts
                .iter()
                .filter(|m| !ro(m))
                .filter_map(|m| m["destination"].as_str())
                .collect();
            assert_eq!(
                writable,
                want[cs.name.as_str()],
                "{name}/{}: writable host mounts",
                cs.name
            );
            assert!(
                !mounts.iter().any(|m| m["destination"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("/var/run/secrets/kubernetes.io"))),
                "{name}/{}: no ServiceAccount token beside the host",
                cs.name
            );
        }
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            let lp = LogParams {
                container: Some(c.name.clone()),
                ..LogParams::default()
            };
            let text = pods
                .logs(&name, &lp)
                .await
                .with_context(|| format!("kubectl logs {name} -c {}", c.name))?;
            assert!(
                !text.trim().is_empty(),
                "{name}/{}: the stage logged something",
                c.name
            );
        }
    }

    for (i, n) in real.iter().enumerate() {
        // The cri stage changed the real config and restarted containerd (that it does not restart
        // it again is checked by the unchanged upgrade below)...
        let after = n.unit_active_since("containerd")?;
        assert!(
            after > containerd_since[i],
            "{}: containerd was restarted by the cri stage",
            n.name
        );
        // ... and the ordinary pod survived the restart of its runtime.
        assert_sleeper_kept(&default_pods, n, &sleepers[i], "the cri stage's restart").await?;
        let l = nodes
            .get(&n.name)
            .await?
            .metadata
            .labels
            .unwrap_or_default();
        assert_eq!(
            l.get(KATA_LABEL).map(String::as_str),
            Some("true"),
            "{}: labelled",
            n.name
        );
        assert!(
            n.path(&format!("{INSTALL_PREFIX}/bin/containerd-shim-kata-v2"))
                .is_file(),
            "{}: payload installed",
            n.name
        );
    }
    wait_handlers(&nodes, n2, "every kata handler in runtimeHandlers", |h| {
        kata_handlers.is_subset(h)
    })
    .await?;

    // A pod of each handler is routed by containerd to the shim our artifacts stage installed
    // (the test payload's shims cannot start a VM: the sandbox fails in our shim, which records
    // the call).
    let probed = probe_handlers(
        &cluster,
        &node2,
        &[
            (
                "kata-qemu".to_string(),
                Reach::Shim(format!("{INSTALL_PREFIX}/bin/containerd-shim-kata-v2")),
            ),
            (
                "kata-qemu-runtime-rs".to_string(),
                Reach::Shim(format!(
                    "{INSTALL_PREFIX}/runtime-rs/bin/containerd-shim-kata-v2"
                )),
            ),
        ],
        "install",
    )
    .await?;
    for (handler, p) in &probed {
        eprintln!(
            "{handler} sandbox on {n2}: {}\nshim call: {}",
            p.message, p.shim_call
        );
        assert!(
            p.message.contains("kata"),
            "containerd used the {handler} handler: {}",
            p.message
        );
    }

    // --- upgrade with nothing changed, every node re-run (job.reinstallAll): each node's stages
    //     run again and converge without a second restart ---
    let since_installed: Vec<u64> = real
        .iter()
        .map(|n| n.unit_active_since("containerd"))
        .collect::<Result<_>>()?;
    let runs_before = install_job_runs(&cluster, ns, &real).await?;
    let mut args = vec!["upgrade", "kata-deploy", chart];
    args.extend(common);
    args.extend(["--set", "job.reinstallAll=true"]);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "helm upgrade (no change) failed: {out}");
    let runs_after = install_job_runs(&cluster, ns, &real).await?;
    for (n, (before, after)) in real.iter().zip(runs_before.iter().zip(&runs_after)) {
        assert_ne!(
            before, after,
            "{}: the unchanged upgrade must run the node's stages again (a new, succeeded Job)",
            n.name
        );
    }
    for (i, n) in real.iter().enumerate() {
        assert_eq!(
            n.unit_active_since("containerd")?,
            since_installed[i],
            "{}: an unchanged re-run must not restart containerd",
            n.name
        );
    }

    // --- the 2.x node loses Kata behind the release's back (its original containerd config put
    //     back, containerd restarted): a plain `helm upgrade` re-installs exactly that node, since
    //     its runtimeHandlers no longer agree with its install record ---
    let runs_before = install_job_runs(&cluster, ns, &real).await?;
    let (orig, _, _, _) = &config_before[1];
    std::fs::write(node2.path("/etc/containerd/config.toml"), orig)?;
    node2.exec(&["systemctl", "restart", "containerd"])?;
    wait_handlers(&nodes, n2, "kata handlers gone with the config", |h| {
        !h.contains("kata-qemu")
    })
    .await?;
    let mut args = vec!["upgrade", "kata-deploy", chart];
    args.extend(common);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "helm upgrade (node lost Kata) failed: {out}");
    wait_handlers(&nodes, n2, "kata handlers back", |h| {
        h.contains("kata-qemu") && h.contains("kata-qemu-runtime-rs")
    })
    .await?;
    let runs_after = install_job_runs_if_any(&cluster, ns, &real).await?;
    let new_run = runs_after[1]
        .clone()
        .with_context(|| format!("{n2}: no install Job after the upgrade"))?;
    assert_ne!(runs_before[1], new_run, "{n2}: re-installed by a new Job");
    assert_ne!(
        runs_after[0].as_ref(),
        Some(&new_run),
        "{n1}: in agreement with its record (its kubelet reports no handlers), not re-run"
    );

    // --- upgrade with a shim disabled: its handler disappears ---
    let mut args = vec!["upgrade", "kata-deploy", chart];
    args.extend(common);
    args.extend(["--set", "shims.qemu-runtime-rs.enabled=false"]);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "helm upgrade (shim disabled) failed: {out}");
    wait_handlers(
        &nodes,
        n2,
        "kata-qemu-runtime-rs gone, kata-qemu kept",
        |h| h.contains("kata-qemu") && !h.contains("kata-qemu-runtime-rs"),
    )
    .await?;

    // --- day 2 through helm and the dispatcher: each step a `helm upgrade -f` to a new release
    //     shape (or a rollback), then every real node serves exactly that shape ---
    day_two_through_helm(&cluster, &real, chart).await?;
    for (i, n) in real.iter().enumerate() {
        assert_sleeper_kept(&default_pods, n, &sleepers[i], "every day-2 step").await?;
    }

    // --- uninstall: handlers gone, containerd serving, config byte-identical, nothing left ---
    let (ok, out) = cluster
        .run_helm(&[
            "uninstall",
            "kata-deploy",
            "--namespace",
            ns,
            "--wait",
            "--timeout",
            "5m",
        ])
        .await?;
    assert!(ok, "helm uninstall failed: {out}");
    wait_handlers(&nodes, n2, "no kata handler left", |h| {
        !h.iter().any(|x| x.starts_with("kata"))
    })
    .await?;
    for (i, n) in real.iter().enumerate() {
        assert_eq!(
            file_identity(&n.path("/etc/containerd/config.toml"))?,
            config_before[i],
            "{}: config.toml restored (bytes, mode, owner)",
            n.name
        );
        n.ctr(&["version"])
            .with_context(|| format!("{}: containerd serving after uninstall", n.name))?;
        let prefix = n.path(INSTALL_PREFIX);
        let left: Vec<_> = std::fs::read_dir(&prefix)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "{}: nothing left under {INSTALL_PREFIX}: {left:?}",
            n.name
        );
        let l = nodes
            .get(&n.name)
            .await?
            .metadata
            .labels
            .unwrap_or_default();
        assert!(
            !l.keys().any(|k| k.starts_with("katacontainers.io/")),
            "{}: kata labels removed: {l:?}",
            n.name
        );
        assert_sleeper_kept(&default_pods, n, &sleepers[i], "install and uninstall").await?;
    }
    assert_eq!(
        runtime_handlers(&nodes, n2).await?,
        handlers_before,
        "{n2}: the handlers served are exactly those before install"
    );

    drop(node2);
    drop(node16);
    drop(cluster);
    let left = leftovers();
    assert!(
        left.is_empty(),
        "real nodes left something behind: {left:?}"
    );
    Ok(())
}
