//! Fixture for running the real dispatcher binary on the test bed: a least-privilege
//! ServiceAccount, an owner Job, a per-node Job template, an independent observer of active Jobs,
//! and a helper that makes chosen nodes' pods fail.

use crate::cluster::{wait_until, workspace_bin, SimNode, TestCluster};
use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Name of the dispatcher's ServiceAccount in every test namespace.
pub const DISPATCHER_SA: &str = "dispatcher";
/// Name of the owner Job standing in for the Helm hook Job.
pub const OWNER_JOB: &str = "kata-deploy-dispatcher";

/// Options of [`DispatcherEnv::setup`].
#[derive(Debug, Clone)]
pub struct EnvOptions {
    /// Simulated per-node Job duration (kwok delay, Go duration).
    pub duration: String,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            duration: "1s".into(),
        }
    }
}

/// A namespace ready for dispatcher runs.
pub struct DispatcherEnv {
    /// Namespace.
    pub namespace: String,
    /// Kubeconfig acting as the dispatcher's ServiceAccount.
    pub kubeconfig: PathBuf,
    /// Template file.
    pub template: PathBuf,
    /// The audit-log user name of the dispatcher.
    pub user: String,
}

/// A test case: a cluster, a namespace ready for the dispatcher, and simulated nodes labelled
/// `kata-test/group=<namespace>` (so a selector picks exactly this case's nodes).
pub struct SimCase {
    /// The cluster.
    pub cluster: TestCluster,
    /// Namespace, identity and template.
    pub env: DispatcherEnv,
    /// Names of this case's nodes.
    pub nodes: Vec<String>,
    /// The selector matching exactly these nodes.
    pub selector: String,
    /// How the nodes were made (to re-create one under the same name).
    pub spec: SimNode,
}

impl SimCase {
    /// A namespace `name-<n>` with `nodes` simulated nodes on `cluster`.
    pub async fn new(
        cluster: TestCluster,
        name: &str,
        nodes: usize,
        opts: &EnvOptions,
    ) -> Result<Self> {
        let namespace = cluster.namespace(name).await?;
        let mut spec = SimNode::default();
        spec.labels
            .insert("kata-test/group".into(), namespace.clone());
        let nodes = cluster.sim_nodes(&namespace, nodes, &spec).await?;
        let env = DispatcherEnv::setup(&cluster, &namespace, opts).await?;
        Ok(Self {
            selector: format!("kata-test/group={namespace}"),
            cluster,
            env,
            nodes,
            spec,
        })
    }
}

/// stdout and stderr of a finished process, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The least-privilege rights of the dispatcher, exactly what the chart grants (rbac.yaml):
/// (cluster rules, release-namespace rules, rules in `default` for the Node Events).
pub fn dispatcher_rules() -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let cluster =
        json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch", "patch"]}]);
    let ns = json!([
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    ]);
    let events = json!([{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]);
    (cluster, ns, events)
}

impl DispatcherEnv {
    /// Creates the namespace's ServiceAccount, RBAC, owner Job and template.
    pub async fn setup(cluster: &TestCluster, namespace: &str, opts: &EnvOptions) -> Result<Self> {
        let client = cluster.client.clone();
        let (cluster_rules, ns_rules, event_rules) = dispatcher_rules();
        let ev_name = format!("{namespace}-node-events");
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": DISPATCHER_SA, "namespace": namespace}});
        let cr_name = format!("{namespace}-dispatcher");
        let objects = vec![
            sa,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": cr_name}, "rules": cluster_rules}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": cr_name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cr_name},
                "subjects": [{"kind": "ServiceAccount", "name": DISPATCHER_SA, "namespace": namespace}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "dispatcher", "namespace": namespace}, "rules": ns_rules}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "dispatcher", "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dispatcher"},
                "subjects": [{"kind": "ServiceAccount", "name": DISPATCHER_SA, "namespace": namespace}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": ev_name, "namespace": "default"}, "rules": event_rules}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": ev_name, "namespace": "default"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ev_name},
                "subjects": [{"kind": "ServiceAccount", "name": DISPATCHER_SA, "namespace": namespace}]}),
        ];
        for obj in objects {
            create_object(&client, obj).await?;
        }
        create_owner_job(cluster, namespace, OWNER_JOB).await?;
        let template = cluster.state().join(format!("template-{namespace}.yaml"));
        std::fs::write(&template, per_node_template(&opts.duration))?;
        let kubeconfig = cluster.sa_kubeconfig(namespace, DISPATCHER_SA).await?;
        Ok(Self {
            namespace: namespace.into(),
            kubeconfig,
            template,
            user: format!("system:serviceaccount:{namespace}:{DISPATCHER_SA}"),
        })
    }

    /// A dispatcher command with this env's identity, namespace, template and owner.
    pub fn command(&self, extra: &[&str]) -> Result<Command> {
        let bin = workspace_bin("kata-deploy-job-dispatcher")?;
        // KATA_DISPATCHER_WRAPPER="heaptrack -o /tmp/ht" profiles the dispatcher (benchmarks).
        let wrapper = std::env::var("KATA_DISPATCHER_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(w) => {
                let mut c = Command::new(w);
                c.args(words).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.env_clear()
            .env("KUBECONFIG", &self.kubeconfig)
            .env("POD_NAMESPACE", &self.namespace)
            .env("RUST_LOG", "info")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Defaults only where the caller did not give its own (clap refuses repeats).
        let template = self.template.to_str().expect("utf-8 path");
        let defaults = [
            ("--template", template),
            ("--owner-job", OWNER_JOB),
            ("--progress-interval", "5s"),
            ("--termination-log", "/nonexistent/termination-log"),
        ];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        Ok(cmd)
    }

    /// Runs the dispatcher to the end.
    pub async fn run(&self, extra: &[&str]) -> Result<Output> {
        let out = tokio::process::Command::from(self.command(extra)?)
            .output()
            .await
            .context("running the dispatcher")?;
        eprintln!(
            "--- dispatcher {extra:?} exited {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }
}

/// The per-node Job template used by tests (what the chart renders, minus the stage images).
pub fn per_node_template(duration: &str) -> String {
    format!(
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: placeholder
spec:
  backoffLimit: 0
  ttlSecondsAfterFinished: 3600
  template:
    metadata:
      annotations:
        kata-testbed/duration: "{duration}"
    spec:
      restartPolicy: Never
      tolerations: [{{operator: Exists}}]
      initContainers:
      - {{name: host-check, image: quay.io/kata-containers/kata-deploy-stage:test}}
      containers:
      - {{name: label, image: quay.io/kata-containers/kata-deploy-stage:test}}
"#
    )
}

async fn create_object(client: &kube::Client, obj: serde_json::Value) -> Result<()> {
    let api_version = obj["apiVersion"].as_str().context("apiVersion")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = obj["kind"].as_str().context("kind")?;
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.create(
        &PostParams::default(),
        &serde_json::from_value(obj.clone())?,
    )
    .await
    .with_context(|| format!("creating {kind}"))?;
    Ok(())
}

/// Creates a suspended Job standing in for the Helm hook Job that runs the dispatcher.
pub async fn create_owner_job(cluster: &TestCluster, namespace: &str, name: &str) -> Result<Job> {
    let api: Api<Job> = Api::namespaced(cluster.client.clone(), namespace);
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"suspend": true, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "dispatcher", "image": "quay.io/kata-containers/kata-deploy-job-dispatcher:test"}]}}}
    }))?;
    Ok(api.create(&PostParams::default(), &job).await?)
}

/// Watches a namespace's Jobs and records the most that were unfinished at once, independently
/// of the dispatcher's own accounting.
#[derive(Clone, Default)]
pub struct ActiveObserver {
    inner: Arc<Mutex<ObserverState>>,
}

#[derive(Default)]
struct ObserverState {
    active: HashSet<String>,
    max_active: usize,
    created: HashSet<String>,
    first_seen: HashMap<String, std::time::Instant>,
    durations: Vec<Duration>,
}

impl ActiveObserver {
    /// Starts observing Jobs with `label_selector` in `namespace`.
    pub fn start(cluster: &TestCluster, namespace: &str, label_selector: &str) -> Self {
        let me = Self::default();
        let api: Api<Job> = Api::namespaced(cluster.client.clone(), namespace);
        let stream = watcher::watcher(api, watcher::Config::default().labels(label_selector))
            .default_backoff();
        let state = me.inner.clone();
        tokio::spawn(async move {
            let mut stream = Box::pin(stream);
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                let mut s = state.lock().expect("observer lock");
                match ev {
                    Event::Apply(job) | Event::InitApply(job) => {
                        let name = job.metadata.uid.clone().unwrap_or_default();
                        s.created.insert(name.clone());
                        s.first_seen
                            .entry(name.clone())
                            .or_insert_with(std::time::Instant::now);
                        let finished = job
                            .status
                            .as_ref()
                            .and_then(|st| st.conditions.as_ref())
                            .is_some_and(|cs| {
                                cs.iter().any(|c| {
                                    (c.type_ == "Complete" || c.type_ == "Failed")
                                        && c.status == "True"
                                })
                            });
                        if finished {
                            if s.active.remove(&name) {
                                let took = s.first_seen[&name].elapsed();
                                s.durations.push(took);
                            }
                        } else {
                            s.active.insert(name);
                        }
                        s.max_active = s.max_active.max(s.active.len());
                    }
                    Event::Delete(job) => {
                        s.active
                            .remove(&job.metadata.uid.clone().unwrap_or_default());
                    }
                    _ => {}
                }
            }
        });
        me
    }

    /// The most Jobs observed unfinished at the same time.
    pub fn max_active(&self) -> usize {
        self.inner.lock().expect("observer lock").max_active
    }

    /// Mean time from a Job's first appearance to its end, as this watcher saw them.
    pub fn mean_job_duration(&self) -> Option<Duration> {
        let s = self.inner.lock().expect("observer lock");
        let n = u32::try_from(s.durations.len()).ok().filter(|n| *n > 0)?;
        Some(s.durations.iter().sum::<Duration>() / n)
    }

    /// Distinct Job objects (by UID) observed.
    pub fn jobs_seen(&self) -> usize {
        self.inner.lock().expect("observer lock").created.len()
    }
}

/// Makes the pods of Jobs on `nodes` fail (kwok's `pod-fail` stage) with `message`, by labelling
/// them as soon as they appear (before their simulated duration ends).
pub fn fail_pods_on(cluster: &TestCluster, namespace: &str, nodes: &[String], message: &str) {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), namespace);
    let nodes: HashSet<String> = nodes.iter().cloned().collect();
    let message = message.to_owned();
    tokio::spawn(async move {
        let mut done: HashMap<String, ()> = HashMap::new();
        let mut stream =
            Box::pin(watcher::watcher(api.clone(), watcher::Config::default()).default_backoff());
        while let Some(ev) = stream.next().await {
            let Ok(Event::Apply(pod) | Event::InitApply(pod)) = ev else {
                continue;
            };
            let on_node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            if nodes.contains(&on_node) && !done.contains_key(&name) {
                done.insert(name.clone(), ());
                let patch = json!({"metadata": {
                    "labels": {"kata-testbed/fail": "true"},
                    "annotations": {"kata-testbed/fail-message": message, "kata-testbed/fail-exit-code": "3"}}});
                let _ = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
        }
    });
}

/// Names of the Jobs in `namespace` with their `nodeName`.
pub async fn jobs_by_node(cluster: &TestCluster, namespace: &str) -> Result<Vec<(String, String)>> {
    let api: Api<Job> = Api::namespaced(cluster.client.clone(), namespace);
    let list = api.list(&Default::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|j| j.metadata.name.as_deref() != Some(OWNER_JOB))
        .map(|j| {
            let node = j
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|p| p.node_name.clone())
                .unwrap_or_default();
            (j.metadata.name.clone().unwrap_or_default(), node)
        })
        .collect())
}

/// Waits until no Job other than the owner is left in `namespace`.
pub async fn wait_jobs_gone(
    cluster: &TestCluster,
    namespace: &str,
    timeout: Duration,
) -> Result<()> {
    wait_until(timeout, "per-node Jobs to be garbage-collected", || async {
        Ok(jobs_by_node(cluster, namespace).await?.is_empty())
    })
    .await
}

/// Requests by `user` in the audit log, by (verb, resource): e.g. ("create", "jobs").
pub fn audit_by_resource(
    cluster: &TestCluster,
    user: &str,
) -> Result<std::collections::BTreeMap<(String, String), usize>> {
    let text =
        std::fs::read_to_string(cluster.state().join("audit.log")).context("reading audit.log")?;
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if ev["user"]["username"] == user && ev["stage"] == "ResponseComplete" {
            let verb = ev["verb"].as_str().unwrap_or("?").to_owned();
            let resource = ev["objectRef"]["resource"]
                .as_str()
                .unwrap_or("?")
                .to_owned();
            *counts.entry((verb, resource)).or_default() += 1;
        }
    }
    Ok(counts)
}
