//! One dispatcher run: discover nodes and existing Jobs through two watches, then pace the
//! rollout, reacting to Job and Node events. Decisions come from the pure core (`pacing`,
//! `naming`, `template`, `status`); this module only carries them out.

use crate::cli::Args;
use crate::kube_io::{ClusterApi, SetupError};
use crate::naming::{validate_prefix, NameBook, NamingError};
use crate::pacing::{Outcome, Rollout, StopReason};
use crate::report;
use crate::select::{NodeSelection, SelectorError};
use crate::status::{job_phase, JobPhase};
use crate::template::{self, JobTemplate, NodeFacts, RunIdentity, TemplateError};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// No namespace known.
    #[error("no namespace: pass --namespace or set POD_NAMESPACE (the chart sets it from the downward API)")]
    NoNamespace,
    /// Empty selection with --require-nodes.
    #[error("no node matches {0}; label the nodes or change the selection, or drop --require-nodes to accept an empty run")]
    NoNodes(String),
}

/// The result of a finished run.
#[derive(Debug)]
pub struct Summary {
    /// Per node: outcome and how long its Job took.
    pub results: BTreeMap<String, (Outcome, Option<Duration>)>,
    /// Why dispatching stopped early, if it did.
    pub stopped: Option<String>,
    /// Transient API errors retried and watches resumed.
    pub retries: usize,
}

impl Summary {
    /// Every targeted node succeeded.
    pub fn all_succeeded(&self) -> bool {
        self.stopped.is_none() && self.results.values().all(|(o, _)| *o == Outcome::Succeeded)
    }
}

/// What we know of a Job seen through the watch.
#[derive(Debug, Clone)]
struct SeenJob {
    run: String,
    template_hash: String,
    phase: JobPhase,
}

impl SeenJob {
    fn from(job: &Job) -> Self {
        let label = |k: &str| job.metadata.labels.as_ref().and_then(|l| l.get(k)).cloned().unwrap_or_default();
        let annotation = |k: &str| job.metadata.annotations.as_ref().and_then(|a| a.get(k)).cloned().unwrap_or_default();
        Self { run: label(template::LABEL_RUN), template_hash: annotation(template::ANNOTATION_TEMPLATE_HASH), phase: job_phase(job) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for the stale Job of an earlier run to be deleted.
    Replacing,
    /// Create call in flight.
    Creating,
    /// Our Job exists and runs.
    Running,
    /// Failed; reading the pod for the reason.
    Finishing,
}

struct Track {
    stage: Stage,
    started: Instant,
}

enum OpDone {
    Created { node: String, result: Result<(), kube::Error> },
    Deleted { node: String, result: Result<(), kube::Error> },
    Conflict { node: String, existing: Result<Option<Job>, kube::Error> },
    Detail { node: String, reason: String },
    /// The Job of a node that is gone was deleted (or could not be; logged).
    Abandoned,
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

fn node_facts(node: &Node) -> NodeFacts {
    let info = node.status.as_ref().and_then(|s| s.node_info.as_ref());
    let get = |f: fn(&k8s_openapi::api::core::v1::NodeSystemInfo) -> &String| info.map(f).cloned().unwrap_or_default();
    NodeFacts {
        name: node.metadata.name.clone().unwrap_or_default(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        machine_id: get(|i| &i.machine_id),
        container_runtime_version: get(|i| &i.container_runtime_version),
        kubelet_version: get(|i| &i.kubelet_version),
        architecture: get(|i| &i.architecture),
    }
}

struct Dispatcher {
    api: ClusterApi,
    template: JobTemplate,
    run: RunIdentity,
    selection: NodeSelection,
    facts: BTreeMap<String, NodeFacts>,
    names: NameBook,
    seen: HashMap<String, SeenJob>,
    tracks: HashMap<String, Track>,
    rollout: Option<Rollout>,
    ops: FuturesUnordered<BoxFuture<'static, OpDone>>,
    relist: Option<HashSet<String>>,
    parallelism: usize,
    max_failures: usize,
}

/// Runs the dispatcher to the end.
pub async fn run(args: Args, client: Client) -> Result<Summary, StartError> {
    let started = Instant::now();
    validate_prefix(&args.name_prefix)?;
    let path = args.template.display().to_string();
    let text = std::fs::read_to_string(&args.template).map_err(|source| StartError::ReadTemplate { path: path.clone(), source })?;
    let template = JobTemplate::parse(&path, &text)?;
    let selection = NodeSelection::from_inputs(&args.nodes, &args.selectors)?;
    let namespace = resolve_namespace(args.namespace.as_deref())?;
    let api = ClusterApi::new(client, &namespace);
    if !args.dry_run {
        api.preflight().await?;
    }
    let owner = match &args.owner_job {
        Some(name) => Some((name.clone(), api.owner_uid(name).await?)),
        None => None,
    };
    let run_id = args
        .run_id
        .clone()
        .or_else(|| owner.as_ref().map(|(_, uid)| uid.clone()))
        .unwrap_or_else(random_run_id);
    let run = RunIdentity { prefix: args.name_prefix.clone(), run_id, owner, namespace };
    info!(namespace = %run.namespace, run = %run.run_id, template_hash = template.hash(), selection = %selection, "dispatcher starting");

    let mut d = Dispatcher {
        names: NameBook::new(&run.prefix),
        api,
        template,
        run,
        selection,
        facts: BTreeMap::new(),
        seen: HashMap::new(),
        tracks: HashMap::new(),
        rollout: None,
        ops: FuturesUnordered::new(),
        relist: None,
        parallelism: args.parallelism as usize,
        max_failures: args.max_failures as usize,
    };

    // One watch on nodes (selection, late nodes, deleted or re-created nodes) and one on this
    // dispatcher's Jobs (adoption and tracking). Both re-list by themselves when a watch expires.
    let node_api = d.api.nodes.clone();
    let mut node_events = watcher::watcher(node_api, watcher::Config::default().page_size(500)).default_backoff().boxed();
    let job_selector = format!("{}={}", template::LABEL_DISPATCHER, d.run.prefix);
    let mut job_events =
        watcher::watcher(d.api.jobs.clone(), watcher::Config::default().labels(&job_selector).page_size(500)).default_backoff().boxed();

    // --- discovery: both initial lists, then optional settling ---
    let (mut nodes_ready, mut jobs_ready) = (false, false);
    while !(nodes_ready && jobs_ready) {
        tokio::select! {
            Some(ev) = node_events.next() => match ev {
                Ok(Event::InitDone) => nodes_ready = true,
                Ok(ev) => { d.on_node_event(ev); }
                Err(e) => { d.api.stats.record(); warn!(error = %e, "node watch error; retrying"); }
            },
            Some(ev) = job_events.next() => match ev {
                Ok(Event::InitDone) => jobs_ready = true,
                Ok(ev) => d.on_job_event(ev),
                Err(e) => { d.api.stats.record(); warn!(error = %e, "job watch error; retrying"); }
            },
        }
    }
    if !args.settle.is_zero() {
        let cap = Instant::now() + args.settle * 5;
        let mut last_change = Instant::now();
        info!(settle = ?args.settle, "waiting for the selection to settle");
        while Instant::now() < cap && last_change.elapsed() < args.settle {
            let wait = args.settle.saturating_sub(last_change.elapsed());
            tokio::select! {
                Some(ev) = node_events.next() => if let Ok(ev) = ev { if d.on_node_event(ev) { last_change = Instant::now(); } },
                _ = tokio::time::sleep(wait) => {},
            }
        }
        info!(nodes = d.facts.len(), "selection settled");
    }
    if d.facts.is_empty() {
        if args.require_nodes {
            return Err(StartError::NoNodes(d.selection.to_string()));
        }
        warn!(selection = %d.selection, "no node matches the selection; nothing to do");
        let summary = Summary { results: BTreeMap::new(), stopped: None, retries: d.api.stats.count() };
        return Ok(remove_after_success(&d.api, &args.remove_on_success, summary).await);
    }
    if args.dry_run {
        d.print_plan();
        return Ok(Summary { results: BTreeMap::new(), stopped: None, retries: d.api.stats.count() });
    }
    d.start_rollout();

    // --- rollout ---
    let deadline = tokio::time::Instant::from_std(started + args.deadline);
    let mut progress = tokio::time::interval(args.progress_interval);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    let rollout_started = Instant::now();
    d.fill_slots();
    loop {
        let done = d.rollout.as_ref().is_some_and(Rollout::is_done) && d.ops.is_empty();
        if done {
            break;
        }
        tokio::select! {
            Some(op) = d.ops.next(), if !d.ops.is_empty() => d.on_op_done(op),
            Some(ev) = job_events.next() => match ev {
                Ok(ev) => d.on_job_event(ev),
                Err(e) => { d.api.stats.record(); warn!(error = %e, "job watch error; the watch resumes by itself"); }
            },
            Some(ev) = node_events.next() => match ev {
                Ok(ev) => { d.on_node_event(ev); }
                Err(e) => { d.api.stats.record(); warn!(error = %e, "node watch error; the watch resumes by itself"); }
            },
            _ = progress.tick() => {
                if let Some(r) = &d.rollout { info!("{}", report::progress_line(&r.progress(), rollout_started.elapsed())); }
            },
            _ = tokio::time::sleep_until(deadline) => { d.stop(StopReason::Deadline); break; }
            _ = tokio::signal::ctrl_c() => { d.stop(StopReason::Interrupted); break; }
            _ = sigterm.recv() => { d.stop(StopReason::Interrupted); break; }
        }
        d.fill_slots();
    }
    let rollout = d.rollout.take().expect("rollout started");
    let stopped = rollout.stopped().map(ToString::to_string);
    let summary = Summary { results: rollout.into_results(), stopped, retries: d.api.stats.count() };
    Ok(remove_after_success(&d.api, &args.remove_on_success, summary).await)
}

/// Deletes `jobs` when the run fully succeeded (failed runs keep them for inspection).
async fn remove_after_success(api: &ClusterApi, jobs: &[String], summary: Summary) -> Summary {
    if summary.all_succeeded() {
        for job in jobs {
            match api.delete_job(job).await {
                Ok(()) => info!(job = %job, "removed after success, with its per-node Jobs"),
                Err(e) => warn!(job = %job, error = %e, "could not remove the Job; delete it by hand"),
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

impl Dispatcher {
    fn rollout(&mut self) -> &mut Rollout {
        self.rollout.as_mut().expect("rollout started")
    }

    /// Returns whether the selection changed.
    fn on_node_event(&mut self, ev: Event<Node>) -> bool {
        match ev {
            Event::Apply(node) | Event::InitApply(node) => self.on_node_applied(&node),
            Event::Delete(node) => self.on_node_deleted(node.metadata.name.as_deref().unwrap_or_default()),
            Event::Init | Event::InitDone => false,
        }
    }

    fn on_node_applied(&mut self, node: &Node) -> bool {
        let facts = node_facts(node);
        let empty = BTreeMap::new();
        let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
        if !self.selection.matches(&facts.name, labels) {
            return false;
        }
        let name = facts.name.clone();
        match self.facts.get(&name) {
            None => {
                self.facts.insert(name.clone(), facts);
                if let Some(r) = self.rollout.as_mut() {
                    info!(node = %name, "node joined the selection during the run; queued");
                    r.enqueue(&name);
                }
                true
            }
            Some(old) if old.uid != facts.uid => {
                let old_uid = old.uid.clone();
                self.facts.insert(name.clone(), facts.clone());
                if self.tracks.contains_key(&name) {
                    let reason = format!(
                        "node was re-created under the same name (UID {old_uid} -> {}) while its Job ran; the Job was deleted so the new machine is not touched. Re-run (helm upgrade) to install it",
                        facts.uid
                    );
                    self.abandon(&name, reason);
                }
                true
            }
            Some(_) => {
                self.facts.insert(name, facts);
                false
            }
        }
    }

    fn on_node_deleted(&mut self, name: &str) -> bool {
        if self.facts.remove(name).is_none() {
            return false;
        }
        if self.tracks.contains_key(name) {
            self.abandon(name, "node was deleted while its Job ran; the Job was deleted so a machine that later takes this name is not touched by it".into());
        } else if let Some(r) = self.rollout.as_mut() {
            if r.drop_queued(name) {
                info!(node = %name, "node deleted before dispatch; no longer a target");
            }
        }
        true
    }

    fn on_job_event(&mut self, ev: Event<Job>) {
        match ev {
            Event::Init => self.relist = Some(HashSet::new()),
            Event::InitApply(job) => {
                if let (Some(set), Some(name)) = (self.relist.as_mut(), job.metadata.name.clone()) {
                    set.insert(name);
                }
                self.on_job_applied(&job);
            }
            Event::InitDone => {
                // After a re-list, Jobs that vanished while the watch was down get no Delete event.
                if let Some(listed) = self.relist.take() {
                    let gone: Vec<String> = self.seen.keys().filter(|n| !listed.contains(*n)).cloned().collect();
                    for name in gone {
                        self.on_job_deleted(&name);
                    }
                }
            }
            Event::Apply(job) => self.on_job_applied(&job),
            Event::Delete(job) => self.on_job_deleted(job.metadata.name.as_deref().unwrap_or_default()),
        }
    }

    fn on_job_applied(&mut self, job: &Job) {
        let Some(name) = job.metadata.name.clone() else { return };
        let seen = SeenJob::from(job);
        let ours = seen.run == self.run.run_id && seen.template_hash == self.template.hash();
        let phase = seen.phase.clone();
        self.seen.insert(name.clone(), seen);
        if phase != JobPhase::Running {
            if let Some(r) = self.rollout.as_mut() {
                r.foreign_gone(&name);
            }
        }
        let Some(node) = self.names.node_of(&name).map(str::to_owned) else { return };
        let Some(track) = self.tracks.get(&node) else { return };
        if !ours || !matches!(track.stage, Stage::Creating | Stage::Running) {
            return;
        }
        match phase {
            JobPhase::Running => {}
            JobPhase::Succeeded => self.finish(&node, Outcome::Succeeded),
            JobPhase::Failed(reason) => {
                self.tracks.get_mut(&node).expect("tracked").stage = Stage::Finishing;
                let api = self.api.clone();
                self.ops.push(Box::pin(async move {
                    let reason = match api.failure_detail(&name).await {
                        Some(detail) => format!("{reason}; {detail}"),
                        None => reason,
                    };
                    OpDone::Detail { node, reason }
                }));
            }
        }
    }

    fn on_job_deleted(&mut self, name: &str) {
        self.seen.remove(name);
        if let Some(r) = self.rollout.as_mut() {
            r.foreign_gone(name);
        }
        let Some(node) = self.names.node_of(name).map(str::to_owned) else { return };
        match self.tracks.get(&node).map(|t| t.stage) {
            Some(Stage::Replacing) => self.create(&node),
            Some(Stage::Running) => self.finish(
                &node,
                Outcome::Failed(format!("Job {name} was deleted before it finished; re-run (helm upgrade) to retry this node")),
            ),
            _ => {}
        }
    }

    /// Classifies existing Jobs once discovery is complete: adopt ours, count the rest.
    fn start_rollout(&mut self) {
        let nodes: Vec<String> = self.facts.keys().cloned().collect();
        let mut rollout = Rollout::new(nodes.clone(), self.parallelism, self.max_failures);
        info!(nodes = nodes.len(), parallelism = rollout.parallelism(), "rollout planned");
        let mut adopted = HashSet::new();
        for node in &nodes {
            let job = self.names.assign(node);
            let Some(seen) = self.seen.get(&job) else { continue };
            if seen.run != self.run.run_id || seen.template_hash != self.template.hash() {
                continue;
            }
            adopted.insert(job.clone());
            match &seen.phase {
                JobPhase::Running => {
                    info!(node = %node, job = %job, "adopting this run's running Job");
                    rollout.adopt_running(node);
                    self.tracks.insert(node.clone(), Track { stage: Stage::Running, started: Instant::now() });
                }
                JobPhase::Succeeded => rollout.record_without_dispatch(node, Outcome::Succeeded),
                JobPhase::Failed(r) => rollout.record_without_dispatch(node, Outcome::Failed(r.clone())),
            }
        }
        for (job, seen) in &self.seen {
            if seen.phase == JobPhase::Running && !adopted.contains(job) {
                rollout.note_foreign_active(job);
            }
        }
        self.rollout = Some(rollout);
    }

    fn fill_slots(&mut self) {
        while let Some(node) = self.rollout.as_mut().and_then(Rollout::next_to_dispatch) {
            let job = self.names.assign(&node);
            let stale = self.seen.contains_key(&job);
            self.tracks.insert(node.clone(), Track { stage: Stage::Replacing, started: Instant::now() });
            if stale {
                info!(node = %node, job = %job, "replacing the Job of an earlier run or template");
                self.delete_then_create(&node, job);
            } else {
                self.create(&node);
            }
        }
    }

    fn delete_then_create(&mut self, node: &str, job: String) {
        let api = self.api.clone();
        let node = node.to_owned();
        self.ops.push(Box::pin(async move { OpDone::Deleted { result: api.delete_job(&job).await, node } }));
    }

    fn create(&mut self, node: &str) {
        let Some(track) = self.tracks.get_mut(node) else { return };
        if track.stage != Stage::Replacing {
            return;
        }
        track.stage = Stage::Creating;
        track.started = Instant::now();
        let job_name = self.names.assign(node);
        let Some(facts) = self.facts.get(node) else {
            self.finish(node, Outcome::Failed("node disappeared before its Job was created".into()));
            return;
        };
        let job = self.template.specialise(&self.run, facts, &job_name);
        let api = self.api.clone();
        let node = node.to_owned();
        info!(node = %node, job = %job_name, "creating per-node Job");
        self.ops.push(Box::pin(async move { OpDone::Created { result: api.create_job(&job).await, node } }));
    }

    fn on_op_done(&mut self, op: OpDone) {
        match op {
            OpDone::Created { node, result: Ok(()) } => {
                if let Some(t) = self.tracks.get_mut(&node) {
                    if t.stage == Stage::Creating {
                        t.stage = Stage::Running;
                    }
                }
                // The watch may have delivered the finished Job before the create call returned.
                let job = self.names.assign(&node);
                if let Some(job) = self.seen.get(&job).cloned() {
                    if job.run == self.run.run_id && job.phase == JobPhase::Succeeded {
                        self.finish(&node, Outcome::Succeeded);
                    }
                }
            }
            OpDone::Created { node, result: Err(kube::Error::Api(s)) } if s.code == 409 => {
                let api = self.api.clone();
                let job = self.names.assign(&node);
                self.ops.push(Box::pin(async move { OpDone::Conflict { existing: api.get_job(&job).await, node } }));
            }
            OpDone::Created { node, result: Err(e) } => {
                self.finish(&node, Outcome::Failed(format!("could not create its Job: {e}")));
            }
            OpDone::Conflict { node, existing } => self.on_conflict(&node, existing),
            OpDone::Deleted { node, result: Ok(()) } => {
                let job = self.names.assign(&node);
                if !self.seen.contains_key(&job) {
                    self.create(&node);
                }
            }
            OpDone::Deleted { node, result: Err(e) } => {
                self.finish(&node, Outcome::Failed(format!("could not delete the stale Job of an earlier run: {e}")));
            }
            OpDone::Detail { node, reason } => self.finish(&node, Outcome::Failed(reason)),
            OpDone::Abandoned => {}
        }
    }

    fn on_conflict(&mut self, node: &str, existing: Result<Option<Job>, kube::Error>) {
        let job_name = self.names.assign(node);
        match existing {
            Ok(Some(job)) => {
                let labels = job.metadata.labels.clone().unwrap_or_default();
                if labels.get(template::LABEL_DISPATCHER) != Some(&self.run.prefix) {
                    self.finish(node, Outcome::Failed(format!(
                        "a Job named {job_name} already exists and is not managed by this dispatcher (prefix {}); it was left untouched. Delete it or choose another --name-prefix",
                        self.run.prefix
                    )));
                    return;
                }
                let seen = SeenJob::from(&job);
                self.seen.insert(job_name.clone(), seen.clone());
                if seen.run == self.run.run_id && seen.template_hash == self.template.hash() {
                    if let Some(t) = self.tracks.get_mut(node) {
                        t.stage = Stage::Running;
                    }
                    self.on_job_applied(&job);
                } else if let Some(t) = self.tracks.get_mut(node) {
                    t.stage = Stage::Replacing;
                    self.delete_then_create(node, job_name);
                }
            }
            Ok(None) => {
                // Deleted between our create and our get: try again.
                if let Some(t) = self.tracks.get_mut(node) {
                    t.stage = Stage::Replacing;
                }
                self.create(node);
            }
            Err(e) => self.finish(node, Outcome::Failed(format!("Job {job_name} exists but cannot be read: {e}"))),
        }
    }

    /// Fails a node whose machine is gone and deletes its Job: the Job is pinned by name, and
    /// a new machine under that name must not run a Job made from the old machine's facts.
    fn abandon(&mut self, node: &str, reason: String) {
        self.finish(node, Outcome::Failed(reason));
        let job = self.names.assign(node);
        let api = self.api.clone();
        self.ops.push(Box::pin(async move {
            if let Err(e) = api.delete_job(&job).await {
                warn!(job = %job, error = %e, "could not delete the Job of a node that is gone; delete it by hand");
            }
            OpDone::Abandoned
        }));
    }

    fn finish(&mut self, node: &str, outcome: Outcome) {
        let Some(track) = self.tracks.remove(node) else { return };
        let took = track.started.elapsed();
        let job = self.names.assign(node);
        match &outcome {
            Outcome::Succeeded => info!(node = %node, job = %job, took = ?took, "node succeeded"),
            other => warn!(node = %node, job = %job, took = ?took, reason = ?other, "node failed"),
        }
        self.rollout().finish(node, outcome, Some(took));
    }

    fn stop(&mut self, reason: StopReason) {
        warn!(reason = %reason, "stopping the rollout");
        self.rollout().stop(reason);
    }

    fn print_plan(&mut self) {
        let nodes: Vec<String> = self.facts.keys().cloned().collect();
        println!("dry run: {} nodes, parallelism {}, nothing will be created", nodes.len(), self.parallelism.min(nodes.len()));
        println!("{:<40}  {:<63}  ACTION", "NODE", "JOB");
        for node in nodes {
            let job = self.names.assign(&node);
            let action = match self.seen.get(&job) {
                None => "create",
                Some(s) if s.run == self.run.run_id && s.template_hash == self.template.hash() => "adopt",
                Some(_) => "replace (earlier run or template)",
            };
            println!("{node:<40}  {job:<63}  {action}");
        }
    }
}
