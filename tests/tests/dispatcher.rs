//! The real dispatcher binary against the real control plane (simulated kwok nodes), running as a
//! ServiceAccount with exactly the rights the chart grants.

use anyhow::Result;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kata_testbed::cluster::{wait_until, TestCluster};
use kata_testbed::rollout::{jobs_by_node, output_text, wait_jobs_gone, ActiveObserver, EnvOptions, SimCase as Case, OWNER_JOB};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

async fn case(name: &str, nodes: usize, opts: EnvOptions) -> Result<Case> {
    Case::new(TestCluster::get().await?, name, nodes, &opts).await
}

fn text(out: &std::process::Output) -> String {
    output_text(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_per_node_paced_owned_and_least_privileged() -> Result<()> {
    let c = case("paced", 10, EnvOptions::default()).await?;
    let observer = ActiveObserver::start(&c.cluster, &c.env.namespace, "katacontainers.io/dispatcher=kd-install");
    let out = c.env.run(&["--selector", &c.selector, "--parallelism", "3", "--name-prefix", "kd-install"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let jobs = jobs_by_node(&c.cluster, &c.env.namespace).await?;
    let pinned: BTreeSet<&str> = jobs.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(jobs.len(), c.nodes.len(), "exactly one Job per node: {jobs:?}");
    assert_eq!(pinned, c.nodes.iter().map(String::as_str).collect(), "every node pinned once");
    assert!(observer.max_active() <= 3, "observed {} active Jobs with parallelism 3", observer.max_active());
    assert!(observer.max_active() >= 2, "pacing should run Jobs in parallel, observed {}", observer.max_active());

    // ownerReference to the dispatcher's Job, non-controller; node facts in the environment.
    let api: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    let owner_uid = api.get(OWNER_JOB).await?.metadata.uid.unwrap();
    let job = api.get(&jobs[0].0).await?;
    let oref = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((oref.uid.as_str(), oref.controller, oref.block_owner_deletion), (owner_uid.as_str(), Some(false), Some(false)));
    let env = job.spec.unwrap().template.spec.unwrap().init_containers.unwrap()[0].env.clone().unwrap();
    let get = |k: &str| env.iter().find(|e| e.name == k).and_then(|e| e.value.clone()).unwrap_or_default();
    assert_eq!(get("KATA_NODE_NAME"), jobs[0].1);
    assert_eq!(get("KATA_NODE_CONTAINER_RUNTIME_VERSION"), "containerd://2.0.5");
    assert_eq!(get("KATA_NODE_MACHINE_ID").len(), 32);

    // Requests per node from the audit log (happy path target: at most 3).
    let requests = c.cluster.audit_requests(&c.env.user)?;
    let total: usize = requests.values().sum();
    eprintln!("dispatcher requests: {requests:?} = {:.2} per node", total as f64 / c.nodes.len() as f64);
    assert_eq!(requests.get("create").copied().unwrap_or(0), c.nodes.len() + 5, "one create per node plus 5 access reviews");

    // The identity can do nothing beyond its rights.
    let sa = c.cluster.sa_client(&c.env.namespace, "dispatcher").await?;
    let pods: Api<Pod> = Api::namespaced(sa.clone(), &c.env.namespace);
    assert_forbidden(pods.list(&ListParams::default()).await.map(|_| ()), "list pods");
    let nodes: Api<Node> = Api::all(sa.clone());
    assert_forbidden(nodes.delete(&c.nodes[0], &DeleteParams::default()).await.map(|_| ()), "delete nodes");
    let patch = serde_json::json!({"metadata": {"labels": {"x": "y"}}});
    assert_forbidden(nodes.patch(&c.nodes[0], &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ()), "patch nodes");
    let other_jobs: Api<Job> = Api::namespaced(sa, "default");
    assert_forbidden(other_jobs.list(&ListParams::default()).await.map(|_| ()), "list jobs in another namespace");
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
    let observer = ActiveObserver::start(&c.cluster, &c.env.namespace, "katacontainers.io/dispatcher=kata-deploy");
    let out = c.env.run(&["--selector", &c.selector, "--parallelism", "2"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let api: Api<Job> = Api::namespaced(c.cluster.client.clone(), &c.env.namespace);
    let uids = |list: Vec<Job>| list.into_iter().filter_map(|j| j.metadata.uid).collect::<BTreeSet<_>>();
    let before = uids(api.list(&ListParams::default().labels("katacontainers.io/dispatcher=kata-deploy")).await?.items);

    // Same owner (same run): adopted, nothing created.
    let creates_before = c.cluster.audit_requests(&c.env.user)?.get("create").copied().unwrap_or(0);
    let out = c.env.run(&["--selector", &c.selector, "--parallelism", "2"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let creates_after = c.cluster.audit_requests(&c.env.user)?.get("create").copied().unwrap_or(0);
    assert_eq!(creates_after - creates_before, 5, "a re-run of the same run creates no Job (only the 5 access reviews)");
    let same = uids(api.list(&ListParams::default().labels("katacontainers.io/dispatcher=kata-deploy")).await?.items);
    assert_eq!(before, same, "adopted, not duplicated");

    // A new run (helm upgrade: new owner UID) replaces every Job, still never above parallelism.
    api.delete(OWNER_JOB, &DeleteParams::background()).await?;
    wait_jobs_gone(&c.cluster, &c.env.namespace, Duration::from_secs(60)).await?;
    kata_testbed::rollout::create_owner_job(&c.cluster, &c.env.namespace, OWNER_JOB).await?;
    let out = c.env.run(&["--selector", &c.selector, "--parallelism", "2"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let after = uids(api.list(&ListParams::default().labels("katacontainers.io/dispatcher=kata-deploy")).await?.items);
    assert_eq!(after.len(), 6);
    assert!(after.is_disjoint(&before));
    assert!(observer.max_active() <= 2, "observed {} active", observer.max_active());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_jobs_of_an_earlier_run_are_replaced_within_parallelism() -> Result<()> {
    // Jobs of an earlier run still running when the next run starts must count against
    // parallelism until they are gone.
    let c = case("stale", 4, EnvOptions { duration: "4s".into(), ..Default::default() }).await?;
    let observer = ActiveObserver::start(&c.cluster, &c.env.namespace, "katacontainers.io/dispatcher=kata-deploy");
    let mut first = tokio::process::Command::from(c.env.command(&["--selector", &c.selector, "--parallelism", "2", "--run-id", "run-a"])?)
        .spawn()?;
    wait_until(Duration::from_secs(30), "two running Jobs", || async { Ok(jobs_by_node(&c.cluster, &c.env.namespace).await?.len() == 2) }).await?;
    first.kill().await?;
    let out = c.env.run(&["--selector", &c.selector, "--parallelism", "2", "--run-id", "run-b"]).await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("replacing the Job of an earlier run"), "{}", text(&out));
    assert_eq!(jobs_by_node(&c.cluster, &c.env.namespace).await?.len(), 4);
    assert!(observer.max_active() <= 2, "observed {} active Jobs with parallelism 2", observer.max_active());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_nodes_are_named_with_the_reason_and_exit_nonzero() -> Result<()> {
    let c = case("fail", 5, EnvOptions { duration: "3s".into(), grant_pods_list: true }).await?;
    let bad = vec![c.nodes[1].clone(), c.nodes[3].clone()];
    kata_testbed::rollout::fail_pods_on(&c.cluster, &c.env.namespace, &bad, "no /dev/kvm on this host");
    let out = c.env.run(&["--selector", &c.selector, "--parallelism", "5"]).await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let failed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("failed"))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(failed, bad.iter().cloned().collect(), "{t}");
    assert!(t.contains("container label exited 3") && t.contains(": no /dev/kvm on this host"), "termination message in the report: {t}");
    assert!(t.contains("5 nodes: 3 succeeded, 2 failed"), "{t}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_budget_stops_new_dispatches() -> Result<()> {
    let c = case("budget", 8, EnvOptions { duration: "2s".into(), ..Default::default() }).await?;
    kata_testbed::rollout::fail_pods_on(&c.cluster, &c.env.namespace, &c.nodes, "bad template");
    let out = c.env.run(&["--selector", &c.selector, "--parallelism", "1", "--max-failures", "2"]).await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert_eq!(jobs_by_node(&c.cluster, &c.env.namespace).await?.len(), 2, "no Job after the budget is spent: {t}");
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
        nodes.patch(node, &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {"labels": map}}))).await?;
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
        (vec!["--selector".into(), format!("{g},zone=a")], [0, 3].into()),
        (vec!["--selector".into(), format!("{g},zone==b")], [1].into()),
        (vec!["--selector".into(), format!("{g},zone!=a")], [1, 2, 4].into()),
        (vec!["--selector".into(), format!("{g},zone in (b,c)")], [1, 2].into()),
        (vec!["--selector".into(), format!("{g},zone notin (a)")], [1, 2, 4].into()),
        (vec!["--selector".into(), format!("{g},gpu")], [0, 1].into()),
        (vec!["--selector".into(), format!("{g},!zone")], [4].into()),
        (vec!["--selector".into(), format!("{g},gpu=yes"), "--selector".into(), format!("{g},role=cp")], [0, 3].into()),
        (vec!["--nodes".into(), format!("{},{}", c.nodes[2], c.nodes[4]), "--selector".into(), format!("{g},zone=a")], [2, 4].into()),
    ];
    for (args, expected) in cases {
        let mut full: Vec<&str> = vec!["--dry-run"];
        full.extend(args.iter().map(String::as_str));
        let out = c.env.run(&full).await?;
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert_eq!(plan(out), expected, "{args:?}");
    }
    assert!(jobs_by_node(&c.cluster, &c.env.namespace).await?.is_empty(), "dry runs create nothing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_deleted_mid_run_fails_only_that_node() -> Result<()> {
    let c = case("nodedel", 3, EnvOptions { duration: "6s".into(), ..Default::default() }).await?;
    let child = tokio::process::Command::from(c.env.command(&["--selector", &c.selector, "--parallelism", "3"])?).spawn()?;
    wait_until(Duration::from_secs(30), "Jobs created", || async { Ok(jobs_by_node(&c.cluster, &c.env.namespace).await?.len() == 3) }).await?;
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    nodes.delete(&c.nodes[0], &DeleteParams::default()).await?;
    let out = child.wait_with_output().await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let line = String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with(&c.nodes[0])).unwrap_or_default().to_owned();
    assert!(line.contains("failed") && line.contains("node was deleted"), "{t}");
    assert!(t.contains("3 nodes: 2 succeeded, 1 failed"), "{t}");
    // Its Job is gone too (foreground deletion: once its pods are): a machine that later takes
    // the name never runs it.
    job_of_node_deleted(&c, &c.nodes[0]).await?;
    Ok(())
}

async fn job_of_node_deleted(c: &Case, node: &str) -> Result<()> {
    wait_until(Duration::from_secs(60), &format!("the Job pinned to {node} to be deleted"), || async {
        Ok(!jobs_by_node(&c.cluster, &c.env.namespace).await?.iter().any(|(_, n)| n == node))
    })
    .await
}

/// A node deleted and re-created under the same name while its Job runs: reported, its Job
/// deleted (the new machine is not touched by a Job made from the old one's facts), no hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_recreated_under_the_same_name_is_reported_and_not_touched() -> Result<()> {
    let c = case("noderecreate", 3, EnvOptions { duration: "8s".into(), ..Default::default() }).await?;
    let child = tokio::process::Command::from(c.env.command(&["--selector", &c.selector, "--parallelism", "3"])?).spawn()?;
    wait_until(Duration::from_secs(30), "Jobs created", || async { Ok(jobs_by_node(&c.cluster, &c.env.namespace).await?.len() == 3) }).await?;
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    let old_uid = nodes.get(&c.nodes[0]).await?.metadata.uid;
    nodes.delete(&c.nodes[0], &DeleteParams::default()).await?;
    wait_until(Duration::from_secs(10), "node deleted", || async { Ok(nodes.get_opt(&c.nodes[0]).await?.is_none()) }).await?;
    let again = c.cluster.sim_nodes(&c.env.namespace, 1, &c.spec).await?;
    assert_eq!(again[0], c.nodes[0]);
    assert_ne!(nodes.get(&c.nodes[0]).await?.metadata.uid, old_uid, "a new node object under the same name");
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await??;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let line = String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with(&c.nodes[0])).unwrap_or_default().to_owned();
    assert!(line.contains("failed") && (line.contains("node was deleted") || line.contains("re-created")), "{t}");
    assert!(t.contains("3 nodes: 2 succeeded, 1 failed"), "{t}");
    job_of_node_deleted(&c, &c.nodes[0]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_dispatching_and_a_rerun_completes() -> Result<()> {
    let c = case("sigterm", 6, EnvOptions { duration: "3s".into(), ..Default::default() }).await?;
    let observer = ActiveObserver::start(&c.cluster, &c.env.namespace, "katacontainers.io/dispatcher=kata-deploy");
    let child = tokio::process::Command::from(c.env.command(&["--selector", &c.selector, "--parallelism", "2"])?).spawn()?;
    wait_until(Duration::from_secs(30), "first Jobs", || async { Ok(jobs_by_node(&c.cluster, &c.env.namespace).await?.len() >= 2) }).await?;
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id().expect("running") as i32, libc::SIGTERM) };
    let out = child.wait_with_output().await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("interrupted"), "{t}");
    let out = c.env.run(&["--selector", &c.selector, "--parallelism", "2"]).await?;
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
    let out = c.env.run(&["--selector", &c.selector, "--require-nodes"]).await?;
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
    let pod = write("pod.yaml", "apiVersion: v1\nkind: Pod\nspec: {containers: [{name: a, image: b}]}\n");
    let pinned = write("pinned.yaml", &good.replace("restartPolicy: Never", "restartPolicy: Never\n      nodeName: somewhere"));
    let garbage = write("garbage.yaml", "{{ not yaml");
    let sel = c.selector.as_str();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--selector", "zone in (a"], "invalid label selector"),
        (vec!["--selector", sel, "--template", &pod], "is not a Job"),
        (vec!["--selector", sel, "--template", &pinned], "nodeName"),
        (vec!["--selector", sel, "--template", &garbage], "not valid YAML"),
        (vec!["--selector", sel, "--template", "/nonexistent.yaml"], "cannot read template"),
        (vec!["--selector", sel, "--parallelism", "0"], "parallelism"),
        (vec!["--selector", sel, "--owner-job", "no-such-job"], "owner Job \"no-such-job\" not found"),
        (vec!["--selector", sel, "--name-prefix", "Bad_Prefix"], "name prefix"),
        (vec!["--selector", sel, "--deadline", "soon"], "invalid duration"),
    ];
    for (args, expect) in cases {
        let out = c.env.run(&args).await?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(expect), "{args:?} should say {expect:?}: {}", text(&out));
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
    assert!(jobs_by_node(&c.cluster, &c.env.namespace).await?.is_empty(), "bad input created nothing");
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
    let uid = api.create(&kube::api::PostParams::default(), &foreign).await?.metadata.uid;
    let out = c.env.run(&["--selector", &c.selector]).await?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("is not managed by this dispatcher") && t.contains("left untouched"), "{t}");
    assert!(t.contains("2 nodes: 1 succeeded, 1 failed"), "{t}");
    assert_eq!(api.get(&name).await?.metadata.uid, uid, "the foreign Job was not replaced");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_picks_up_a_node_labelled_late() -> Result<()> {
    let c = case("settle", 2, EnvOptions::default()).await?;
    let nodes: Api<Node> = Api::all(c.cluster.client.clone());
    // Only node 0 matches at start; node 1 gets the label (as NFD would) a second later.
    let sel = format!("{},feature=yes", c.selector);
    nodes.patch(&c.nodes[0], &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {"labels": {"feature": "yes"}}}))).await?;
    let child = tokio::process::Command::from(c.env.command(&["--selector", &sel, "--settle", "3s"])?).spawn()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    nodes.patch(&c.nodes[1], &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {"labels": {"feature": "yes"}}}))).await?;
    let out = child.wait_with_output().await?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(jobs_by_node(&c.cluster, &c.env.namespace).await?.len(), 2, "the late node got its Job: {}", text(&out));
    Ok(())
}
