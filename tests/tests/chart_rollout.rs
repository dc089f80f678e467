//! The chart's rollout controls end to end on the test bed (issue 23): the per-node Jobs' failure
//! policy on the real Job controller, the node state label and the rollout summary, startup
//! taints and the node-scope policy, the reconcile CronJob. Real helm, real API server, the real
//! dispatcher and stage binaries on local nodes.

mod common;

use anyhow::{bail, Context, Result};
use common::{helm_uninstall, labels_of, mtimes, nodes_as, Bed, KATA_LABEL};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kata_testbed::cluster::{repo_root, wait_until, SimNode, TestCluster};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;
use std::time::Duration;

/// The chart's per-node install Job template as rendered with `sets`, as JSON.
async fn rendered_install_template(
    cluster: &TestCluster,
    sets: &[&str],
) -> Result<serde_json::Value> {
    let chart = repo_root().join("chart/kata-deploy");
    let mut cmd = cluster.helm();
    cmd.args(["template", "kd", chart.to_str().expect("utf-8")])
        // --validate: the real API server's version and APIs (Capabilities), as helm install.
        .args(["--validate", "--show-only", "templates/job-templates.yaml"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .context("helm template timed out")??;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    let cm: serde_json::Value = serde_yaml::from_slice(&out.stdout)?;
    let text = cm["data"]["install-job.yaml"]
        .as_str()
        .context("install-job.yaml in the job-templates ConfigMap")?;
    Ok(serde_yaml::from_str(text)?)
}

/// Sets a pod's status as the kubelet does when it ends: phase Failed, its container terminated
/// with `exit`, and, for an eviction, the DisruptionTarget condition the eviction API adds.
async fn end_pod(pods: &Api<Pod>, name: &str, exit: i32, evicted: bool) -> Result<()> {
    let mut conditions = vec![serde_json::json!({"type": "Ready", "status": "False"})];
    if evicted {
        conditions.push(
            serde_json::json!({"type": "DisruptionTarget", "status": "True",
            "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}),
        );
    }
    let patch = serde_json::json!({"status": {"phase": "Failed", "conditions": conditions,
        "containerStatuses": [{"name": "label", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit, "reason": "Error"}}}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("ending pod {name}"))?;
    Ok(())
}

/// Pods of Job `job`, by name, oldest first.
async fn job_pods(pods: &Api<Pod>, job: &str) -> Result<Vec<Pod>> {
    let mut items = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await?
        .items;
    items.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
    Ok(items)
}

/// The chart's per-node Job spec on the real Job controller: an evicted pod (DisruptionTarget)
/// is replaced without spending backoffLimit (here 0), the replacement starts only once the pod
/// is terminal (podReplacementPolicy: Failed, kept by the API server), and a real failure still
/// fails the Job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_per_node_pod_is_replaced_without_spending_a_retry() -> Result<()> {
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("evict").await?;
    let sim = cluster
        .sim_nodes(&format!("{ns}-s"), 1, &SimNode::default())
        .await?;
    let mut job = rendered_install_template(&cluster, &["job.backoffLimit=0"]).await?;
    job["metadata"]["name"] = "evict".into();
    let pod = &mut job["spec"]["template"];
    pod["metadata"]["annotations"] = serde_json::json!({"kata-testbed/duration": "1h"});
    pod["spec"]["nodeName"] = sim[0].clone().into();
    pod["spec"]["serviceAccountName"] = "default".into();
    pod["spec"]["tolerations"] = serde_json::json!([{"operator": "Exists"}]);
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &ns);
    let created = jobs
        .create(&PostParams::default(), &serde_json::from_value(job)?)
        .await
        .context("the API server admits the chart's per-node Job spec")?;
    let spec = created.spec.context("spec")?;
    assert_eq!(spec.pod_replacement_policy.as_deref(), Some("Failed"));
    let rules = spec.pod_failure_policy.context("podFailurePolicy")?.rules;
    assert_eq!(rules[0].action, "Ignore", "{rules:?}");
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    let running = |n: usize| {
        let pods = pods.clone();
        async move {
            let all = job_pods(&pods, "evict").await?;
            Ok(all.len() == n
                && all[n - 1].status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        }
    };
    wait_until(Duration::from_secs(60), "the first pod running", || {
        running(1)
    })
    .await?;
    let first = job_pods(&pods, "evict").await?[0]
        .metadata
        .name
        .clone()
        .unwrap_or_default();
    end_pod(&pods, &first, 137, true).await?;
    wait_until(
        Duration::from_secs(60),
        "a replacement pod after the eviction",
        || running(2),
    )
    .await?;
    let j = jobs.get("evict").await?;
    let failed_cond = |j: &Job| {
        j.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Failed" && c.status == "True"))
    };
    assert!(
        !failed_cond(&j),
        "an eviction must not fail a Job with backoffLimit 0: {:?}",
        j.status
    );
    // The control: the same Job, a real failure (exit 1, no disruption) fails it at once.
    let second = job_pods(&pods, "evict").await?[1]
        .metadata
        .name
        .clone()
        .unwrap_or_default();
    end_pod(&pods, &second, 1, false).await?;
    wait_until(
        Duration::from_secs(60),
        "the Job failed by a real failure",
        || {
            let jobs = jobs.clone();
            async move { Ok(failed_cond(&jobs.get("evict").await?)) }
        },
    )
    .await?;
    assert_eq!(
        job_pods(&pods, "evict").await?.len(),
        2,
        "no retry after a real failure with backoffLimit 0"
    );
    Ok(())
}

/// Every value the state label of each watched node took, in order (`None`: no label), as an
/// independent watcher of the Nodes saw them.
#[derive(Clone, Default)]
struct StateRecorder(std::sync::Arc<std::sync::Mutex<BTreeMap<String, Vec<Option<String>>>>>);

impl StateRecorder {
    fn start(nodes: Api<Node>, selector: &str, key: &str) -> Self {
        let key = key.to_owned();
        use futures::StreamExt;
        use kube::runtime::{watcher, WatchStreamExt};
        let me = Self::default();
        let seen = me.0.clone();
        let stream = watcher::watcher(nodes, watcher::Config::default().labels(selector))
            .default_backoff()
            .applied_objects();
        tokio::spawn(async move {
            let mut stream = Box::pin(stream);
            while let Some(Ok(node)) = stream.next().await {
                let name = node.metadata.name.clone().unwrap_or_default();
                let value = labels_of(&node).get(&key).cloned();
                let mut s = seen.lock().expect("recorder lock");
                let v = s.entry(name).or_default();
                if v.last() != Some(&value) {
                    v.push(value);
                }
            }
        });
        me
    }

    /// The values seen for `node`, `-` for no label.
    fn of(&self, node: &str) -> Vec<String> {
        let s = self.0.lock().expect("recorder lock");
        s.get(node)
            .into_iter()
            .flatten()
            .map(|v| v.clone().unwrap_or_else(|| "-".into()))
            .collect()
    }
}

/// `data[key]` of the release's rollout summary ConfigMap, parsed.
async fn rollout_summary(cluster: &TestCluster, ns: &str, key: &str) -> Result<serde_yaml::Value> {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(cluster.client.clone(), ns);
    let cm = cms.get("kata-deploy-rollout").await?;
    let text = cm
        .data
        .unwrap_or_default()
        .get(key)
        .cloned()
        .with_context(|| format!("no {key} summary in the rollout ConfigMap"))?;
    Ok(serde_yaml::from_str(&text)?)
}

/// The node state label and the rollout summary on the real API server, with the real stages on
/// local nodes: each node goes pending → installing → installed, a node whose host-check fails
/// goes pending → failed and the summary names it with the reason after the dispatcher's pod and
/// Job are gone; uninstall goes cleaning → no label on every node it cleans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_state_and_rollout_summary_follow_install_failure_and_uninstall() -> Result<()> {
    let bed = Bed::start("state", 2).await?;
    let (cluster, ns, local) = (&bed.cluster, bed.ns.as_str(), &bed.local);
    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let scope = bed.scope();
    // Its own suffix: RuntimeClasses are cluster-scoped and tests run side by side.
    let suffix = ns.replacen("state-", "st", 1);
    let key = format!("katacontainers.io/kata-deploy-state-{suffix}");
    let suffix_set = format!("env.multiInstallSuffix={suffix}");
    let mut args = vec!["install", "kata-deploy", chart];
    args.extend(scope.iter().map(String::as_str));
    args.extend([
        "--set",
        &suffix_set,
        "--set",
        "shims.disableAll=true",
        "--set",
        "shims.qemu.enabled=true",
        "--wait",
        "--timeout",
        "3m",
    ]);
    let recorder = StateRecorder::start(bed.nodes.clone(), &format!("kata-test/group={ns}"), &key);
    std::fs::remove_file(bed.hosts.join(&local[1]).join("dev/kvm"))?;
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(
        !ok,
        "the install must fail on the node without /dev/kvm: {out}"
    );
    assert_eq!(
        recorder.of(&local[0]),
        ["-", "pending", "installing", "installed"],
        "the healthy node"
    );
    assert_eq!(
        recorder.of(&local[1]),
        ["-", "pending", "failed"],
        "host-check fails before the claim"
    );
    // The dispatcher's Job (and its pod) gone: the summary still tells what happened and why.
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    jobs.delete(
        "kata-deploy-dispatch-install",
        &kube::api::DeleteParams::foreground(),
    )
    .await?;
    wait_until(
        Duration::from_secs(60),
        "the install dispatcher gone",
        || async {
            Ok(jobs
                .get_opt("kata-deploy-dispatch-install")
                .await?
                .is_none())
        },
    )
    .await?;
    let s = rollout_summary(cluster, ns, "install").await?;
    assert_eq!(s["phase"], "failed", "{s:?}");
    assert_eq!(s["total"], 2, "{s:?}");
    assert_eq!(s["counts"]["succeeded"], 1, "{s:?}");
    assert_eq!(s["counts"]["failed"], 1, "{s:?}");
    let reason = s["failedNodes"][local[1].as_str()]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("kvm"),
        "the failed node with its reason: {s:?}"
    );
    assert!(s["failedNodes"].get(local[0].as_str()).is_none(), "{s:?}");

    helm_uninstall(cluster, ns).await?;
    assert_eq!(
        recorder.of(&local[0]),
        [
            "-",
            "pending",
            "installing",
            "installed",
            "pending",
            "cleaning",
            "-"
        ],
        "the installed node through uninstall"
    );
    assert_eq!(
        recorder.of(&local[1]),
        ["-", "pending", "failed", "pending", "cleaning", "-"],
        "the failed node is cleaned of its state too"
    );
    bed.kubelet.shutdown().await;
    Ok(())
}

/// Taints of `node`.
async fn taints_of(
    nodes: &Api<Node>,
    node: &str,
) -> Result<Vec<k8s_openapi::api::core::v1::Taint>> {
    Ok(nodes
        .get(node)
        .await?
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default())
}

/// Sets the taints of `node` to exactly `taints` (a merge patch of the whole list).
async fn set_taints(
    nodes: &Api<Node>,
    node: &str,
    taints: &[k8s_openapi::api::core::v1::Taint],
) -> kube::Result<Node> {
    let patch = serde_json::json!({"spec": {"taints": taints}});
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

fn taint(key: &str, effect: &str) -> k8s_openapi::api::core::v1::Taint {
    k8s_openapi::api::core::v1::Taint {
        key: key.into(),
        effect: effect.into(),
        ..Default::default()
    }
}

/// startupTaints on the real API server: the real label stage lifts exactly the startup taint
/// from its own Node as the install's last step (another taint stays); with a per-node token,
/// removing the startup taint from its own Node is admitted, while adding a taint, removing
/// another taint, or removing the startup taint from another Node is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_taints_are_lifted_and_the_node_token_can_remove_nothing_else() -> Result<()> {
    const STARTUP: &str = "example.com/kata-not-ready";
    const KEEP: &str = "example.com/keep";
    let bed = Bed::start("taint", 1).await?;
    let (cluster, ns, local) = (&bed.cluster, bed.ns.as_str(), &bed.local);
    let nodes = &bed.nodes;
    let mut with_startup = taints_of(nodes, &local[0]).await?;
    with_startup.extend([
        taint(STARTUP, "NoSchedule"),
        taint(KEEP, "PreferNoSchedule"),
    ]);
    set_taints(nodes, &local[0], &with_startup).await?;
    let sim_spec = SimNode {
        labels: [("kata-test/none".to_string(), ns.to_string())].into(),
        taints: vec![(STARTUP.into(), String::new(), "NoSchedule".into())],
        ..Default::default()
    };
    let sim = cluster.sim_nodes(&format!("{ns}-s"), 2, &sim_spec).await?;
    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let suffix = ns.replacen("taint-", "tt", 1);
    let suffix_set = format!("env.multiInstallSuffix={suffix}");
    let startup_set = format!("startupTaints[0]={STARTUP}:NoSchedule");
    let tolerate = format!("job.dispatcher.tolerations[0].key={STARTUP}");
    let mut args = vec!["install", "kata-deploy", chart];
    let scope = bed.scope();
    args.extend(scope.iter().map(String::as_str));
    args.extend([
        "--set",
        &suffix_set,
        "--set",
        &startup_set,
        // The dispatcher pod runs on the local node, which carries the startup taint.
        "--set",
        &tolerate,
        "--set",
        "job.dispatcher.tolerations[0].operator=Exists",
        "--set",
        "shims.disableAll=true",
        "--set",
        "shims.qemu.enabled=true",
        "--wait",
        "--timeout",
        "3m",
    ]);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "helm install failed: {out}");
    let after: Vec<String> = taints_of(nodes, &local[0])
        .await?
        .iter()
        .map(|t| format!("{}:{}", t.key, t.effect))
        .collect();
    assert!(
        !after.contains(&format!("{STARTUP}:NoSchedule")),
        "lifted: {after:?}"
    );
    assert!(
        after.contains(&format!("{KEEP}:PreferNoSchedule")),
        "the other taint stays: {after:?}"
    );
    assert_eq!(
        labels_of(&nodes.get(&local[0]).await?)
            .get(KATA_LABEL)
            .map(String::as_str),
        Some("true"),
        "labelled before the taint was lifted"
    );

    // The per-node token on a simulated node (kwok's own taint + the startup taint).
    let node_sa = format!("kata-deploy-{suffix}-node");
    let node_sa = Api::<ServiceAccount>::namespaced(cluster.client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|sa| sa.metadata.name)
        .find(|n| n.ends_with("-node"))
        .with_context(|| format!("the per-node ServiceAccount ({node_sa})"))?;
    let as_node = nodes_as(cluster, ns, &node_sa, "taint-probe", &sim[0]).await?;
    let own = taints_of(nodes, &sim[0]).await?;
    assert!(
        own.iter().any(|t| t.key == STARTUP) && own.len() >= 2,
        "{own:?}"
    );
    let refused = |r: &kube::Result<Node>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422);
    let mut added = own.clone();
    added.push(taint("example.com/added", "NoSchedule"));
    let r = set_taints(&as_node, &sim[0], &added).await;
    assert!(refused(&r), "adding a taint must be refused: {r:?}");
    let other_removed: Vec<_> = own.iter().filter(|t| t.key == STARTUP).cloned().collect();
    let r = set_taints(&as_node, &sim[0], &other_removed).await;
    assert!(refused(&r), "removing another taint must be refused: {r:?}");
    let theirs: Vec<_> = taints_of(nodes, &sim[1])
        .await?
        .into_iter()
        .filter(|t| t.key != STARTUP)
        .collect();
    let r = set_taints(&as_node, &sim[1], &theirs).await;
    assert!(
        refused(&r),
        "another node's startup taint must be refused: {r:?}"
    );
    let lifted: Vec<_> = own.iter().filter(|t| t.key != STARTUP).cloned().collect();
    let r = set_taints(&as_node, &sim[0], &lifted).await;
    assert!(r.is_ok(), "its own node's startup taint: {r:?}");
    assert_eq!(taints_of(nodes, &sim[0]).await?, lifted);

    helm_uninstall(cluster, ns).await?;
    bed.kubelet.shutdown().await;
    Ok(())
}

/// Creates a Job from the CronJob's jobTemplate, as `kubectl create job --from=cronjob/<name>`
/// (a run now, outside the schedule).
async fn trigger(cluster: &TestCluster, ns: &str, cronjob: &str, name: &str) -> Result<()> {
    let cjs: Api<k8s_openapi::api::batch::v1::CronJob> =
        Api::namespaced(cluster.client.clone(), ns);
    let cj = cjs.get(cronjob).await?;
    let tpl = cj
        .spec
        .as_ref()
        .map(|s| s.job_template.clone())
        .context("jobTemplate")?;
    let mut meta = tpl.metadata.unwrap_or_default();
    meta.name = Some(name.into());
    meta.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "batch/v1".into(),
            kind: "CronJob".into(),
            name: cronjob.into(),
            uid: cj.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
    ]);
    let job = Job {
        metadata: meta,
        spec: tpl.spec,
        status: None,
    };
    Api::<Job>::namespaced(cluster.client.clone(), ns)
        .create(&PostParams::default(), &job)
        .await?;
    Ok(())
}

/// Waits until Job `name` finished; whether it succeeded.
async fn finished(cluster: &TestCluster, ns: &str, name: &str) -> Result<bool> {
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    let cond = |j: &Job, t: &str| {
        j.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
    };
    wait_until(
        Duration::from_secs(180),
        "the reconcile Job to finish",
        || {
            let jobs = jobs.clone();
            async move {
                let j = jobs.get(name).await?;
                Ok(cond(&j, "Complete") || cond(&j, "Failed"))
            }
        },
    )
    .await?;
    Ok(cond(&jobs.get(name).await?, "Complete"))
}

/// The reconcile CronJob on the real API server with the real stages: a node added after
/// install gets Kata from the CronJob's scheduled run within one period (no helm command), the
/// installed node gets no Job; a run yields while a hook dispatcher of the release is active; uninstall's cleanup
/// dispatcher deletes the CronJob itself (the audit log says who deleted it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_after_install_is_installed_by_the_reconcile_cronjob() -> Result<()> {
    let bed = Bed::start("recon", 1).await?;
    let (cluster, ns, local, hosts) = (&bed.cluster, bed.ns.as_str(), &bed.local, &bed.hosts);
    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let suffix = ns.replacen("recon-", "rc", 1);
    let suffix_set = format!("env.multiInstallSuffix={suffix}");
    let mut args = vec!["install", "kata-deploy", chart];
    let scope = bed.scope();
    args.extend(scope.iter().map(String::as_str));
    args.extend([
        "--set",
        &suffix_set,
        "--set",
        "job.reconcile.schedule=*/1 * * * *",
        "--set",
        "shims.disableAll=true",
        "--set",
        "shims.qemu.enabled=true",
        "--wait",
        "--timeout",
        "3m",
    ]);
    let (ok, out) = cluster.run_helm(&args).await?;
    assert!(ok, "helm install failed: {out}");
    // Names derive from the release name (kata-deploy); the suffix only from labels and paths.
    let cronjob = "kata-deploy-reconcile".to_string();
    let cjs: Api<k8s_openapi::api::batch::v1::CronJob> =
        Api::namespaced(cluster.client.clone(), ns);
    assert!(
        cjs.get_opt(&cronjob).await?.is_some(),
        "the reconcile CronJob"
    );
    let marker = format!("katacontainers.io/kata-deploy-installed-{suffix}");

    // A node joins after install: no helm command, one run of the CronJob's Job.
    let added = cluster
        .local_nodes(&format!("{ns}-n"), 1, hosts, ns, &bed.group)
        .await?;
    wait_until(Duration::from_secs(60), "the added node Ready", || async {
        let node = bed.nodes.get(&added[0]).await?;
        Ok(node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await?;
    assert!(!labels_of(&bed.nodes.get(&added[0]).await?).contains_key(&marker));
    // The CronJob controller runs it on its schedule (every minute here): within one period
    // (plus the controller's own delay) a Job of the CronJob installs the added node. A run
    // scheduled before the node was there (right after install) does not count.
    let joined =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(1);
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    let scheduled = || async {
        Ok::<_, anyhow::Error>(
            jobs.list(&ListParams::default().labels("katacontainers.io/dispatcher-role=reconcile"))
                .await?
                .items
                .into_iter()
                .filter(|j| {
                    j.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.kind == "CronJob" && o.name == cronjob)
                        && j.metadata
                            .creation_timestamp
                            .as_ref()
                            .is_some_and(|t| t.0 >= joined)
                })
                .filter_map(|j| j.metadata.name)
                .collect::<Vec<_>>(),
        )
    };
    wait_until(
        Duration::from_secs(150),
        "a Job of the reconcile CronJob (the test bed's kube-controller-manager must run cronjob-controller: restart it with hack/testenv/start.sh)",
        || async { Ok(!scheduled().await?.is_empty()) },
    )
    .await?;
    let first = scheduled().await?.remove(0);
    assert!(
        finished(cluster, ns, &first).await?,
        "the scheduled reconcile run {first} failed"
    );
    let l = labels_of(&bed.nodes.get(&added[0]).await?);
    assert_eq!(l.get(KATA_LABEL).map(String::as_str), Some("true"), "{l:?}");
    assert_eq!(l.get(&marker).map(String::as_str), Some("true"), "{l:?}");
    assert!(
        hosts
            .join(&added[0])
            .join(format!("opt/kata-{suffix}"))
            .exists()
            || hosts.join(&added[0]).join("opt/kata").exists(),
        "payload installed on the added node"
    );
    let s = rollout_summary(cluster, ns, "reconcile").await?;
    assert_eq!(s["phase"], "succeeded", "{s:?}");
    assert_eq!(
        s["counts"]["succeeded"], 1,
        "only the added node ran: {s:?}"
    );
    assert_eq!(s["counts"]["already-installed"], 1, "{s:?}");

    // Single flight: while a hook dispatcher of the release is active, a run does nothing (nor
    // does a scheduled one meanwhile: every run yields).
    let hook: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hook-standin", "labels": {"app.kubernetes.io/instance": "kata-deploy", "katacontainers.io/dispatcher-role": "install"}},
        "spec": {"suspend": true, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "d", "image": "quay.io/kata-containers/kata-deploy-job-dispatcher:test"}]}}}
    }))?;
    jobs.create(&PostParams::default(), &hook).await?;
    // A scheduled run that passed its check before the stand-in existed may still be at work.
    for name in scheduled().await? {
        finished(cluster, ns, &name).await?;
    }
    let before = rollout_summary(cluster, ns, "reconcile").await?;
    trigger(cluster, ns, &cronjob, "reconcile-2").await?;
    assert!(
        finished(cluster, ns, "reconcile-2").await?,
        "a yielding run succeeds"
    );
    assert_eq!(
        rollout_summary(cluster, ns, "reconcile").await?["run"],
        before["run"],
        "the yielding run wrote nothing"
    );
    jobs.delete("hook-standin", &kube::api::DeleteParams::background())
        .await?;

    helm_uninstall(cluster, ns).await?;
    assert!(
        cjs.get_opt(&cronjob).await?.is_none(),
        "the CronJob is gone"
    );
    let dispatcher_sa = format!("system:serviceaccount:{ns}:kata-deploy-dispatcher");
    let by_dispatcher = kata_testbed::rollout::audit_by_resource(cluster, &dispatcher_sa)?;
    assert!(
        by_dispatcher
            .get(&("delete".to_string(), "cronjobs".to_string()))
            .is_some_and(|n| *n >= 1),
        "the cleanup dispatcher deleted the CronJob (before cleaning): {by_dispatcher:?}"
    );
    for n in [&local[0], &added[0]] {
        let l = labels_of(&bed.nodes.get(n).await?);
        assert!(!l.contains_key(&marker), "{n} cleaned: {l:?}");
    }
    bed.kubelet.shutdown().await;
    Ok(())
}

/// Sets (`Some`) or removes (`None`) label `key` on `node`.
async fn set_label(nodes: &Api<Node>, node: &str, key: &str, value: Option<&str>) -> Result<()> {
    let patch = serde_json::json!({"metadata": {"labels": {key: value}}});
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The node's labels and install record under this test's suffix: (marker, claimed, record).
async fn kata_marks(nodes: &Api<Node>, node: &str, suffix: &str) -> Result<(bool, bool, bool)> {
    let n = nodes.get(node).await?;
    let l = labels_of(&n);
    let a = n.metadata.annotations.unwrap_or_default();
    Ok((
        l.contains_key(&format!("katacontainers.io/kata-deploy-installed-{suffix}")),
        l.contains_key(&format!("katacontainers.io/kata-deploy-claimed-{suffix}")),
        a.contains_key("katacontainers.io/installed-by-kata-deploy-install"),
    ))
}

/// The retire run of an upgrade uninstalls only nodes a change of values dropped (issue 21): a
/// selection label missing for a moment during an unchanged upgrade retires nothing (the old
/// retire cleaned every claimed node outside the selection at that instant, under its running
/// Kata pods); a narrowing upgrade retires the node it dropped, and not a node whose label is
/// missing at that instant; the recorded selection follows each fully successful run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_selection_label_retires_nothing_and_narrowing_retires_only_what_it_dropped(
) -> Result<()> {
    let bed = Bed::start("retire", 3).await?;
    let (cluster, ns, local, nodes) = (&bed.cluster, bed.ns.as_str(), &bed.local, &bed.nodes);
    let chart = repo_root().join("chart/kata-deploy");
    let chart = chart.to_str().expect("utf-8");
    let suffix = ns.replacen("retire-", "rt", 1);
    let suffix_set = format!("env.multiInstallSuffix={suffix}");
    let mut common: Vec<String> = bed.scope();
    common.extend(
        [
            "--set",
            &suffix_set,
            "--set",
            "shims.disableAll=true",
            "--set",
            "shims.qemu.enabled=true",
        ]
        .map(String::from),
    );
    common.extend(["--wait", "--timeout", "3m"].map(String::from));
    let helm = |verb: &'static str, extra: Vec<String>| {
        let mut args = vec![verb.to_string(), "kata-deploy".into(), chart.into()];
        args.extend(common.iter().cloned());
        args.extend(extra);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, out) = cluster.run_helm(&args).await?;
            anyhow::ensure!(ok, "helm {verb} failed: {out}");
            Ok::<_, anyhow::Error>(())
        }
    };
    helm("install", vec![]).await?;
    let recorded = |s: serde_yaml::Value| -> Vec<String> {
        s["selectors"]
            .as_sequence()
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let group = format!("kata-test/group={ns}");
    let first = recorded(rollout_summary(cluster, ns, "selection").await?);
    assert!(
        first.len() == 1 && first[0].starts_with(&group),
        "the first install records its selection: {first:?}"
    );
    for n in local {
        assert_eq!(
            kata_marks(nodes, n, &suffix).await?,
            (true, true, true),
            "{n}"
        );
    }

    // --- an unchanged upgrade while local[2]'s selection label is missing: nothing retired ---
    let before = mtimes(&bed.hosts.join(&local[2]))?;
    set_label(nodes, &local[2], "kata-test/group", None).await?;
    helm("upgrade", vec!["--reuse-values".into()]).await?;
    assert_eq!(
        kata_marks(nodes, &local[2], &suffix).await?,
        (true, true, true),
        "a label missing for a moment is not a change of values: the node keeps Kata"
    );
    assert_eq!(
        mtimes(&bed.hosts.join(&local[2]))?,
        before,
        "no write on its host"
    );
    set_label(nodes, &local[2], "kata-test/group", Some(ns)).await?;

    // --- narrowing to tier=b: local[2] (no tier) is dropped and retired; local[1] has tier=b
    // but its group label is missing at that instant: not dropped by the values, kept ---
    set_label(nodes, &local[0], "kata-test/tier", Some("b")).await?;
    set_label(nodes, &local[1], "kata-test/tier", Some("b")).await?;
    set_label(nodes, &local[1], "kata-test/group", None).await?;
    let kept = mtimes(&bed.hosts.join(&local[1]))?;
    helm(
        "upgrade",
        vec![
            "--reuse-values".into(),
            "--set-string".into(),
            "job.nodeSelector.kata-test/tier=b".into(),
        ],
    )
    .await?;
    assert_eq!(
        kata_marks(nodes, &local[2], &suffix).await?,
        (false, false, false),
        "the node the narrowed values dropped is retired, its record removed"
    );
    assert_eq!(
        kata_marks(nodes, &local[1], &suffix).await?,
        (true, true, true)
    );
    assert_eq!(
        mtimes(&bed.hosts.join(&local[1]))?,
        kept,
        "{}: untouched",
        local[1]
    );
    assert_eq!(
        kata_marks(nodes, &local[0], &suffix).await?,
        (true, true, true)
    );
    let now = recorded(rollout_summary(cluster, ns, "selection").await?);
    assert!(
        now.len() == 1 && now[0].contains("kata-test/tier=b"),
        "the retire run recorded the narrowed selection: {now:?}"
    );
    set_label(nodes, &local[1], "kata-test/group", Some(ns)).await?;

    helm_uninstall(cluster, ns).await?;
    for n in local {
        assert_eq!(
            kata_marks(nodes, n, &suffix).await?,
            (false, false, false),
            "{n}"
        );
    }
    bed.kubelet.shutdown().await;
    Ok(())
}
