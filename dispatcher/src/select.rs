//! Node selection: explicit names, a union of label-selector groups, or every node.
//!
//! The grammar is Kubernetes' label-selector string grammar (`a=b`, `a==b`, `a!=b`,
//! `a in (x,y)`, `a notin (x)`, `a`, `!a`, comma = AND). Repeating `--selector` gives a union
//! (OR of AND-groups), like nodeAffinity terms. We parse it ourselves so bad input is rejected
//! with a precise message before any API call, and so the same selection can be re-evaluated
//! locally (wait-and-settle, late labels).

use std::collections::BTreeMap;
use std::fmt;

/// What the user asked to target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSelection {
    /// Explicit node names, verbatim (they win over selectors).
    Names(Vec<String>),
    /// A union of AND-groups.
    Selectors(Vec<LabelSelector>),
    /// Every node.
    All,
}

/// One AND-group of label requirements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector {
    /// Requirements that must all hold.
    pub requirements: Vec<Requirement>,
}

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// Operator and its values.
    pub op: Operator,
}

/// A label-selector operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    /// `key=value` / `key==value`.
    Equals(String),
    /// `key!=value` (also true when the key is absent, as in Kubernetes).
    NotEquals(String),
    /// `key in (a,b)`.
    In(Vec<String>),
    /// `key notin (a,b)` (also true when the key is absent).
    NotIn(Vec<String>),
    /// `key`.
    Exists,
    /// `!key`.
    DoesNotExist,
}

/// A selector string that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {problem}. Use the Kubernetes grammar, e.g. 'kubernetes.io/os=linux,!node-role.kubernetes.io/control-plane' or 'zone in (a,b)'")]
pub struct SelectorError {
    /// The selector as given.
    pub selector: String,
    /// What is wrong with it.
    pub problem: String,
}

impl NodeSelection {
    /// Builds the selection from the command line: names win, then selectors, else all nodes.
    pub fn from_inputs(names: &[String], selectors: &[String]) -> Result<Self, SelectorError> {
        let names: Vec<String> = names
            .iter()
            .flat_map(|n| n.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        if !names.is_empty() {
            let mut unique = names;
            unique.sort();
            unique.dedup();
            return Ok(Self::Names(unique));
        }
        let groups: Vec<LabelSelector> = selectors
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(LabelSelector::parse)
            .collect::<Result<_, _>>()?;
        // An empty group matches everything, which makes the whole union match everything.
        if groups.is_empty() || groups.iter().any(|g| g.requirements.is_empty()) {
            return Ok(Self::All);
        }
        Ok(Self::Selectors(groups))
    }

    /// Whether a node with these labels is selected (names are checked by the caller).
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Names(names) => names.binary_search_by(|n| n.as_str().cmp(name)).is_ok(),
            Self::Selectors(groups) => groups.iter().any(|g| g.matches(labels)),
            Self::All => true,
        }
    }
}

impl fmt::Display for NodeSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Names(n) => write!(f, "nodes named {}", n.join(",")),
            Self::Selectors(g) => {
                let parts: Vec<String> = g.iter().map(|s| format!("({s})")).collect();
                write!(f, "nodes matching {}", parts.join(" OR "))
            }
            Self::All => write!(f, "all nodes"),
        }
    }
}

/// What a run targets: a selection, minus the nodes of an exception (the retire run of an
/// upgrade: nodes this install claimed that the install selection no longer covers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// Nodes considered.
    pub selection: NodeSelection,
    /// Nodes left out even when selected (`None`: no exception).
    pub except: Option<NodeSelection>,
    /// Only nodes also in this selection (`None`: no restriction). The retire run of an upgrade
    /// passes the previous install selection: only nodes that a change of values dropped are
    /// retired, never one whose label is merely missing for a moment. Names here are a filter:
    /// a name with no Node is not an error.
    pub within: Option<NodeSelection>,
}

impl Targets {
    /// Builds the targets from the command line; no exception when both exception inputs are
    /// empty (an empty exception must not mean "every node").
    pub fn from_inputs(
        names: &[String],
        selectors: &[String],
        except_names: &[String],
        except_selectors: &[String],
    ) -> Result<Self, SelectorError> {
        let except = if given(except_names) || given(except_selectors) {
            Some(NodeSelection::from_inputs(except_names, except_selectors)?)
        } else {
            None
        };
        Ok(Self {
            selection: NodeSelection::from_inputs(names, selectors)?,
            except,
            within: None,
        })
    }

    /// Restricts the targets to nodes also matching these names or selectors; no restriction
    /// when both are empty (an empty restriction must not mean "every node" either way).
    pub fn within(mut self, names: &[String], selectors: &[String]) -> Result<Self, SelectorError> {
        if given(names) || given(selectors) {
            self.within = Some(NodeSelection::from_inputs(names, selectors)?);
        }
        Ok(self)
    }

    /// Whether a node with this name and these labels is targeted.
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.selection.matches(name, labels)
            && self.within.as_ref().is_none_or(|w| w.matches(name, labels))
            && !self
                .except
                .as_ref()
                .is_some_and(|e| e.matches(name, labels))
    }
}

/// Whether a list input holds anything but blanks.
fn given(v: &[String]) -> bool {
    v.iter().any(|s| !s.trim().is_empty())
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.selection)?;
        if let Some(w) = &self.within {
            write!(f, ", within {w}")?;
        }
        if let Some(e) = &self.except {
            write!(f, ", except {e}")?;
        }
        Ok(())
    }
}

impl LabelSelector {
    /// Parses one AND-group.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let err = |problem: String| SelectorError {
            selector: input.to_owned(),
            problem,
        };
        let mut requirements = Vec::new();
        for term in split_terms(input).map_err(&err)? {
            requirements.push(parse_term(&term).map_err(&err)?);
        }
        Ok(Self { requirements })
    }

    /// Whether labels satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| {
            let value = labels.get(&r.key);
            match &r.op {
                Operator::Equals(v) => value == Some(v),
                Operator::NotEquals(v) => value != Some(v),
                Operator::In(vs) => value.is_some_and(|x| vs.contains(x)),
                Operator::NotIn(vs) => !value.is_some_and(|x| vs.contains(x)),
                Operator::Exists => value.is_some(),
                Operator::DoesNotExist => value.is_none(),
            }
        })
    }
}

impl fmt::Display for LabelSelector {
    /// The canonical string the API server accepts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match &r.op {
                Operator::Equals(v) => format!("{}={}", r.key, v),
                Operator::NotEquals(v) => format!("{}!={}", r.key, v),
                Operator::In(vs) => format!("{} in ({})", r.key, vs.join(",")),
                Operator::NotIn(vs) => format!("{} notin ({})", r.key, vs.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            })
            .collect();
        f.write_str(&terms.join(","))
    }
}

/// Splits on commas that are not inside parentheses.
fn split_terms(input: &str) -> Result<Vec<String>, String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in input.chars() {
        match c {
            '(' => {
                depth += 1;
                if depth > 1 {
                    return Err("nested parentheses".into());
                }
                current.push(c);
            }
            ')' => {
                depth = depth.checked_sub(1).ok_or("')' without '('")?;
                current.push(c);
            }
            ',' if depth == 0 => terms.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    if depth != 0 {
        return Err("'(' without ')'".into());
    }
    terms.push(current);
    let terms: Vec<String> = terms.into_iter().map(|t| t.trim().to_owned()).collect();
    if terms.len() == 1 && terms[0].is_empty() {
        return Ok(Vec::new());
    }
    if let Some(pos) = terms.iter().position(String::is_empty) {
        return Err(format!("empty requirement at position {}", pos + 1));
    }
    Ok(terms)
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        validate_key(key)?;
        return Ok(Requirement {
            key: key.to_owned(),
            op: Operator::DoesNotExist,
        });
    }
    for (sym, ctor) in [("!=", 0), ("==", 1), ("=", 1)] {
        if let Some((k, v)) = term.split_once(sym) {
            let (key, value) = (k.trim(), v.trim());
            validate_key(key)?;
            validate_value(value)?;
            let op = if ctor == 0 {
                Operator::NotEquals(value.into())
            } else {
                Operator::Equals(value.into())
            };
            return Ok(Requirement {
                key: key.to_owned(),
                op,
            });
        }
    }
    if let Some(open) = term.find('(') {
        let head = term[..open].trim();
        let close = term.rfind(')').ok_or("missing ')'")?;
        if !term[close + 1..].trim().is_empty() {
            return Err(format!("unexpected text after ')' in {term:?}"));
        }
        let (key, op) = head
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| format!("expected 'key in (...)' or 'key notin (...)', got {term:?}"))?;
        let key = key.trim();
        validate_key(key)?;
        let values: Vec<String> = term[open + 1..close]
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        for v in &values {
            validate_value(v)?;
        }
        return match op {
            "in" if values.is_empty() => Err(format!("'{key} in ()' needs at least one value")),
            "in" => Ok(Requirement {
                key: key.to_owned(),
                op: Operator::In(values),
            }),
            "notin" if values.is_empty() => {
                Err(format!("'{key} notin ()' needs at least one value"))
            }
            "notin" => Ok(Requirement {
                key: key.to_owned(),
                op: Operator::NotIn(values),
            }),
            other => Err(format!(
                "unknown operator {other:?} (use in, notin, =, ==, !=, or a bare key / !key)"
            )),
        };
    }
    let key = term.trim();
    if key.contains(char::is_whitespace) {
        return Err(format!(
            "unknown operator in {term:?} (use in, notin, =, ==, !=, or a bare key / !key)"
        ));
    }
    validate_key(key)?;
    Ok(Requirement {
        key: key.to_owned(),
        op: Operator::Exists,
    })
}

/// A label key: optional DNS-subdomain prefix and '/', then a name of at most 63 characters.
fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!("label key prefix {p:?} is not a DNS subdomain"));
        }
    }
    if !is_label_name(name) {
        return Err(format!(
            "label key {key:?} is invalid: the name part must be 1-63 characters of [A-Za-z0-9_.-], starting and ending alphanumeric"
        ));
    }
    Ok(())
}

fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!("label value {value:?} is invalid: at most 63 characters of [A-Za-z0-9_.-], starting and ending alphanumeric"))
    }
}

/// Whether `s` is a valid label name / non-empty label value.
pub fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_exception_removes_nodes_and_an_empty_one_removes_none() {
        let claimed = "katacontainers.io/kata-deploy-claimed";
        let t = Targets::from_inputs(
            &[],
            &[claimed.into()],
            &[],
            &["pool=a".into(), "pool=b,gpu".into()],
        )
        .unwrap();
        assert!(t.matches("n1", &labels(&[(claimed, "true"), ("pool", "c")])));
        assert!(!t.matches("n2", &labels(&[(claimed, "true"), ("pool", "a")])));
        assert!(t.matches("n3", &labels(&[(claimed, "true"), ("pool", "b")])));
        assert!(!t.matches(
            "n4",
            &labels(&[(claimed, "true"), ("pool", "b"), ("gpu", "")])
        ));
        assert!(!t.matches("n5", &labels(&[("pool", "c")])), "not claimed");
        assert_eq!(
            t.to_string(),
            format!("nodes matching ({claimed}), except nodes matching (pool=a) OR (pool=b,gpu)")
        );
        // Named nodes as the exception (an install of job.nodes).
        let t = Targets::from_inputs(&[], &[claimed.into()], &["w1,w2".into()], &[]).unwrap();
        assert!(!t.matches("w1", &labels(&[(claimed, "true")])));
        assert!(t.matches("w3", &labels(&[(claimed, "true")])));
        // No exception inputs: nothing is excepted (an empty selection would mean every node).
        let t = Targets::from_inputs(&[], &[claimed.into()], &[], &["".into()]).unwrap();
        assert_eq!(t.except, None);
        assert!(t.matches("w1", &labels(&[(claimed, "true")])));
        let e = Targets::from_inputs(&[], &[], &[], &["a in (x".into()]).unwrap_err();
        assert!(e.to_string().contains("a in (x"), "{e}");
    }

    #[test]
    fn a_restriction_keeps_only_nodes_the_previous_selection_had() {
        let claimed = "katacontainers.io/kata-deploy-claimed";
        // Previous selection pool in (a,b); now pool=a: only claimed pool=b nodes are retired.
        let t = Targets::from_inputs(&[], &[claimed.into()], &[], &["pool=a".into()])
            .unwrap()
            .within(&[], &["pool in (a,b)".into()])
            .unwrap();
        assert!(t.matches("b1", &labels(&[(claimed, "true"), ("pool", "b")])));
        assert!(!t.matches("a1", &labels(&[(claimed, "true"), ("pool", "a")])));
        assert!(
            !t.matches("x1", &labels(&[(claimed, "true")])),
            "a claimed node whose label is missing for a moment was not dropped by the values"
        );
        assert_eq!(
            t.to_string(),
            format!("nodes matching ({claimed}), within nodes matching (pool in (a,b)), except nodes matching (pool=a)")
        );
        // Previous job.nodes: a filter, so a listed name that is gone is simply not matched.
        let t = Targets::from_inputs(&[], &[claimed.into()], &["w1".into()], &[])
            .unwrap()
            .within(&["w1,w2,gone".into()], &[])
            .unwrap();
        assert!(t.matches("w2", &labels(&[(claimed, "true")])));
        assert!(!t.matches("w1", &labels(&[(claimed, "true")])));
        assert!(!t.matches("w3", &labels(&[(claimed, "true")])));
        // Blank restriction inputs restrict nothing.
        let t = Targets::from_inputs(&[], &[claimed.into()], &[], &[])
            .unwrap()
            .within(&["".into()], &[" ".into()])
            .unwrap();
        assert_eq!(t.within, None);
        assert!(t.matches("w3", &labels(&[(claimed, "true")])));
    }

    #[test]
    fn parses_every_operator() {
        let s = LabelSelector::parse("a=1,b==2,c!=3,d in (x, y),e notin (z),f,!g").unwrap();
        let ops: Vec<&Operator> = s.requirements.iter().map(|r| &r.op).collect();
        assert_eq!(
            ops,
            vec![
                &Operator::Equals("1".into()),
                &Operator::Equals("2".into()),
                &Operator::NotEquals("3".into()),
                &Operator::In(vec!["x".into(), "y".into()]),
                &Operator::NotIn(vec!["z".into()]),
                &Operator::Exists,
                &Operator::DoesNotExist,
            ]
        );
        assert_eq!(s.to_string(), "a=1,b=2,c!=3,d in (x,y),e notin (z),f,!g");
    }

    #[test]
    fn matching_follows_kubernetes_semantics() {
        let s = LabelSelector::parse("os=linux,role!=cp,zone in (a,b),tier notin (x),gpu,!tainted")
            .unwrap();
        assert!(s.matches(&labels(&[("os", "linux"), ("zone", "a"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("os", "linux"), ("zone", "c"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[
            ("os", "linux"),
            ("zone", "a"),
            ("gpu", ""),
            ("tainted", "1")
        ])));
        assert!(!s.matches(&labels(&[
            ("os", "linux"),
            ("zone", "a"),
            ("gpu", ""),
            ("role", "cp")
        ])));
        assert!(!s.matches(&labels(&[
            ("os", "linux"),
            ("zone", "a"),
            ("gpu", ""),
            ("tier", "x")
        ])));
        assert!(!s.matches(&labels(&[("os", "linux"), ("zone", "a")])));
    }

    #[test]
    fn repeated_selectors_are_a_union() {
        let sel = NodeSelection::from_inputs(&[], &["a=1".into(), "b=2".into()]).unwrap();
        assert!(sel.matches("n", &labels(&[("a", "1")])));
        assert!(sel.matches("n", &labels(&[("b", "2")])));
        assert!(!sel.matches("n", &labels(&[("a", "2")])));
        assert_eq!(sel.to_string(), "nodes matching (a=1) OR (b=2)");
    }

    #[test]
    fn names_win_and_are_deduplicated() {
        let sel =
            NodeSelection::from_inputs(&["w2,w1".into(), "w1".into()], &["a=1".into()]).unwrap();
        assert_eq!(sel, NodeSelection::Names(vec!["w1".into(), "w2".into()]));
        assert!(sel.matches("w2", &BTreeMap::new()));
        assert!(!sel.matches("w3", &BTreeMap::new()));
    }

    #[test]
    fn nothing_or_an_empty_group_means_all() {
        assert_eq!(
            NodeSelection::from_inputs(&[], &[]).unwrap(),
            NodeSelection::All
        );
        assert_eq!(
            NodeSelection::from_inputs(&[" ".into()], &["".into()]).unwrap(),
            NodeSelection::All
        );
    }

    #[test]
    fn rejects_bad_selectors_with_the_reason() {
        for (bad, why) in [
            ("a in x", "unknown operator"),
            ("a in (x", "'(' without ')'"),
            ("a) ", "')' without '('"),
            ("a between (x)", "unknown operator"),
            ("a in ()", "needs at least one value"),
            ("a,,b", "empty requirement"),
            ("-a=1", "label key"),
            ("a=b c", "label value"),
            ("Bad_Prefix/x=1", "prefix"),
            ("a b", "unknown operator"),
        ] {
            let e = LabelSelector::parse(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
    }
}
