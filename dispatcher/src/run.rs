//! One dispatcher run, the I/O shell around [`crate::lifecycle`]: it turns watch events and API
//! answers into lifecycle inputs and carries out the actions that come back. Every decision
//! (what to create, delete, adopt, when a node is done) is the lifecycle's.

use crate::admission::Admission;
use crate::cli::Args;
use crate::kube_io::{ClusterApi, Right, SetupError, NODE_EVENTS_NAMESPACE};
use crate::lifecycle::{
    install_record, Action, Config, Conflicting, Created, Input, JobObs, Lifecycle, NodeObs,
    Outcome, PodObs, Results, SkipRule, StopReason,
};
use crate::naming::{validate_prefix, NamingError};
use crate::progress_io::{Visibility, VisibilityConfig};
use crate::recorded_selection::{record, restrict_to_record, RecordError};
use crate::report;
use crate::select::{NodeSelection, SelectorError, Targets};
use crate::status::job_phase;
use crate::supersede::StopWait;
use crate::template::{self, JobTemplate, NodeFacts, RunIdentity, TemplateError};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The run could not start; nothing was created (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Template problem.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Selector problem.
    #[error(transparent)]
    Selector(#[from] SelectorError),
    /// Prefix problem.
    #[error(transparent)]
    Naming(#[from] NamingError),
    /// API / RBAC / owner problem.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// Cannot read the template file.
    #[error("cannot read template {path}: {source}. Mount the per-node Job template there or pass --template")]
    ReadTemplate {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The template's tolerations cannot be read.
    #[error("template {path}: {problem}")]
    Tolerations {
        /// Path.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// No namespace known.
    #[error("no namespace: pass --namespace or set POD_NAMESPACE (the chart sets it from the downward API)")]
    NoNamespace,
    /// The superseded dispatcher's per-node Jobs outlived the run deadline.
    #[error("the per-node Jobs of {prefix} were not all gone when the run deadline passed ({last}); check them (kubectl get jobs,pods -l katacontainers.io/dispatcher={prefix}) and uninstall again, or raise --deadline")]
    SupersedeDeadline {
        /// The superseded prefix.
        prefix: String,
        /// What was left.
        last: String,
    },
    /// The recorded install selection cannot be read or used.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// Empty selection with --require-nodes.
    #[error("no node matches {0}; label the nodes or change the selection, or drop --require-nodes to accept an empty run")]
    NoNodes(String),
    /// Another dispatcher run of the release could not be checked or stopped.
    #[error("single flight: {0}; check the release's dispatcher Jobs (kubectl get jobs -l katacontainers.io/dispatcher-role) and re-run")]
    SingleFlight(String),
}

/// The result of a finished run.
#[derive(Debug)]
pub struct Summary {
    /// Per node: outcome and how long its Job took.
    pub results: Results,
    /// Why dispatching stopped early, if it did.
    pub stopped: Option<String>,
    /// Transient API errors retried and watches resumed.
    pub retries: usize,
    /// The canary nodes and how the wave ended (`None` without a canary).
    pub canary: Option<crate::summary::CanaryView>,
}

impl Summary {
    /// Every targeted node succeeded (or was already installed, skipped by rule, or removed).
    pub fn all_succeeded(&self) -> bool {
        self.stopped.is_none() && self.results.values().all(|(o, _)| o.is_ok())
    }
}

/// Reads the namespace the Jobs go to.
pub fn resolve_namespace(flag: Option<&str>) -> Result<String, StartError> {
    if let Some(ns) = flag.filter(|n| !n.is_empty()) {
        return Ok(ns.to_owned());
    }
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .ok_or(StartError::NoNamespace)
}

/// What `--skip-installed` checks, or `None` when nothing is skipped (`--reinstall-all`).
pub fn skip_rule(args: &Args, template_hash: &str) -> Option<SkipRule> {
    // --reinstall-all: records are still written, none is trusted.
    (args.skip_installed && !args.reinstall_all).then(|| SkipRule {
        hash: template_hash.to_owned(),
        handlers: args.expect_handlers.clone(),
    })
}

/// The Node annotation recording the last success under `prefix` ([`install_record`]).
pub fn installed_annotation(prefix: &str) -> String {
    format!("katacontainers.io/installed-by-{prefix}")
}

fn node_facts(node: &Node) -> NodeFacts {
    let info = node.status.as_ref().and_then(|s| s.node_info.as_ref());
    let get = |f: fn(&k8s_openapi::api::core::v1::NodeSystemInfo) -> &String| {
        info.map(f).cloned().unwrap_or_default()
    };
    NodeFacts {
        name: node.metadata.name.clone().unwrap_or_default(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        machine_id: get(|i| &i.machine_id),
        container_runtime_version: get(|i| &i.container_runtime_version),
        kubelet_version: get(|i| &i.kubelet_version),
        architecture: get(|i| &i.architecture),
        cri_dir: crate::cri_dir::CriDir::of_node(
            &get(|i| &i.container_runtime_version),
            node.metadata.labels.as_ref().unwrap_or(&Default::default()),
            node.metadata
                .annotations
                .as_ref()
                .unwrap_or(&Default::default()),
        ),
    }
}

/// A node is NotReady only when it says so (a Ready condition False or Unknown); a node that
/// reports no conditions yet is not held back.
fn node_ready(node: &Node) -> bool {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .is_none_or(|c| c.status == "True")
}

/// Everything the shell needs to turn API objects into lifecycle inputs.
struct Translate {
    selection: Targets,
    admission: Admission,
    installed_key: String,
    /// `--installed-label`: the label an installed node carries.
    marker: Option<(String, String)>,
    run_id: String,
    template_hash: String,
}

impl Translate {
    fn node(&self, node: &Node) -> NodeObs {
        let facts = node_facts(node);
        let empty = BTreeMap::new();
        let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_deref())
            .unwrap_or_default();
        let handlers = node
            .status
            .as_ref()
            .and_then(|s| s.runtime_handlers.as_deref())
            .unwrap_or_default();
        NodeObs {
            selected: self.selection.matches(&facts.name, labels),
            // A Ready condition with the node controller's not-ready taint still on is not ready
            // yet: the node waits, and one that keeps it is not started rather than skipped.
            ready: node_ready(node) && !self.admission.not_ready(taints),
            untolerated: self.admission.untolerated(taints),
            record: node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(&self.installed_key))
                .cloned(),
            marked: self
                .marker
                .as_ref()
                .is_none_or(|(k, v)| labels.get(k) == Some(v)),
            // The default handler has an empty name: nothing to check there.
            runtime_handlers: handlers
                .iter()
                .filter_map(|h| h.name.clone())
                .filter(|n| !n.is_empty())
                .collect(),
            facts,
        }
    }

    fn job(&self, job: &Job) -> JobObs {
        let label = |k: &str| {
            job.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(k))
                .cloned()
                .unwrap_or_default()
        };
        let annotation = |k: &str| {
            job.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(k))
                .cloned()
                .unwrap_or_default()
        };
        let pinned = job
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.node_name.clone());
        let node = Some(annotation(template::ANNOTATION_NODE_NAME))
            .filter(|n| !n.is_empty())
            .or(pinned)
            .unwrap_or_default();
        JobObs {
            name: job.metadata.name.clone().unwrap_or_default(),
            uid: job.metadata.uid.clone().unwrap_or_default(),
            node,
            node_uid: annotation(template::ANNOTATION_NODE_UID),
            ours: label(template::LABEL_RUN) == self.run_id
                && annotation(template::ANNOTATION_TEMPLATE_HASH) == self.template_hash,
            phase: job_phase(job),
            deleting: job.metadata.deletion_timestamp.is_some(),
        }
    }
}

fn pod_obs(pod: &Pod) -> PodObs {
    let job_uid = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| {
            l.get("batch.kubernetes.io/controller-uid")
                .or_else(|| l.get("controller-uid"))
        })
        .cloned()
        .or_else(|| {
            pod.metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "Job")
                .map(|o| o.uid.clone())
        })
        .unwrap_or_default();
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    PodObs {
        name: pod.metadata.name.clone().unwrap_or_default(),
        node: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        job_uid,
        live: !matches!(phase, Some("Succeeded" | "Failed")),
    }
}

/// A watch error that retrying cannot fix (rights, missing resource): discovery fails fast.
fn fatal_watch_error(e: &watcher::Error) -> Option<String> {
    let inner = match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => k,
        _ => return None,
    };
    match inner {
        kube::Error::Api(s) if matches!(s.code, 401 | 403 | 404) => {
            Some(format!("{} ({})", s.message, s.code))
        }
        _ => None,
    }
}

/// The rights this run uses, for the preflight.
pub fn rights(args: &Args, namespace: &str) -> Vec<Right> {
    let right = |verb, group, resource, namespace: Option<&str>| Right {
        verb,
        group,
        resource,
        namespace: namespace.map(str::to_owned),
        name: None,
    };
    let ns = Some(namespace);
    let mut r = vec![
        right("list", "", "nodes", None),
        right("watch", "", "nodes", None),
    ];
    for verb in ["create", "get", "list", "watch", "delete"] {
        r.push(right(verb, "batch", "jobs", ns));
    }
    for verb in ["list", "watch"] {
        r.push(right(verb, "", "pods", ns));
    }
    if args.node_events {
        r.push(right("create", "", "events", Some(NODE_EVENTS_NAMESPACE)));
    }
    if args.skip_installed
        || args.supersede_prefix.is_some()
        || args.forget_record.is_some()
        || args.state_label.is_some()
    {
        r.push(right("patch", "", "nodes", None));
    }
    if let Some(cj) = &args.remove_cronjob {
        r.push(Right {
            name: Some(cj.clone()),
            ..right("delete", "batch", "cronjobs", ns)
        });
    }
    if let Some(cm) = &args.summary_configmap {
        r.push(Right {
            name: Some(cm.clone()),
            ..right("patch", "", "configmaps", ns)
        });
        if args.within_recorded || args.record_if_absent {
            r.push(Right {
                name: Some(cm.clone()),
                ..right("get", "", "configmaps", ns)
            });
        }
    }
    r
}

type Op = BoxFuture<'static, Option<Input>>;

/// A node's final result, as the shell reports it.
struct NodeReport {
    node: String,
    job: String,
    node_uid: String,
    /// The install record to write on success ([`install_record`]).
    record: String,
    outcome: Outcome,
    took: Option<Duration>,
}

struct Shell {
    api: ClusterApi,
    template: JobTemplate,
    run: RunIdentity,
    ops: FuturesUnordered<Op>,
    node_events: bool,
    record_key: Option<String>,
    forget_key: Option<String>,
    report_slots: std::sync::Arc<tokio::sync::Semaphore>,
    vis: Visibility,
}

impl Shell {
    fn carry_out(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Create { node, job, facts } => self.create(node, job, &facts),
                Action::Delete {
                    node,
                    job,
                    uid,
                    why,
                } => self.delete(node, job, uid, why),
                Action::ReadConflict { node, job } => self.read_conflict(node, job),
                Action::ReadFailure {
                    node,
                    job,
                    condition,
                } => self.read_failure(node, job, condition),
                Action::Adopted { node, job } => {
                    info!(node = %node, job = %job, "adopting this run's Job")
                }
                Action::Report {
                    node,
                    job,
                    node_uid,
                    machine_id,
                    outcome,
                    took,
                } => {
                    let record = install_record(self.template.hash(), &machine_id);
                    self.report(NodeReport {
                        node,
                        job,
                        node_uid,
                        record,
                        outcome,
                        took,
                    })
                }
            }
        }
    }

    fn create(&mut self, node: String, job: String, facts: &NodeFacts) {
        info!(node = %node, job = %job, "creating per-node Job");
        let body = self.template.specialise(&self.run, facts, &job);
        let api = self.api.clone();
        let (state, uid) = (self.vis.state_key(), facts.uid.clone());
        self.ops.push(Box::pin(async move {
            // The state label says pending before the Job exists, so the stages' installing
            // (written by its claim container) always comes after it.
            Visibility::mark_pending(&api, state.as_deref(), &node, &uid).await;
            let result = match api.create_job(&body).await {
                Ok(uid) => Created::Ok(uid),
                Err(kube::Error::Api(s)) if s.code == 409 => Created::Conflict,
                Err(e) => Created::Err(e.to_string()),
            };
            Some(Input::Created { node, result })
        }));
    }

    fn delete(&mut self, node: String, job: String, uid: String, why: &'static str) {
        info!(node = %node, job = %job, why, "deleting Job (foreground)");
        let api = self.api.clone();
        self.ops.push(Box::pin(async move {
            let result = api
                .delete_job_uid(&job, Some(&uid))
                .await
                .map_err(|e| e.to_string());
            if let Err(e) = &result {
                warn!(job = %job, error = %e, "could not delete the Job; delete it by hand");
            }
            Some(Input::Deleted { node, result })
        }));
    }

    fn read_conflict(&mut self, node: String, job: String) {
        let api = self.api.clone();
        let prefix = self.run.prefix.clone();
        let tr = self.translate_job_fn();
        self.ops.push(Box::pin(async move {
            let found = match api.get_job(&job).await {
                Ok(None) => Conflicting::Gone,
                Ok(Some(j))
                    if j.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(template::LABEL_DISPATCHER))
                        != Some(&prefix) =>
                {
                    Conflicting::Foreign
                }
                Ok(Some(j)) => Conflicting::Managed(tr.job(&j)),
                Err(e) => Conflicting::Err(e.to_string()),
            };
            Some(Input::ConflictRead { node, found })
        }));
    }

    fn read_failure(&mut self, node: String, job: String, condition: String) {
        let api = self.api.clone();
        self.ops.push(Box::pin(async move {
            let reason = match api.failure_detail(&job).await {
                Some(detail) => format!("{condition}; {detail}"),
                None => condition,
            };
            Some(Input::FailureDetail { node, reason })
        }));
    }

    fn translate_job_fn(&self) -> Translate {
        Translate {
            selection: Targets {
                selection: NodeSelection::All,
                except: None,
                within: None,
            },
            admission: Admission::default(),
            installed_key: String::new(),
            marker: None,
            run_id: self.run.run_id.clone(),
            template_hash: self.template.hash().to_owned(),
        }
    }

    /// Logs a node's result, records it as an Event on the Node, and keeps the install record.
    fn report(&mut self, r: NodeReport) {
        let o = &r.outcome;
        if o.is_ok() {
            info!(node = %r.node, job = %r.job, took = ?r.took, result = o.word(), reason = o.reason(), "node done")
        } else {
            warn!(node = %r.node, job = %r.job, took = ?r.took, result = o.word(), reason = o.reason(), "node failed")
        }
        let succeeded = matches!(o, Outcome::Succeeded);
        let failed_state = (self.vis.on_result(&r.node, o, r.took) && !r.node_uid.is_empty())
            .then(|| self.vis.state_key())
            .flatten();
        let record = succeeded.then(|| self.record_key.clone()).flatten();
        let forget = succeeded.then(|| self.forget_key.clone()).flatten();
        // An Event for what happened on (or was refused for) the node; none for a node that is
        // gone, nor for one already up to date (an unchanged upgrade writes nothing per node).
        let event = (self.node_events
            && !matches!(o, Outcome::Removed(_) | Outcome::AlreadyInstalled)
            && !r.node_uid.is_empty())
        .then(|| node_event(&self.run.prefix, self.template.hash(), &r.job, o));
        if event.is_none() && record.is_none() && forget.is_none() && failed_state.is_none() {
            return;
        }
        let (api, limit) = (self.api.clone(), self.report_slots.clone());
        self.ops.push(Box::pin(async move {
            // Bounded: many nodes can finish at once (adoption of a finished run).
            let _slot = limit.acquire_owned().await;
            let (node, uid) = (&r.node, &r.node_uid);
            if let Some(key) = record {
                if let Err(e) = api.annotate_node(node, uid, &key, Some(&r.record)).await {
                    warn!(node = %node, error = %e, "could not record the install on the Node; the next run re-installs it");
                }
            }
            if let Some(key) = forget {
                if let Err(e) = api.annotate_node(node, uid, &key, None).await {
                    warn!(node = %node, error = %e, "could not remove the install record from the Node");
                }
            }
            if failed_state.is_some() {
                Visibility::mark_failed(&api, failed_state.as_deref(), node, uid).await;
            }
            if let Some((reason, message)) = event {
                let warning = !r.outcome.is_ok();
                if let Err(e) = api.node_event(node, uid, warning, reason, &message).await {
                    tracing::debug!(node = %node, error = %e, "could not record the Event on the Node");
                }
            }
            None
        }));
    }
}

/// The Event recorded on the Node for a result: reason and message.
fn node_event(prefix: &str, hash: &str, job: &str, outcome: &Outcome) -> (&'static str, String) {
    let reason = match outcome {
        Outcome::Succeeded => "KataDeploySucceeded",
        Outcome::AlreadyInstalled => "KataDeployUpToDate",
        Outcome::Skipped(_) => "KataDeploySkipped",
        _ => "KataDeployFailed",
    };
    let message = match outcome.reason() {
        "" => format!("{prefix}: Job {job} succeeded (template {hash})"),
        r => format!("{prefix}: {} ({r})", outcome.word()),
    };
    (reason, message)
}

/// The release's single-flight rule ([`crate::single_flight`]): `true` when this run must yield
/// (an active hook run of the release) and ends here, having touched nothing.
async fn single_flight(api: &ClusterApi, args: &Args) -> Result<bool, StartError> {
    let own = args.owner_job.as_deref();
    let err = |what: &str, e: String| StartError::SingleFlight(format!("{what}: {e}"));
    if let Some(sel) = &args.yield_to {
        match crate::single_flight::must_yield(api, sel, own).await {
            Ok(Some(job)) => {
                warn!(job = %job, "a Helm hook run of this release is in progress: this run yields and does nothing (the next one reconciles)");
                return Ok(true);
            }
            Ok(None) => {}
            Err(e) => return Err(err(&format!("listing Jobs {sel}"), e.to_string())),
        }
    }
    if let Some(cj) = &args.remove_cronjob {
        crate::single_flight::remove_cronjob(api, cj)
            .await
            .map_err(|e| err(&format!("deleting CronJob {cj}"), e.to_string()))?;
    }
    if let Some(sel) = &args.supersede_runs {
        crate::single_flight::stop_runs(api, sel, own, args.discovery_timeout)
            .await
            .map_err(|e| err(&format!("stopping the runs {sel}"), e))?;
    }
    Ok(false)
}

/// Deletes the superseded dispatcher's Job, waits until it is gone, then deletes its per-node
/// Jobs and waits until no Job or pod of it is left: an uninstall never interleaves with an
/// install still running on the same node. Returns the nodes where something of it stayed past
/// the per-node timeout (they are not cleaned by this run), with why.
async fn supersede(
    api: &ClusterApi,
    args: &Args,
    node_timeout: Duration,
    deadline: tokio::time::Instant,
) -> Result<BTreeMap<String, String>, StartError> {
    if let Some(job) = &args.supersede_job {
        let until = (tokio::time::Instant::now() + args.discovery_timeout).min(deadline);
        stop_superseded_job(api, job, &args.discovery_timeout, until).await?;
    }
    match &args.supersede_prefix {
        Some(prefix) => wait_for_leftovers(api, prefix, node_timeout, deadline).await,
        None => Ok(BTreeMap::new()),
    }
}

/// Deletes the superseded dispatcher's own Job and waits until it is gone (it then starts no
/// new per-node Job), within the discovery timeout.
async fn stop_superseded_job(
    api: &ClusterApi,
    job: &str,
    limit: &Duration,
    until: tokio::time::Instant,
) -> Result<(), StartError> {
    info!(job = %job, "stopping the superseded dispatcher first");
    api.delete_job(job)
        .await
        .map_err(|source| SetupError::Api {
            what: format!("delete Job {job}"),
            source,
        })?;
    loop {
        match api.get_job(job).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) => {}
            Err(e) => {
                warn!(job = %job, error = %e, "cannot read the superseded dispatcher's Job; retrying")
            }
        }
        if tokio::time::Instant::now() >= until {
            return Err(StartError::Setup(SetupError::DiscoveryTimeout {
                what: format!("stopping the superseded dispatcher Job {job}"),
                limit: humantime::format_duration(*limit).to_string(),
                last: "it still exists".into(),
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Deletes the per-node Jobs of `prefix` and waits until they and their pods are gone; each
/// Job or pod gets the per-node timeout, then it is reported and the wait goes on without it
/// ([`StopWait`]). Bounded by the run deadline.
async fn wait_for_leftovers(
    api: &ClusterApi,
    prefix: &str,
    node_timeout: Duration,
    deadline: tokio::time::Instant,
) -> Result<BTreeMap<String, String>, StartError> {
    let selector = format!("{}={prefix}", template::LABEL_DISPATCHER);
    let mut wait = StopWait::new(node_timeout);
    loop {
        let last = match api.list_leftovers(&selector).await {
            Ok(listed) => {
                let step = wait.observe(Instant::now(), listed);
                for l in &step.given_up {
                    warn!(prefix = %prefix, kind = ?l.kind, name = %l.name, node = %l.node, timeout = %humantime::format_duration(node_timeout), "still there after the per-node timeout; its node is not cleaned by this run, the others are");
                }
                if step.done {
                    break;
                }
                for l in &step.delete {
                    if let Err(e) = api.delete_job_uid(&l.name, Some(&l.uid)).await {
                        warn!(job = %l.name, error = %e, "could not delete a Job of the superseded dispatcher");
                    }
                }
                step.left
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::SupersedeDeadline {
                prefix: prefix.into(),
                last,
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let stuck = wait.stuck_nodes();
    if stuck.is_empty() {
        info!(prefix = %prefix, "no Job or pod of the superseded dispatcher is left");
    } else {
        let nodes: Vec<&String> = stuck.keys().collect();
        warn!(prefix = %prefix, nodes = ?nodes, "the superseded dispatcher is stopped but for Jobs or pods stuck on these nodes; they are reported failed and not cleaned, the other nodes are");
    }
    Ok(stuck)
}

/// What a run is made of, read and checked before anything is watched or created.
struct Prepared {
    api: ClusterApi,
    template: JobTemplate,
    admission: Admission,
    selection: Targets,
    run: RunIdentity,
    node_timeout: Duration,
}

/// How long a stopped run (SIGTERM, deadline) keeps finishing its in-flight writes: inside the
/// 30 s a pod gets between SIGTERM and SIGKILL by default, with room for the final summary.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Runs the dispatcher to the end.
pub async fn run(args: Args, client: Client) -> Result<Summary, StartError> {
    let started = Instant::now();
    let p = prepare(&args, client).await?;
    let api = p.api.clone();
    let deadline = tokio::time::Instant::from_std(started + args.deadline);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    if !args.dry_run && single_flight(&api, &args).await? {
        return Ok(Summary {
            results: BTreeMap::new(),
            stopped: None,
            retries: api.stats.count(),
            canary: None,
        });
    }
    let mut held = BTreeMap::new();
    if !args.dry_run && (args.supersede_job.is_some() || args.supersede_prefix.is_some()) {
        held = tokio::select! {
            r = supersede(&api, &args, p.node_timeout, deadline) => r?,
            _ = sigterm.recv() => return Ok(interrupted(&api)),
            _ = tokio::signal::ctrl_c() => return Ok(interrupted(&api)),
        };
    }
    // Discovery's own bound starts once the superseded dispatcher is stopped.
    let discovery_until = tokio::time::Instant::now() + args.discovery_timeout;
    let selection = p.selection.to_string();
    let mut d = Driver::new(&args, p, held, sigterm);
    if !d.discover(&args, discovery_until.min(deadline)).await? || !d.settle(args.settle).await {
        return Ok(interrupted(&api));
    }
    let summary = match d.before_rollout(&args, &selection).await? {
        Some(early) => early,
        None => {
            d.rollout(deadline, args.progress_interval).await;
            let summary = d.summary().await;
            remove_after_success(&api, &args.remove_on_success, summary).await
        }
    };
    if let (Some(cm), Some(rec), false) = (
        &args.summary_configmap,
        &args.record_selection,
        args.dry_run,
    ) {
        // A retire's record moves only once every dropped node is clean; an install only ever
        // claims nodes of its own selection, so its first record holds whatever the outcome.
        if summary.all_succeeded() || args.record_if_absent {
            record(&api, cm, rec, args.record_if_absent).await;
        }
    }
    Ok(summary)
}

/// Reads the template and the selection, checks the rights and identifies the run: everything
/// that can refuse the run before anything is created (exit code 2).
async fn prepare(args: &Args, client: Client) -> Result<Prepared, StartError> {
    validate_prefix(&args.name_prefix)?;
    let path = args.template.display().to_string();
    let text =
        std::fs::read_to_string(&args.template).map_err(|source| StartError::ReadTemplate {
            path: path.clone(),
            source,
        })?;
    let template = JobTemplate::parse(&path, &text)?;
    let admission =
        Admission::from_template(template.job(), args.ignore_taints).map_err(|problem| {
            StartError::Tolerations {
                path: path.clone(),
                problem,
            }
        })?;
    let selection = Targets::from_inputs(
        &args.nodes,
        &args.selectors,
        &args.except_nodes,
        &args.except_selectors,
    )?
    .within(&args.within_nodes, &args.within_selectors)?;
    let namespace = resolve_namespace(args.namespace.as_deref())?;
    let api = ClusterApi::new(client, &namespace);
    if !args.dry_run {
        api.preflight(&rights(args, &namespace)).await?;
    }
    let selection = match (&args.summary_configmap, args.within_recorded) {
        (Some(cm), true) => restrict_to_record(&api, cm, selection).await?,
        _ => selection,
    };
    let run = identify(&api, args, namespace).await?;
    let node_timeout = node_timeout(args, &template);
    info!(namespace = %run.namespace, run = %run.run_id, template_hash = template.hash(), selection = %selection, budget = %args.max_failures, node_timeout = %humantime::format_duration(node_timeout), "dispatcher starting");
    Ok(Prepared {
        api,
        template,
        admission,
        selection,
        run,
        node_timeout,
    })
}

/// The run's identity: prefix, run id (given, else the owner Job's UID, else random), owner.
async fn identify(
    api: &ClusterApi,
    args: &Args,
    namespace: String,
) -> Result<RunIdentity, StartError> {
    let owner = match &args.owner_job {
        Some(name) => Some((name.clone(), api.owner_uid(name).await?)),
        None => None,
    };
    let run_id = args
        .run_id
        .clone()
        .or_else(|| owner.as_ref().map(|(_, uid)| uid.clone()))
        .unwrap_or_else(random_run_id);
    Ok(RunIdentity {
        prefix: args.name_prefix.clone(),
        run_id,
        owner,
        namespace,
    })
}

/// `--node-timeout`, else the template's `activeDeadlineSeconds` plus 2 minutes, else 1 hour.
fn node_timeout(args: &Args, template: &JobTemplate) -> Duration {
    args.node_timeout
        .or_else(|| {
            template
                .active_deadline()
                .map(|d| d + Duration::from_secs(120))
        })
        .unwrap_or(Duration::from_secs(3600))
}

type Watch<K> = futures::stream::BoxStream<'static, Result<Event<K>, watcher::Error>>;

/// Three watches: nodes (selection, taints, late, deleted or re-created nodes), this
/// dispatcher's Jobs (adoption, tracking) and their pods (a node is busy while one runs).
/// Each re-lists by itself after an expiry; the lifecycle diffs every re-list.
struct Watches {
    nodes: Watch<Node>,
    jobs: Watch<Job>,
    pods: Watch<Pod>,
}

impl Watches {
    fn start(api: &ClusterApi, prefix: &str) -> Self {
        // Pages bound the memory of a (re-)list: Nodes are small (~3.5 KB), Jobs and pods carry
        // a whole pod template or status (~7 KB), so their pages are smaller.
        let page = 500;
        let small_page = 100;
        let own = format!("{}={prefix}", template::LABEL_DISPATCHER);
        let owned = || {
            watcher::Config::default()
                .labels(&own)
                .page_size(small_page)
        };
        Self {
            nodes: watcher::watcher(
                api.nodes.clone(),
                watcher::Config::default().page_size(page),
            )
            .default_backoff()
            .boxed(),
            jobs: watcher::watcher(api.jobs.clone(), owned())
                .default_backoff()
                .boxed(),
            pods: watcher::watcher(api.pods.clone(), owned())
                .default_backoff()
                .boxed(),
        }
    }
}

fn node_input(tr: &Translate, ev: Event<Node>) -> Input {
    match ev {
        Event::Init => Input::NodeListStarted,
        Event::InitApply(n) | Event::Apply(n) => Input::NodeSeen(tr.node(&n)),
        Event::Delete(n) => Input::NodeGone(n.metadata.name.unwrap_or_default()),
        Event::InitDone => Input::NodeListDone,
    }
}

fn job_input(tr: &Translate, ev: Event<Job>) -> Input {
    match ev {
        Event::Init => Input::JobListStarted,
        Event::InitApply(j) | Event::Apply(j) => Input::JobSeen(tr.job(&j)),
        Event::Delete(j) => Input::JobGone(j.metadata.name.unwrap_or_default()),
        Event::InitDone => Input::JobListDone,
    }
}

fn pod_input(ev: Event<Pod>) -> Input {
    match ev {
        Event::Init => Input::PodListStarted,
        Event::InitApply(p) | Event::Apply(p) => Input::PodSeen(pod_obs(&p)),
        Event::Delete(p) => Input::PodGone(p.metadata.name.unwrap_or_default()),
        Event::InitDone => Input::PodListDone,
    }
}

/// What one turn of a watch loop produced.
// One short-lived value per turn, never stored: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Turn {
    /// An input for the lifecycle (or nothing: a retried watch error, a timer, a progress line).
    Input(Option<Input>),
    /// Stop (interrupted, or the run deadline).
    Stop(StopReason),
}

/// The lifecycle, the shell carrying out its actions and the watches feeding it.
struct Driver {
    lc: Lifecycle,
    shell: Shell,
    tr: Translate,
    watches: Watches,
    sigterm: tokio::signal::unix::Signal,
}

impl Driver {
    fn new(
        args: &Args,
        p: Prepared,
        held: BTreeMap<String, String>,
        sigterm: tokio::signal::unix::Signal,
    ) -> Self {
        let named = match &p.selection.selection {
            NodeSelection::Names(n) => Some(n.clone()),
            _ => None,
        };
        let cfg = Config {
            parallelism: args.parallelism as usize,
            budget: args.max_failures,
            node_timeout: Some(p.node_timeout),
            skip_installed: skip_rule(args, p.template.hash()),
            unready_grace: args.unready_grace,
            unready: args.unready,
            named,
            held,
            canary: args.canary,
        };
        let tr = Translate {
            selection: p.selection,
            admission: p.admission,
            installed_key: installed_annotation(&p.run.prefix),
            marker: args.installed_label.clone(),
            run_id: p.run.run_id.clone(),
            template_hash: p.template.hash().to_owned(),
        };
        let shell = Shell {
            api: p.api.clone(),
            template: p.template,
            ops: FuturesUnordered::new(),
            node_events: args.node_events && !args.dry_run,
            record_key: args
                .skip_installed
                .then(|| installed_annotation(&args.name_prefix)),
            forget_key: args
                .forget_record
                .as_deref()
                .or(args.supersede_prefix.as_deref())
                .map(installed_annotation),
            report_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(16)),
            vis: Visibility::new(
                p.api.clone(),
                VisibilityConfig {
                    state_label: args.state_label.clone().filter(|_| !args.dry_run),
                    summary: args
                        .summary_configmap
                        .clone()
                        .filter(|_| !args.dry_run)
                        .map(|cm| (cm, args.summary_key.clone())),
                    prefix: p.run.prefix.clone(),
                    run: p.run.run_id.clone(),
                    parallelism: args.parallelism as usize,
                },
            ),
            run: p.run,
        };
        Self {
            lc: Lifecycle::new(cfg, &shell.run.prefix),
            watches: Watches::start(&p.api, &shell.run.prefix),
            shell,
            tr,
            sigterm,
        }
    }

    fn feed(&mut self, input: Input) {
        let actions = self.lc.handle(Instant::now(), input);
        self.shell.carry_out(actions);
    }

    /// The three initial lists, bounded by `limit`. `Ok(false)`: interrupted.
    async fn discover(
        &mut self,
        args: &Args,
        limit: tokio::time::Instant,
    ) -> Result<bool, StartError> {
        let (mut nodes_ready, mut jobs_ready, mut pods_ready) = (false, false, false);
        let mut last_error = String::from("no answer yet");
        let api = self.shell.api.clone();
        while !(nodes_ready && jobs_ready && pods_ready) {
            let w = &mut self.watches;
            let input = tokio::select! {
                Some(ev) = w.nodes.next() => match ev {
                    Ok(ev) => { nodes_ready |= matches!(ev, Event::InitDone); Some(node_input(&self.tr, ev)) }
                    Err(e) => { discovery_error(&api, "nodes", &e, &mut last_error)?; None }
                },
                Some(ev) = w.jobs.next() => match ev {
                    Ok(ev) => { jobs_ready |= matches!(ev, Event::InitDone); Some(job_input(&self.tr, ev)) }
                    Err(e) => { discovery_error(&api, "jobs", &e, &mut last_error)?; None }
                },
                Some(ev) = w.pods.next() => match ev {
                    Ok(ev) => { pods_ready |= matches!(ev, Event::InitDone); Some(pod_input(ev)) }
                    Err(e) => { discovery_error(&api, "pods", &e, &mut last_error)?; None }
                },
                _ = tokio::time::sleep_until(limit) => {
                    let limit = humantime::format_duration(args.discovery_timeout).to_string();
                    return Err(SetupError::DiscoveryTimeout { what: "listing nodes, Jobs and pods".into(), limit, last: last_error }.into());
                }
                _ = self.sigterm.recv() => return Ok(false),
                _ = tokio::signal::ctrl_c() => return Ok(false),
            };
            if let Some(input) = input {
                self.feed(input);
            }
        }
        Ok(true)
    }

    /// Waits until the selection has not changed for `settle` (at most 5 × `settle`).
    /// `false`: interrupted.
    async fn settle(&mut self, settle: Duration) -> bool {
        if settle.is_zero() {
            return true;
        }
        let cap = Instant::now() + settle * 5;
        let mut last_change = Instant::now();
        let mut seen = self.lc.selection_changes();
        info!(settle = ?settle, "waiting for the selection to settle");
        while Instant::now() < cap && last_change.elapsed() < settle {
            let wait = settle.saturating_sub(last_change.elapsed());
            let w = &mut self.watches;
            let input = tokio::select! {
                Some(ev) = w.nodes.next() => ev.ok().map(|ev| node_input(&self.tr, ev)),
                Some(ev) = w.jobs.next() => ev.ok().map(|ev| job_input(&self.tr, ev)),
                Some(ev) = w.pods.next() => ev.ok().map(pod_input),
                _ = tokio::time::sleep(wait) => None,
                _ = self.sigterm.recv() => return false,
            };
            if let Some(input) = input {
                self.feed(input);
                if self.lc.selection_changes() != seen {
                    seen = self.lc.selection_changes();
                    last_change = Instant::now();
                }
            }
        }
        info!(nodes = self.lc.targets().len(), "selection settled");
        true
    }

    /// The checks between discovery and rollout: an empty selection, a dry run. `Some`: the
    /// run ends here with this summary; `None`: dispatching has started.
    async fn before_rollout(
        &mut self,
        args: &Args,
        selection: &str,
    ) -> Result<Option<Summary>, StartError> {
        let api = self.shell.api.clone();
        let empty = || Summary {
            results: BTreeMap::new(),
            stopped: None,
            retries: api.stats.count(),
            canary: None,
        };
        if self.lc.targets().is_empty() && self.lc.missing() == 0 {
            if args.require_nodes {
                return Err(StartError::NoNodes(selection.to_owned()));
            }
            warn!(selection = %selection, "no node matches the selection; nothing to do");
            return Ok(Some(
                remove_after_success(&api, &args.remove_on_success, empty()).await,
            ));
        }
        if self.lc.targets().is_empty() && args.require_nodes {
            return Err(StartError::NoNodes(selection.to_owned()));
        }
        if args.dry_run {
            print_plan(&mut self.lc, args.parallelism);
            return Ok(Some(empty()));
        }
        info!(
            nodes = self.lc.targets().len(),
            parallelism = args.parallelism,
            "rollout planned"
        );
        self.feed(Input::DiscoveryDone);
        self.write_summary();
        Ok(None)
    }

    /// Dispatches and tracks until every node is done, the run deadline or a signal.
    async fn rollout(&mut self, deadline: tokio::time::Instant, progress_interval: Duration) {
        let mut progress = tokio::time::interval(progress_interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = Instant::now();
        while !(self.lc.is_done() && self.shell.ops.is_empty()) {
            match self.next_turn(deadline, &mut progress, started).await {
                Turn::Input(Some(input)) => self.feed(input),
                Turn::Input(None) => {}
                Turn::Stop(reason) => {
                    self.feed(Input::Stop(reason));
                    self.finish_pending(STOP_GRACE).await;
                    break;
                }
            }
            if self.lc.is_done() && self.lc.stopped().is_some() {
                // Stopped by the budget: in-flight nodes are done; reports may still be written.
                while let Some(done) = self.shell.ops.next().await {
                    if let Some(input) = done {
                        self.feed(input);
                    }
                }
                break;
            }
        }
        info!(
            peak_busy = self.lc.peak(),
            "{}",
            report::progress_line(&self.lc.progress(), started.elapsed())
        );
    }

    /// Finishes what is already in flight (install record writes and removals, state labels,
    /// Events, Job creations) within `grace`: a run stopped by SIGTERM or its deadline must not
    /// drop a record change it already decided. Nothing new is dispatched once stopped.
    async fn finish_pending(&mut self, grace: Duration) {
        let until = tokio::time::Instant::now() + grace;
        while !self.shell.ops.is_empty() {
            match tokio::time::timeout_at(until, self.shell.ops.next()).await {
                Ok(Some(Some(input))) => self.feed(input),
                Ok(Some(None)) => {}
                Ok(None) => break,
                Err(_) => {
                    warn!(pending = self.shell.ops.len(), grace = ?grace, "stopping: requests still in flight after the grace period are dropped");
                    break;
                }
            }
        }
    }

    /// Waits for the next thing that happens during the rollout.
    async fn next_turn(
        &mut self,
        deadline: tokio::time::Instant,
        progress: &mut tokio::time::Interval,
        started: Instant,
    ) -> Turn {
        let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let next_timer = self
            .lc
            .next_deadline()
            .map(tokio::time::Instant::from_std)
            .unwrap_or(far);
        let (w, stats) = (&mut self.watches, &self.shell.api.stats);
        let watch_error = |what: &str, e: watcher::Error| {
            stats.record();
            warn!(error = %e, watch = what, "watch error; the watch resumes by itself");
            None
        };
        let input = tokio::select! {
            Some(done) = self.shell.ops.next(), if !self.shell.ops.is_empty() => done,
            Some(ev) = w.jobs.next() => ev.map_or_else(|e| watch_error("jobs", e), |ev| Some(job_input(&self.tr, ev))),
            Some(ev) = w.pods.next() => ev.map_or_else(|e| watch_error("pods", e), |ev| Some(pod_input(ev))),
            Some(ev) = w.nodes.next() => ev.map_or_else(|e| watch_error("nodes", e), |ev| Some(node_input(&self.tr, ev))),
            _ = tokio::time::sleep_until(next_timer) => Some(Input::Tick),
            _ = progress.tick() => { info!("{}", report::progress_line(&self.lc.progress(), started.elapsed())); self.write_summary(); None }
            _ = tokio::time::sleep_until(deadline) => { warn!("run deadline reached; stopping"); return Turn::Stop(StopReason::Deadline) }
            _ = tokio::signal::ctrl_c() => { warn!("interrupted; stopping"); return Turn::Stop(StopReason::Interrupted) }
            _ = self.sigterm.recv() => { warn!("SIGTERM; stopping"); return Turn::Stop(StopReason::Interrupted) }
        };
        Turn::Input(input)
    }

    /// Writes the rollout summary when it changed (in the background, one write at a time).
    fn write_summary(&mut self) {
        let canary = self.lc.canary();
        if let Some(text) = self.shell.vis.running_text(&self.lc.progress(), canary) {
            let write = self.shell.vis.write(text);
            self.shell.ops.push(Box::pin(async move {
                write.await;
                None
            }));
        }
    }

    /// The per-node results, once the final summary is written.
    async fn summary(self) -> Summary {
        let stopped = self.lc.stopped().map(ToString::to_string);
        let mut vis = self.shell.vis.clone();
        let canary = self.lc.canary();
        if let Some(c) = &canary {
            info!(canary = ?c.nodes, state = %c.state, "canary");
        }
        let results = self.lc.into_results();
        if let Some(text) = vis.final_text(&results, stopped.as_deref(), canary.clone()) {
            vis.write(text).await;
        }
        Summary {
            retries: self.shell.api.stats.count(),
            results,
            stopped,
            canary,
        }
    }
}

fn discovery_error(
    api: &ClusterApi,
    what: &str,
    e: &watcher::Error,
    last: &mut String,
) -> Result<(), StartError> {
    api.stats.record();
    if let Some(why) = fatal_watch_error(e) {
        let verb = "list/watch";
        return Err(SetupError::Forbidden {
            verb: verb.into(),
            resource: format!("{what} ({why})"),
            scope: "this run".into(),
        }
        .into());
    }
    warn!(error = %e, watch = what, "watch error during discovery; retrying");
    *last = e.to_string();
    Ok(())
}

fn interrupted(api: &ClusterApi) -> Summary {
    warn!("interrupted before dispatching; nothing was created");
    Summary {
        results: BTreeMap::new(),
        stopped: Some(StopReason::Interrupted.to_string()),
        retries: api.stats.count(),
        canary: None,
    }
}

/// Deletes `jobs` when the run fully succeeded (failed runs keep them for inspection).
async fn remove_after_success(api: &ClusterApi, jobs: &[String], summary: Summary) -> Summary {
    if summary.all_succeeded() {
        for job in jobs {
            match api.delete_job(job).await {
                Ok(()) => info!(job = %job, "removed after success, with its per-node Jobs"),
                Err(e) => {
                    warn!(job = %job, error = %e, "could not remove the Job; delete it by hand")
                }
            }
        }
    }
    summary
}

fn random_run_id() -> String {
    use sha2::{Digest, Sha256};
    let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
    hex::encode(Sha256::digest(seed.as_bytes()))[..16].to_owned()
}

fn print_plan(lc: &mut Lifecycle, parallelism: u32) {
    let nodes = lc.targets();
    println!(
        "dry run: {} nodes, parallelism {}, nothing will be created",
        nodes.len(),
        (parallelism as usize).min(nodes.len())
    );
    println!("{:<40}  {:<63}  ACTION", "NODE", "JOB");
    for node in nodes {
        let job = lc.job_name(&node);
        let action = lc.plan_of(&node);
        println!("{node:<40}  {job:<63}  {action}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;

    fn translate() -> Translate {
        let tpl = json!({"spec": {"template": {"spec": {"tolerations": [{"key": "kwok", "operator": "Exists"}]}}}});
        Translate {
            selection: Targets::from_inputs(&[], &["zone=a".into()], &[], &[]).unwrap(),
            admission: Admission::from_template(&tpl, false).unwrap(),
            installed_key: installed_annotation("kd"),
            marker: Some(("katacontainers.io/kata-runtime".into(), "true".into())),
            run_id: "run-1".into(),
            template_hash: "h1".into(),
        }
    }

    #[test]
    fn a_node_is_read_with_selection_readiness_taints_and_install_record() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "uid": "u1", "labels": {"zone": "a"}, "annotations": {"katacontainers.io/installed-by-kd": "h0"}},
            "spec": {"taints": [{"key": "kwok", "effect": "NoSchedule"}, {"key": "gpu", "value": "x", "effect": "NoExecute"}]},
            "status": {"conditions": [{"type": "Ready", "status": "False"}],
                "runtimeHandlers": [{"name": ""}, {"name": "kata-qemu"}], "nodeInfo": {
                "machineID": "m", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "containerd://2.0.5",
                "kubeletVersion": "v1.34.4", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}}
        }))
        .unwrap();
        let o = translate().node(&node);
        assert!(o.selected && !o.ready);
        assert_eq!(o.record.as_deref(), Some("h0"));
        assert!(!o.marked, "no marker label");
        assert_eq!(
            o.runtime_handlers,
            ["kata-qemu"],
            "the default (empty) handler is left out"
        );
        assert!(
            o.untolerated
                .as_deref()
                .is_some_and(|t| t.contains("gpu=x:NoExecute")),
            "{o:?}"
        );
        assert_eq!(
            (o.facts.uid.as_str(), o.facts.machine_id.as_str()),
            ("u1", "m")
        );
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "n2",
            "labels": {"zone": "b", "katacontainers.io/kata-runtime": "true"}}}))
        .unwrap();
        let o = translate().node(&bare);
        assert!(
            !o.selected && o.ready,
            "no Ready condition yet is not NotReady"
        );
        assert!(o.marked && o.runtime_handlers.is_empty());
        let mut t = translate();
        t.marker = None;
        assert!(t.node(&node).marked, "no --installed-label: not checked");
    }

    #[test]
    fn a_ready_node_with_the_not_ready_taint_still_on_is_not_ready_yet() {
        // Was: read as Ready with an untolerated taint, so the run ended reporting it "skipped"
        // (a success, advising a toleration) though the node controller had only not lifted the
        // taint the API server puts on every new Node (chart e2e: simulated nodes got no Job).
        let node = |taints: serde_json::Value| -> Node {
            serde_json::from_value(json!({"metadata": {"name": "n1", "labels": {"zone": "a"}},
                "spec": {"taints": taints},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
            .unwrap()
        };
        let t = translate();
        let o = t.node(&node(json!([{"key": "kwok", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}])));
        assert!(!o.ready, "{o:?}");
        let why = o.untolerated.as_deref().unwrap_or_default();
        assert!(
            why.contains("node.kubernetes.io/not-ready:NoSchedule")
                && !why.contains("job.nodeJobs.tolerations"),
            "{why}"
        );
        // A rule taint is still a rule taint: the node is Ready and skipped by the lifecycle.
        let o = t.node(&node(json!([{"key": "gpu", "effect": "NoSchedule"}])));
        assert!(o.ready && o.untolerated.is_some(), "{o:?}");
        // The DaemonSet's implied not-ready:NoExecute toleration still applies.
        let o = t.node(&node(
            json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]),
        ));
        assert!(o.ready && o.untolerated.is_none(), "{o:?}");
        // The cleanup dispatcher (--ignore-taints) reaches the node as before.
        let mut ignoring = translate();
        ignoring.admission = Admission::from_template(&json!({}), true).unwrap();
        let o = ignoring.node(&node(
            json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]),
        ));
        assert!(o.ready && o.untolerated.is_none(), "{o:?}");
    }

    #[test]
    fn a_job_is_ours_only_for_this_run_and_template() {
        let job = |run: &str, hash: &str| -> Job {
            serde_json::from_value(json!({"metadata": {"name": "kd-n1", "uid": "j1",
                "labels": {"katacontainers.io/run": run},
                "annotations": {"katacontainers.io/node-name": "n1", "katacontainers.io/node-uid": "u1", "katacontainers.io/template-hash": hash}}}))
            .unwrap()
        };
        let t = translate();
        let o = t.job(&job("run-1", "h1"));
        assert!(o.ours && o.node == "n1" && o.node_uid == "u1" && !o.deleting);
        assert!(!t.job(&job("run-0", "h1")).ours);
        assert!(!t.job(&job("run-1", "h0")).ours);
    }

    #[test]
    fn pods_carry_their_job_and_liveness() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "labels": {"batch.kubernetes.io/controller-uid": "j1"}},
            "spec": {"nodeName": "n1", "containers": []}, "status": {"phase": "Running"}}))
        .unwrap();
        assert_eq!(
            pod_obs(&pod),
            PodObs {
                name: "p".into(),
                node: "n1".into(),
                job_uid: "j1".into(),
                live: true
            }
        );
        let done: Pod = serde_json::from_value(
            json!({"metadata": {"name": "p"}, "status": {"phase": "Succeeded"}}),
        )
        .unwrap();
        assert!(!pod_obs(&done).live);
    }

    #[test]
    fn reinstall_all_skips_nothing_and_the_rule_carries_the_expected_handlers() {
        let parse = |extra: &[&str]| {
            let mut v = vec!["d", "--template", "t", "--skip-installed"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v).unwrap()
        };
        let rule = skip_rule(&parse(&["--expect-handler", "kata-qemu"]), "h1").unwrap();
        assert_eq!(
            (rule.hash.as_str(), &rule.handlers[..]),
            ("h1", &["kata-qemu".to_string()][..])
        );
        assert_eq!(skip_rule(&parse(&["--reinstall-all"]), "h1"), None);
        let plain = Args::try_parse_from(["d", "--template", "t"]).unwrap();
        assert_eq!(skip_rule(&plain, "h1"), None);
    }

    #[test]
    fn the_preflight_covers_every_verb_the_run_uses() {
        let args = Args::try_parse_from(["d", "--template", "t"]).unwrap();
        let have = |r: &[Right], verb: &str, res: &str| {
            r.iter().any(|x| x.verb == verb && x.resource == res)
        };
        let r = rights(&args, "ns");
        for (verb, res) in [
            ("list", "nodes"),
            ("watch", "nodes"),
            ("create", "jobs"),
            ("get", "jobs"),
            ("list", "jobs"),
            ("watch", "jobs"),
            ("delete", "jobs"),
            ("list", "pods"),
            ("watch", "pods"),
            ("create", "events"),
        ] {
            assert!(have(&r, verb, res), "{verb} {res}");
        }
        assert!(
            !have(&r, "patch", "nodes"),
            "patch only when the install record is used"
        );
        let args = Args::try_parse_from(["d", "--template", "t", "--skip-installed"]).unwrap();
        assert!(have(&rights(&args, "ns"), "patch", "nodes"));
        let args = Args::try_parse_from(["d", "--template", "t", "--forget-record", "kd-install"])
            .unwrap();
        assert!(
            have(&rights(&args, "ns"), "patch", "nodes"),
            "the retire run removes the install record"
        );
    }

    #[test]
    fn rights_errors_stop_discovery_and_transient_ones_do_not() {
        let api_err = |code: u16| {
            kube::Error::Api(
                serde_json::from_value(json!({"status": "Failure", "message": "no", "reason": "Forbidden", "code": code})).unwrap(),
            )
        };
        assert!(fatal_watch_error(&watcher::Error::InitialListFailed(api_err(403))).is_some());
        assert!(fatal_watch_error(&watcher::Error::InitialListFailed(api_err(503))).is_none());
    }
}
