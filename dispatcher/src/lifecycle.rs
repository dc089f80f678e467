//! The per-node lifecycle of one dispatcher run, as a pure state machine.
//!
//! The I/O shell (`run.rs`) turns watch events and API results into [`Input`]s and carries out
//! the [`Action`]s that come back; nothing here talks to the API or reads the clock (the shell
//! passes `now`). Every race of a rollout is therefore a short, deterministic event sequence in
//! the tests below, and a seeded random-interleaving test checks the invariants:
//!
//! - never more than `parallelism` nodes busy at once (our Jobs in flight, plus Jobs or pods of
//!   earlier runs still alive on nodes we have not finished with);
//! - never two Jobs or pods on one node: a node is dispatched only once no Job of ours and no
//!   pod of an earlier Job is alive on it, and a replaced Job is deleted in the foreground (its
//!   pods are gone before its name is free);
//! - every selected node ends with a result (or, when the run stops early, "not started" /
//!   "still running");
//! - a Job this dispatcher did not create is never deleted (only Jobs seen through the watch of
//!   our own label, and only by UID), and a Job of another run is never deleted while it runs:
//!   the node waits for it, within the per-node timeout;
//! - no wait is unbounded: waiting for an earlier Job or pod, like running our own Job, ends
//!   with the per-node timeout.
//!
//! Cost: every input costs O(log N) (ordered sets for the queue and the per-node deadlines,
//! counters for the progress), so a run is O(N log N).

use crate::canary::{Canary, CanaryEnd, CanarySize};
use crate::naming::NameBook;
use crate::status::JobPhase;
use crate::summary::CanaryView;
use crate::template::NodeFacts;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

/// How one node ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its Job completed.
    Succeeded,
    /// Its last successful Job ran the current template (recorded on the Node): no Job created.
    AlreadyInstalled,
    /// Its Job failed, or something prevented it from running; the reason says what to do.
    Failed(String),
    /// Not dispatched, by rule rather than by accident (a taint the template does not tolerate,
    /// the node stopped matching the selection); not a failure, like a DaemonSet that does not
    /// place a pod there.
    Skipped(String),
    /// The Node was deleted (autoscaler, operator): nothing left to install; not a failure.
    Removed(String),
    /// Never dispatched (failure budget spent, deadline, interrupted, node never Ready).
    NotStarted(String),
    /// Dispatched, still running when this run stopped; the next run adopts it.
    StillRunning(String),
}

impl Outcome {
    /// Short word for tables.
    pub fn word(&self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::AlreadyInstalled => "already-installed",
            Self::Failed(_) => "failed",
            Self::Skipped(_) => "skipped",
            Self::Removed(_) => "removed",
            Self::NotStarted(_) => "not-started",
            Self::StillRunning(_) => "running",
        }
    }

    /// Whether this result lets the run succeed.
    pub fn is_ok(&self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::AlreadyInstalled | Self::Skipped(_) | Self::Removed(_)
        )
    }

    /// The reason, empty for a success.
    pub fn reason(&self) -> &str {
        match self {
            Self::Succeeded => "",
            Self::AlreadyInstalled => {
                "the Node shows this template installed on this machine; no Job created"
            }
            Self::Failed(r)
            | Self::Skipped(r)
            | Self::Removed(r)
            | Self::NotStarted(r)
            | Self::StillRunning(r) => r,
        }
    }
}

/// Why dispatching stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Too many nodes failed.
    FailureBudget(usize),
    /// The run deadline passed.
    Deadline,
    /// SIGTERM / SIGINT.
    Interrupted,
    /// A node of the canary wave failed: no other node was started.
    CanaryFailed(String),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FailureBudget(n) => write!(
                f,
                "failure budget spent ({n} nodes failed); fix the cause and re-run (helm upgrade)"
            ),
            Self::Deadline => write!(
                f,
                "run deadline reached; re-run (helm upgrade) to continue, or raise --deadline"
            ),
            Self::Interrupted => write!(
                f,
                "dispatcher interrupted; re-run (helm upgrade) to continue"
            ),
            Self::CanaryFailed(node) => write!(
                f,
                "canary node {node} failed, so no other node was started; fix the cause (see its reason) and re-run (helm upgrade)"
            ),
        }
    }
}

/// How many failed nodes stop new dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// `0`: never stop early.
    Unlimited,
    /// Stop after this many failed nodes.
    Count(usize),
    /// Stop after this percentage of the targeted nodes failed (at least one node).
    Percent(u32),
}

impl Budget {
    /// Parses `5`, `0` (no budget) or `10%`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || {
            format!("invalid failure budget {s:?}: use a node count (5; 0 = never stop early) or a percentage of the targeted nodes (10%)")
        };
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p.trim().parse().map_err(|_| bad())?;
            return match p {
                0 => Ok(Self::Unlimited),
                1..=100 => Ok(Self::Percent(p)),
                _ => Err(format!(
                    "invalid failure budget {s:?}: a percentage must be 0% to 100%"
                )),
            };
        }
        match s.parse::<usize>().map_err(|_| bad())? {
            0 => Ok(Self::Unlimited),
            n => Ok(Self::Count(n)),
        }
    }

    /// The number of failures that stops dispatching, for `total` targeted nodes.
    pub fn limit(&self, total: usize) -> Option<usize> {
        match *self {
            Self::Unlimited => None,
            Self::Count(n) => Some(n),
            Self::Percent(p) => Some((total * p as usize).div_ceil(100).max(1)),
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unlimited => f.write_str("0 (never stop early)"),
            Self::Count(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Counters for progress lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Nodes done successfully (including already installed, skipped and removed).
    pub succeeded: usize,
    /// Nodes failed.
    pub failed: usize,
    /// Nodes in flight.
    pub running: usize,
    /// Nodes waiting for a slot (or for their node to become dispatchable).
    pub queued: usize,
    /// All targeted nodes.
    pub total: usize,
}

/// What the shell read from one Node (the latest watch view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeObs {
    /// Name, UID and the facts that go into its Job.
    pub facts: NodeFacts,
    /// Whether it matches the selection.
    pub selected: bool,
    /// `Ready=True` (or no Ready condition yet), and no not-ready taint of the node controller
    /// that the template does not tolerate (`admission::NOT_READY_TAINTS`).
    pub ready: bool,
    /// The first taint the Job template does not tolerate (DaemonSet rules), if any.
    pub untolerated: Option<String>,
    /// The install record on the Node (annotation `katacontainers.io/installed-by-<prefix>`),
    /// written by this dispatcher's last success there: see [`install_record`].
    pub record: Option<String>,
    /// The Node carries the install's marker label (`--installed-label`; true without one).
    pub marked: bool,
    /// `status.runtimeHandlers` names (empty on kubelets that do not report them).
    pub runtime_handlers: Vec<String>,
}

/// What makes a node count as already installed (`--skip-installed`): everything the Node tells
/// must agree, since the record alone survives a re-imaged machine or a stage that undid itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkipRule {
    /// The template hash the record must name.
    pub hash: String,
    /// Runtime handlers the Node must report (checked only when it reports any).
    pub handlers: Vec<String>,
}

impl SkipRule {
    /// Whether `obs` tells, by this rule, that the template is installed. Anything missing or
    /// different means "not installed": the node gets its Job (a needless re-run is cheap, a
    /// skipped broken node is not).
    pub fn is_installed(&self, obs: &NodeObs) -> bool {
        let machine = obs.facts.machine_id.as_str();
        // An old record (the hash alone) names no machine: not trusted. A node that reports no
        // machine ID cannot show it is the machine the record names.
        let record_ok = obs
            .record
            .as_deref()
            .and_then(|r| r.split_once(RECORD_SEPARATOR))
            .is_some_and(|(hash, id)| hash == self.hash && !machine.is_empty() && id == machine);
        // Kubelets before 1.30 report no handlers: then there is nothing to check.
        let handlers_ok = obs.runtime_handlers.is_empty()
            || self
                .handlers
                .iter()
                .all(|h| obs.runtime_handlers.contains(h));
        record_ok && obs.marked && handlers_ok
    }
}

/// Separates the template hash from the machine ID in the install record.
const RECORD_SEPARATOR: char = '.';

/// The install record written after a success: the template hash and the machine it ran on.
pub fn install_record(template_hash: &str, machine_id: &str) -> String {
    format!("{template_hash}{RECORD_SEPARATOR}{machine_id}")
}

/// What the shell read from one Job carrying this dispatcher's label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobObs {
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// The node it is pinned to.
    pub node: String,
    /// The node's UID when the Job was created (empty when unknown).
    pub node_uid: String,
    /// Created by this run from this template.
    pub ours: bool,
    /// Where it stands.
    pub phase: JobPhase,
    /// Has a deletionTimestamp.
    pub deleting: bool,
}

/// What the shell read from one pod of this dispatcher's Jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodObs {
    /// Name.
    pub name: String,
    /// `spec.nodeName`.
    pub node: String,
    /// UID of the Job that owns it.
    pub job_uid: String,
    /// Not Succeeded/Failed (a terminating pod is still alive).
    pub live: bool,
}

/// The answer to a create call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// Created, with its UID.
    Ok(String),
    /// 409: a Job with that name exists.
    Conflict,
    /// Any other error (after the shell's retries).
    Err(String),
}

/// What a GET after a 409 found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflicting {
    /// Nothing any more (deleted in between).
    Gone,
    /// A Job with this dispatcher's label.
    Managed(JobObs),
    /// A Job without this dispatcher's label: never touched.
    Foreign,
    /// The GET failed.
    Err(String),
}

/// Events into the lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A node (re-)list begins: nodes not seen again before [`Input::NodeListDone`] are gone.
    NodeListStarted,
    /// A node was added or changed.
    NodeSeen(NodeObs),
    /// A node was deleted.
    NodeGone(String),
    /// The node (re-)list is complete.
    NodeListDone,
    /// A Job (re-)list begins.
    JobListStarted,
    /// A Job was added or changed.
    JobSeen(JobObs),
    /// A Job was deleted (by name).
    JobGone(String),
    /// The Job (re-)list is complete.
    JobListDone,
    /// A pod (re-)list begins.
    PodListStarted,
    /// A pod was added or changed.
    PodSeen(PodObs),
    /// A pod was deleted (by name).
    PodGone(String),
    /// The pod (re-)list is complete.
    PodListDone,
    /// Discovery (initial lists, settling) is over: adopt, fail missing nodes, dispatch.
    DiscoveryDone,
    /// A create call returned.
    Created {
        /// Node.
        node: String,
        /// Result.
        result: Created,
    },
    /// The GET after a 409 returned.
    ConflictRead {
        /// Node.
        node: String,
        /// What it found.
        found: Conflicting,
    },
    /// A delete call returned.
    Deleted {
        /// Node.
        node: String,
        /// Result.
        result: Result<(), String>,
    },
    /// The failure detail of a failed Job was read.
    FailureDetail {
        /// Node.
        node: String,
        /// Reason for the report.
        reason: String,
    },
    /// Time passed (per-node deadlines).
    Tick,
    /// Stop dispatching.
    Stop(StopReason),
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the Job `job` for `node` from these facts.
    Create {
        /// Node.
        node: String,
        /// Job name.
        job: String,
        /// Facts of the node as last seen.
        facts: NodeFacts,
    },
    /// Delete Job `job` with this UID as precondition, in the foreground (its pods first).
    Delete {
        /// Node.
        node: String,
        /// Job name.
        job: String,
        /// Precondition UID.
        uid: String,
        /// Why (for the log).
        why: &'static str,
    },
    /// GET Job `job` after a 409.
    ReadConflict {
        /// Node.
        node: String,
        /// Job name.
        job: String,
    },
    /// Read why Job `job` failed (its pods' termination messages).
    ReadFailure {
        /// Node.
        node: String,
        /// Job name.
        job: String,
        /// The Job condition's reason.
        condition: String,
    },
    /// A Job of this run already exists for `node` and is tracked (nothing to call).
    Adopted {
        /// Node.
        node: String,
        /// Job name.
        job: String,
    },
    /// `node` has its final result (log it, record it on the Node).
    Report {
        /// Node.
        node: String,
        /// Job name (the name it has or would have had).
        job: String,
        /// The node's UID as last seen (empty when never seen).
        node_uid: String,
        /// The node's machine ID as last seen (for the install record).
        machine_id: String,
        /// Outcome.
        outcome: Outcome,
        /// How long its Job took, when one ran.
        took: Option<Duration>,
    },
}

/// Fixed parameters of a run.
#[derive(Debug, Clone)]
pub struct Config {
    /// At most this many nodes busy at once.
    pub parallelism: usize,
    /// Failure budget.
    pub budget: Budget,
    /// A Job running longer than this fails its node and is deleted, freeing the slot.
    pub node_timeout: Option<Duration>,
    /// Skip nodes that tell, by this rule, that this template is installed.
    pub skip_installed: Option<SkipRule>,
    /// How long a NotReady or tainted node may keep the run waiting once nothing else is left
    /// (a node that just joined is NotReady and tainted for a few seconds).
    pub unready_grace: Duration,
    /// Explicitly named nodes (they must exist), or `None` for a label selection.
    pub named: Option<Vec<String>>,
    /// Nodes not to dispatch to, with why (a Job or pod of the superseded install is stuck
    /// there): they fail with that reason instead.
    pub held: BTreeMap<String, String>,
    /// The canary wave: how many dispatched nodes must succeed before any other starts.
    pub canary: CanarySize,
    /// What a node that needs work and stayed NotReady past the grace counts as.
    pub unready: UnreadyPolicy,
}

/// What a node that needs a Job but stayed NotReady past `--unready-grace` counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UnreadyPolicy {
    /// `not-started`: a failure (exit 1), the operator decides.
    #[default]
    Fail,
    /// `skipped`: not a failure; the report names the node and says that nothing was changed on
    /// it (an uninstall leaves Kata and the claim label there, to clean once it is Ready).
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Known (a Job or pod of ours is on it) but not a target.
    Untargeted,
    /// Named but not seen yet.
    Missing,
    /// A target waiting for dispatch.
    Queued,
    /// Waiting for an earlier Job under our name (and its pods) to be gone.
    Replacing,
    /// Create call in flight.
    Creating,
    /// Our Job runs.
    Running,
    /// Our Job failed; reading why.
    Finishing,
    /// The machine behind the name changed: waiting for the old Job to be gone, then requeued.
    Abandoning,
    /// Final.
    Done(Outcome),
}

impl Phase {
    fn in_flight(&self) -> bool {
        matches!(
            self,
            Self::Replacing | Self::Creating | Self::Running | Self::Finishing | Self::Abandoning
        )
    }
}

/// What `refresh` derives about one node from the records.
struct Derived {
    /// An earlier Job or pod is alive on it (or a Job we must delete once created).
    busy: bool,
    /// A Job other than our current one holds our Job name for the node.
    name_taken: bool,
    /// The node tells this template is installed there (`--skip-installed`).
    installed: bool,
    /// Takes a slot without being in flight.
    counts: bool,
    /// Queue class, when queued.
    class: Option<Class>,
    /// Its phase.
    phase: Phase,
}

/// What keeps a node busy (for the report when the wait times out).
enum Holder {
    Job(String),
    Pod(String),
    Unknown,
}

/// Why a queued node is not dispatchable now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Dispatchable.
    Ready,
    /// An earlier Job or pod is still alive on it: clears by itself.
    Busy,
    /// NotReady, tainted or not seen: may clear, but the run does not wait for it.
    Parked,
}

#[derive(Debug)]
struct NodeRec {
    obs: Option<NodeObs>,
    phase: Phase,
    /// UID of this run's Job on the node.
    current: Option<String>,
    /// Names of Jobs (with our label) pinned to the node.
    jobs: Vec<String>,
    /// Names of live pods pinned to the node.
    pods: Vec<String>,
    /// Counted in `foreign_busy`.
    busy_counted: bool,
    class: Option<Class>,
    seq: u64,
    started: Option<Instant>,
    took: Option<Duration>,
    deadline: Option<Instant>,
    /// The node went away while its create call was in flight: delete what it creates.
    delete_on_create: bool,
    /// We gave up on what runs there (per-node timeout): it no longer takes a slot.
    gave_up: bool,
    /// A create call is in flight.
    create_pending: bool,
    /// Parked since this long ago the grace ends here (in `deadlines` while waiting).
    park_until: Option<Instant>,
    /// Queued but busy with an earlier Job or pod: the per-node timeout ends the wait here (in
    /// `deadlines` while waiting).
    busy_until: Option<Instant>,
}

impl NodeRec {
    fn new(phase: Phase) -> Self {
        Self {
            obs: None,
            phase,
            current: None,
            jobs: Vec::new(),
            pods: Vec::new(),
            busy_counted: false,
            class: None,
            seq: 0,
            started: None,
            took: None,
            deadline: None,
            delete_on_create: false,
            gave_up: false,
            create_pending: false,
            park_until: None,
            busy_until: None,
        }
    }
}

#[derive(Debug, Clone)]
struct JobRec {
    node: String,
    node_uid: String,
    uid: String,
    ours: bool,
    phase: JobPhase,
    deleting: bool,
    /// Known from a create answer only: a re-list that began before the create cannot show it.
    placeholder: bool,
}

#[derive(Debug, Clone)]
struct PodRec {
    node: String,
    job_uid: String,
}

/// The lifecycle of every node of one run.
#[derive(Debug)]
pub struct Lifecycle {
    cfg: Config,
    names: NameBook,
    nodes: HashMap<String, NodeRec>,
    jobs: HashMap<String, JobRec>,
    pods: HashMap<String, PodRec>,
    ready: BTreeSet<(u64, String)>,
    deadlines: BTreeSet<(Instant, String)>,
    next_seq: u64,
    started: bool,
    stopped: Option<StopReason>,
    relist_nodes: Option<HashSet<String>>,
    relist_jobs: Option<HashSet<String>>,
    relist_pods: Option<HashSet<String>>,
    in_flight: usize,
    foreign_busy: usize,
    queued: usize,
    queued_busy: usize,
    total: usize,
    ok: usize,
    failed: usize,
    failed_budget: usize,
    /// Most nodes ever busy at once (for tests and the report).
    peak: usize,
    /// Nodes that joined or left the selection (settling watches it).
    changes: u64,
    /// Parked nodes still within their grace period.
    parked_waiting: usize,
    /// The canary wave (sized when discovery is done).
    canary: Canary,
}

/// Per-node results of a run, in node order.
pub type Results = BTreeMap<String, (Outcome, Option<Duration>)>;

impl Lifecycle {
    /// A lifecycle for one run.
    pub fn new(cfg: Config, prefix: &str) -> Self {
        let mut me = Self {
            names: NameBook::new(prefix),
            nodes: HashMap::new(),
            jobs: HashMap::new(),
            pods: HashMap::new(),
            ready: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            next_seq: 0,
            started: false,
            stopped: None,
            relist_nodes: None,
            relist_jobs: None,
            relist_pods: None,
            in_flight: 0,
            foreign_busy: 0,
            queued: 0,
            queued_busy: 0,
            total: 0,
            ok: 0,
            failed: 0,
            failed_budget: 0,
            peak: 0,
            changes: 0,
            parked_waiting: 0,
            canary: Canary::default(),
            cfg,
        };
        for name in me.cfg.named.clone().unwrap_or_default() {
            me.nodes.insert(name, NodeRec::new(Phase::Missing));
            me.total += 1;
        }
        me
    }

    /// The Job name of `node`.
    pub fn job_name(&mut self, node: &str) -> String {
        self.names.assign(node)
    }

    /// Nodes busy now: ours in flight plus nodes with an earlier Job or pod still alive.
    pub fn taken(&self) -> usize {
        self.in_flight + self.foreign_busy
    }

    /// How often a node joined or left the queue (the selection settles when this stops moving).
    pub fn selection_changes(&self) -> u64 {
        self.changes
    }

    /// The most nodes busy at once so far.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// Targeted nodes known so far (for the empty-selection check and the plan).
    pub fn targets(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, r)| r.phase == Phase::Queued)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Nodes named on the command line that do not exist (so far).
    pub fn missing(&self) -> usize {
        self.nodes
            .values()
            .filter(|r| r.phase == Phase::Missing)
            .count()
    }

    /// For the dry-run plan: what would happen to `node`.
    pub fn plan_of(&mut self, node: &str) -> &'static str {
        let job = self.names.assign(node);
        let obs = self.nodes.get(node).and_then(|r| r.obs.as_ref());
        if obs.is_some_and(|o| self.is_installed(o)) {
            return "skip (already installed)";
        }
        match self.jobs.get(&job) {
            None => "create",
            Some(j) if j.ours => "adopt",
            Some(_) => "replace (earlier run or template)",
        }
    }

    /// When the next per-node deadline falls.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// The canary wave, for the summary (`None` without one).
    pub fn canary(&self) -> Option<CanaryView> {
        self.canary.view()
    }

    /// Why dispatching stopped, if it did.
    pub fn stopped(&self) -> Option<&StopReason> {
        self.stopped.as_ref()
    }

    /// Nothing left to wait for.
    pub fn is_done(&self) -> bool {
        self.started
            && self.in_flight == 0
            && (self.stopped.is_some()
                || (self.ready.is_empty() && self.queued_busy == 0 && self.parked_waiting == 0))
    }

    /// Counters for a progress line.
    pub fn progress(&self) -> Progress {
        Progress {
            succeeded: self.ok,
            failed: self.failed,
            running: self.in_flight,
            queued: self.queued,
            total: self.total,
        }
    }

    /// Handles one input at `now`; returns what to do.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::NodeListStarted => self.relist_nodes = Some(HashSet::new()),
            Input::NodeSeen(obs) => {
                if let Some(set) = self.relist_nodes.as_mut() {
                    set.insert(obs.facts.name.clone());
                }
                self.on_node(now, obs, &mut out);
            }
            Input::NodeGone(name) => self.on_node_gone(now, &name, &mut out),
            Input::NodeListDone => self.on_node_list_done(now, &mut out),
            Input::JobListStarted => self.relist_jobs = Some(HashSet::new()),
            Input::JobSeen(job) => {
                if let Some(set) = self.relist_jobs.as_mut() {
                    set.insert(job.name.clone());
                }
                self.on_job(now, job, &mut out);
            }
            Input::JobGone(name) => self.on_job_gone(now, &name, &mut out),
            Input::JobListDone => self.on_job_list_done(now, &mut out),
            Input::PodListStarted => self.relist_pods = Some(HashSet::new()),
            Input::PodSeen(pod) => {
                if let Some(set) = self.relist_pods.as_mut() {
                    set.insert(pod.name.clone());
                }
                self.on_pod(now, pod, &mut out);
            }
            Input::PodGone(name) => self.on_pod_gone(now, &name, &mut out),
            Input::PodListDone => self.on_pod_list_done(now, &mut out),
            Input::DiscoveryDone => self.on_discovery_done(now, &mut out),
            Input::Created { node, result } => self.on_created(now, &node, result, &mut out),
            Input::ConflictRead { node, found } => self.on_conflict(now, &node, found, &mut out),
            Input::Deleted { node, result } => self.on_deleted(now, &node, result, &mut out),
            Input::FailureDetail { node, reason } => {
                if self.phase(&node) == Some(&Phase::Finishing) {
                    self.finish(now, &node, Outcome::Failed(reason), &mut out);
                }
            }
            Input::Tick => self.on_tick(now, &mut out),
            Input::Stop(reason) => {
                self.stopped.get_or_insert(reason);
            }
        }
        self.dispatch(now, &mut out);
        self.peak = self.peak.max(self.taken());
        out
    }

    // ----- re-lists: what a re-list no longer shows is gone -----

    fn on_node_list_done(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(listed) = self.relist_nodes.take() else {
            return;
        };
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(n, r)| r.obs.is_some() && !listed.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            self.on_node_gone(now, &n, out);
        }
    }

    fn on_job_list_done(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(listed) = self.relist_jobs.take() else {
            return;
        };
        let gone: Vec<String> = self
            .jobs
            .iter()
            .filter(|(n, j)| !j.placeholder && !listed.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            self.on_job_gone(now, &n, out);
        }
    }

    fn on_pod_list_done(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(listed) = self.relist_pods.take() else {
            return;
        };
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|n| !listed.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            self.on_pod_gone(now, &n, out);
        }
    }

    fn on_deleted(
        &mut self,
        now: Instant,
        node: &str,
        result: Result<(), String>,
        out: &mut Vec<Action>,
    ) {
        if let Err(e) = result {
            if self.phase(node) == Some(&Phase::Replacing) {
                let reason = format!("could not delete the Job of an earlier run or template: {e}; delete it by hand and re-run");
                self.finish(now, node, Outcome::Failed(reason), out);
            }
        }
    }

    fn phase(&self, node: &str) -> Option<&Phase> {
        self.nodes.get(node).map(|r| &r.phase)
    }

    fn rec(&mut self, node: &str) -> &mut NodeRec {
        self.nodes
            .entry(node.to_owned())
            .or_insert_with(|| NodeRec::new(Phase::Untargeted))
    }

    // ----- nodes -----

    fn on_node(&mut self, now: Instant, obs: NodeObs, out: &mut Vec<Action>) {
        let name = obs.facts.name.clone();
        let selected = obs.selected;
        if !selected && !self.nodes.contains_key(&name) {
            return; // not a target, nothing of ours on it: not kept (memory)
        }
        let started = self.started;
        let rec = self.rec(&name);
        let old_uid = rec.obs.as_ref().map(|o| o.facts.uid.clone());
        let recreated = old_uid.as_ref().is_some_and(|u| *u != obs.facts.uid);
        rec.obs = Some(obs);
        let phase = rec.phase.clone();
        match phase {
            Phase::Untargeted | Phase::Missing if selected => {
                self.set_phase(now, &name, Phase::Queued, out);
            }
            Phase::Done(Outcome::Skipped(_)) | Phase::Done(Outcome::Removed(_))
                if selected && started =>
            {
                // Selected again, or a new machine took the name: a target again.
                self.set_phase(now, &name, Phase::Queued, out);
            }
            Phase::Queued if !selected => {
                if started {
                    let o = Outcome::Skipped(
                        "stopped matching the selection before its Job was created; not dispatched"
                            .into(),
                    );
                    self.finish(now, &name, o, out);
                } else {
                    self.set_phase(now, &name, Phase::Untargeted, out);
                }
            }
            Phase::Creating | Phase::Running | Phase::Finishing | Phase::Replacing if recreated => {
                // A new machine under the same name: the old Job was made from the old machine's
                // facts and must not run there. Delete it, wait until it is gone, then start over.
                self.abandon(now, &name, out);
            }
            _ => {}
        }
        self.refresh(now, &name, out);
    }

    fn on_node_gone(&mut self, now: Instant, name: &str, out: &mut Vec<Action>) {
        let Some(rec) = self.nodes.get_mut(name) else {
            return;
        };
        if rec.obs.take().is_none() && rec.phase != Phase::Missing {
            return;
        }
        let phase = rec.phase.clone();
        let reason = |what: &str| format!("node was deleted {what}; nothing left to install");
        match phase {
            Phase::Queued if !self.started && self.cfg.named.is_some() => {
                self.set_phase(now, name, Phase::Missing, out)
            }
            Phase::Queued if !self.started => self.set_phase(now, name, Phase::Untargeted, out),
            Phase::Queued => self.finish(
                now,
                name,
                Outcome::Removed(reason("before its Job was created")),
                out,
            ),
            Phase::Creating => {
                let rec = self.rec(name);
                rec.delete_on_create = rec.create_pending;
                self.finish(
                    now,
                    name,
                    Outcome::Removed(reason(
                        "while its Job was being created; the Job is deleted",
                    )),
                    out,
                );
            }
            Phase::Running | Phase::Finishing | Phase::Replacing | Phase::Abandoning => {
                self.delete_current(name, "its node was deleted", out);
                let o = Outcome::Removed(reason("while its Job ran; the Job was deleted so a machine that later takes the name is not touched by it"));
                self.finish(now, name, o, out);
            }
            _ => {}
        }
        self.refresh(now, name, out);
    }

    // ----- Jobs and pods -----

    fn on_job(&mut self, now: Instant, job: JobObs, out: &mut Vec<Action>) {
        let node = if job.node.is_empty() {
            self.names.node_of(&job.name).map(str::to_owned)
        } else {
            Some(job.node.clone())
        };
        let Some(node) = node else { return };
        let name = job.name.clone();
        let rec = JobRec {
            node: node.clone(),
            node_uid: job.node_uid.clone(),
            uid: job.uid.clone(),
            ours: job.ours,
            phase: job.phase.clone(),
            deleting: job.deleting,
            placeholder: false,
        };
        if let Some(old) = self.jobs.insert(name.clone(), rec) {
            if old.node != node {
                self.detach_job(now, &old.node, &name, out);
            }
        }
        let r = self.rec(&node);
        if !r.jobs.contains(&name) {
            r.jobs.push(name.clone());
        }
        let our_name = self.names.assign(&node);
        if name == our_name && job.ours && !job.deleting {
            self.track_ours(now, &node, &job, out);
        }
        self.refresh(now, &node, out);
    }

    /// A Job of this run under the node's name: adopt it or follow it to its end.
    fn track_ours(&mut self, now: Instant, node: &str, job: &JobObs, out: &mut Vec<Action>) {
        let phase = self.nodes[node].phase.clone();
        let current = self.nodes[node].current.clone();
        match phase {
            Phase::Creating => {
                self.rec(node).current = Some(job.uid.clone());
                self.set_phase(now, node, Phase::Running, out);
            }
            Phase::Queued if self.started && self.same_machine(node, job) => {
                out.push(Action::Adopted {
                    node: node.into(),
                    job: job.name.clone(),
                });
                match &job.phase {
                    // Already running: it held a slot as an earlier Job; now it is ours.
                    JobPhase::Running => {
                        self.rec(node).current = Some(job.uid.clone());
                        self.set_phase(now, node, Phase::Running, out);
                    }
                    // Finished before this dispatcher looked: record it, take no slot.
                    JobPhase::Succeeded => self.finish(now, node, Outcome::Succeeded, out),
                    JobPhase::Failed(reason) => {
                        self.finish(now, node, Outcome::Failed(reason.clone()), out)
                    }
                }
                return;
            }
            Phase::Done(_) if self.nodes[node].delete_on_create => {
                self.rec(node).delete_on_create = false;
                out.push(Action::Delete {
                    node: node.into(),
                    job: job.name.clone(),
                    uid: job.uid.clone(),
                    why: "its node is gone",
                });
                return;
            }
            Phase::Running if current.as_ref().is_none_or(|c| *c == job.uid) => {
                self.rec(node).current = Some(job.uid.clone());
            }
            _ => return,
        }
        if self.nodes[node].phase != Phase::Running {
            return;
        }
        match &job.phase {
            JobPhase::Running => {}
            JobPhase::Succeeded => self.finish(now, node, Outcome::Succeeded, out),
            JobPhase::Failed(reason) => {
                self.set_phase(now, node, Phase::Finishing, out);
                out.push(Action::ReadFailure {
                    node: node.into(),
                    job: job.name.clone(),
                    condition: reason.clone(),
                });
            }
        }
    }

    /// Whether `job` was made for the machine now behind the node's name.
    fn same_machine(&self, node: &str, job: &JobObs) -> bool {
        let uid = self
            .nodes
            .get(node)
            .and_then(|r| r.obs.as_ref())
            .map(|o| o.facts.uid.as_str());
        job.node_uid.is_empty() || uid.is_none_or(|u| u == job.node_uid)
    }

    fn on_job_gone(&mut self, now: Instant, name: &str, out: &mut Vec<Action>) {
        let Some(job) = self.jobs.remove(name) else {
            return;
        };
        let node = job.node.clone();
        self.detach_job(now, &node, name, out);
        let rec = self.rec(&node);
        if rec.current.as_deref() == Some(job.uid.as_str()) {
            rec.current = None;
            if matches!(rec.phase, Phase::Running | Phase::Finishing) {
                let o = Outcome::Failed(format!("Job {name} was deleted before it finished; re-run (helm upgrade) to retry this node"));
                self.finish(now, &node, o, out);
            }
        }
        self.refresh(now, &node, out);
    }

    fn detach_job(&mut self, now: Instant, node: &str, name: &str, out: &mut Vec<Action>) {
        if let Some(r) = self.nodes.get_mut(node) {
            r.jobs.retain(|j| j != name);
        }
        self.refresh(now, node, out);
    }

    fn on_pod(&mut self, now: Instant, pod: PodObs, out: &mut Vec<Action>) {
        if !pod.live {
            self.on_pod_gone(now, &pod.name, out);
            return;
        }
        if pod.node.is_empty() {
            return;
        }
        let node = pod.node.clone();
        self.pods.insert(
            pod.name.clone(),
            PodRec {
                node: node.clone(),
                job_uid: pod.job_uid,
            },
        );
        let r = self.rec(&node);
        if !r.pods.contains(&pod.name) {
            r.pods.push(pod.name);
        }
        self.refresh(now, &node, out);
    }

    fn on_pod_gone(&mut self, now: Instant, name: &str, out: &mut Vec<Action>) {
        let Some(pod) = self.pods.remove(name) else {
            return;
        };
        if let Some(r) = self.nodes.get_mut(&pod.node) {
            r.pods.retain(|p| p != name);
        }
        self.refresh(now, &pod.node, out);
    }

    // ----- API results -----

    fn on_created(&mut self, now: Instant, node: &str, result: Created, out: &mut Vec<Action>) {
        let job = self.names.assign(node);
        if let Some(r) = self.nodes.get_mut(node) {
            r.create_pending = false;
        }
        let Some(phase) = self.phase(node).cloned() else {
            return;
        };
        match result {
            Created::Ok(uid) => {
                if phase == Phase::Creating {
                    self.rec(node).current = Some(uid.clone());
                    self.set_phase(now, node, Phase::Running, out);
                    // The watch may have delivered the finished Job before the create returned.
                    if let Some(seen) = self.jobs.get(&job).filter(|j| j.uid == uid).cloned() {
                        let obs = JobObs {
                            name: job.clone(),
                            uid,
                            node: node.into(),
                            node_uid: String::new(),
                            ours: seen.ours,
                            phase: seen.phase,
                            deleting: seen.deleting,
                        };
                        self.track_ours(now, node, &obs, out);
                    }
                } else if self.nodes[node].delete_on_create {
                    self.rec(node).delete_on_create = false;
                    // It exists until the watch says it is gone: the name and the node stay busy.
                    self.note_job(now, node, &job, &uid, out);
                    out.push(Action::Delete {
                        node: node.into(),
                        job,
                        uid,
                        why: "its node is gone",
                    });
                }
            }
            Created::Conflict if phase == Phase::Creating => out.push(Action::ReadConflict {
                node: node.into(),
                job,
            }),
            Created::Conflict => self.rec(node).delete_on_create = false,
            Created::Err(e) => {
                self.rec(node).delete_on_create = false;
                if phase == Phase::Creating {
                    self.finish(
                        now,
                        node,
                        Outcome::Failed(format!("could not create its Job: {e}")),
                        out,
                    );
                }
            }
        }
        self.refresh(now, node, out);
    }

    fn on_conflict(&mut self, now: Instant, node: &str, found: Conflicting, out: &mut Vec<Action>) {
        if self.phase(node) != Some(&Phase::Creating) {
            return;
        }
        let job = self.names.assign(node);
        match found {
            Conflicting::Foreign => {
                let o = Outcome::Failed(format!(
                    "a Job named {job} already exists and is not managed by this dispatcher; it was left untouched. Delete it or choose another --name-prefix"
                ));
                self.finish(now, node, o, out);
            }
            Conflicting::Err(e) => self.finish(
                now,
                node,
                Outcome::Failed(format!("Job {job} exists but cannot be read: {e}")),
                out,
            ),
            Conflicting::Gone => {
                // Deleted between our create and our get: try again.
                self.set_phase(now, node, Phase::Replacing, out);
            }
            Conflicting::Managed(obs) => {
                if obs.ours && !obs.deleting {
                    self.on_job(now, obs, out);
                } else if obs.phase == JobPhase::Running && !obs.deleting {
                    // Another run's Job, still at work on this node, that the watch had not shown
                    // yet: never cut short (it may be half-way through the host). The node waits,
                    // busy, until it ends, within the per-node timeout; then it is replaced.
                    self.on_job(now, obs, out);
                    self.set_phase(now, node, Phase::Queued, out);
                } else {
                    // A finished (or vanishing) Job of an earlier run: replace it.
                    let uid = obs.uid.clone();
                    let deleting = obs.deleting;
                    self.on_job(now, obs, out);
                    self.set_phase(now, node, Phase::Replacing, out);
                    if !deleting {
                        out.push(Action::Delete {
                            node: node.into(),
                            job,
                            uid,
                            why: "replacing the Job of an earlier run or template",
                        });
                    }
                }
            }
        }
        self.refresh(now, node, out);
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        while let Some((t, node)) = self.deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            if self.nodes[&node].park_until == Some(t) {
                // The grace is over: the node no longer holds the run (it is still dispatched
                // if it becomes ready while the run goes on). A canary node back in the queue
                // (its machine re-created) that stays NotReady proves nothing: it frees its
                // place in the wave, or the whole rollout would wait for it until the deadline.
                self.parked_waiting -= 1;
                if self.phase(&node) == Some(&Phase::Queued) {
                    self.canary.finished(&node, CanaryEnd::Void);
                }
                continue;
            }
            if self.nodes[&node].busy_until == Some(t) {
                self.busy_timeout(now, &node, out);
                continue;
            }
            let limit = humantime::format_duration(self.cfg.node_timeout.unwrap_or_default());
            self.rec(&node).gave_up = true;
            match self.phase(&node) {
                Some(Phase::Running) => {
                    self.delete_current(&node, "it ran past the per-node timeout", out);
                    let o = Outcome::Failed(format!(
                        "its Job did not finish within the per-node timeout ({limit}); it was deleted to free the slot. Check the node (kubectl describe node) and re-run"
                    ));
                    self.finish(now, &node, o, out);
                }
                Some(Phase::Replacing | Phase::Abandoning) => {
                    let o = Outcome::Failed(format!(
                        "the previous Job on this node (or its pod) was not gone within the per-node timeout ({limit}); nothing new was started. Check the node's pods and re-run"
                    ));
                    self.finish(now, &node, o, out);
                }
                _ => {}
            }
        }
    }

    /// A queued node waited past the per-node timeout for an earlier Job or pod to be gone: it
    /// fails, naming what holds it, and no longer takes a slot (what holds it is left alone).
    fn busy_timeout(&mut self, now: Instant, node: &str, out: &mut Vec<Action>) {
        let limit = humantime::format_duration(self.cfg.node_timeout.unwrap_or_default());
        let rec = self.rec(node);
        rec.busy_until = None;
        rec.gave_up = true;
        let reason = match self.holder(node) {
            Holder::Job(job) => format!(
                "Job {job} of an earlier run was still running on this node after the per-node timeout ({limit}); it was left alone (a running install is never cut short) and nothing new was started. Wait for it to end or delete it (kubectl get job {job}), then re-run"
            ),
            Holder::Pod(pod) => format!(
                "pod {pod} of an earlier Job was still on this node after the per-node timeout ({limit}); nothing new was started. A pod stuck Terminating usually sits on an unreachable node: check the node (kubectl describe node {node}), delete the pod once the machine is gone (kubectl delete pod {pod} --force), then re-run"
            ),
            Holder::Unknown => format!(
                "an earlier Job on this node was not gone within the per-node timeout ({limit}); nothing new was started. Check the node's Jobs and pods and re-run"
            ),
        };
        self.finish(now, node, Outcome::Failed(reason), out);
    }

    /// What keeps a node busy: an earlier Job (named first: it says most), else a pod.
    fn holder(&mut self, node: &str) -> Holder {
        let our_name = self.names.assign(node);
        let rec = &self.nodes[node];
        let current = rec.current.as_deref();
        let alive = |j: &JobRec| {
            Some(j.uid.as_str()) != current && (j.phase == JobPhase::Running || j.deleting)
        };
        if self.jobs.get(&our_name).is_some_and(alive) {
            return Holder::Job(our_name);
        }
        let job = rec
            .jobs
            .iter()
            .find(|j| self.jobs.get(*j).is_some_and(alive));
        let pod = rec.pods.iter().find(|p| {
            self.pods
                .get(*p)
                .is_some_and(|r| Some(r.job_uid.as_str()) != current)
        });
        match (job, pod) {
            (Some(j), _) => Holder::Job(j.clone()),
            (None, Some(p)) => Holder::Pod(p.clone()),
            (None, None) => Holder::Unknown,
        }
    }

    /// Starts or stops the per-node timeout of a queued node's wait for an earlier Job or pod.
    fn time_busy_wait(&mut self, now: Instant, node: &str, busy: bool) {
        let timeout = self.cfg.node_timeout.filter(|_| busy && self.started);
        match (timeout, self.nodes[node].busy_until) {
            (Some(limit), None) => {
                let t = self.add_deadline(now + limit, node);
                self.rec(node).busy_until = Some(t);
            }
            (None, Some(t)) => {
                self.rec(node).busy_until = None;
                self.deadlines.remove(&(t, node.to_owned()));
            }
            _ => {}
        }
    }

    /// Schedules a timer for `node` at `t`, or a nanosecond later for each timer of that node
    /// already there: a node's timers (its Job's, its busy wait's, its park grace's) never share
    /// an entry, so ending one never cancels another. Returns the instant used.
    fn add_deadline(&mut self, t: Instant, node: &str) -> Instant {
        let mut t = t;
        while !self.deadlines.insert((t, node.to_owned())) {
            t += Duration::from_nanos(1);
        }
        t
    }

    /// Whether the Node's own view says this template is installed there (`--skip-installed`).
    fn is_installed(&self, obs: &NodeObs) -> bool {
        self.cfg
            .skip_installed
            .as_ref()
            .is_some_and(|rule| obs.selected && rule.is_installed(obs))
    }

    fn on_discovery_done(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.started = true;
        let mut names: Vec<String> = self.nodes.keys().cloned().collect();
        names.sort();
        for node in names {
            self.refresh(now, &node, out);
            match self.nodes[&node].phase {
                Phase::Missing => {
                    let o = Outcome::Failed(format!("node not found: no Node named {node:?} exists; check job.nodes (--nodes) for a typo"));
                    self.finish(now, &node, o, out);
                }
                Phase::Queued => {
                    let job = self.names.assign(&node);
                    if let Some(seen) = self
                        .jobs
                        .get(&job)
                        .filter(|j| j.ours && !j.deleting)
                        .cloned()
                    {
                        let obs = JobObs {
                            name: job,
                            uid: seen.uid,
                            node: node.clone(),
                            node_uid: seen.node_uid,
                            ours: true,
                            phase: seen.phase,
                            deleting: false,
                        };
                        self.track_ours(now, &node, &obs, out);
                    }
                }
                _ => {}
            }
        }
        // Sized now that the nodes needing a Job are known (installed ones are done already).
        let size = self.cfg.canary.resolve(self.queued, self.cfg.parallelism);
        self.canary = Canary::new(size);
    }

    // ----- the core of the state machine -----

    fn delete_current(&mut self, node: &str, why: &'static str, out: &mut Vec<Action>) {
        let job = self.names.assign(node);
        match self.jobs.get(&job) {
            Some(j) if !j.deleting => out.push(Action::Delete {
                node: node.into(),
                job,
                uid: j.uid.clone(),
                why,
            }),
            Some(_) => {}
            None => match self.nodes.get(node).and_then(|r| r.current.clone()) {
                Some(uid) => {
                    self.note_job_quiet(node, &job, &uid);
                    out.push(Action::Delete {
                        node: node.into(),
                        job,
                        uid,
                        why,
                    });
                }
                None => {
                    let rec = self.rec(node);
                    rec.delete_on_create = rec.create_pending;
                }
            },
        }
    }

    /// Records a Job we know exists (from a create answer) before the watch shows it, deleting.
    fn note_job(&mut self, now: Instant, node: &str, job: &str, uid: &str, out: &mut Vec<Action>) {
        self.note_job_quiet(node, job, uid);
        self.refresh(now, node, out);
    }

    fn note_job_quiet(&mut self, node: &str, job: &str, uid: &str) {
        if !self.jobs.contains_key(job) {
            let rec = JobRec {
                node: node.into(),
                node_uid: String::new(),
                uid: uid.into(),
                ours: true,
                phase: JobPhase::Running,
                deleting: true,
                placeholder: true,
            };
            self.jobs.insert(job.into(), rec);
            let r = self.rec(node);
            if !r.jobs.iter().any(|j| j == job) {
                r.jobs.push(job.into());
            }
        }
    }

    fn abandon(&mut self, now: Instant, node: &str, out: &mut Vec<Action>) {
        self.delete_current(node, "its node was re-created under the same name", out);
        self.rec(node).current = None;
        self.set_phase(now, node, Phase::Abandoning, out);
    }

    fn finish(&mut self, now: Instant, node: &str, outcome: Outcome, out: &mut Vec<Action>) {
        let job = self.names.assign(node);
        let took = self
            .nodes
            .get(node)
            .and_then(|r| r.started)
            .map(|s| now.saturating_duration_since(s));
        let rec = self.rec(node);
        rec.took = took;
        let (node_uid, machine_id) = rec
            .obs
            .as_ref()
            .map(|o| (o.facts.uid.clone(), o.facts.machine_id.clone()))
            .unwrap_or_default();
        // Whatever Job is left on the node is no longer this node's current work: should the
        // node become a target again (re-created, re-selected), that Job must be gone first.
        rec.current = None;
        out.push(Action::Report {
            node: node.into(),
            job,
            node_uid,
            machine_id,
            outcome: outcome.clone(),
            took,
        });
        let end = match outcome {
            Outcome::Succeeded => CanaryEnd::Passed,
            Outcome::Failed(_) | Outcome::StillRunning(_) | Outcome::NotStarted(_) => {
                CanaryEnd::Failed
            }
            _ => CanaryEnd::Void,
        };
        if let Some(failed) = self.canary.finished(node, end) {
            self.stopped.get_or_insert(StopReason::CanaryFailed(failed));
        }
        self.set_phase(now, node, Phase::Done(outcome), out);
    }

    /// Moves `node` to `new`, keeping every counter and index in step (the only place that does).
    fn set_phase(&mut self, now: Instant, node: &str, new: Phase, out: &mut Vec<Action>) {
        let rec = self.rec(node);
        let old = std::mem::replace(&mut rec.phase, new.clone());
        if matches!(new, Phase::Creating) && rec.started.is_none() {
            rec.started = Some(now);
        }
        if matches!(new, Phase::Queued) {
            rec.started = None;
        }
        self.time_dispatch(now, node, &old, &new);
        if old.in_flight() {
            self.in_flight -= 1;
        }
        if new.in_flight() {
            self.in_flight += 1;
        }
        let targeted = |p: &Phase| !matches!(p, Phase::Untargeted);
        match (targeted(&old), targeted(&new)) {
            (false, true) => self.total += 1,
            (true, false) => self.total -= 1,
            _ => {}
        }
        self.count_results(&old, &new);
        self.count_queue(node, &old, &new);
        self.refresh(now, node, out);
    }

    /// One per-node timeout from dispatch to the end, whatever the node waits for.
    fn time_dispatch(&mut self, now: Instant, node: &str, old: &Phase, new: &Phase) {
        let timeout = self.cfg.node_timeout;
        let timed = |p: &Phase| matches!(p, Phase::Replacing | Phase::Running | Phase::Abandoning);
        let rec = self.rec(node);
        let old_deadline = if timed(old) && !timed(new) {
            rec.deadline.take()
        } else {
            None
        };
        let new_deadline = if timed(new) && !timed(old) {
            timeout.map(|t| now + t)
        } else {
            None
        };
        if let Some(t) = old_deadline {
            self.deadlines.remove(&(t, node.to_owned()));
        }
        if let Some(t) = new_deadline {
            let t = self.add_deadline(t, node);
            self.rec(node).deadline = Some(t);
        }
    }

    /// Keeps the result counters and the failure budget in step with a phase change.
    fn count_results(&mut self, old: &Phase, new: &Phase) {
        if let Phase::Done(o) = old {
            if o.is_ok() {
                self.ok -= 1;
            } else {
                self.failed -= 1;
            }
        }
        let Phase::Done(o) = new else {
            return;
        };
        if o.is_ok() {
            self.ok += 1;
            return;
        }
        self.failed += 1;
        // Only Jobs that were dispatched spend the budget.
        if !old.in_flight() {
            return;
        }
        self.failed_budget += 1;
        if let Some(limit) = self.cfg.budget.limit(self.total) {
            if self.failed_budget >= limit
                && self.stopped.is_none()
                && self.queued > usize::from(*old == Phase::Queued)
            {
                self.stopped = Some(StopReason::FailureBudget(self.failed_budget));
            }
        }
    }

    /// Keeps the queue counters in step; a node (re-)queued goes to the back.
    fn count_queue(&mut self, node: &str, old: &Phase, new: &Phase) {
        if *old == Phase::Queued {
            self.queued -= 1;
        }
        if (*old == Phase::Queued) != (*new == Phase::Queued) {
            self.changes += 1;
        }
        if *new == Phase::Queued {
            self.queued += 1;
            let seq = self.next_seq;
            self.next_seq += 1;
            self.rec(node).seq = seq;
        }
    }

    /// Re-derives the node's busy flag and queue class, and moves a node waiting for its
    /// name or host to be free on to its next step.
    fn refresh(&mut self, now: Instant, node: &str, out: &mut Vec<Action>) {
        let our_name = self.names.assign(node);
        let Some(v) = self.derive(node, &our_name) else {
            return;
        };
        self.reclass(node, v.counts, v.class);
        self.time_parked_wait(now, node, v.class == Some(Class::Parked));
        self.time_busy_wait(now, node, v.class == Some(Class::Busy));
        self.advance(now, node, our_name, &v, out);
    }

    /// What the node's records say now (see [`Derived`]).
    fn derive(&self, node: &str, our_name: &str) -> Option<Derived> {
        let rec = self.nodes.get(node)?;
        let current = rec.current.as_deref();
        let old_job_alive = rec.jobs.iter().any(|j| {
            self.jobs.get(j).is_some_and(|r| {
                Some(r.uid.as_str()) != current && (r.phase == JobPhase::Running || r.deleting)
            })
        });
        let old_pod_alive = rec.pods.iter().any(|p| {
            self.pods
                .get(p)
                .is_some_and(|r| Some(r.job_uid.as_str()) != current)
        });
        let busy = old_job_alive || old_pod_alive || rec.delete_on_create;
        let named = self.jobs.get(our_name);
        let name_taken = named.is_some_and(|j| Some(j.uid.as_str()) != current);
        let phase = rec.phase.clone();
        // Our own Job of this run is adopted rather than skipped (its result is the truer one).
        let adoptable = named.is_some_and(|j| j.ours);
        let installed = !adoptable && rec.obs.as_ref().is_some_and(|o| self.is_installed(o));
        // Busy nodes we are not (or no longer) working on still run a Job: they take a slot
        // until it is gone, except once we gave up on it (a pod stuck on an unreachable machine
        // past the per-node timeout restarts nothing).
        let counts = busy && !phase.in_flight() && phase != Phase::Missing && !rec.gave_up;
        let class = (phase == Phase::Queued).then(|| {
            let o = rec.obs.as_ref();
            // A Job under our name that runs (wherever it is pinned) is never cut short: wait.
            let name_busy = named.is_some_and(|j| j.deleting || j.phase == JobPhase::Running);
            if busy || name_taken && name_busy {
                Class::Busy
            } else if o.is_some_and(|o| o.selected && o.ready && o.untolerated.is_none()) {
                Class::Ready
            } else {
                Class::Parked
            }
        });
        Some(Derived {
            busy,
            name_taken,
            installed,
            counts,
            class,
            phase,
        })
    }

    /// Moves the node between the slot count, the ready queue and the busy count.
    fn reclass(&mut self, node: &str, counts: bool, class: Option<Class>) {
        let rec = self.nodes.get_mut(node).expect("present");
        let (old_counts, old_class, seq) = (rec.busy_counted, rec.class, rec.seq);
        rec.busy_counted = counts;
        rec.class = class;
        if counts != old_counts {
            if counts {
                self.foreign_busy += 1;
            } else {
                self.foreign_busy -= 1;
            }
        }
        if class == old_class {
            return;
        }
        match old_class {
            Some(Class::Ready) => {
                self.ready.remove(&(seq, node.to_owned()));
            }
            Some(Class::Busy) => self.queued_busy -= 1,
            _ => {}
        }
        match class {
            Some(Class::Ready) => {
                self.ready.insert((seq, node.to_owned()));
            }
            Some(Class::Busy) => self.queued_busy += 1,
            _ => {}
        }
    }

    /// A parked node keeps the run waiting for the grace period, then stops counting.
    fn time_parked_wait(&mut self, now: Instant, node: &str, parked: bool) {
        let park_until = self.nodes[node].park_until;
        match (parked, park_until) {
            (true, None) if self.started => {
                let t = self.add_deadline(now + self.cfg.unready_grace, node);
                self.parked_waiting += 1;
                self.nodes.get_mut(node).expect("present").park_until = Some(t);
            }
            (false, Some(t)) => {
                if self.deadlines.remove(&(t, node.to_owned())) {
                    self.parked_waiting -= 1;
                }
                self.nodes.get_mut(node).expect("present").park_until = None;
            }
            _ => {}
        }
    }

    /// Moves a node whose wait is over on to its next step.
    fn advance(
        &mut self,
        now: Instant,
        node: &str,
        job: String,
        v: &Derived,
        out: &mut Vec<Action>,
    ) {
        let free = !v.name_taken && !v.busy;
        let obs = self.nodes[node].obs.as_ref();
        let (facts, selected) = (
            obs.map(|o| o.facts.clone()),
            obs.is_some_and(|o| o.selected),
        );
        match v.phase {
            // The superseded install left something stuck there: never overlap with it.
            Phase::Queued if self.started && self.cfg.held.contains_key(node) => {
                let why = self.cfg.held[node].clone();
                self.finish(now, node, Outcome::Failed(why), out)
            }
            // Installed and unchanged: nothing to do there, whether the node is Ready or not
            // (a NotReady node must not fail a run that has nothing to change on it).
            Phase::Queued if self.started && v.class != Some(Class::Busy) && v.installed => {
                self.finish(now, node, Outcome::AlreadyInstalled, out)
            }
            Phase::Replacing if free => match facts {
                Some(facts) => {
                    self.set_phase(now, node, Phase::Creating, out);
                    self.rec(node).create_pending = true;
                    out.push(Action::Create {
                        node: node.into(),
                        job,
                        facts,
                    });
                }
                None => {
                    let o = Outcome::Removed("node was deleted before its Job was created".into());
                    self.finish(now, node, o, out)
                }
            },
            Phase::Abandoning if free && selected => self.set_phase(now, node, Phase::Queued, out),
            Phase::Abandoning if free => {
                let o = Outcome::Removed(
                    "node was re-created under the same name and no longer matches the selection"
                        .into(),
                );
                self.finish(now, node, o, out);
            }
            _ => {}
        }
    }

    /// Starts Jobs while slots are free: the selection, taints, readiness and identity are
    /// those of the latest watch view, checked now rather than when the node was queued.
    fn dispatch(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.started {
            return;
        }
        while self.stopped.is_none() && self.taken() < self.cfg.parallelism {
            let Some(node) = self.next_ready() else {
                break;
            };
            if self
                .cfg
                .budget
                .limit(self.total)
                .is_some_and(|limit| self.failed_budget >= limit)
            {
                self.stopped = Some(StopReason::FailureBudget(self.failed_budget));
                break;
            }
            // Installed nodes never get here: `refresh` finished them.
            let obs = self.nodes[&node]
                .obs
                .clone()
                .expect("ready nodes have a view");
            let job = self.names.assign(&node);
            self.canary.dispatched(&node);
            match self.jobs.get(&job).cloned() {
                Some(stale) => {
                    self.set_phase(now, &node, Phase::Replacing, out);
                    if !stale.deleting {
                        out.push(Action::Delete {
                            node: node.clone(),
                            job,
                            uid: stale.uid,
                            why: "replacing the Job of an earlier run or template",
                        });
                    }
                }
                None => {
                    self.set_phase(now, &node, Phase::Creating, out);
                    self.rec(&node).create_pending = true;
                    out.push(Action::Create {
                        node: node.clone(),
                        job,
                        facts: obs.facts,
                    });
                }
            }
            self.peak = self.peak.max(self.taken());
        }
    }

    /// The next node to dispatch: the head of the ready queue, or, while the canary wave is
    /// full and has not passed, only a wave member back in the queue (its machine re-created).
    fn next_ready(&self) -> Option<String> {
        if self.canary.open() {
            return self.ready.first().map(|(_, n)| n.clone());
        }
        if self.canary.failed() {
            return None;
        }
        self.canary
            .members()
            .find(|m| {
                self.nodes
                    .get(*m)
                    .is_some_and(|r| r.class == Some(Class::Ready))
            })
            .cloned()
    }

    /// Queued nodes with their class and what keeps them (for test failure messages).
    #[cfg(test)]
    fn debug_queued(&self) -> String {
        let mut v: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, r)| r.phase == Phase::Queued || r.phase.in_flight() || r.busy_counted)
            .map(|(n, r)| {
                format!(
                    "{n}: {:?} {:?} jobs={:?} pods={:?} current={:?} obs={:?} doc={}",
                    r.phase,
                    r.class,
                    r.jobs,
                    r.pods,
                    r.current,
                    r.obs.as_ref().map(|o| (o.selected, &o.facts.uid)),
                    r.delete_on_create
                )
            })
            .collect();
        v.sort();
        format!(
            "{v:#?} ready={:?} queued_busy={} taken={} foreign={} P={} stopped={:?} jobs={:?}",
            self.ready,
            self.queued_busy,
            self.taken(),
            self.foreign_busy,
            self.cfg.parallelism,
            self.stopped,
            self.jobs.keys().collect::<Vec<_>>()
        )
    }

    /// Final per-node results: queued nodes are not-started, in-flight ones still running.
    pub fn into_results(self) -> Results {
        let why = self.stopped.as_ref().map(ToString::to_string);
        let mut results = BTreeMap::new();
        for (node, rec) in self.nodes {
            let outcome = match rec.phase {
                Phase::Untargeted => continue,
                Phase::Done(o) => {
                    results.insert(node, (o, rec.took));
                    continue;
                }
                Phase::Missing => Outcome::Failed(format!("node not found: no Node named {node:?} exists; check job.nodes (--nodes) for a typo")),
                Phase::Queued => {
                    let parked = match &rec.obs {
                        Some(o) if !o.ready => Some(match &o.untolerated {
                            Some(t) => format!("node stayed NotReady ({t}); not dispatched. Fix the node and re-run"),
                            None => "node stayed NotReady; not dispatched. Fix the node and re-run".to_owned(),
                        }),
                        Some(o) => o.untolerated.as_ref().map(|t| format!("{t}; not dispatched (as a DaemonSet would not place a pod there)")),
                        None => None,
                    };
                    let unready = rec.obs.as_ref().is_some_and(|o| !o.ready);
                    match (parked, &why) {
                        (_, Some(w)) => Outcome::NotStarted(w.clone()),
                        (Some(p), None) if unready && self.cfg.unready == UnreadyPolicy::Skip => {
                            Outcome::Skipped(format!("{p}; skipped (unready policy skip): nothing was changed on it, and whatever it carries of this release stays (after an uninstall: Kata and the claim label; clean it once it is Ready)"))
                        }
                        (Some(p), None) if rec.obs.as_ref().is_some_and(|o| o.untolerated.is_some() && o.ready) => Outcome::Skipped(p),
                        (Some(p), None) => Outcome::NotStarted(p),
                        (None, None) => Outcome::NotStarted("not dispatched".into()),
                    }
                }
                _ => Outcome::StillRunning(format!("{}; its Job keeps running", why.clone().unwrap_or_else(|| "run ended".into()))),
            };
            results.insert(node, (outcome, None));
        }
        results
    }
}

#[cfg(test)]
mod tests;
