//! Node labels: the claim label (set before the first host change, so an install that dies
//! half-way is still found by uninstall), the shared `katacontainers.io/kata-runtime` label and
//! the per-install marker. Patches are JSON patches that touch only our labels and start with a
//! `test` op on /metadata/uid, so a node name reused by another machine is never labelled.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};

use crate::config::{Install, NodeFacts, MARKER_LABEL_PREFIX, RUNTIME_LABEL};
use crate::error::{Result, StageError};

/// Escapes a label key for a JSON pointer (RFC 6901).
pub fn json_pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Builds the JSON patch that sets `set` and removes `remove`, guarded by the node UID.
/// Returns None when the labels are already as wanted (no API write at all).
pub fn build_label_patch(
    uid: &str,
    current: Option<&BTreeMap<String, String>>,
    set: &[(String, String)],
    remove: &[String],
) -> Option<Value> {
    let empty = BTreeMap::new();
    let labels = current.unwrap_or(&empty);
    let mut ops = vec![json!({"op": "test", "path": "/metadata/uid", "value": uid})];
    if current.is_none() && !set.is_empty() {
        ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {}}));
    }
    for (k, v) in set {
        if labels.get(k) != Some(v) {
            ops.push(json!({"op": "add", "path": format!("/metadata/labels/{}", json_pointer_escape(k)), "value": v}));
        }
    }
    for k in remove {
        if let Some(v) = labels.get(k) {
            // test-then-remove: if someone changed it meanwhile the patch fails and we re-read.
            let path = format!("/metadata/labels/{}", json_pointer_escape(k));
            ops.push(json!({"op": "test", "path": path, "value": v}));
            ops.push(json!({"op": "remove", "path": path}));
        }
    }
    (ops.len() > 1).then_some(Value::Array(ops))
}

/// Values of the per-install state label ([`Install::state_label`]) the stages write.
pub const STATE_INSTALLING: &str = "installing";
/// The install's last stage labelled the node.
pub const STATE_INSTALLED: &str = "installed";
/// The uninstall's first stage removed the labels; the host is being cleaned.
pub const STATE_CLEANING: &str = "cleaning";

/// Labels the install sets once its handlers are served (the state label says `installed`).
pub fn install_labels(install: &Install) -> Vec<(String, String)> {
    vec![
        (RUNTIME_LABEL.to_string(), "true".to_string()),
        (install.marker_label(), "true".to_string()),
        (install.state_label(), STATE_INSTALLED.to_string()),
    ]
}

/// Labels the claim sets before the first host change (the state label says `installing`).
pub fn claim_labels(install: &Install) -> Vec<(String, String)> {
    vec![
        (install.claimed_label(), "true".to_string()),
        (install.state_label(), STATE_INSTALLING.to_string()),
    ]
}

/// Labels unclaim removes once nothing of this install is left on the host.
pub fn unclaim_removals(install: &Install) -> Vec<String> {
    vec![install.claimed_label(), install.state_label()]
}

/// Labels unlabel removes: our marker, and the shared runtime label only when no other
/// install's marker remains on the node.
pub fn uninstall_removals(install: &Install, labels: &BTreeMap<String, String>) -> Vec<String> {
    let ours = install.marker_label();
    let others = labels
        .keys()
        .any(|k| k.starts_with(MARKER_LABEL_PREFIX) && *k != ours);
    let mut v = vec![ours];
    if !others {
        v.push(RUNTIME_LABEL.to_string());
    }
    v
}

/// What to set and what to remove, from the labels read.
pub type LabelEdit<'a> =
    dyn Fn(&BTreeMap<String, String>) -> (Vec<(String, String)>, Vec<String>) + 'a;

/// unlabel: the removals of [`uninstall_removals`], and state `cleaning` when anything of this
/// install is on the node (a node that never had it stays untouched: no API write).
pub fn unlabel_edit(
    install: &Install,
    labels: &BTreeMap<String, String>,
) -> (Vec<(String, String)>, Vec<String>) {
    let ours = [
        install.claimed_label(),
        install.marker_label(),
        install.state_label(),
    ];
    let set = if ours.iter().any(|k| labels.contains_key(k)) {
        vec![(install.state_label(), STATE_CLEANING.to_string())]
    } else {
        vec![]
    };
    (set, uninstall_removals(install, labels))
}

/// One startup taint to lift: `key[=value][:Effect]` (no value: any value; no effect: any effect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintMatch {
    /// Taint key.
    pub key: String,
    /// Taint value, when given.
    pub value: Option<String>,
    /// NoSchedule, PreferNoSchedule or NoExecute, when given.
    pub effect: Option<String>,
}

impl TaintMatch {
    /// Parses `key[=value][:Effect]` (kubectl taint syntax, without the trailing `-`).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "{s:?} {why}: use key[=value][:Effect], e.g. example.com/kata-not-ready:NoSchedule"
            )
        };
        let (rest, effect) = match s.rsplit_once(':') {
            Some((r, e)) if ["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&e) => {
                (r, Some(e.to_owned()))
            }
            Some((_, e)) => {
                return Err(bad(&format!(
                    "has the effect {e:?}, not NoSchedule, PreferNoSchedule or NoExecute"
                )))
            }
            None => (s, None),
        };
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (rest, None),
        };
        let key_ok = !key.is_empty()
            && key.len() <= 317
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !key_ok {
            return Err(bad("has no valid taint key"));
        }
        Ok(Self {
            key: key.to_owned(),
            value,
            effect,
        })
    }

    /// Whether `t` is this startup taint.
    pub fn matches(&self, t: &Taint) -> bool {
        t.key == self.key
            && self
                .value
                .as_ref()
                .is_none_or(|v| t.value.as_deref().unwrap_or("") == v)
            && self.effect.as_ref().is_none_or(|e| t.effect == *e)
    }
}

/// The JSON patch removing the taints `lift` matches from `current` (guarded by the node UID and
/// by the taint list as read, so a concurrent change makes it fail and be re-read); `None` when
/// none of them is on the node.
pub fn build_untaint_patch(uid: &str, current: &[Taint], lift: &[TaintMatch]) -> Option<Value> {
    let kept: Vec<&Taint> = current
        .iter()
        .filter(|t| !lift.iter().any(|m| m.matches(t)))
        .collect();
    if kept.len() == current.len() {
        return None;
    }
    Some(json!([
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "test", "path": "/spec/taints", "value": current},
        {"op": "replace", "path": "/spec/taints", "value": kept},
    ]))
}

/// A kube client bound to one node.
pub struct NodeLabeler {
    api: Api<Node>,
    name: String,
    uid: String,
}

fn kube_err(node: &str, e: impl std::fmt::Display, hint: &str) -> StageError {
    StageError::Kube {
        node: node.into(),
        message: e.to_string(),
        hint: hint.into(),
    }
}

impl NodeLabeler {
    /// Connects (in-cluster or KUBECONFIG) for the node named in the facts.
    pub async fn connect(facts: &NodeFacts) -> Result<NodeLabeler> {
        let name = facts.name.clone().ok_or_else(|| kube_err("<unknown>", "KATA_NODE_NAME is not set", "The dispatcher sets it; for a standalone run export KATA_NODE_NAME and KATA_NODE_UID"))?;
        let uid = facts.uid.clone().ok_or_else(|| kube_err(&name, "KATA_NODE_UID is not set", "The dispatcher sets it; export KATA_NODE_UID (kubectl get node <name> -o jsonpath='{.metadata.uid}')"))?;
        let client = kube::Client::try_default().await.map_err(|e| {
            kube_err(
                &name,
                e,
                "Run in the cluster with the kata-deploy ServiceAccount, or set KUBECONFIG",
            )
        })?;
        Ok(NodeLabeler {
            api: Api::all(client),
            name,
            uid,
        })
    }

    /// For tests against a test-bed: a labeler from an existing client.
    pub fn with_client(client: kube::Client, name: String, uid: String) -> NodeLabeler {
        NodeLabeler {
            api: Api::all(client),
            name,
            uid,
        }
    }

    async fn get(&self) -> Result<Node> {
        let node = self.api.get(&self.name).await.map_err(|e| {
            kube_err(
                &self.name,
                e,
                "Check RBAC (nodes get/patch) and API reachability, then re-run",
            )
        })?;
        let uid = node.metadata.uid.clone().unwrap_or_default();
        if uid != self.uid {
            return Err(StageError::NodeReplaced {
                node: self.name.clone(),
                uid,
                expected: self.uid.clone(),
            });
        }
        Ok(node)
    }

    /// `get` with retries on transient API errors (bounded; a replaced node fails at once).
    async fn get_retrying(&self) -> Result<Node> {
        let mut delay = Duration::from_millis(200);
        for attempt in 0.. {
            match self.get().await {
                Ok(n) => return Ok(n),
                Err(e @ StageError::NodeReplaced { .. }) => return Err(e),
                Err(e) if attempt >= 5 => return Err(e),
                Err(e) => {
                    tracing::warn!(stage = "label", node = %self.name, attempt, error = %e, "reading the node failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        unreachable!()
    }

    /// Applies a label change (retrying a few times when a concurrent change fails the tests).
    pub async fn change(
        &self,
        set: &[(String, String)],
        remove_fn: &dyn Fn(&BTreeMap<String, String>) -> Vec<String>,
    ) -> Result<bool> {
        self.change_with(&|labels| (set.to_vec(), remove_fn(labels)))
            .await
    }

    /// [`Self::change`] where what is set also depends on the labels read.
    pub async fn change_with(&self, edit: &LabelEdit<'_>) -> Result<bool> {
        self.patch_node(
            "labels updated",
            "label patch kept failing",
            "Check RBAC (nodes patch) and whether another controller fights over these labels",
            &|node| {
                let labels = node.metadata.labels.as_ref();
                let (set, remove) = edit(labels.unwrap_or(&BTreeMap::new()));
                build_label_patch(&self.uid, labels, &set, &remove)
            },
        )
        .await
    }

    /// Reads the node, builds a JSON patch from it (None: nothing to change) and applies it,
    /// re-reading and retrying (5 attempts) when the patch fails, e.g. its test op on a node
    /// changed in between.
    async fn patch_node(
        &self,
        done: &str,
        failed: &str,
        hint: &str,
        build: &dyn Fn(&Node) -> Option<Value>,
    ) -> Result<bool> {
        let mut last = String::new();
        for attempt in 0..5 {
            let node = self.get_retrying().await?;
            let Some(patch) = build(&node) else {
                return Ok(false);
            };
            let patch: json_patch::Patch = serde_json::from_value(patch).expect("valid JSON patch");
            let params = PatchParams::default();
            match self
                .api
                .patch(&self.name, &params, &Patch::Json::<()>(patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(stage = "label", node = %self.name, "{done}");
                    return Ok(true);
                }
                Err(e) => {
                    last = e.to_string();
                    tracing::warn!(stage = "label", node = %self.name, attempt, error = %e, "patch failed; re-reading the node");
                    tokio::time::sleep(Duration::from_millis(300 * (attempt + 1))).await;
                }
            }
        }
        Err(kube_err(&self.name, format!("{failed}: {last}"), hint))
    }

    /// Marks the node claimed by this install (before the first host change), state `installing`.
    pub async fn claim(&self, install: &Install) -> Result<bool> {
        self.change(&claim_labels(install), &|_| vec![]).await
    }

    /// Drops the claim and the state label (after the last host cleanup).
    pub async fn unclaim(&self, install: &Install) -> Result<bool> {
        let keys = unclaim_removals(install);
        self.change(&[], &move |_| keys.clone()).await
    }

    /// Waits (bounded) until the node is Ready and, when it reports runtime handlers at all,
    /// lists ours; then labels it and re-checks after a delay that the labels stuck.
    pub async fn label_installed(
        &self,
        install: &Install,
        handlers: &[String],
        wait: Duration,
        recheck: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            let node = self.get_retrying().await?;
            let st = node.status.clone().unwrap_or_default();
            let ready = st
                .conditions
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let reported: Option<Vec<String>> = st
                .runtime_handlers
                .as_ref()
                .filter(|v| !v.is_empty())
                .map(|v| v.iter().filter_map(|h| h.name.clone()).collect());
            let missing: Vec<&String> = match &reported {
                Some(r) => handlers.iter().filter(|h| !r.contains(h)).collect(),
                None => vec![],
            };
            if ready && missing.is_empty() {
                if reported.is_none() {
                    tracing::info!(stage = "label", node = %self.name, "node reports no runtimeHandlers (kubelet < 1.30 or simulated node); not waiting for them");
                }
                break;
            }
            if Instant::now() >= deadline {
                return Err(kube_err(
                    &self.name,
                    format!("not labelled: after {}s ready={ready}, handlers missing from status.runtimeHandlers: {missing:?}", wait.as_secs()),
                    "Check the runtime loaded the configuration (kata-deploy-stage status, runtime logs) and the kubelet is healthy, then re-run",
                ));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let labels = install_labels(install);
        self.change(&labels, &|_| vec![]).await?;
        // k3s/rke2 re-register the node with cached labels after a runtime restart: re-check.
        for _ in 0..3 {
            tokio::time::sleep(recheck).await;
            if !self.change(&labels, &|_| vec![]).await? {
                return Ok(());
            }
            tracing::warn!(stage = "label", node = %self.name, "labels were wiped (kubelet re-registration?); re-applied");
        }
        Ok(())
    }

    /// Removes the startup taints from the node (after it was labelled): exactly those, nothing
    /// else; returns whether anything was removed.
    pub async fn lift_startup_taints(&self, lift: &[TaintMatch]) -> Result<bool> {
        if lift.is_empty() {
            return Ok(false);
        }
        tracing::info!(stage = "label", node = %self.name, ?lift, "lifting the startup taints");
        self.patch_node(
            "startup taints lifted",
            "could not lift the startup taints",
            "Check the node-scope admission policy lists these startupTaints (helm upgrade renders it) and RBAC (nodes patch)",
            &|node| {
                let taints = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.clone())
                    .unwrap_or_default();
                build_untaint_patch(&self.uid, &taints, lift)
            },
        )
        .await
    }

    /// Removes our marker and, when no other install serves the node, the shared runtime label;
    /// the state label says `cleaning` until unclaim removes it.
    pub async fn unlabel(&self, install: &Install) -> Result<bool> {
        self.change_with(&|labels| unlabel_edit(install, labels))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn patch_is_guarded_by_uid_and_touches_only_our_labels() {
        let install = Install::new("", "/opt/kata");
        let cur = labels(&[("kubernetes.io/hostname", "n1")]);
        let p = build_label_patch("uid-1", Some(&cur), &install_labels(&install), &[]).unwrap();
        assert_eq!(
            p,
            json!([
                {"op": "test", "path": "/metadata/uid", "value": "uid-1"},
                {"op": "add", "path": "/metadata/labels/katacontainers.io~1kata-runtime", "value": "true"},
                {"op": "add", "path": "/metadata/labels/katacontainers.io~1kata-deploy-installed", "value": "true"},
                {"op": "add", "path": "/metadata/labels/katacontainers.io~1kata-deploy-state", "value": "installed"},
            ])
        );
        // Parses as a JSON patch kube can send.
        let _: json_patch::Patch = serde_json::from_value(p).unwrap();
    }

    #[test]
    fn no_patch_when_already_labelled_and_labels_map_created_when_missing() {
        let install = Install::new("", "/opt/kata");
        let cur = labels(&[
            ("katacontainers.io/kata-runtime", "true"),
            ("katacontainers.io/kata-deploy-installed", "true"),
            ("katacontainers.io/kata-deploy-state", "installed"),
        ]);
        assert!(build_label_patch("u", Some(&cur), &install_labels(&install), &[]).is_none());
        let p = build_label_patch("u", None, &install_labels(&install), &[]).unwrap();
        assert_eq!(
            p[1],
            json!({"op": "add", "path": "/metadata/labels", "value": {}})
        );
    }

    #[test]
    fn shared_label_stays_while_another_install_serves_the_node() {
        let a = Install::new("", "/opt/kata");
        let b = Install::new("cicd", "/opt/kata");
        let both = labels(&[
            ("katacontainers.io/kata-runtime", "true"),
            ("katacontainers.io/kata-deploy-installed", "true"),
            ("katacontainers.io/kata-deploy-installed-cicd", "true"),
        ]);
        assert_eq!(
            uninstall_removals(&a, &both),
            vec!["katacontainers.io/kata-deploy-installed".to_string()]
        );
        let only_b = labels(&[
            ("katacontainers.io/kata-runtime", "true"),
            ("katacontainers.io/kata-deploy-installed-cicd", "true"),
        ]);
        assert_eq!(
            uninstall_removals(&b, &only_b),
            vec![
                "katacontainers.io/kata-deploy-installed-cicd".to_string(),
                RUNTIME_LABEL.to_string()
            ]
        );
        let p =
            build_label_patch("u", Some(&only_b), &[], &uninstall_removals(&b, &only_b)).unwrap();
        assert_eq!(p.as_array().unwrap().len(), 5); // uid test + (test, remove) x2
        assert_eq!(
            p[2],
            json!({"op": "remove", "path": "/metadata/labels/katacontainers.io~1kata-deploy-installed-cicd"})
        );
    }

    fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: value.map(str::to_owned),
            effect: effect.into(),
            time_added: None,
        }
    }

    #[test]
    fn startup_taints_parse_like_kubectl_and_bad_ones_are_named() {
        let m = TaintMatch::parse("example.com/kata:NoSchedule").unwrap();
        assert_eq!(
            (m.key.as_str(), m.value, m.effect.as_deref()),
            ("example.com/kata", None, Some("NoSchedule"))
        );
        let m = TaintMatch::parse("k=v").unwrap();
        assert_eq!((m.value.as_deref(), m.effect), (Some("v"), None));
        for bad in ["", ":NoSchedule", "k:Sometimes", "bad key:NoExecute"] {
            let e = TaintMatch::parse(bad).unwrap_err();
            assert!(e.contains("key[=value][:Effect]"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_untaint_patch_removes_exactly_the_startup_taints() {
        let lift = [
            TaintMatch::parse("kata/not-ready:NoSchedule").unwrap(),
            TaintMatch::parse("kata/x=1").unwrap(),
        ];
        let current = [
            taint("kata/not-ready", None, "NoSchedule"),
            taint("kata/not-ready", None, "NoExecute"),
            taint("kata/x", Some("1"), "NoExecute"),
            taint("kata/x", Some("2"), "NoExecute"),
            taint("other", None, "NoSchedule"),
        ];
        let p = build_untaint_patch("u", &current, &lift).unwrap();
        assert_eq!(
            p[0],
            json!({"op": "test", "path": "/metadata/uid", "value": "u"})
        );
        assert_eq!(p[1]["op"], "test", "guarded by the list as read");
        let kept: Vec<Taint> = serde_json::from_value(p[2]["value"].clone()).unwrap();
        assert_eq!(
            kept,
            [current[1].clone(), current[3].clone(), current[4].clone()]
        );
        let _: json_patch::Patch = serde_json::from_value(p).unwrap();
        assert!(
            build_untaint_patch("u", &current[3..], &lift).is_none(),
            "nothing to lift: no write"
        );
    }

    #[test]
    fn the_state_label_follows_claim_label_unlabel_unclaim_per_install() {
        let a = Install::new("cicd", "/opt/kata");
        let key = "katacontainers.io/kata-deploy-state-cicd";
        let value =
            |set: &[(String, String)]| set.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        assert_eq!(value(&claim_labels(&a)).as_deref(), Some("installing"));
        assert_eq!(value(&install_labels(&a)).as_deref(), Some("installed"));
        // unclaim removes the claim and the state, nothing else.
        let claimed = labels(&[
            ("katacontainers.io/kata-deploy-claimed-cicd", "true"),
            (key, "cleaning"),
            ("katacontainers.io/kata-deploy-state", "installed"),
        ]);
        let p = build_label_patch("u", Some(&claimed), &[], &unclaim_removals(&a)).unwrap();
        let removed: Vec<&str> = p
            .as_array()
            .unwrap()
            .iter()
            .filter(|op| op["op"] == "remove")
            .map(|op| op["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            removed,
            [
                "/metadata/labels/katacontainers.io~1kata-deploy-claimed-cicd",
                "/metadata/labels/katacontainers.io~1kata-deploy-state-cicd"
            ]
        );
    }

    #[test]
    fn unlabel_on_clean_node_is_a_noop() {
        let a = Install::new("", "/opt/kata");
        let none = BTreeMap::new();
        assert!(build_label_patch("u", Some(&none), &[], &uninstall_removals(&a, &none)).is_none());
        let (set, remove) = unlabel_edit(&a, &none);
        assert!(build_label_patch("u", Some(&none), &set, &remove).is_none());
        // A claimed node (an install that died half-way) says cleaning while it is cleaned.
        let claimed = labels(&[("katacontainers.io/kata-deploy-claimed", "true")]);
        let (set, _) = unlabel_edit(&a, &claimed);
        assert_eq!(
            set,
            [(
                "katacontainers.io/kata-deploy-state".to_string(),
                "cleaning".to_string()
            )]
        );
    }
}
