//! The canary: the first wave of N dispatched nodes must all succeed before any other node
//! starts; one canary failure stops the run (no other node is touched). Pure planning logic,
//! driven by [`crate::lifecycle`].

use crate::summary::CanaryView;
use std::collections::BTreeSet;
use std::fmt;

/// `--canary`: how many nodes go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanarySize {
    /// One node first when more nodes need a Job than `--parallelism` starts at once (the run
    /// has more than one wave anyway: the canary costs one node's install time, and a template
    /// that breaks nodes breaks one instead of a whole wave); none otherwise.
    Auto,
    /// Exactly this many first (0: no canary).
    Nodes(usize),
}

impl CanarySize {
    /// Parses `auto` or a node count (`0`: off).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            n => n.parse().map(Self::Nodes).map_err(|_| {
                format!("invalid canary {s:?}: use a node count (1; 0 = no canary) or auto")
            }),
        }
    }

    /// The canary size for a run where `to_run` nodes need a Job, `parallelism` at a time.
    pub fn resolve(&self, to_run: usize, parallelism: usize) -> usize {
        match *self {
            Self::Auto => usize::from(to_run > parallelism),
            Self::Nodes(n) => n,
        }
    }
}

impl fmt::Display for CanarySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Nodes(n) => write!(f, "{n}"),
        }
    }
}

/// How a finished canary node ended, as far as the canary is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryEnd {
    /// Its Job succeeded.
    Passed,
    /// It failed: the rollout stops.
    Failed,
    /// It proved nothing (the Node was deleted): another node takes its place.
    Void,
}

/// The canary wave of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Canary {
    size: usize,
    members: BTreeSet<String>,
    passed: BTreeSet<String>,
    failed: Option<String>,
}

impl Canary {
    /// A canary of `size` nodes (0: none).
    pub fn new(size: usize) -> Self {
        Self {
            size,
            ..Self::default()
        }
    }

    /// Whether the canary is on for this run.
    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    /// Whether the canary wave passed: `size` nodes succeeded.
    pub fn passed(&self) -> bool {
        self.passed.len() >= self.size
    }

    /// Whether any node may be dispatched now: always once the canary passed; before, only to
    /// fill the wave (never after a canary failure). While closed, only a wave member that went
    /// back to the queue (its machine was re-created) may be dispatched again ([`Self::members`]).
    pub fn open(&self) -> bool {
        self.failed.is_none() && (self.passed() || self.members.len() < self.size)
    }

    /// Whether `node` may be dispatched now ([`Self::open`], or a member of the wave).
    pub fn may_dispatch(&self, node: &str) -> bool {
        self.open() || (self.failed.is_none() && self.members.contains(node))
    }

    /// A canary node failed: nothing is dispatched any more.
    pub fn failed(&self) -> bool {
        self.failed.is_some()
    }

    /// The wave's nodes.
    pub fn members(&self) -> impl Iterator<Item = &String> {
        self.members.iter()
    }

    /// A node was dispatched: it joins the wave while the wave is not full.
    pub fn dispatched(&mut self, node: &str) {
        if !self.passed() && self.members.len() < self.size {
            self.members.insert(node.to_owned());
        }
    }

    /// A node finished; returns the canary node that failed when this stops the rollout.
    pub fn finished(&mut self, node: &str, end: CanaryEnd) -> Option<String> {
        if !self.members.contains(node) || self.passed.contains(node) {
            return None;
        }
        match end {
            CanaryEnd::Passed => {
                self.passed.insert(node.to_owned());
                None
            }
            CanaryEnd::Void => {
                self.members.remove(node);
                None
            }
            CanaryEnd::Failed if self.failed.is_none() && !self.passed() => {
                self.failed = Some(node.to_owned());
                self.failed.clone()
            }
            CanaryEnd::Failed => None,
        }
    }

    /// For the summary: the canary nodes and where the wave stands (`None` without a canary).
    pub fn view(&self) -> Option<CanaryView> {
        if !self.enabled() {
            return None;
        }
        let state = if self.failed.is_some() {
            "failed"
        } else if self.passed() {
            "passed"
        } else if self.members.is_empty() {
            "waiting"
        } else if self.passed.len() == self.members.len() && self.members.len() < self.size {
            // Fewer nodes needed a Job than the wave holds, and all of them passed.
            "passed"
        } else {
            "running"
        };
        Some(CanaryView {
            nodes: self.members.iter().cloned().collect(),
            state: state.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_auto_is_one_only_when_the_run_has_more_than_one_wave() {
        assert_eq!(CanarySize::parse("auto"), Ok(CanarySize::Auto));
        assert_eq!(CanarySize::parse("0"), Ok(CanarySize::Nodes(0)));
        assert_eq!(CanarySize::parse(" 3 "), Ok(CanarySize::Nodes(3)));
        assert!(CanarySize::parse("-1")
            .unwrap_err()
            .contains("invalid canary"));
        assert!(CanarySize::parse("some").is_err());
        assert_eq!(CanarySize::Auto.resolve(10, 10), 0, "one wave: no canary");
        assert_eq!(CanarySize::Auto.resolve(11, 10), 1);
        assert_eq!(CanarySize::Auto.resolve(0, 10), 0);
        assert_eq!(CanarySize::Nodes(2).resolve(1, 10), 2);
    }

    #[test]
    fn the_wave_fills_then_waits_until_every_canary_node_passed() {
        let mut c = Canary::new(2);
        assert_eq!(c.view().unwrap().state, "waiting");
        assert!(c.open());
        c.dispatched("a");
        assert!(c.open(), "the wave is not full");
        c.dispatched("b");
        assert!(!c.open(), "full: nothing else until it passed");
        assert!(
            c.may_dispatch("b") && !c.may_dispatch("x"),
            "a member may go again"
        );
        assert_eq!(c.finished("a", CanaryEnd::Passed), None);
        assert!(!c.open(), "b still runs");
        assert_eq!(c.view().unwrap().state, "running");
        assert_eq!(c.finished("b", CanaryEnd::Passed), None);
        assert!(c.open() && c.passed());
        c.dispatched("c");
        let v = c.view().unwrap();
        assert_eq!(
            (v.nodes, v.state.as_str()),
            (vec!["a".into(), "b".into()], "passed")
        );
        // A later node's failure is the failure budget's business, not the canary's.
        assert_eq!(c.finished("c", CanaryEnd::Failed), None);
        assert!(c.open());
    }

    #[test]
    fn a_canary_failure_stops_everything_and_a_deleted_node_is_replaced_in_the_wave() {
        let mut c = Canary::new(2);
        c.dispatched("a");
        c.dispatched("b");
        assert_eq!(c.finished("a", CanaryEnd::Void), None);
        assert!(c.open(), "a proved nothing: its place is free");
        c.dispatched("c");
        assert!(!c.open());
        assert_eq!(c.finished("c", CanaryEnd::Failed), Some("c".into()));
        assert!(!c.open(), "never again after a canary failure");
        assert_eq!(c.finished("b", CanaryEnd::Failed), None, "reported once");
        let v = c.view().unwrap();
        assert_eq!(
            (v.nodes, v.state.as_str()),
            (vec!["b".into(), "c".into()], "failed")
        );
    }

    #[test]
    fn no_canary_never_holds_anything_back() {
        let mut c = Canary::new(0);
        assert!(!c.enabled() && c.open() && c.view().is_none());
        c.dispatched("a");
        assert_eq!(c.finished("a", CanaryEnd::Failed), None);
        assert!(c.open());
    }

    #[test]
    fn a_wave_larger_than_the_nodes_to_run_passes_when_they_all_passed() {
        let mut c = Canary::new(3);
        c.dispatched("a");
        c.finished("a", CanaryEnd::Passed);
        assert_eq!(c.view().unwrap().state, "passed");
        assert!(c.open(), "a late node may still join the wave");
    }
}
