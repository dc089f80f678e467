//! The rollout state machine: which node to dispatch next, how many slots are taken, when to
//! stop. Pure: the I/O shell feeds it events and carries out what it decides.
//!
//! Invariant: `taken() <= parallelism` at every dispatch decision, where `taken` counts our
//! nodes in flight (including Jobs being replaced) plus unfinished Jobs of earlier runs that we
//! did not adopt. Counting those conservatively is what keeps a re-run from overshooting.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

/// How one node ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its Job completed.
    Succeeded,
    /// Its Job failed, or something prevented it from running; the reason says what to do.
    Failed(String),
    /// Never dispatched (failure budget spent, deadline, interrupted).
    NotStarted(String),
    /// Dispatched, still running when this run stopped; the next run adopts it.
    StillRunning(String),
}

impl Outcome {
    /// Short word for tables.
    pub fn word(&self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed(_) => "failed",
            Self::NotStarted(_) => "not-started",
            Self::StillRunning(_) => "running",
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
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FailureBudget(n) => write!(f, "failure budget spent ({n} nodes failed); fix the cause and re-run (helm upgrade)"),
            Self::Deadline => write!(f, "run deadline reached; re-run (helm upgrade) to continue, or raise --deadline"),
            Self::Interrupted => write!(f, "dispatcher interrupted; re-run (helm upgrade) to continue"),
        }
    }
}

/// Counters for progress lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Nodes done successfully.
    pub succeeded: usize,
    /// Nodes failed.
    pub failed: usize,
    /// Nodes in flight.
    pub running: usize,
    /// Nodes waiting for a slot.
    pub queued: usize,
    /// All targeted nodes.
    pub total: usize,
}

/// The rollout of one run.
#[derive(Debug)]
pub struct Rollout {
    parallelism: usize,
    max_failures: usize,
    queue: VecDeque<String>,
    in_flight: HashSet<String>,
    foreign_active: HashSet<String>,
    results: BTreeMap<String, (Outcome, Option<Duration>)>,
    total: usize,
    stopped: Option<StopReason>,
}

impl Rollout {
    /// A rollout over `nodes` (in dispatch order); `parallelism` is capped at the node count.
    pub fn new(nodes: Vec<String>, parallelism: usize, max_failures: usize) -> Self {
        let total = nodes.len();
        Self {
            parallelism: parallelism.clamp(1, total.max(1)),
            max_failures: max_failures.max(1),
            queue: nodes.into(),
            in_flight: HashSet::new(),
            foreign_active: HashSet::new(),
            results: BTreeMap::new(),
            total,
            stopped: None,
        }
    }

    /// The effective parallelism.
    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    /// An unfinished Job we did not create (an earlier run's) occupies a slot until it ends.
    pub fn note_foreign_active(&mut self, job: &str) {
        self.foreign_active.insert(job.to_owned());
    }

    /// A foreign Job finished or disappeared: its slot is free.
    pub fn foreign_gone(&mut self, job: &str) {
        self.foreign_active.remove(job);
    }

    /// A node that started matching the selection during the run joins the queue.
    pub fn enqueue(&mut self, node: &str) {
        if !self.in_flight.contains(node) && !self.results.contains_key(node) && !self.queue.iter().any(|n| n == node) {
            self.queue.push_back(node.to_owned());
            self.total += 1;
        }
    }

    /// A queued node left the cluster before dispatch: it is no longer a target.
    pub fn drop_queued(&mut self, node: &str) -> bool {
        let dropped = self.remove_queued(node);
        if dropped {
            self.total -= 1;
        }
        dropped
    }

    /// A node whose Job from this run is already running: in flight without a new dispatch.
    pub fn adopt_running(&mut self, node: &str) {
        if self.remove_queued(node) {
            self.in_flight.insert(node.to_owned());
        }
    }

    /// A node whose result is already known (adopted finished Job, or failed before dispatch).
    pub fn record_without_dispatch(&mut self, node: &str, outcome: Outcome) {
        if self.remove_queued(node) {
            self.record(node, outcome, None);
        }
    }

    fn remove_queued(&mut self, node: &str) -> bool {
        match self.queue.iter().position(|n| n == node) {
            Some(i) => {
                self.queue.remove(i);
                true
            }
            None => false,
        }
    }

    /// Slots taken right now.
    pub fn taken(&self) -> usize {
        self.in_flight.len() + self.foreign_active.len()
    }

    /// The next node to dispatch, if a slot is free and dispatching has not stopped.
    pub fn next_to_dispatch(&mut self) -> Option<String> {
        if self.stopped.is_some() || self.taken() >= self.parallelism {
            return None;
        }
        let node = self.queue.pop_front()?;
        self.in_flight.insert(node.clone());
        Some(node)
    }

    /// A dispatched node ended.
    pub fn finish(&mut self, node: &str, outcome: Outcome, took: Option<Duration>) {
        if self.in_flight.remove(node) {
            self.record(node, outcome, took);
        }
    }

    fn record(&mut self, node: &str, outcome: Outcome, took: Option<Duration>) {
        self.results.insert(node.to_owned(), (outcome, took));
        let failed = self.failed();
        if failed >= self.max_failures && self.stopped.is_none() && !self.queue.is_empty() {
            self.stopped = Some(StopReason::FailureBudget(failed));
        }
    }

    /// Whether `node` is in flight.
    pub fn is_in_flight(&self, node: &str) -> bool {
        self.in_flight.contains(node)
    }

    /// Stop dispatching (in-flight nodes still finish).
    pub fn stop(&mut self, reason: StopReason) {
        self.stopped.get_or_insert(reason);
    }

    /// Why dispatching stopped, if it did.
    pub fn stopped(&self) -> Option<&StopReason> {
        self.stopped.as_ref()
    }

    /// Nothing left to wait for.
    pub fn is_done(&self) -> bool {
        self.in_flight.is_empty() && (self.queue.is_empty() || self.stopped.is_some())
    }

    fn failed(&self) -> usize {
        self.results.values().filter(|(o, _)| matches!(o, Outcome::Failed(_))).count()
    }

    /// Counters for a progress line.
    pub fn progress(&self) -> Progress {
        Progress {
            succeeded: self.results.values().filter(|(o, _)| *o == Outcome::Succeeded).count(),
            failed: self.failed(),
            running: self.in_flight.len(),
            queued: self.queue.len(),
            total: self.total,
        }
    }

    /// Final per-node results: still-queued nodes are not-started, in-flight ones still running.
    pub fn into_results(mut self) -> BTreeMap<String, (Outcome, Option<Duration>)> {
        let why = self.stopped.as_ref().map(ToString::to_string).unwrap_or_else(|| "not dispatched".into());
        for node in std::mem::take(&mut self.queue) {
            self.results.insert(node, (Outcome::NotStarted(why.clone()), None));
        }
        for node in std::mem::take(&mut self.in_flight) {
            self.results.insert(node, (Outcome::StillRunning(format!("{why}; its Job keeps running")), None));
        }
        self.results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn never_more_than_parallelism_and_refills_on_finish() {
        let mut r = Rollout::new(nodes(5), 2, 10);
        let a = r.next_to_dispatch().unwrap();
        let b = r.next_to_dispatch().unwrap();
        assert_eq!(r.next_to_dispatch(), None);
        r.finish(&a, Outcome::Succeeded, None);
        let c = r.next_to_dispatch().unwrap();
        assert_eq!(r.next_to_dispatch(), None);
        for n in [b, c] {
            r.finish(&n, Outcome::Succeeded, None);
        }
        while let Some(n) = r.next_to_dispatch() {
            assert!(r.taken() <= 2);
            r.finish(&n, Outcome::Succeeded, None);
        }
        assert!(r.is_done());
        assert_eq!(r.progress().succeeded, 5);
    }

    #[test]
    fn parallelism_is_capped_at_node_count() {
        assert_eq!(Rollout::new(nodes(3), 100, 1).parallelism(), 3);
        assert_eq!(Rollout::new(nodes(0), 100, 1).parallelism(), 1);
        assert!(Rollout::new(nodes(0), 100, 1).is_done());
    }

    #[test]
    fn failure_budget_stops_new_dispatches_but_lets_in_flight_finish() {
        let mut r = Rollout::new(nodes(10), 3, 2);
        let d: Vec<String> = std::iter::from_fn(|| r.next_to_dispatch()).collect();
        assert_eq!(d.len(), 3);
        r.finish(&d[0], Outcome::Failed("x".into()), None);
        assert!(r.next_to_dispatch().is_some());
        r.finish(&d[1], Outcome::Failed("y".into()), None);
        assert_eq!(r.stopped(), Some(&StopReason::FailureBudget(2)));
        assert_eq!(r.next_to_dispatch(), None);
        assert!(!r.is_done());
        r.finish(&d[2], Outcome::Succeeded, None);
        let results = r.into_results();
        assert_eq!(results.values().filter(|(o, _)| matches!(o, Outcome::NotStarted(_))).count(), 6);
        assert_eq!(results.values().filter(|(o, _)| matches!(o, Outcome::StillRunning(_))).count(), 1);
    }

    #[test]
    fn foreign_and_adopted_jobs_take_slots() {
        let mut r = Rollout::new(nodes(4), 2, 5);
        r.note_foreign_active("old-job");
        r.adopt_running("n3");
        assert_eq!(r.taken(), 2);
        assert_eq!(r.next_to_dispatch(), None);
        r.foreign_gone("old-job");
        assert_eq!(r.next_to_dispatch().as_deref(), Some("n0"));
        assert_eq!(r.next_to_dispatch(), None);
        r.finish("n3", Outcome::Succeeded, None);
        assert_eq!(r.next_to_dispatch().as_deref(), Some("n1"));
    }

    #[test]
    fn late_nodes_join_and_deleted_ones_leave() {
        let mut r = Rollout::new(nodes(1), 5, 5);
        r.enqueue("late");
        r.enqueue("late");
        assert_eq!(r.progress().total, 2);
        assert!(r.drop_queued("n0"));
        assert!(!r.drop_queued("n0"));
        assert_eq!(r.next_to_dispatch().as_deref(), Some("late"));
        assert_eq!(r.progress().total, 1);
    }

    #[test]
    fn recorded_results_skip_dispatch_and_interrupt_reports_the_rest() {
        let mut r = Rollout::new(nodes(3), 1, 5);
        r.record_without_dispatch("n0", Outcome::Succeeded);
        assert_eq!(r.next_to_dispatch().as_deref(), Some("n1"));
        r.stop(StopReason::Interrupted);
        assert_eq!(r.next_to_dispatch(), None);
        let res = r.into_results();
        assert_eq!(res["n0"].0, Outcome::Succeeded);
        assert!(matches!(&res["n1"].0, Outcome::StillRunning(m) if m.contains("interrupted")));
        assert!(matches!(&res["n2"].0, Outcome::NotStarted(m) if m.contains("interrupted")));
    }
}
