//! Stopping the superseded dispatcher (the install, when uninstalling), as a pure step function:
//! given what is left of it (its per-node Jobs and live pods), which Jobs to delete, and when
//! the wait is over.
//!
//! The wait is per object, not cluster-wide: a pod stuck on an unreachable machine would
//! otherwise keep the whole uninstall waiting and then fail it. Each Job or pod gets the
//! per-node timeout from when it was first seen; past it, it is given up on (reported once,
//! naming it) and the wait goes on for the rest. The nodes it sits on are not cleaned in this
//! run, so an install and an uninstall never overlap on one host.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// What kind of object is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A per-node Job.
    Job,
    /// A live pod of one.
    Pod,
}

/// One Job or live pod of the superseded dispatcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// Job or pod.
    pub kind: Kind,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// The node it is for (annotation `katacontainers.io/node-name`), empty when unknown.
    pub node: String,
    /// Has a deletionTimestamp.
    pub deleting: bool,
}

/// What to do after one listing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    /// Jobs to delete (not being deleted yet, not given up on).
    pub delete: Vec<Leftover>,
    /// Objects given up on at this step (to report once, by name).
    pub given_up: Vec<Leftover>,
    /// Nothing left to wait for.
    pub done: bool,
    /// What is still waited for, for the log.
    pub left: String,
}

/// The wait for the superseded dispatcher's per-node Jobs and pods to be gone.
#[derive(Debug)]
pub struct StopWait {
    timeout: Duration,
    first_seen: HashMap<String, Instant>,
    given_up: BTreeMap<String, Leftover>,
}

impl StopWait {
    /// A wait giving each object `timeout` from when it is first seen.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            first_seen: HashMap::new(),
            given_up: BTreeMap::new(),
        }
    }

    /// One listing of what is left, at `now`.
    pub fn observe(&mut self, now: Instant, listed: Vec<Leftover>) -> Step {
        // Only what is still listed is remembered (memory stays bounded by what is left).
        let mut seen = HashMap::with_capacity(listed.len());
        let mut step = Step::default();
        let (mut jobs, mut pods) = (0, 0);
        for l in listed {
            if self.given_up.contains_key(&l.uid) {
                continue;
            }
            let first = self.first_seen.get(&l.uid).copied().unwrap_or(now);
            seen.insert(l.uid.clone(), first);
            if now.saturating_duration_since(first) > self.timeout {
                self.given_up.insert(l.uid.clone(), l.clone());
                step.given_up.push(l);
                continue;
            }
            match l.kind {
                Kind::Job => jobs += 1,
                Kind::Pod => pods += 1,
            }
            if l.kind == Kind::Job && !l.deleting {
                step.delete.push(l);
            }
        }
        self.first_seen = seen;
        step.done = jobs == 0 && pods == 0;
        step.left = format!("{jobs} Jobs and {pods} running pods left");
        step
    }

    /// Nodes where something was given up on, with why: this run does not clean them.
    pub fn stuck_nodes(&self) -> BTreeMap<String, String> {
        let limit = humantime::format_duration(self.timeout);
        let mut nodes = BTreeMap::new();
        for l in self.given_up.values().filter(|l| !l.node.is_empty()) {
            let what = match l.kind {
                Kind::Job => "Job",
                Kind::Pod => "pod",
            };
            let why = format!(
                "{what} {} of the install being stopped was still there after the per-node timeout ({limit}); this node was not cleaned so the two never overlap on one host. Check the node (kubectl describe node {}), delete the {what} once its machine is gone (kubectl delete {what} {} --force), then uninstall again",
                l.name, l.node, l.name
            );
            // A pod says more than its Job (the Job waits for it): the pod's reason wins.
            if l.kind == Kind::Pod || !nodes.contains_key(&l.node) {
                nodes.insert(l.node.clone(), why);
            }
        }
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str) -> Leftover {
        Leftover {
            kind: Kind::Pod,
            name: name.into(),
            uid: format!("uid-{name}"),
            node: node.into(),
            deleting: false,
        }
    }

    fn job(name: &str, node: &str, deleting: bool) -> Leftover {
        Leftover {
            kind: Kind::Job,
            deleting,
            ..pod(name, node)
        }
    }

    /// Issue 21: one pod stuck Terminating on an unreachable node kept the whole uninstall
    /// waiting, then failed it (a cluster-wide 5 min wait).
    #[test]
    fn a_pod_stuck_past_the_per_node_timeout_is_given_up_on_and_the_wait_goes_on() {
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        let mut w = StopWait::new(minute);
        let step = w.observe(
            t0,
            vec![
                job("kd-a", "a", false),
                job("kd-b", "b", true),
                pod("stuck", "b"),
                pod("slow", "c"),
            ],
        );
        assert_eq!(
            step.delete,
            [job("kd-a", "a", false)],
            "only Jobs not yet deleting"
        );
        assert!(!step.done && step.given_up.is_empty());
        // kd-a is gone; the rest is still there past the per-node timeout.
        let step = w.observe(
            t0 + minute + Duration::from_secs(1),
            vec![job("kd-b", "b", true), pod("stuck", "b"), pod("slow", "c")],
        );
        let mut names: Vec<&str> = step.given_up.iter().map(|l| l.name.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            ["kd-b", "slow", "stuck"],
            "each past its own timeout"
        );
        assert!(step.done, "only given-up objects are left: {step:?}");
        let stuck = w.stuck_nodes();
        assert_eq!(stuck.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert!(
            stuck["b"].contains("stuck") || stuck["b"].contains("kd-b"),
            "{stuck:?}"
        );
    }

    #[test]
    fn the_timeout_runs_from_when_each_object_is_first_seen() {
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        let mut w = StopWait::new(minute);
        assert!(!w.observe(t0, vec![pod("p1", "a")]).done);
        let late = t0 + Duration::from_secs(50);
        assert!(w
            .observe(late, vec![pod("p1", "a"), pod("p2", "b")])
            .given_up
            .is_empty());
        let step = w.observe(
            t0 + Duration::from_secs(61),
            vec![pod("p1", "a"), pod("p2", "b")],
        );
        assert_eq!(step.given_up, [pod("p1", "a")]);
        assert!(!step.done, "p2 still has time");
        let step = w.observe(t0 + Duration::from_secs(70), vec![pod("p1", "a")]);
        assert!(
            step.done && step.given_up.is_empty(),
            "reported once: {step:?}"
        );
        assert_eq!(w.stuck_nodes().keys().collect::<Vec<_>>(), ["a"]);
        assert!(StopWait::new(minute).observe(t0, Vec::new()).done);
    }
}
