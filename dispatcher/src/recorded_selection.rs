//! The install selection that the claimed nodes last converged to, recorded in the rollout
//! ConfigMap under the key `selection`. The retire run of an upgrade or a rollback retires only
//! claimed nodes that this recorded selection covered and the new one does not (nodes a change of
//! values dropped), never a node whose selection label is missing for a moment. The record moves
//! only when a retire run fully succeeded (or a first install did), so a failed upgrade's retry
//! still retires what the failed one should have.

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::kube_io::ClusterApi;
use crate::select::{NodeSelection, SelectorError, Targets};

/// The ConfigMap key holding the record.
pub const RECORD_KEY: &str = "selection";

/// An install selection as the chart passes it: explicit names win, else a union of selectors,
/// else (both empty) every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedSelection {
    /// Explicit node names (job.nodes).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Label selectors, a union.
    #[serde(default)]
    pub selectors: Vec<String>,
}

impl RecordedSelection {
    /// Parses and checks a record (the flag's value or the ConfigMap's key).
    pub fn parse(text: &str) -> Result<Self, String> {
        let rec: Self = serde_json::from_str(text).map_err(|e| {
            format!("not a JSON object {{\"nodes\": [...], \"selectors\": [...]}}: {e}")
        })?;
        NodeSelection::from_inputs(&rec.nodes, &rec.selectors).map_err(|e| e.to_string())?;
        Ok(rec)
    }

    /// The record's text (compact JSON, as stored).
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a record serializes")
    }

    /// Restricts `targets` to the nodes this record selected (no restriction when it selected
    /// every node).
    pub fn restrict(&self, targets: Targets) -> Result<Targets, SelectorError> {
        targets.within(&self.nodes, &self.selectors)
    }
}

/// A record in the ConfigMap that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The key holds something that is not a selection.
    #[error("the recorded install selection (configmap {configmap}, key {RECORD_KEY}) is invalid: {problem}. Delete that key (kubectl -n <namespace> patch configmap {configmap} --type=json -p '[{{\"op\":\"remove\",\"path\":\"/data/{RECORD_KEY}\"}}]') to retire every claimed node outside the selection, then run helm upgrade again")]
    Invalid {
        /// The ConfigMap.
        configmap: String,
        /// What is wrong.
        problem: String,
    },
    /// Reading the ConfigMap failed.
    #[error("reading configmap {configmap} (the recorded install selection) failed: {source}. Check the dispatcher's get right on it and the API server, then run helm upgrade again")]
    Read {
        /// The ConfigMap.
        configmap: String,
        /// The API error.
        source: kube::Error,
    },
}

/// Restricts `targets` to the recorded selection in `configmap`; without a record (an upgrade
/// from a chart that kept none) every claimed node outside the selection stays targeted.
pub async fn restrict_to_record(
    api: &ClusterApi,
    configmap: &str,
    targets: Targets,
) -> Result<Targets, RecordError> {
    let text = api
        .read_configmap_key(configmap, RECORD_KEY)
        .await
        .map_err(|source| RecordError::Read {
            configmap: configmap.to_owned(),
            source,
        })?;
    let Some(text) = text else {
        warn!(
            configmap,
            "no recorded install selection: every claimed node outside the selection is a target"
        );
        return Ok(targets);
    };
    let invalid = |problem: String| RecordError::Invalid {
        configmap: configmap.to_owned(),
        problem,
    };
    let rec = RecordedSelection::parse(&text).map_err(invalid)?;
    rec.restrict(targets).map_err(|e| invalid(e.to_string()))
}

/// Records `rec` once a run fully succeeded; with `only_if_absent`, an existing record is kept
/// (a first install records its selection; a rollback to it must not overwrite a newer one).
/// A failed write is a warning: the older record still covers every node it covered.
pub async fn record(
    api: &ClusterApi,
    configmap: &str,
    rec: &RecordedSelection,
    only_if_absent: bool,
) {
    if only_if_absent {
        match api.read_configmap_key(configmap, RECORD_KEY).await {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(e) => {
                warn!(configmap, error = %e, "could not read the recorded install selection; not recording");
                return;
            }
        }
    }
    match api
        .write_summary(configmap, RECORD_KEY, &rec.to_text())
        .await
    {
        Ok(()) => info!(configmap, selection = %rec.to_text(), "install selection recorded"),
        Err(e) => {
            warn!(configmap, error = %e, "could not record the install selection; the next retire uses the previous record")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_record_round_trips_and_restricts_the_retire_targets() {
        let rec = RecordedSelection::parse(r#"{"selectors":["pool in (a,b)"]}"#).unwrap();
        assert_eq!(RecordedSelection::parse(&rec.to_text()).unwrap(), rec);
        let claimed = "katacontainers.io/kata-deploy-claimed";
        let t = Targets::from_inputs(&[], &[claimed.into()], &[], &["pool=a".into()]).unwrap();
        let t = rec.restrict(t).unwrap();
        let l = |pool: Option<&str>| {
            let mut m = BTreeMap::from([(claimed.to_owned(), "true".to_owned())]);
            if let Some(p) = pool {
                m.insert("pool".into(), p.into());
            }
            m
        };
        assert!(t.matches("b", &l(Some("b"))), "dropped by the values");
        assert!(!t.matches("a", &l(Some("a"))), "still selected");
        assert!(!t.matches("x", &l(None)), "label missing for a moment");
        // A record of "every node" restricts nothing.
        let all = RecordedSelection::parse("{}").unwrap();
        let t = Targets::from_inputs(&[], &[claimed.into()], &[], &["pool=a".into()]).unwrap();
        assert!(all.restrict(t).unwrap().matches("x", &l(None)));
    }

    #[test]
    fn a_bad_record_is_refused_with_the_reason() {
        let e = RecordedSelection::parse("pool=a").unwrap_err();
        assert!(e.contains("JSON object"), "{e}");
        let e = RecordedSelection::parse(r#"{"selectors":["a in (x"]}"#).unwrap_err();
        assert!(e.contains("a in (x"), "{e}");
        let e = RecordedSelection::parse(r#"{"nodes":[],"labels":[]}"#).unwrap_err();
        assert!(e.contains("labels"), "{e}");
    }
}
