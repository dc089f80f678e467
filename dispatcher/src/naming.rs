//! Deterministic names for per-node Jobs and the label value that identifies a node.
//!
//! A Job name must be a DNS-1123 label of at most 63 characters, but node names are DNS
//! subdomains of up to 253 characters. Readable names are kept when they fit; otherwise the name
//! is shortened and suffixed with a stable hash of the full node name. The two forms cannot meet:
//! a verbatim name never ends in the hash marker `-h<10 hex>`, a hashed name always does. Within a
//! run, [`plan_job_names`] also proves that no two nodes got the same name (a hash collision is
//! resolved by lengthening the hash), so "one Job per node" never silently breaks.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

const MAX_NAME: usize = 63;
const HASH_LEN: usize = 10;

/// A naming problem the user has to fix (the prefix is theirs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamingError {
    /// The prefix cannot start a DNS-1123 label.
    #[error("name prefix {0:?} is invalid: use 1-30 lowercase letters, digits or '-', starting with a letter (e.g. 'kata-deploy-install')")]
    BadPrefix(String),
}

/// Checks the name prefix: short enough to leave room for a readable node part.
pub fn validate_prefix(prefix: &str) -> Result<(), NamingError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 30
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && !prefix.ends_with('-')
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(NamingError::BadPrefix(prefix.to_owned()))
    }
}

fn hash_hex(s: &str, len: usize) -> String {
    let digest = Sha256::digest(s.as_bytes());
    hex::encode(digest)[..len].to_owned()
}

fn ends_with_hash_marker(s: &str) -> bool {
    s.len() > HASH_LEN + 2 && {
        let tail = &s[s.len() - HASH_LEN - 2..];
        tail.starts_with("-h")
            && tail[2..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    }
}

/// The Job name for `node` under `prefix` (which must pass [`validate_prefix`]).
pub fn job_name(prefix: &str, node: &str) -> String {
    job_name_with_hash(prefix, node, HASH_LEN)
}

fn job_name_with_hash(prefix: &str, node: &str, hash_len: usize) -> String {
    let verbatim = format!("{prefix}-{node}");
    let is_label_safe = node
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !node.is_empty()
        && !node.ends_with('-');
    if is_label_safe
        && verbatim.len() <= MAX_NAME
        && !ends_with_hash_marker(&verbatim)
        && hash_len == HASH_LEN
    {
        return verbatim;
    }
    // Normalise: lowercase, every other character becomes '-', runs collapsed.
    let mut readable = String::new();
    for c in node.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (readable.is_empty() || readable.ends_with('-'))) {
            readable.push(c);
        }
    }
    let budget = MAX_NAME - prefix.len() - 1 - (hash_len + 2);
    readable.truncate(budget);
    let readable = readable.trim_end_matches('-');
    let hash = hash_hex(node, hash_len);
    if readable.is_empty() {
        format!("{prefix}-h{hash}")
    } else {
        format!("{prefix}-{readable}-h{hash}")
    }
}

/// The value of the `katacontainers.io/node` label: the node name when it is a valid label
/// value, else a stable hash (the raw name is always kept in an annotation).
pub fn node_label_value(node: &str) -> String {
    if crate::select::is_label_name(node) {
        node.to_owned()
    } else {
        format!("h-{}", hash_hex(node, 20))
    }
}

/// Job names handed out in one run, guaranteed distinct (nodes may join late).
#[derive(Debug, Default)]
pub struct NameBook {
    prefix: String,
    by_node: BTreeMap<String, String>,
    by_job: HashMap<String, String>,
}

impl NameBook {
    /// An empty book for `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            ..Self::default()
        }
    }

    /// The Job name of `node`, assigning one on first use.
    pub fn assign(&mut self, node: &str) -> String {
        if let Some(name) = self.by_node.get(node) {
            return name.clone();
        }
        let mut hash_len = HASH_LEN;
        let mut name = job_name(&self.prefix, node);
        // A clash is astronomically unlikely; lengthen the hash (and shorten the readable part)
        // rather than ever giving two nodes one Job.
        while self.by_job.contains_key(&name) {
            hash_len += 2;
            name = job_name_with_hash(&self.prefix, node, hash_len);
        }
        self.by_job.insert(name.clone(), node.to_owned());
        self.by_node.insert(node.to_owned(), name.clone());
        name
    }

    /// The node a Job name was assigned to.
    pub fn node_of(&self, job: &str) -> Option<&str> {
        self.by_job.get(job).map(String::as_str)
    }

    /// The Job name already assigned to `node`.
    pub fn job_of(&self, node: &str) -> Option<&str> {
        self.by_node.get(node).map(String::as_str)
    }
}

/// Job names for every node of a run, guaranteed distinct.
pub fn plan_job_names<'a>(
    prefix: &str,
    nodes: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, String> {
    let mut book = NameBook::new(prefix);
    for node in nodes {
        book.assign(node);
    }
    book.by_node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_dns_label(s: &str) -> bool {
        s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    }

    #[test]
    fn short_simple_names_stay_readable() {
        assert_eq!(
            job_name("kata-install", "worker-1"),
            "kata-install-worker-1"
        );
    }

    #[test]
    fn long_or_dotted_names_get_a_stable_hash() {
        let long = "ip-10-0-0-1.eu-west-1.compute.internal.example.with.a.very.long.domain.name";
        let n = job_name("kata-install", long);
        assert!(is_dns_label(&n), "{n}");
        assert!(n.starts_with("kata-install-ip-10-0-0-1-eu-west"), "{n}");
        assert!(ends_with_hash_marker(&n));
        // Stability across versions: this exact value is part of the upgrade contract (an
        // upgraded dispatcher must find the Jobs an older one created).
        assert_eq!(
            job_name("kata-install", "Node.Example"),
            "kata-install-node-example-hc3744935a5"
        );
    }

    #[test]
    fn verbatim_and_hashed_forms_cannot_collide() {
        // A node whose literal name looks like a hashed name is hashed too.
        let tricky = format!("node-example-h{}", hash_hex("Node.Example", 10));
        assert_ne!(
            job_name("kata-install", &tricky),
            job_name("kata-install", "Node.Example")
        );
        assert!(ends_with_hash_marker(&job_name("kata-install", &tricky)));
    }

    #[test]
    fn different_nodes_never_share_a_name() {
        let nodes: Vec<String> = (0..5000)
            .flat_map(|i| {
                [
                    format!("node-{i}"),
                    format!("Node-{i}"),
                    format!("node.{i}"),
                    format!("node_{i}"),
                ]
            })
            .collect();
        let plan = plan_job_names("p", nodes.iter().map(String::as_str));
        let mut names: Vec<&String> = plan.values().collect();
        assert_eq!(names.len(), nodes.len());
        names.sort();
        names.dedup();
        assert_eq!(names.len(), nodes.len());
        assert!(plan.values().all(|n| is_dns_label(n)));
    }

    #[test]
    fn a_forced_clash_lengthens_the_hash() {
        let mut book = NameBook::new("p");
        let a = book.assign("Node.A");
        // Pretend another node already holds the name the next one would get.
        let b_default = job_name("p", "Node.B");
        book.by_job.insert(b_default.clone(), "someone-else".into());
        let b = book.assign("Node.B");
        assert_ne!(b, b_default);
        assert_ne!(a, b);
        assert_eq!(book.node_of(&b), Some("Node.B"));
        assert_eq!(book.assign("Node.B"), b, "stable once assigned");
    }

    #[test]
    fn label_values_are_valid_or_hashed() {
        assert_eq!(node_label_value("worker-1"), "worker-1");
        assert_eq!(node_label_value("a.b.c"), "a.b.c");
        let long = "x".repeat(100);
        let v = node_label_value(&long);
        assert!(v.starts_with("h-") && v.len() == 22);
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(validate_prefix("kata-deploy-install").is_ok());
        for bad in ["", "Kata", "1abc", "a_b", "abc-", &"a".repeat(31)] {
            assert!(validate_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
