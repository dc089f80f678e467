//! Whether a node admits the per-node pod, by the rules a DaemonSet follows.
//!
//! A Job pinned with `nodeName` skips the scheduler, so taints would never be checked: we check
//! them ourselves, the way the DaemonSet controller decides where its pods go. Every taint with
//! effect `NoSchedule` or `NoExecute` must be tolerated by the template's tolerations plus the
//! ones the DaemonSet controller adds to every daemon pod (not-ready and unreachable NoExecute;
//! disk-, memory- and pid-pressure and unschedulable NoSchedule; network-unavailable NoSchedule
//! for host-network pods). `PreferNoSchedule` never blocks. The cleanup dispatcher passes
//! `--ignore-taints`: a node tainted after install must still be cleaned.

use k8s_openapi::api::core::v1::{Taint, Toleration};
use serde_json::Value;

/// The tolerations of the per-node pod.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    tolerations: Vec<Toleration>,
    ignore: bool,
}

fn exists(key: &str, effect: &str) -> Toleration {
    Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    }
}

impl Admission {
    /// From the Job template (`spec.template.spec.tolerations`, `hostNetwork`); `ignore` admits
    /// every node whatever its taints.
    pub fn from_template(job: &Value, ignore: bool) -> Result<Self, String> {
        let spec = job.pointer("/spec/template/spec");
        let mut tolerations: Vec<Toleration> = match spec.and_then(|s| s.get("tolerations")) {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                format!("spec.template.spec.tolerations is not a list of tolerations: {e}")
            })?,
        };
        for (key, effect) in [
            ("node.kubernetes.io/not-ready", "NoExecute"),
            ("node.kubernetes.io/unreachable", "NoExecute"),
            ("node.kubernetes.io/disk-pressure", "NoSchedule"),
            ("node.kubernetes.io/memory-pressure", "NoSchedule"),
            ("node.kubernetes.io/pid-pressure", "NoSchedule"),
            ("node.kubernetes.io/unschedulable", "NoSchedule"),
        ] {
            tolerations.push(exists(key, effect));
        }
        if spec
            .and_then(|s| s.get("hostNetwork"))
            .and_then(Value::as_bool)
            == Some(true)
        {
            tolerations.push(exists(
                "node.kubernetes.io/network-unavailable",
                "NoSchedule",
            ));
        }
        Ok(Self {
            tolerations,
            ignore,
        })
    }

    /// The taints that keep the pod off the node (NoSchedule / NoExecute, not tolerated).
    fn blocking<'a>(&'a self, taints: &'a [Taint]) -> impl Iterator<Item = &'a Taint> + 'a {
        taints
            .iter()
            .filter(|_| !self.ignore)
            .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
            .filter(|t| !self.tolerations.iter().any(|tol| tolerates(tol, t)))
    }

    /// The first taint that keeps the pod off the node, described for the report; a taint of
    /// [`NOT_READY_TAINTS`] is named first (it says the node is not ready, see [`Self::not_ready`]).
    pub fn untolerated(&self, taints: &[Taint]) -> Option<String> {
        let first = self
            .blocking(taints)
            .find(|t| is_not_ready_taint(t))
            .or_else(|| self.blocking(taints).next())?;
        let value = first
            .value
            .as_deref()
            .filter(|v| !v.is_empty())
            .map(|v| format!("={v}"))
            .unwrap_or_default();
        let (key, effect) = (&first.key, &first.effect);
        Some(if is_not_ready_taint(first) {
            format!("node has taint {key}{value}:{effect}: the node controller does not (yet) see it Ready and lifts this taint itself once it does (check the node's conditions and kube-controller-manager)")
        } else {
            format!("node has taint {key}{value}:{effect} that the Job template does not tolerate (add a toleration to job.nodeJobs.tolerations, or untaint the node)")
        })
    }

    /// Whether a taint of [`NOT_READY_TAINTS`] keeps the pod off the node: the node is not ready
    /// (whatever its Ready condition says right now), rather than not meant for this template.
    pub fn not_ready(&self, taints: &[Taint]) -> bool {
        self.blocking(taints).any(is_not_ready_taint)
    }
}

/// Taints the node lifecycle controller keeps on a node while it does not see it Ready, and lifts
/// by itself once it does (the API server also puts `not-ready` on every new Node). A daemon pod
/// does not tolerate them with effect NoSchedule, yet they are a node's state, not a rule: a node
/// that keeps one is reported not started (a failure, like a NotReady node), never skipped.
pub const NOT_READY_TAINTS: [&str; 2] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

fn is_not_ready_taint(t: &Taint) -> bool {
    NOT_READY_TAINTS.contains(&t.key.as_str())
}

/// Kubernetes' toleration matching (`ToleratesTaint`).
fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    if tol
        .effect
        .as_deref()
        .is_some_and(|e| !e.is_empty() && e != taint.effect)
    {
        return false;
    }
    let key = tol.key.as_deref().unwrap_or_default();
    match tol.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        "Equal" | "" => {
            key == taint.key
                && tol.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            ..Default::default()
        }
    }

    fn admission(tolerations: Value) -> Admission {
        Admission::from_template(
            &json!({"spec": {"template": {"spec": {"tolerations": tolerations}}}}),
            false,
        )
        .unwrap()
    }

    #[test]
    fn the_node_controllers_not_ready_taints_mean_not_ready() {
        let a = admission(json!([{"key": "kwok", "operator": "Exists"}]));
        for key in NOT_READY_TAINTS {
            let taints = [
                taint("kwok", "fake", "NoSchedule"),
                taint(key, "", "NoSchedule"),
            ];
            assert!(a.not_ready(&taints), "{key}");
            let why = a.untolerated(&taints).unwrap();
            assert!(
                why.contains(&format!("{key}:NoSchedule")) && !why.contains("job.nodeJobs"),
                "{why}"
            );
            assert!(!a.not_ready(&[taint(key, "", "NoExecute")]), "implied");
        }
        let rule = [
            taint("dedicated", "db", "NoSchedule"),
            taint("node.kubernetes.io/not-ready", "", "NoSchedule"),
        ];
        assert!(
            a.untolerated(&rule).unwrap().contains("not-ready"),
            "named first: it is why the node waits"
        );
        assert!(!a.not_ready(&[taint("dedicated", "db", "NoSchedule")]));
        let tolerated =
            admission(json!([{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}]));
        assert!(!tolerated.not_ready(&rule) && tolerated.untolerated(&rule).is_some());
        let ignoring = Admission::from_template(&json!({}), true).unwrap();
        assert!(!ignoring.not_ready(&rule) && ignoring.untolerated(&rule).is_none());
    }

    #[test]
    fn untolerated_noschedule_and_noexecute_block_prefer_does_not() {
        let a = admission(json!([]));
        assert!(a
            .untolerated(&[taint("gpu", "yes", "PreferNoSchedule")])
            .is_none());
        let why = a.untolerated(&[taint("gpu", "yes", "NoSchedule")]).unwrap();
        assert!(
            why.contains("gpu=yes:NoSchedule") && why.contains("toleration"),
            "{why}"
        );
        assert!(a
            .untolerated(&[taint("dedicated", "db", "NoExecute")])
            .is_some());
    }

    #[test]
    fn daemonset_tolerations_are_implied() {
        let a = admission(json!([]));
        assert!(
            a.untolerated(&[taint("node.kubernetes.io/unschedulable", "", "NoSchedule")])
                .is_none(),
            "cordoned nodes still get daemons"
        );
        assert!(a
            .untolerated(&[taint("node.kubernetes.io/not-ready", "", "NoExecute")])
            .is_none());
        assert!(
            a.untolerated(&[taint("node.kubernetes.io/not-ready", "", "NoSchedule")])
                .is_some(),
            "only NoExecute is implied"
        );
        assert!(a
            .untolerated(&[taint(
                "node.kubernetes.io/network-unavailable",
                "",
                "NoSchedule"
            )])
            .is_some());
        let host = Admission::from_template(
            &json!({"spec": {"template": {"spec": {"hostNetwork": true}}}}),
            false,
        )
        .unwrap();
        assert!(host
            .untolerated(&[taint(
                "node.kubernetes.io/network-unavailable",
                "",
                "NoSchedule"
            )])
            .is_none());
    }

    #[test]
    fn toleration_operators_and_effects() {
        let a = admission(
            json!([{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}, {"key": "db", "operator": "Exists"}]),
        );
        assert!(a
            .untolerated(&[taint("gpu", "yes", "NoSchedule")])
            .is_none());
        assert!(
            a.untolerated(&[taint("gpu", "no", "NoSchedule")]).is_some(),
            "value must match"
        );
        assert!(
            a.untolerated(&[taint("gpu", "yes", "NoExecute")]).is_some(),
            "effect must match"
        );
        assert!(
            a.untolerated(&[taint("db", "anything", "NoExecute")])
                .is_none(),
            "Exists with no effect tolerates all effects"
        );
        let all = admission(json!([{"operator": "Exists"}]));
        assert!(all
            .untolerated(&[taint("x", "y", "NoExecute"), taint("z", "", "NoSchedule")])
            .is_none());
        let ignore = Admission::from_template(&json!({}), true).unwrap();
        assert!(ignore
            .untolerated(&[taint("x", "y", "NoExecute")])
            .is_none());
    }

    #[test]
    fn bad_tolerations_are_refused() {
        let e = Admission::from_template(
            &json!({"spec": {"template": {"spec": {"tolerations": "all"}}}}),
            false,
        )
        .unwrap_err();
        assert!(e.contains("tolerations"), "{e}");
    }
}
