//! The real dispatcher binary against the real control plane (simulated kwok nodes), running as a
//! ServiceAccount with exactly the rights the chart grants.

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kata_testbed::cluster::{wait_until, TestCluster};
use kata_testbed::rollout::audit_by_resource;
use kata_testbed::rollout::{
    jobs_by_node, output_text, wait_jobs_gone, ActiveObserver, EnvOptions, SimCase as Case,
    OWNER_JOB,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

async fn case(name: &str, nodes: usize, opts: EnvOptions) -> Result<Case> {
    Case::new(TestCluster::get().await?, name, nodes, &opts).await
}

fn text(out: &std::process::Output) -> String {
    output_text(out)
}

/// Runs the dispatcher to the end, requires exit 0 and returns its output.
async fn run_ok(c: &Case, args: &[&str]) -> Result<String> {
    let out = c.env.run(args).await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    Ok(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_per_node_paced_owned_and_least_privileged() -> Result<()> {
    let c = case("paced", 10, EnvOptions::default()).await?;
    let observer = ActiveObserver::start(
        &c.cluster,
        &c.env.namespace,
        "katacontainers.io/dispatcher=kd-install",
    );
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--parallelism",
            "3",
            "--name-prefix",
            "kd-install",
        ])
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let jobs = jobs_by_node(&c.cluster, &c.env.namespace).await?;
    let pinned: BTreeSet<&str> = jobs.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        jobs.len(),
        c.nodes.len(),
        "exactly one Job per node: {jobs:?}"
    );
    assert_eq!(
        pinned,
        c.nodes.iter().map(String::as_str).collect(),
        "every node pinned once"
    );
    assert!(
        observer.max_active() <= 3,
        "observed {} active Jobs with parallelism 3",
        observer.max_active()
    );
    assert!(
        observer.max_active() >= 2,
        "pacing should run Jobs in parallel, observed {}",
        observer.max_active()
    );

    // ownerReference to the dispatcher's Job, non-controller; node facts in the environment.
    let api: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    let owner_uid = api.get(OWNER_JOB).await?.metadata.uid.unwrap();
    let job = api.get(&jobs[0].0).await?;
    let oref = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (
            oref.uid.as_str(),
            oref.controller,
            oref.block_owner_deletion
        ),
        (owner_uid.as_str(), Some(false), Some(false))
    );
    let env = job
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .init_containers
        .unwrap()[0]
        .env
        .clone()
        .unwrap();
    let get = |k: &str| {
        env.iter()
            .find(|e| e.name == k)
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(get("KATA_NODE_NAME"), jobs[0].1);
    assert_eq!(
        get("KATA_NODE_CONTAINER_RUNTIME_VERSION"),
        "containerd://2.0.5"
    );
    assert_eq!(get("KATA_NODE_MACHINE_ID").len(), 32);

    // Requests per node from the audit log (happy path target: at most 3): one Job and one Node
    // Event per node, plus the preflight's access reviews.
    let requests = c.cluster.audit_requests(&c.env.user)?;
    let total: usize = requests.values().sum();
    eprintln!(
        "dispatcher requests: {requests:?} = {:.2} per node",
        total as f64 / c.nodes.len() as f64
    );
    let by_resource = audit_by_resource(&c.cluster, &c.env.user)?;
    assert_eq!(
        by_resource.get(&("create".into(), "jobs".into())).copied(),
        Some(c.nodes.len()),
        "one create per node: {by_resource:?}"
    );
    assert_eq!(
        by_resource
            .get(&("create".into(), "events".into()))
            .copied(),
        Some(c.nodes.len()),
        "one Node Event per node: {by_resource:?}"
    );
    // Per run, whatever N: the access reviews, the owner Job, the initial lists and watches.
    assert!(total <= 2 * c.nodes.len() + 20, "{requests:?}");

    // The identity can do nothing beyond its rights.
    let sa = c.cluster.sa_client(&c.env.namespace, "dispatcher").await?;
    let pods: Api<Pod> = Api::namespaced(sa.clone(), &c.env.namespace);
    assert_forbidden(
        pods.delete(&jobs[0].0, &DeleteParams::default())
            .await
            .map(|_| ()),
        "delete pods",
    );
    let nodes: Api<Node> = Api::all(sa.clone());
    assert_forbidden(
        nodes
            .delete(&c.nodes[0], &DeleteParams::default())
            .await
            .map(|_| ()),
        "delete nodes",
    );
    let status = serde_json::json!({"status": {"capacity": {"x": "1"}}});
    assert_forbidden(
        nodes
            .patch_status(&c.nodes[0], &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map(|_| ()),
        "patch node status",
    );
    let other_jobs: Api<Job> = Api::namespaced(sa, "default");
    assert_forbidden(
        other_jobs.list(&ListParams::default()).await.map(|_| ()),
        "list jobs in another namespace",
    );
    Ok(())
}

fn assert_forbidden(r: Result<(), kube::Error>, what: &str) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_adopts_and_upgrade_replaces_without_overshooting() -> Result<()> {
    let c = case("rerun", 6, EnvOptions::default()).await?;
    let observer = ActiveObserver::start(
        &c.cluster,
        &c.env.namespace,
        "katacontainers.io/dispatcher=kata-deploy",
    );
    let out = c
        .env
        .run(&["--selector", &c.selector, "--parallelism", "2"])
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let api: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    let uids = |list: Vec<Job>| {
        list.into_iter()
            .filter_map(|j| j.metadata.uid)
            .collect::<BTreeSet<_>>()
    };
    let before = uids(
        api.list(&ListParams::default().labels("katacontainers.io/dispatcher=kata-deploy"))
            .await?
            .items,
    );

    // Same owner (same run): adopted, nothing created.
    let job_creates = || -> Result<usize> {
        Ok(audit_by_resource(&c.cluster, &c.env.user)?
            .get(&("create".into(), "jobs".into()))
            .copied()
            .unwrap_or(0))
    };
    let creates_before = job_creates()?;
    let out = c
        .env
        .run(&["--selector", &c.selector, "--parallelism", "2"])
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        job_creates()? - creates_before,
        0,
        "a re-run of the same run creates no Job"
    );
    let same = uids(
        api.list(&ListParams::default().labels("katacontainers.io/dispatcher=kata-deploy"))
            .await?
            .items,
    );
    assert_eq!(before, same, "adopted, not duplicated");

    // A new run (helm upgrade: new owner UID) replaces every Job, still never above parallelism.
    api.delete(OWNER_JOB, &DeleteParams::background()).await?;
    wait_jobs_gone(&c.cluster, &c.env.namespace, Duration::from_secs(60)).await?;
    kata_testbed::rollout::create_owner_job(&c.cluster, &c.env.namespace, OWNER_JOB).await?;
    let out = c
        .env
        .run(&["--selector", &c.selector, "--parallelism", "2"])
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let after = uids(
        api.list(&ListParams::default().labels("katacontainers.io/dispatcher=kata-deploy"))
            .await?
            .items,
    );
    assert_eq!(after.len(), 6);
    assert!(after.is_disjoint(&before));
    assert!(
        observer.max_active() <= 2,
        "observed {} active",
        observer.max_active()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_jobs_of_an_earlier_run_are_replaced_within_parallelism() -> Result<()> {
    // Jobs of an earlier run still running when the next run starts must count against
    // parallelism until they are gone.
    let c = case(
        "stale",
        4,
        EnvOptions {
            duration: "4s".into(),
        },
    )
    .await?;
    let observer = ActiveObserver::start(
        &c.cluster,
        &c.env.namespace,
        "katacontainers.io/dispatcher=kata-deploy",
    );
    let mut first = tokio::process::Command::from(c.env.command(&[
        "--selector",
        &c.selector,
        "--parallelism",
        "2",
        "--run-id",
        "run-a",
    ])?)
    .spawn()?;
    wait_until(Duration::from_secs(30), "two running Jobs", || async {
        Ok(jobs_by_node(&c.cluster, &c.env.namespace).await?.len() == 2)
    })
    .await?;
    first.kill().await?;
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--parallelism",
            "2",
            "--run-id",
            "run-b",
        ])
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("replacing the Job of an earlier run"),
        "{}",
        text(&out)
    );
    assert_eq!(jobs_by_node(&c.cluster, &c.env.namespace).await?.len(), 4);
    assert!(
        observer.max_active() <= 2,
        "observed {} active Jobs with parallelism 2",
        observer.max_active()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_nodes_are_named_with_the_reason_and_exit_nonzero() -> Result<()> {
    let c = case(
        "fail",
        5,
        EnvOptions {
            duration: "3s".into(),
        },
    )
    .await?;
    let bad = vec![c.nodes[1].clone(), c.nodes[3].clone()];
    kata_testbed::rollout::fail_pods_on(
        &c.cluster,
        &c.env.namespace,
        &bad,
        "no /dev/kvm on this host",
    );
    let out = c
        .env
        .run(&["--selector", &c.selector, "--parallelism", "5"])
        .await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let failed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("failed"))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(failed, bad.iter().cloned().collect(), "{t}");
    assert!(
        t.contains("container label exited 3") && t.contains(": no /dev/kvm on this host"),
        "termination message in the report: {t}"
    );
    assert!(t.contains("5 nodes: 3 succeeded, 2 failed"), "{t}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_budget_stops_new_dispatches() -> Result<()> {
    let c = case(
        "budget",
        8,
        EnvOptions {
            duration: "2s".into(),
        },
    )
    .await?;
    kata_testbed::rollout::fail_pods_on(&c.cluster, &c.env.namespace, &c.nodes, "bad template");
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--parallelism",
            "1",
            "--max-failures",
            "2",
        ])
        .await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert_eq!(
        jobs_by_node(&c.cluster, &c.env.namespace).await?.len(),
        2,
        "no Job after the budget is spent: {t}"
    );
    assert!(t.contains("failure budget spent"), "{t}");
    assert!(t.contains("2 failed, 6 not started"), "{t}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_explicit_names_and_every_operator() -> Result<()> {
    let c = case("select", 5, EnvOptions::default()).await?;
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    let labels: [&[(&str, &str)]; 5] = [
        &[("zone", "a"), ("gpu", "yes")],
        &[("zone", "b"), ("gpu", "no")],
        &[("zone", "c")],
        &[("zone", "a"), ("role", "cp")],
        &[],
    ];
    for (node, ls) in c.nodes.iter().zip(labels) {
        let map: BTreeMap<&str, &str> = ls.iter().copied().collect();
        nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": map}})),
            )
            .await?;
    }
    let g = &c.selector;
    let plan = |out: std::process::Output| -> BTreeSet<usize> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|n| c.nodes.iter().position(|x| x == n))
            .collect()
    };
    let cases: Vec<(Vec<String>, BTreeSet<usize>)> = vec![
        (
            vec!["--selector".into(), format!("{g},zone=a")],
            [0, 3].into(),
        ),
        (
            vec!["--selector".into(), format!("{g},zone==b")],
            [1].into(),
        ),
        (
            vec!["--selector".into(), format!("{g},zone!=a")],
            [1, 2, 4].into(),
        ),
        (
            vec!["--selector".into(), format!("{g},zone in (b,c)")],
            [1, 2].into(),
        ),
        (
            vec!["--selector".into(), format!("{g},zone notin (a)")],
            [1, 2, 4].into(),
        ),
        (vec!["--selector".into(), format!("{g},gpu")], [0, 1].into()),
        (vec!["--selector".into(), format!("{g},!zone")], [4].into()),
        (
            vec![
                "--selector".into(),
                format!("{g},gpu=yes"),
                "--selector".into(),
                format!("{g},role=cp"),
            ],
            [0, 3].into(),
        ),
        (
            vec![
                "--nodes".into(),
                format!("{},{}", c.nodes[2], c.nodes[4]),
                "--selector".into(),
                format!("{g},zone=a"),
            ],
            [2, 4].into(),
        ),
    ];
    for (args, expected) in cases {
        let mut full: Vec<&str> = vec!["--dry-run"];
        full.extend(args.iter().map(String::as_str));
        let out = c.env.run(&full).await?;
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert_eq!(plan(out), expected, "{args:?}");
    }
    assert!(
        jobs_by_node(&c.cluster, &c.env.namespace).await?.is_empty(),
        "dry runs create nothing"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_deleted_mid_run_is_removed_not_failed() -> Result<()> {
    // Was: reported "failed" and counted against the failure budget (an autoscaler scaling
    // down during a rollout could stop it).
    let c = case(
        "nodedel",
        3,
        EnvOptions {
            duration: "6s".into(),
        },
    )
    .await?;
    let child = tokio::process::Command::from(c.env.command(&[
        "--selector",
        &c.selector,
        "--parallelism",
        "3",
        "--max-failures",
        "1",
    ])?)
    .spawn()?;
    wait_until(Duration::from_secs(30), "Jobs created", || async {
        Ok(jobs_by_node(&c.cluster, &c.env.namespace).await?.len() == 3)
    })
    .await?;
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    nodes.delete(&c.nodes[0], &DeleteParams::default()).await?;
    let out = child.wait_with_output().await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&c.nodes[0]))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains("removed") && line.contains("node was deleted"),
        "{t}"
    );
    assert!(
        t.contains("3 nodes: 2 succeeded, 0 failed") && t.contains("1 removed"),
        "{t}"
    );
    // Its Job is gone too (foreground deletion: once its pods are): a machine that later takes
    // the name never runs it.
    job_of_node_deleted(&c, &c.nodes[0]).await?;
    Ok(())
}

async fn job_of_node_deleted(c: &Case, node: &str) -> Result<()> {
    // Foreground deletion ends only once the Job's pod is gone, and the pod of a deleted node is
    // removed by the pod garbage collector (orphan quarantine 40 s, sweep every 20 s): under the
    // load of a full CI run that exceeded the 60 s this waited before (one CI failure seen).
    wait_until(
        Duration::from_secs(180),
        &format!("the Job pinned to {node} to be deleted"),
        || async {
            Ok(!jobs_by_node(&c.cluster, &c.env.namespace)
                .await?
                .iter()
                .any(|(_, n)| n == node))
        },
    )
    .await
}

/// A node deleted and re-created under the same name while its Job runs: the old Job (made from
/// the old machine's facts) is deleted, and once it is gone the new machine gets its own Job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_recreated_under_the_same_name_gets_a_job_for_the_new_machine() -> Result<()> {
    let c = case(
        "noderecreate",
        3,
        EnvOptions {
            duration: "8s".into(),
        },
    )
    .await?;
    let child = tokio::process::Command::from(c.env.command(&[
        "--selector",
        &c.selector,
        "--parallelism",
        "3",
    ])?)
    .spawn()?;
    wait_until(Duration::from_secs(30), "Jobs created", || async {
        Ok(jobs_by_node(&c.cluster, &c.env.namespace).await?.len() == 3)
    })
    .await?;
    let api: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    let job_name = jobs_by_node(&c.cluster, &c.env.namespace)
        .await?
        .into_iter()
        .find(|(_, n)| *n == c.nodes[0])
        .unwrap()
        .0;
    let old_job_uid = api.get(&job_name).await?.metadata.uid;
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    let old_uid = nodes.get(&c.nodes[0]).await?.metadata.uid;
    nodes.delete(&c.nodes[0], &DeleteParams::default()).await?;
    wait_until(Duration::from_secs(10), "node deleted", || async {
        Ok(nodes.get_opt(&c.nodes[0]).await?.is_none())
    })
    .await?;
    let again = c.cluster.sim_nodes(&c.env.namespace, 1, &c.spec).await?;
    assert_eq!(again[0], c.nodes[0]);
    let new_uid = nodes.get(&c.nodes[0]).await?.metadata.uid;
    assert_ne!(new_uid, old_uid, "a new node object under the same name");
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await??;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("3 nodes: 3 succeeded"), "{t}");
    let job = api.get(&job_name).await?;
    assert_ne!(
        job.metadata.uid, old_job_uid,
        "the old machine's Job was replaced"
    );
    let env = job
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .init_containers
        .unwrap()[0]
        .env
        .clone()
        .unwrap();
    let uid = env
        .iter()
        .find(|e| e.name == "KATA_NODE_UID")
        .and_then(|e| e.value.clone());
    assert_eq!(uid, new_uid, "made from the new machine's facts");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_dispatching_and_a_rerun_completes() -> Result<()> {
    let c = case(
        "sigterm",
        6,
        EnvOptions {
            duration: "3s".into(),
        },
    )
    .await?;
    let observer = ActiveObserver::start(
        &c.cluster,
        &c.env.namespace,
        "katacontainers.io/dispatcher=kata-deploy",
    );
    let child = tokio::process::Command::from(c.env.command(&[
        "--selector",
        &c.selector,
        "--parallelism",
        "2",
    ])?)
    .spawn()?;
    wait_until(Duration::from_secs(30), "first Jobs", || async {
        Ok(jobs_by_node(&c.cluster, &c.env.namespace).await?.len() >= 2)
    })
    .await?;
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id().expect("running") as i32, libc::SIGTERM) };
    let at_signal = jobs_by_node(&c.cluster, &c.env.namespace).await?.len();
    let out = child.wait_with_output().await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("interrupted"), "{t}");
    // The first two Jobs run 3 s: no slot freed before the signal, so a run that stops
    // dispatching on SIGTERM created exactly those two.
    assert_eq!(at_signal, 2, "{t}");
    assert_eq!(
        jobs_by_node(&c.cluster, &c.env.namespace).await?.len(),
        2,
        "no Job created after SIGTERM: {t}"
    );
    let out = c
        .env
        .run(&["--selector", &c.selector, "--parallelism", "2"])
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let jobs = jobs_by_node(&c.cluster, &c.env.namespace).await?;
    assert_eq!(jobs.len(), 6, "every node covered exactly once: {jobs:?}");
    assert_eq!(observer.jobs_seen(), 6, "no Job was created twice");
    assert!(observer.max_active() <= 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_owner_garbage_collects_per_node_jobs() -> Result<()> {
    let c = case("gc", 3, EnvOptions::default()).await?;
    let out = c.env.run(&["--selector", &c.selector]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(jobs_by_node(&c.cluster, &c.env.namespace).await?.len(), 3);
    let api: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    api.delete(OWNER_JOB, &DeleteParams::background()).await?;
    wait_jobs_gone(&c.cluster, &c.env.namespace, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_selection_warns_or_fails_when_nodes_are_required() -> Result<()> {
    let c = case("empty", 0, EnvOptions::default()).await?;
    let out = c.env.run(&["--selector", &c.selector]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("no node matches"));
    let out = c
        .env
        .run(&["--selector", &c.selector, "--require-nodes"])
        .await?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("drop --require-nodes"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_creates_nothing() -> Result<()> {
    let c = case("badinput", 2, EnvOptions::default()).await?;
    let dir = c.cluster.state().join(format!("bad-{}", c.env.namespace));
    std::fs::create_dir_all(&dir)?;
    let write = |name: &str, body: &str| -> String {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let good = std::fs::read_to_string(&c.env.template)?;
    let pod = write(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nspec: {containers: [{name: a, image: b}]}\n",
    );
    let pinned = write(
        "pinned.yaml",
        &good.replace(
            "restartPolicy: Never",
            "restartPolicy: Never\n      nodeName: somewhere",
        ),
    );
    let garbage = write("garbage.yaml", "{{ not yaml");
    let sel = c.selector.as_str();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--selector", "zone in (a"], "invalid label selector"),
        (vec!["--selector", sel, "--template", &pod], "is not a Job"),
        (vec!["--selector", sel, "--template", &pinned], "nodeName"),
        (
            vec!["--selector", sel, "--template", &garbage],
            "not valid YAML",
        ),
        (
            vec!["--selector", sel, "--template", "/nonexistent.yaml"],
            "cannot read template",
        ),
        (vec!["--selector", sel, "--parallelism", "0"], "parallelism"),
        (
            vec!["--selector", sel, "--owner-job", "no-such-job"],
            "owner Job \"no-such-job\" not found",
        ),
        (
            vec!["--selector", sel, "--name-prefix", "Bad_Prefix"],
            "name prefix",
        ),
        (
            vec!["--selector", sel, "--deadline", "soon"],
            "invalid duration",
        ),
    ];
    for (args, expect) in cases {
        let out = c.env.run(&args).await?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains(expect),
            "{args:?} should say {expect:?}: {}",
            text(&out)
        );
    }
    // Missing namespace: no --namespace, no POD_NAMESPACE, not in a pod.
    let mut cmd = c.env.command(&["--selector", sel])?;
    cmd.env_remove("POD_NAMESPACE");
    let out = tokio::process::Command::from(cmd).output().await?;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("no namespace"), "{}", text(&out));
    // RBAC denied: an identity without the Job rights.
    let weak = c.cluster.sa_kubeconfig(&c.env.namespace, "nobody").await?;
    let mut cmd = c.env.command(&["--selector", sel])?;
    cmd.env("KUBECONFIG", &weak);
    let out = tokio::process::Command::from(cmd).output().await?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("RBAC denied"), "{}", text(&out));
    assert!(
        jobs_by_node(&c.cluster, &c.env.namespace).await?.is_empty(),
        "bad input created nothing"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_owned_by_someone_else_is_never_touched() -> Result<()> {
    let c = case("foreign", 2, EnvOptions::default()).await?;
    // A Job with exactly the name the dispatcher would use, but not created by it.
    let name = format!("kata-deploy-{}", c.nodes[0]);
    let api: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    let foreign: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"suspend": true, "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}
    }))?;
    let uid = api
        .create(&kube::api::PostParams::default(), &foreign)
        .await?
        .metadata
        .uid;
    let out = c.env.run(&["--selector", &c.selector]).await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("is not managed by this dispatcher") && t.contains("left untouched"),
        "{t}"
    );
    assert!(t.contains("2 nodes: 1 succeeded, 1 failed"), "{t}");
    assert_eq!(
        api.get(&name).await?.metadata.uid,
        uid,
        "the foreign Job was not replaced"
    );
    Ok(())
}

/// A selected Node that never becomes Ready (no kubelet, no kwok): Ready=False and the API
/// server's not-ready taint, as a node that went down.
async fn create_not_ready_node(c: &Case, name: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    let (k, v) = c.selector.split_once('=').expect("group selector");
    let node: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": {k: v}}}))?;
    nodes.create(&Default::default(), &node).await?;
    let status = serde_json::json!({"status": {
        "conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "down"}],
        "nodeInfo": {"machineID": "down", "systemUUID": "down", "bootID": "", "kernelVersion": "", "osImage": "",
            "containerRuntimeVersion": "containerd://2.0.5", "kubeletVersion": "", "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": "amd64"}}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// A NotReady node that needs a Job: with `--unready skip` (the chart's default) the run
/// succeeds and the report names the node and what stays on it (an uninstall does not fail on
/// the one down node a fleet nearly always has); with `--unready fail` it is not-started and the
/// run fails. Either way it gets no Job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_ready_node_is_skipped_or_fails_the_run_as_the_unready_policy_says() -> Result<()> {
    let c = case("unready", 1, EnvOptions::default()).await?;
    let down = format!("{}-down", c.env.namespace);
    create_not_ready_node(&c, &down).await?;
    let run = |policy: &'static str, prefix: &'static str| {
        let sel = c.selector.clone();
        let env = &c.env;
        async move {
            env.run(&[
                "--selector",
                &sel,
                "--unready",
                policy,
                "--unready-grace",
                "3s",
                "--name-prefix",
                prefix,
            ])
            .await
        }
    };
    let out = run("skip", "kd-skip").await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let line = result_line(&out, &down);
    assert!(
        line.contains("skipped") && t.contains("Kata and the claim label"),
        "the report names the node and what stays on it: {t}"
    );
    let out = run("fail", "kd-fail").await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(result_line(&out, &down).contains("not-started"), "{t}");
    let jobs = jobs_by_node(&c.cluster, &c.env.namespace).await?;
    assert!(
        jobs.iter().all(|(_, n)| *n != down),
        "no Job on the NotReady node: {jobs:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_picks_up_a_node_labelled_late() -> Result<()> {
    let c = case("settle", 2, EnvOptions::default()).await?;
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    // Only node 0 matches at start; node 1 gets the label (as NFD would) a second later.
    let sel = format!("{},feature=yes", c.selector);
    nodes
        .patch(
            &c.nodes[0],
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"feature": "yes"}}})),
        )
        .await?;
    let mut child =
        tokio::process::Command::from(c.env.command(&["--selector", &sel, "--settle", "3s"])?)
            .spawn()?;
    // Labelled only once the dispatcher saw the first selection and waits for it to settle (a
    // label set before discovery would prove nothing about settling).
    let mut log = tokio::io::BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = log.next_line().await? {
            let settling = line.contains("waiting for the selection to settle");
            seen.push(line);
            if settling {
                return Ok(());
            }
        }
        anyhow::bail!("the dispatcher ended before settling: {seen:?}")
    })
    .await??;
    nodes
        .patch(
            &c.nodes[1],
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"feature": "yes"}}})),
        )
        .await?;
    let rest = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Ok(Some(l)) = log.next_line().await {
            lines.push(l);
        }
        lines
    });
    let out = child.wait_with_output().await?;
    let t = format!("{}{}", text(&out), rest.await?.join("\n"));
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert_eq!(
        jobs_by_node(&c.cluster, &c.env.namespace).await?.len(),
        2,
        "the late node got its Job: {t}"
    );
    Ok(())
}

// ----- the bugs of issue 15, each reproduced against the real binary -----

fn result_line(out: &std::process::Output, node: &str) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(node))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_failures_zero_never_stops_and_a_percentage_does() -> Result<()> {
    // Was: `--max-failures 0` (the chart's documented "never stop early") refused, exit 2.
    let c = case(
        "budget0",
        4,
        EnvOptions {
            duration: "1s".into(),
        },
    )
    .await?;
    kata_testbed::rollout::fail_pods_on(&c.cluster, &c.env.namespace, &c.nodes, "bad template");
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--parallelism",
            "1",
            "--max-failures",
            "0",
            "--name-prefix",
            "kd-zero",
        ])
        .await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("4 nodes: 0 succeeded, 4 failed") && !t.contains("budget spent"),
        "{t}"
    );
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--parallelism",
            "1",
            "--max-failures",
            "50%",
            "--name-prefix",
            "kd-pct",
        ])
        .await?;
    let t = text(&out);
    assert!(
        t.contains("failure budget spent (2 nodes failed)")
            && t.contains("2 failed, 2 not started"),
        "{t}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_nodes_raise_the_parallelism() -> Result<()> {
    // Was: parallelism clamped to the one node selected at discovery, never raised.
    let c = case(
        "late",
        6,
        EnvOptions {
            duration: "6s".into(),
        },
    )
    .await?;
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    let label = |n: &str| {
        let nodes = nodes.clone();
        let n = n.to_owned();
        async move {
            nodes
                .patch(
                    &n,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"metadata": {"labels": {"feature": "yes"}}})),
                )
                .await
        }
    };
    label(&c.nodes[0]).await?;
    let observer = ActiveObserver::start(
        &c.cluster,
        &c.env.namespace,
        "katacontainers.io/dispatcher=kata-deploy",
    );
    let sel = format!("{},feature=yes", c.selector);
    let child = tokio::process::Command::from(c.env.command(&[
        "--selector",
        &sel,
        "--parallelism",
        "10",
    ])?)
    .spawn()?;
    wait_until(Duration::from_secs(30), "the first Job", || async {
        Ok(!jobs_by_node(&c.cluster, &c.env.namespace).await?.is_empty())
    })
    .await?;
    for n in &c.nodes[1..] {
        label(n).await?;
    }
    let out = child.wait_with_output().await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(jobs_by_node(&c.cluster, &c.env.namespace).await?.len(), 6);
    assert!(
        observer.max_active() >= 4,
        "late nodes ran one at a time: max active {}",
        observer.max_active()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_node_that_does_not_exist_fails_with_node_not_found() -> Result<()> {
    // Was: silently dropped, exit 0.
    let c = case("missing", 1, EnvOptions::default()).await?;
    let typo = format!("{}-typo", c.nodes[0]);
    let out = c
        .env
        .run(&["--nodes", &format!("{},{typo}", c.nodes[0])])
        .await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(result_line(&out, &typo).contains("node not found"), "{t}");
    assert!(result_line(&out, &c.nodes[0]).contains("succeeded"), "{t}");
    // Every named node missing and --require-nodes: refused before anything (exit 2).
    let out = c.env.run(&["--nodes", &typo, "--require-nodes"]).await?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deselected_while_queued_is_not_dispatched() -> Result<()> {
    // Was: dispatched anyway (a privileged install on a node the user just de-selected).
    let c = case(
        "deselect",
        3,
        EnvOptions {
            duration: "4s".into(),
        },
    )
    .await?;
    let child = tokio::process::Command::from(c.env.command(&[
        "--selector",
        &c.selector,
        "--parallelism",
        "1",
    ])?)
    .spawn()?;
    wait_until(Duration::from_secs(30), "the first Job", || async {
        Ok(!jobs_by_node(&c.cluster, &c.env.namespace).await?.is_empty())
    })
    .await?;
    let first = jobs_by_node(&c.cluster, &c.env.namespace).await?[0]
        .1
        .clone();
    let other = c.nodes.iter().find(|n| **n != first).unwrap().clone();
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    nodes
        .patch(
            &other,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"kata-test/group": null}}})),
        )
        .await?;
    let out = child.wait_with_output().await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        !jobs_by_node(&c.cluster, &c.env.namespace)
            .await?
            .iter()
            .any(|(_, n)| *n == other),
        "{t}"
    );
    assert!(
        result_line(&out, &other).contains("skipped")
            && t.contains("stopped matching the selection"),
        "{t}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taints_follow_daemonset_rules_unless_ignored() -> Result<()> {
    // Was: taints never checked (nodeName bypasses the scheduler).
    let c = case("taints", 2, EnvOptions::default()).await?;
    let only_kwok = std::fs::read_to_string(&c.env.template)?.replace(
        "tolerations: [{operator: Exists}]",
        "tolerations: [{key: kwok.x-k8s.io/node, operator: Exists}]",
    );
    let template = c
        .cluster
        .state()
        .join(format!("template-taints-{}.yaml", c.env.namespace));
    std::fs::write(&template, only_kwok)?;
    let template = template.display().to_string();
    // sim_nodes lifted the API server's not-ready taint (as the node-lifecycle controller would);
    // node 1 gets a taint the template does not tolerate.
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    for (i, name) in c.nodes.iter().enumerate() {
        let mut node = nodes.get(name).await?;
        let taints = node
            .spec
            .get_or_insert_with(Default::default)
            .taints
            .get_or_insert_with(Vec::new);
        taints.retain(|t| t.key != "node.kubernetes.io/not-ready");
        if i == 1 {
            taints.push(k8s_openapi::api::core::v1::Taint {
                key: "dedicated".into(),
                value: Some("db".into()),
                effect: "NoSchedule".into(),
                ..Default::default()
            });
        }
        nodes.replace(name, &Default::default(), &node).await?;
    }
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--template",
            &template,
            "--name-prefix",
            "kd-taint",
            "--unready-grace",
            "5s",
        ])
        .await?;
    let t = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a DaemonSet would not run there either: {t}"
    );
    assert!(
        result_line(&out, &c.nodes[1]).contains("skipped") && t.contains("dedicated=db:NoSchedule"),
        "{t}"
    );
    assert_eq!(
        jobs_by_node(&c.cluster, &c.env.namespace).await?.len(),
        1,
        "{t}"
    );
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--template",
            &template,
            "--name-prefix",
            "kd-clean",
            "--ignore-taints",
        ])
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        result_line(&out, &c.nodes[1]).contains("succeeded"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waits_until_the_pod_of_an_earlier_job_is_gone() -> Result<()> {
    // Was: a Job garbage-collected in the background leaves its pod running, and the new Job on
    // the same node started beside it (two CRI restarts at once on one node).
    let c = case(
        "leftover",
        2,
        EnvOptions {
            duration: "2s".into(),
        },
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    let leftover: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "leftover", "labels": {"katacontainers.io/dispatcher": "kata-deploy", "batch.kubernetes.io/controller-uid": "gone"},
                     "annotations": {"kata-testbed/duration": "600s"}},
        "spec": {"nodeName": c.nodes[0], "restartPolicy": "Never", "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "c", "image": "quay.io/kata-containers/kata-deploy-stage:test"}]}
    }))?;
    pods.create(&Default::default(), &leftover).await?;
    let child = tokio::process::Command::from(c.env.command(&[
        "--selector",
        &c.selector,
        "--parallelism",
        "5",
    ])?)
    .spawn()?;
    wait_until(Duration::from_secs(30), "the other node's Job", || async {
        Ok(jobs_by_node(&c.cluster, &c.env.namespace)
            .await?
            .iter()
            .any(|(_, n)| *n == c.nodes[1]))
    })
    .await?;
    // The other node's Job (2 s) completes and frees a slot: a dispatcher that ignored the
    // leftover pod would have started node 0 long before (5 slots, 2 nodes).
    let jobs: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    wait_until(
        Duration::from_secs(60),
        "the other node's Job Complete",
        || async {
            Ok(jobs
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .any(|j| {
                    j.spec
                        .as_ref()
                        .and_then(|s| s.template.spec.as_ref())
                        .and_then(|p| p.node_name.as_deref())
                        == Some(c.nodes[1].as_str())
                        && j.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) > 0
                }))
        },
    )
    .await?;
    assert!(
        !jobs_by_node(&c.cluster, &c.env.namespace)
            .await?
            .iter()
            .any(|(_, n)| *n == c.nodes[0]),
        "no Job beside the leftover pod"
    );
    pods.delete(
        "leftover",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await??;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        result_line(&out, &c.nodes[0]).contains("succeeded"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_timeout_frees_the_slot() -> Result<()> {
    // Was: a Job whose pod never finishes held its slot until the run deadline.
    let c = case(
        "nodetimeout",
        2,
        EnvOptions {
            duration: "600s".into(),
        },
    )
    .await?;
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--parallelism",
            "1",
            "--node-timeout",
            "3s",
            "--max-failures",
            "0",
        ])
        .await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("2 nodes: 0 succeeded, 2 failed") && t.contains("per-node timeout (3s)"),
        "both nodes were tried in turn: {t}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_checks_every_right_and_discovery_is_bounded() -> Result<()> {
    // Was: the preflight missed get/list jobs (and now pods watch, events create); a run without
    // them failed half-way instead of creating nothing.
    let c = case("preflight", 1, EnvOptions::default()).await?;
    let role: Api<k8s_openapi::api::rbac::v1::Role> =
        Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    let full = role.get("dispatcher").await?;
    let mut r = full.clone();
    r.rules
        .as_mut()
        .unwrap()
        .retain(|rule| rule.resources.as_deref() != Some(&["pods".to_string()][..]));
    role.replace("dispatcher", &Default::default(), &r).await?;
    let out = c.env.run(&["--selector", &c.selector]).await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("RBAC denied") && t.contains("pods"), "{t}");
    assert!(jobs_by_node(&c.cluster, &c.env.namespace).await?.is_empty());
    // Discovery has a bound (with every right back: a denied list raced the 1 ms bound, and
    // sometimes won, failing this check with "RBAC denied").
    let mut back = role.get("dispatcher").await?;
    back.rules = full.rules;
    role.replace("dispatcher", &Default::default(), &back)
        .await?;
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--dry-run",
            "--discovery-timeout",
            "1ms",
        ])
        .await?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("did not finish within 1ms"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_events_on_the_node_and_an_unchanged_upgrade_creates_no_job() -> Result<()> {
    let c = case("upgrade", 3, EnvOptions::default()).await?;
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--skip-installed",
            "--run-id",
            "first",
        ])
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // `kubectl describe node` lists Events whose involvedObject is the Node (by name and UID).
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(c.cluster.client.clone(), "default");
    let uid = Api::<Node>::all(c.cluster.client.clone())
        .get(&c.nodes[0])
        .await?
        .metadata
        .uid
        .unwrap();
    let fs = format!(
        "involvedObject.kind=Node,involvedObject.name={},involvedObject.uid={uid}",
        c.nodes[0]
    );
    let found = events.list(&ListParams::default().fields(&fs)).await?.items;
    assert!(
        found
            .iter()
            .any(|e| e.reason.as_deref() == Some("KataDeploySucceeded")),
        "{found:?}"
    );
    // An upgrade (new run) with the same template: nothing to do, no Job.
    let api: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    let before: BTreeSet<_> = api
        .list(&ListParams::default().labels("katacontainers.io/dispatcher=kata-deploy"))
        .await?
        .items
        .into_iter()
        .filter_map(|j| j.metadata.uid)
        .collect();
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--skip-installed",
            "--run-id",
            "second",
        ])
        .await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("3 already installed"), "{t}");
    let after: BTreeSet<_> = api
        .list(&ListParams::default().labels("katacontainers.io/dispatcher=kata-deploy"))
        .await?
        .items
        .into_iter()
        .filter_map(|j| j.metadata.uid)
        .collect();
    assert_eq!(before, after, "no Job created or replaced");
    // A changed template: every node runs again.
    let changed = c
        .cluster
        .state()
        .join(format!("template-changed-{}.yaml", c.env.namespace));
    std::fs::write(&changed, kata_testbed::rollout::per_node_template("2s"))?;
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--skip-installed",
            "--run-id",
            "third",
            "--template",
            &changed.display().to_string(),
        ])
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("3 nodes: 3 succeeded"),
        "{}",
        text(&out)
    );
    Ok(())
}

/// The retire run of an upgrade: the cleanup template on the nodes the install selection no longer
/// covers, and only there; each retired node loses its install record, so selecting it again
/// later installs it again instead of reporting "already installed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_runs_only_on_nodes_left_out_of_the_selection_and_forgets_their_record() -> Result<()>
{
    let c = case("retire", 3, EnvOptions::default()).await?;
    let record = "katacontainers.io/installed-by-kata-deploy";
    run_ok(
        &c,
        &[
            "--selector",
            &c.selector,
            "--skip-installed",
            "--run-id",
            "install",
        ],
    )
    .await?;
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    let recorded = |n: Node| {
        n.metadata
            .annotations
            .unwrap_or_default()
            .contains_key(record)
    };
    for n in &c.nodes {
        assert!(recorded(nodes.get(n).await?), "{n}: install recorded");
    }
    // The user narrows the install to the nodes not labelled pool=gone; nodes[0] falls out.
    let pool = serde_json::json!({"metadata": {"labels": {"kata-test/pool": "gone"}}});
    nodes
        .patch(&c.nodes[0], &PatchParams::default(), &Patch::Merge(pool))
        .await?;
    let install_selection = format!("{},kata-test/pool!=gone", c.selector);
    let t = run_ok(
        &c,
        &[
            "--name-prefix",
            "kd-retire",
            "--selector",
            &c.selector,
            "--except-selector",
            &install_selection,
            "--ignore-taints",
            "--forget-record",
            "kata-deploy",
            "--run-id",
            "retire",
        ],
    )
    .await?;
    assert!(t.contains("1 nodes: 1 succeeded"), "{t}");
    let jobs: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    let retired: Vec<String> = jobs
        .list(&ListParams::default().labels("katacontainers.io/dispatcher=kd-retire"))
        .await?
        .items
        .into_iter()
        .filter_map(|j| j.spec?.template.spec?.node_name)
        .collect();
    assert_eq!(
        retired,
        [c.nodes[0].clone()],
        "one Job, on the retired node only"
    );
    assert!(
        !recorded(nodes.get(&c.nodes[0]).await?),
        "the retired node's install record is removed"
    );
    for n in &c.nodes[1..] {
        assert!(
            recorded(nodes.get(n).await?),
            "{n}: still installed, record kept"
        );
    }
    // Selected again: installed again (no stale "already installed").
    let t = run_ok(
        &c,
        &[
            "--selector",
            &c.selector,
            "--skip-installed",
            "--run-id",
            "again",
        ],
    )
    .await?;
    assert!(
        t.contains("1 succeeded") && t.contains("2 already installed"),
        "{t}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_first_stops_the_install_dispatcher_and_waits_for_its_jobs() -> Result<()> {
    // Was: `helm uninstall` during a long install let install and cleanup Jobs interleave on
    // one node. The install dispatcher runs as a process here; deleting its Job stands for
    // deleting its pod, so the test kills the process when its Job disappears.
    let c = case(
        "supersede",
        3,
        EnvOptions {
            duration: "5s".into(),
        },
    )
    .await?;
    let api: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    kata_testbed::rollout::create_owner_job(&c.cluster, &c.env.namespace, "install-owner").await?;
    let mut install = tokio::process::Command::from(c.env.command(&[
        "--selector",
        &c.selector,
        "--parallelism",
        "1",
        "--name-prefix",
        "kd-install",
        "--owner-job",
        "install-owner",
    ])?)
    .spawn()?;
    // A per-node Job of the install (not install-owner, which exists from the start: waiting
    // for "any Job" let the cleanup run before the install had created anything).
    let install_jobs = ListParams::default().labels("katacontainers.io/dispatcher=kd-install");
    wait_until(
        Duration::from_secs(30),
        "an install per-node Job",
        || async { Ok(!api.list(&install_jobs).await?.items.is_empty()) },
    )
    .await?;
    let timeline = InstallCleanupTimeline::start(&c.cluster, &c.env.namespace).await?;
    let killer = {
        let api = api.clone();
        tokio::spawn(async move {
            let gone = async {
                while api.get_opt("install-owner").await.ok().flatten().is_some() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(120), gone).await;
            let _ = install.kill().await;
        })
    };
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--parallelism",
            "3",
            "--name-prefix",
            "kd-cleanup",
            "--supersede-job",
            "install-owner",
            "--supersede-prefix",
            "kd-install",
        ])
        .await?;
    let t = text(&out);
    killer.await?;
    assert_eq!(out.status.code(), Some(0), "{t}");
    // Seen by the test's own watches, not the dispatcher's log: the last install Job or pod
    // deleted before the first cleanup Job appeared.
    let (last_install_gone, first_cleanup) = timeline.get();
    let (gone, first) = (
        last_install_gone.context("no install Job or pod deletion seen")?,
        first_cleanup.context("no cleanup Job seen")?,
    );
    assert!(
        gone <= first,
        "a cleanup Job appeared {:?} before the last install Job or pod was gone: {t}",
        gone - first
    );
    let left = api
        .list(&ListParams::default().labels("katacontainers.io/dispatcher=kd-install"))
        .await?
        .items;
    assert!(left.is_empty(), "{left:?}");
    Ok(())
}

/// When, seen by independent watches, the last Job or pod of `kd-install` was deleted and the
/// first Job of `kd-cleanup` appeared.
struct InstallCleanupTimeline(std::sync::Arc<std::sync::Mutex<(Option<Instant>, Option<Instant>)>>);

impl InstallCleanupTimeline {
    /// Returns once both watches have listed what exists (a deletion before that would be
    /// missed: CI once deleted the install's Jobs before the first list answered).
    async fn start(cluster: &TestCluster, ns: &str) -> Result<Self> {
        use futures::StreamExt;
        use kube::runtime::watcher::{self, Event};
        let seen = std::sync::Arc::new(std::sync::Mutex::new((None, None)));
        let label = |m: &kube::api::ObjectMeta| {
            m.labels
                .as_ref()
                .and_then(|l| l.get("katacontainers.io/dispatcher").cloned())
                .unwrap_or_default()
        };
        let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
        let s = seen.clone();
        let (jobs_listed, jobs_ready) = tokio::sync::oneshot::channel::<()>();
        let mut jobs_listed = Some(jobs_listed);
        tokio::spawn(async move {
            let mut w = Box::pin(watcher::watcher(jobs, watcher::Config::default()));
            while let Some(Ok(ev)) = w.next().await {
                let now = Instant::now();
                let mut g = s.lock().expect("lock");
                match ev {
                    Event::InitDone => {
                        if let Some(tx) = jobs_listed.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Delete(j) if label(&j.metadata) == "kd-install" => g.0 = Some(now),
                    Event::Apply(j) | Event::InitApply(j) if label(&j.metadata) == "kd-cleanup" => {
                        g.1.get_or_insert(now);
                    }
                    _ => {}
                }
            }
        });
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
        let s = seen.clone();
        let (pods_listed, pods_ready) = tokio::sync::oneshot::channel::<()>();
        let mut pods_listed = Some(pods_listed);
        tokio::spawn(async move {
            let mut w = Box::pin(watcher::watcher(pods, watcher::Config::default()));
            while let Some(Ok(ev)) = w.next().await {
                match ev {
                    Event::InitDone => {
                        if let Some(tx) = pods_listed.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Delete(p) if label(&p.metadata) == "kd-install" => {
                        s.lock().expect("lock").0 = Some(Instant::now());
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), async {
            jobs_ready.await?;
            pods_ready.await
        })
        .await
        .context("the test's Job and Pod watches did not list within 30 s")??;
        Ok(Self(seen))
    }

    fn get(&self) -> (Option<Instant>, Option<Instant>) {
        *self.0.lock().expect("lock")
    }
}

/// Lets the case's dispatcher patch ConfigMap `name` (what the chart grants for the rollout
/// summary) and creates it empty, as the chart does.
async fn summary_configmap(c: &Case, name: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::api::PostParams;
    let ns = &c.env.namespace;
    let client = c.cluster.client.clone();
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cm)
        .await?;
    let role: Role = serde_json::from_value(serde_json::json!({"metadata": {"name": "summary"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["patch"]}]}))?;
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &role)
        .await?;
    let rb: RoleBinding = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "summary"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "summary"},
        "subjects": [{"kind": "ServiceAccount", "name": kata_testbed::rollout::DISPATCHER_SA, "namespace": ns}]}),
    )?;
    Api::<RoleBinding>::namespaced(client, ns)
        .create(&PostParams::default(), &rb)
        .await?;
    Ok(())
}

/// The canary on the real control plane: the first node's Job fails, so no other node ever gets
/// a Job (the failure budget allows more), the run fails naming the canary node, and the rollout
/// summary (written by the dispatcher as its ServiceAccount) names the canary and its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failure_stops_the_rollout_before_any_other_node_gets_a_job() -> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let c = case(
        "canary",
        6,
        EnvOptions {
            duration: "2s".into(),
        },
    )
    .await?;
    summary_configmap(&c, "rollout").await?;
    let observer = ActiveObserver::start(
        &c.cluster,
        &c.env.namespace,
        "katacontainers.io/dispatcher=kd-install",
    );
    kata_testbed::rollout::fail_pods_on(&c.cluster, &c.env.namespace, &c.nodes, "bad template");
    let out = c
        .env
        .run(&[
            "--selector",
            &c.selector,
            "--name-prefix",
            "kd-install",
            "--parallelism",
            "3",
            "--max-failures",
            "0",
            "--canary",
            "auto",
            "--summary-configmap",
            "rollout",
            "--summary-key",
            "install",
        ])
        .await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let jobs = jobs_by_node(&c.cluster, &c.env.namespace).await?;
    assert_eq!(jobs.len(), 1, "only the canary got a Job: {jobs:?}\n{t}");
    assert_eq!(observer.jobs_seen(), 1, "no other Job ever existed");
    let canary = &jobs[0].1;
    assert!(
        t.contains(&format!("canary node {canary} failed")) && t.contains("5 not started"),
        "{t}"
    );
    assert!(t.contains(&format!("canary (failed): {canary}")), "{t}");
    let cm = Api::<ConfigMap>::namespaced(c.cluster.client.clone(), &c.env.namespace)
        .get("rollout")
        .await?;
    let s: serde_yaml::Value = serde_yaml::from_str(
        cm.data
            .unwrap_or_default()
            .get("install")
            .map(String::as_str)
            .unwrap_or_default(),
    )?;
    assert_eq!(s["phase"], "failed", "{s:?}");
    assert_eq!(
        s["canary"]["nodes"][0].as_str(),
        Some(canary.as_str()),
        "{s:?}"
    );
    assert_eq!(s["canary"]["state"], "failed", "{s:?}");
    assert_eq!(s["counts"]["not-started"], 5, "{s:?}");
    let reason = s["failedNodes"][canary.as_str()]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("bad template"), "{s:?}");
    assert!(
        s["stopped"].as_str().unwrap_or_default().contains("canary"),
        "{s:?}"
    );
    Ok(())
}

/// Creates a suspended Job with these labels (an active dispatcher run of another role).
async fn fake_run(c: &Case, name: &str, role: &str) -> Result<()> {
    use kube::api::PostParams;
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app.kubernetes.io/instance": "rel", "katacontainers.io/dispatcher-role": role}},
        "spec": {"suspend": true, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "dispatcher", "image": "quay.io/kata-containers/kata-deploy-job-dispatcher:test"}]}}}
    }))?;
    Api::<Job>::namespaced(c.cluster.client.clone(), &c.env.namespace)
        .create(&PostParams::default(), &job)
        .await?;
    Ok(())
}

/// Single flight on the real control plane: a reconcile run yields (exit 0, no Job) while a hook
/// run of the release is active; a hook run first deletes the release's reconcile runs (waiting
/// until they are gone) and then dispatches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_runs_yield_to_hook_runs_and_hook_runs_stop_reconcile_runs() -> Result<()> {
    let c = case("flight", 2, EnvOptions::default()).await?;
    let hooks = "app.kubernetes.io/instance=rel,katacontainers.io/dispatcher-role in (install,retire,cleanup)";
    let reconciles =
        "app.kubernetes.io/instance=rel,katacontainers.io/dispatcher-role in (reconcile)";
    fake_run(&c, "hook-install", "install").await?;
    let t = run_ok(&c, &["--selector", &c.selector, "--yield-to", hooks]).await?;
    assert!(t.contains("yields and does nothing"), "{t}");
    let per_node = |jobs: Vec<(String, String)>| {
        jobs.into_iter()
            .filter(|(n, _)| !n.starts_with("hook-") && !n.starts_with("rec-"))
            .count()
    };
    assert_eq!(
        per_node(jobs_by_node(&c.cluster, &c.env.namespace).await?),
        0,
        "a yielding run creates nothing"
    );

    let jobs: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    jobs.delete("hook-install", &DeleteParams::background())
        .await?;
    fake_run(&c, "rec-1", "reconcile").await?;
    let t = run_ok(
        &c,
        &["--selector", &c.selector, "--supersede-runs", reconciles],
    )
    .await?;
    assert!(t.contains("stopping a scheduled reconcile run"), "{t}");
    assert!(
        jobs.get_opt("rec-1").await?.is_none(),
        "the reconcile run is gone"
    );
    assert_eq!(
        per_node(jobs_by_node(&c.cluster, &c.env.namespace).await?),
        2,
        "then the hook run dispatched"
    );
    Ok(())
}

/// The dispatcher's share of the node state label on the real API server, as its
/// ServiceAccount: `pending` on every node right before its Job is created, `failed` on a node
/// whose Job failed (simulated nodes run no stage, so nothing writes installing/installed), one
/// node patch per created Job plus one per failure, and nothing at all per node on an unchanged
/// re-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_writes_pending_and_failed_and_nothing_on_an_unchanged_rerun() -> Result<()>
{
    const KEY: &str = "katacontainers.io/kata-deploy-state";
    let c = case("state", 4, EnvOptions::default()).await?;
    kata_testbed::rollout::fail_pods_on(&c.cluster, &c.env.namespace, &c.nodes[..1], "no /dev/kvm");
    let patches = || -> Result<usize> {
        Ok(audit_by_resource(&c.cluster, &c.env.user)?
            .get(&("patch".to_string(), "nodes".to_string()))
            .copied()
            .unwrap_or(0))
    };
    let flags = |run: &'static str| {
        vec![
            "--selector".to_string(),
            c.selector.clone(),
            "--skip-installed".into(),
            "--state-label".into(),
            KEY.into(),
            "--max-failures".into(),
            "0".into(),
            "--run-id".into(),
            run.into(),
        ]
    };
    let args = flags("first");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.env.run(&args).await?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    let state = |n: &String| {
        let nodes = nodes.clone();
        let n = n.clone();
        async move {
            Ok::<_, anyhow::Error>(
                nodes
                    .get(&n)
                    .await?
                    .metadata
                    .labels
                    .unwrap_or_default()
                    .get(KEY)
                    .cloned(),
            )
        }
    };
    assert_eq!(state(&c.nodes[0]).await?.as_deref(), Some("failed"));
    for n in &c.nodes[1..] {
        assert_eq!(
            state(n).await?.as_deref(),
            Some("pending"),
            "{n}: no stage runs on kwok"
        );
    }
    // 4 pending + 1 failed + 3 install records.
    let first = patches()?;
    assert_eq!(first, 8, "node patches of the first run");
    // Unchanged re-run: the failed node runs again (pending, then failed), the others get nothing.
    let args = flags("second");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.env.run(&args).await?;
    let t = text(&out);
    assert!(t.contains("3 already installed"), "{t}");
    assert_eq!(
        patches()? - first,
        2,
        "only the failed node's pending and failed: {t}"
    );
    Ok(())
}
