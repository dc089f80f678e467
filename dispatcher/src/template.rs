//! The per-node Job template: validated once, then specialised for each node.
//!
//! The template stays untyped JSON on purpose: a typed round-trip through k8s-openapi would drop
//! fields this binary does not know (newer Kubernetes fields), silently changing what users asked
//! for. We only touch the paths we own.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// Label: who manages the per-node Jobs.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGER: &str = "kata-deploy-job-dispatcher";
/// Label: which dispatcher (its name prefix) created the Job; the watch selector.
pub const LABEL_DISPATCHER: &str = "katacontainers.io/dispatcher";
/// Label: the run (owner Job UID) that created the Job.
pub const LABEL_RUN: &str = "katacontainers.io/run";
/// Label: the node the Job is pinned to (label-safe form).
pub const LABEL_NODE: &str = "katacontainers.io/node";
/// Annotation: the raw node name.
pub const ANNOTATION_NODE_NAME: &str = "katacontainers.io/node-name";
/// Annotation: the node's UID when the Job was created.
pub const ANNOTATION_NODE_UID: &str = "katacontainers.io/node-uid";
/// Annotation: hash of the template the Job was made from.
pub const ANNOTATION_TEMPLATE_HASH: &str = "katacontainers.io/template-hash";

/// Why a template file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// Not YAML / JSON at all.
    #[error("template {path}: not valid YAML: {source}. Give a batch/v1 Job manifest")]
    Parse {
        /// File path.
        path: String,
        /// Parser error.
        source: serde_yaml::Error,
    },
    /// Parsed, but not a usable per-node Job template.
    #[error("template {path}: {problem}")]
    Invalid {
        /// File path.
        path: String,
        /// What is wrong and what to do.
        problem: String,
    },
}

/// The facts about one node that go into its Job.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// Node UID.
    pub uid: String,
    /// `status.nodeInfo.machineID`.
    pub machine_id: String,
    /// `status.nodeInfo.containerRuntimeVersion`.
    pub container_runtime_version: String,
    /// `status.nodeInfo.kubeletVersion`.
    pub kubelet_version: String,
    /// `status.nodeInfo.architecture`.
    pub architecture: String,
    /// Its CRI configuration directory (the volume the template names for it).
    pub cri_dir: crate::cri_dir::CriDir,
}

/// Who the per-node Jobs belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIdentity {
    /// Name prefix (also the dispatcher label value).
    pub prefix: String,
    /// Run id (owner Job UID, or a random id when standalone).
    pub run_id: String,
    /// The owner Job (name, uid), if any.
    pub owner: Option<(String, String)>,
    /// Namespace of everything.
    pub namespace: String,
}

/// A validated template.
#[derive(Debug, Clone)]
pub struct JobTemplate {
    job: Value,
    hash: String,
}

impl JobTemplate {
    /// Parses and validates a template file's content.
    pub fn parse(path: &str, text: &str) -> Result<Self, TemplateError> {
        let job: Value = serde_yaml::from_str(text).map_err(|source| TemplateError::Parse {
            path: path.into(),
            source,
        })?;
        let invalid = |problem: &str| TemplateError::Invalid {
            path: path.into(),
            problem: problem.into(),
        };
        if !job.is_object() {
            return Err(invalid("expected a YAML mapping holding a batch/v1 Job"));
        }
        if job.get("apiVersion").and_then(Value::as_str) != Some("batch/v1")
            || job.get("kind").and_then(Value::as_str) != Some("Job")
        {
            return Err(invalid(
                "is not a Job: set 'apiVersion: batch/v1' and 'kind: Job'",
            ));
        }
        let pod_spec = job
            .pointer("/spec/template/spec")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                invalid("has no spec.template.spec: a per-node Job needs a pod template")
            })?;
        let containers = pod_spec.get("containers").and_then(Value::as_array);
        if containers.is_none_or(|c| c.is_empty()) {
            return Err(invalid(
                "spec.template.spec.containers is empty: add the container the Job runs",
            ));
        }
        if pod_spec.get("nodeName").is_some() {
            return Err(invalid(
                "sets spec.template.spec.nodeName: remove it, the dispatcher pins each Job to its node",
            ));
        }
        let restart = pod_spec.get("restartPolicy").and_then(Value::as_str);
        if !matches!(restart, Some("Never") | Some("OnFailure")) {
            return Err(invalid("spec.template.spec.restartPolicy must be Never or OnFailure (a Job's pods cannot use Always)"));
        }
        if job
            .pointer("/spec/parallelism")
            .and_then(Value::as_i64)
            .is_some_and(|p| p != 1)
            || job
                .pointer("/spec/completions")
                .and_then(Value::as_i64)
                .is_some_and(|c| c != 1)
        {
            return Err(invalid("spec.parallelism and spec.completions must be 1 (or unset): each node gets exactly one pod"));
        }
        let hash = hex::encode(Sha256::digest(
            serde_json::to_vec(&job).expect("JSON values serialise"),
        ))[..16]
            .to_owned();
        Ok(Self { job, hash })
    }

    /// The template as given.
    pub fn job(&self) -> &Value {
        &self.job
    }

    /// `spec.activeDeadlineSeconds` of the template, if set.
    pub fn active_deadline(&self) -> Option<std::time::Duration> {
        self.job
            .pointer("/spec/activeDeadlineSeconds")
            .and_then(Value::as_u64)
            .map(std::time::Duration::from_secs)
    }

    /// Short hash identifying this template (stored on every Job made from it).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The Job for one node: name, labels, annotations, owner, `nodeName` and node facts set;
    /// everything else exactly as in the template.
    pub fn specialise(&self, run: &RunIdentity, node: &NodeFacts, job_name: &str) -> Value {
        let mut job = self.job.clone();
        let node_label = crate::naming::node_label_value(&node.name);
        let labels = [
            (LABEL_MANAGED_BY, MANAGER.to_owned()),
            (LABEL_DISPATCHER, run.prefix.clone()),
            (LABEL_RUN, run.run_id.clone()),
            (LABEL_NODE, node_label),
        ];
        let annotations = [
            (ANNOTATION_NODE_NAME, node.name.clone()),
            (ANNOTATION_NODE_UID, node.uid.clone()),
            (ANNOTATION_TEMPLATE_HASH, self.hash.clone()),
        ];
        {
            let meta = object_at(&mut job, "metadata");
            for k in [
                "generateName",
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "managedFields",
                "selfLink",
            ] {
                meta.remove(k);
            }
            meta.insert("name".into(), json!(job_name));
            meta.insert("namespace".into(), json!(run.namespace));
            insert_all(meta, "labels", &labels);
            insert_all(meta, "annotations", &annotations);
            if let Some((owner_name, owner_uid)) = &run.owner {
                // Non-controller and no blockOwnerDeletion: the Job controller must keep owning its
                // pods, and deleting the dispatcher must not wait on per-node Jobs.
                let refs = meta.entry("ownerReferences").or_insert_with(|| json!([]));
                if let Some(refs) = refs.as_array_mut() {
                    refs.push(json!({
                        "apiVersion": "batch/v1", "kind": "Job", "name": owner_name, "uid": owner_uid,
                        "controller": false, "blockOwnerDeletion": false,
                    }));
                }
            }
        }
        let pod_template = object_at(
            object_at(&mut job, "spec")
                .entry("template")
                .or_insert_with(|| json!({})),
            "metadata",
        );
        insert_all(pod_template, "labels", &labels);
        insert_all(pod_template, "annotations", &annotations[..1]);
        let pod_spec = job
            .pointer_mut("/spec/template/spec")
            .and_then(Value::as_object_mut)
            .expect("validated in parse");
        pod_spec.insert("nodeName".into(), json!(node.name));
        let mut env = node_env(node);
        if let Some(reason) = point_cri_volume(&self.job, pod_spec, &node.cri_dir) {
            env.push((crate::cri_dir::ENV_CRI_UNKNOWN, reason));
        }
        for list in ["initContainers", "containers"] {
            if let Some(containers) = pod_spec.get_mut(list).and_then(Value::as_array_mut) {
                for c in containers.iter_mut().filter_map(Value::as_object_mut) {
                    let vars = c.entry("env").or_insert_with(|| json!([]));
                    if let Some(vars) = vars.as_array_mut() {
                        // Ours win: drop template entries with the same names first.
                        vars.retain(|v| {
                            !env.iter()
                                .any(|(k, _)| v.get("name").and_then(Value::as_str) == Some(k))
                        });
                        vars.extend(env.iter().map(|(k, v)| json!({"name": k, "value": v})));
                    }
                }
            }
        }
        job
    }
}

/// Points the hostPath volume the template names (pod-template annotation
/// [`crate::cri_dir::ANNOTATION_CRI_VOLUME`]) at the node's CRI configuration directory. Returns
/// why it is unknown, for the stages to fail on before any host change (the volume stays as the
/// template has it, unused).
fn point_cri_volume(
    template: &Value,
    pod_spec: &mut Map<String, Value>,
    dir: &crate::cri_dir::CriDir,
) -> Option<String> {
    let volume = template
        .pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(crate::cri_dir::ANNOTATION_CRI_VOLUME))
        .and_then(Value::as_str)?;
    match dir {
        crate::cri_dir::CriDir::NotRead => None,
        crate::cri_dir::CriDir::Unknown(why) => Some(why.clone()),
        crate::cri_dir::CriDir::Known(path) => {
            let vols = pod_spec.get_mut("volumes").and_then(Value::as_array_mut)?;
            let host_path = vols
                .iter_mut()
                .find(|v| v.get("name").and_then(Value::as_str) == Some(volume))
                .and_then(|v| v.get_mut("hostPath"))
                .and_then(Value::as_object_mut)?;
            let old = host_path.get("path").and_then(Value::as_str)?.to_string();
            host_path.insert("path".into(), json!(path));
            // Each mount keeps its place under the container's host root (/host/etc -> /host/etc/containerd).
            for list in ["initContainers", "containers"] {
                let containers = pod_spec.get_mut(list).and_then(Value::as_array_mut);
                for c in containers.into_iter().flatten() {
                    let mounts = c.get_mut("volumeMounts").and_then(Value::as_array_mut);
                    for m in mounts.into_iter().flatten() {
                        if m.get("name").and_then(Value::as_str) != Some(volume) {
                            continue;
                        }
                        let at = m.get("mountPath").and_then(Value::as_str).unwrap_or("");
                        if let Some(root) = at.strip_suffix(old.as_str()) {
                            let moved = format!("{root}{path}");
                            m["mountPath"] = json!(moved);
                        }
                    }
                }
            }
            None
        }
    }
}

/// The node facts as container environment (names in ARCHITECTURE.md).
pub fn node_env(node: &NodeFacts) -> Vec<(&'static str, String)> {
    vec![
        ("KATA_NODE_NAME", node.name.clone()),
        ("KATA_NODE_UID", node.uid.clone()),
        ("KATA_NODE_MACHINE_ID", node.machine_id.clone()),
        (
            "KATA_NODE_CONTAINER_RUNTIME_VERSION",
            node.container_runtime_version.clone(),
        ),
        ("KATA_NODE_KUBELET_VERSION", node.kubelet_version.clone()),
        ("KATA_NODE_ARCH", node.architecture.clone()),
    ]
}

fn object_at<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let obj = v.as_object_mut().expect("templates are objects");
    let entry = obj.entry(key).or_insert_with(|| json!({}));
    if !entry.is_object() {
        *entry = json!({});
    }
    entry.as_object_mut().expect("just made an object")
}

fn insert_all(meta: &mut Map<String, Value>, key: &str, pairs: &[(&str, String)]) {
    let map = meta.entry(key).or_insert_with(|| json!({}));
    if !map.is_object() {
        *map = json!({});
    }
    let map = map.as_object_mut().expect("just made an object");
    for (k, v) in pairs {
        map.insert((*k).to_owned(), json!(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
apiVersion: batch/v1
kind: Job
metadata:
  name: ignored
  labels: {app: kata}
spec:
  backoffLimit: 2
  someFutureJobField: {keep: me}
  template:
    metadata:
      labels: {tier: node}
    spec:
      restartPolicy: Never
      futurePodField: 42
      initContainers:
      - name: host-check
        image: stage
        env: [{name: KATA_NODE_NAME, value: wrong}, {name: OTHER, value: x}]
      containers:
      - name: label
        image: stage
        futureContainerField: [1, 2]
"#;

    fn run() -> RunIdentity {
        RunIdentity {
            prefix: "kd-install".into(),
            run_id: "run-1".into(),
            owner: Some(("kd-dispatcher".into(), "uid-owner".into())),
            namespace: "kata-system".into(),
        }
    }

    fn node() -> NodeFacts {
        NodeFacts {
            name: "worker-1".into(),
            uid: "uid-n1".into(),
            machine_id: "m1".into(),
            container_runtime_version: "containerd://2.0.5".into(),
            kubelet_version: "v1.34.4".into(),
            architecture: "amd64".into(),
            cri_dir: Default::default(),
        }
    }

    /// With `stage.cri: auto` the chart names its CRI volume: each node's Job mounts that node's
    /// own CRI directory; a node whose CRI cannot be told gets the reason for its stages, which
    /// fail before any host change; a template without the annotation is left alone.
    #[test]
    fn the_cri_volume_points_at_each_nodes_own_directory() {
        use crate::cri_dir::{CriDir, ANNOTATION_CRI_VOLUME, ENV_CRI_UNKNOWN};
        let text = format!(
            "apiVersion: batch/v1\nkind: Job\nspec:\n  template:\n    metadata:\n      annotations: {{\"{ANNOTATION_CRI_VOLUME}\": host-cri-config}}\n    spec:\n      restartPolicy: Never\n      containers: [{{name: cri, image: x, volumeMounts: [{{name: host-cri-config, mountPath: /host/etc}}, {{name: other, mountPath: /host/etc}}]}}]\n      volumes:\n      - {{name: host-cri-config, hostPath: {{path: /etc, type: Directory}}}}\n      - {{name: other, hostPath: {{path: /etc}}}}\n"
        );
        let t = JobTemplate::parse("t.yaml", &text).unwrap();
        let run = RunIdentity {
            prefix: "p".into(),
            run_id: "r".into(),
            owner: None,
            namespace: "ns".into(),
        };
        let with = |dir: CriDir| {
            let n = NodeFacts {
                cri_dir: dir,
                ..node()
            };
            t.specialise(&run, &n, "j")
        };
        let job = with(CriDir::Known(
            "/var/lib/rancher/k3s/agent/etc/containerd".into(),
        ));
        assert_eq!(
            job.pointer("/spec/template/spec/volumes/0/hostPath/path"),
            Some(&json!("/var/lib/rancher/k3s/agent/etc/containerd"))
        );
        assert_eq!(
            job.pointer("/spec/template/spec/volumes/1/hostPath/path"),
            Some(&json!("/etc")),
            "only the named volume"
        );
        assert_eq!(
            job.pointer("/spec/template/spec/containers/0/volumeMounts/0/mountPath"),
            Some(&json!("/host/var/lib/rancher/k3s/agent/etc/containerd")),
            "mounted where the host has it, under the container's host root"
        );
        assert_eq!(
            job.pointer("/spec/template/spec/containers/0/volumeMounts/1/mountPath"),
            Some(&json!("/host/etc"))
        );
        let job = with(CriDir::Unknown("its runtime \"docker://24\"".into()));
        assert_eq!(
            job.pointer("/spec/template/spec/volumes/0/hostPath/path"),
            Some(&json!("/etc"))
        );
        let env = job.pointer("/spec/template/spec/containers/0/env").unwrap();
        assert!(
            env.as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == ENV_CRI_UNKNOWN
                    && e["value"].as_str().unwrap().contains("docker://24")),
            "{env}"
        );
        let job = with(CriDir::NotRead);
        assert_eq!(
            job.pointer("/spec/template/spec/volumes/0/hostPath/path"),
            Some(&json!("/etc"))
        );
    }

    #[test]
    fn specialise_pins_labels_owns_and_keeps_unknown_fields() {
        let t = JobTemplate::parse("t.yaml", TEMPLATE).unwrap();
        let job = t.specialise(&run(), &node(), "kd-install-worker-1");
        assert_eq!(job["metadata"]["name"], "kd-install-worker-1");
        assert_eq!(job["metadata"]["namespace"], "kata-system");
        assert_eq!(job["metadata"]["labels"]["app"], "kata");
        assert_eq!(job["metadata"]["labels"][LABEL_RUN], "run-1");
        assert_eq!(job["metadata"]["labels"][LABEL_NODE], "worker-1");
        assert_eq!(
            job["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH],
            t.hash()
        );
        let owner = &job["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], "uid-owner");
        assert_eq!(owner["controller"], false);
        assert_eq!(owner["blockOwnerDeletion"], false);
        assert_eq!(job["spec"]["template"]["spec"]["nodeName"], "worker-1");
        assert_eq!(job["spec"]["someFutureJobField"]["keep"], "me");
        assert_eq!(job["spec"]["template"]["spec"]["futurePodField"], 42);
        assert_eq!(
            job["spec"]["template"]["spec"]["containers"][0]["futureContainerField"][1],
            2
        );
        assert_eq!(
            job["spec"]["template"]["metadata"]["labels"]["tier"],
            "node"
        );
        assert_eq!(
            job["spec"]["template"]["metadata"]["labels"][LABEL_NODE],
            "worker-1"
        );
        let env = job["spec"]["template"]["spec"]["initContainers"][0]["env"]
            .as_array()
            .unwrap();
        let get = |k: &str| {
            env.iter()
                .filter(|v| v["name"] == k)
                .map(|v| v["value"].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("KATA_NODE_NAME"), vec![json!("worker-1")]);
        assert_eq!(get("OTHER"), vec![json!("x")]);
        assert_eq!(
            get("KATA_NODE_CONTAINER_RUNTIME_VERSION"),
            vec![json!("containerd://2.0.5")]
        );
        let main_env = job["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap();
        assert!(main_env
            .iter()
            .any(|v| v["name"] == "KATA_NODE_MACHINE_ID" && v["value"] == "m1"));
    }

    #[test]
    fn hash_changes_with_the_template() {
        let a = JobTemplate::parse("t", TEMPLATE).unwrap();
        let b = JobTemplate::parse("t", &TEMPLATE.replace("backoffLimit: 2", "backoffLimit: 3"))
            .unwrap();
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), JobTemplate::parse("t", TEMPLATE).unwrap().hash());
    }

    #[test]
    fn rejects_bad_templates_with_a_reason() {
        for (text, why) in [
            ("a: [", "not valid YAML"),
            ("- 1", "expected a YAML mapping"),
            ("apiVersion: v1\nkind: Pod\nspec: {}", "is not a Job"),
            (
                "apiVersion: batch/v1\nkind: Job\nspec: {}",
                "no spec.template.spec",
            ),
            (
                "apiVersion: batch/v1\nkind: Job\nspec: {template: {spec: {containers: []}}}",
                "containers is empty",
            ),
            (
                &TEMPLATE.replace(
                    "restartPolicy: Never",
                    "restartPolicy: Never\n      nodeName: n1",
                ),
                "nodeName",
            ),
            (
                &TEMPLATE.replace("restartPolicy: Never", "restartPolicy: Always"),
                "restartPolicy",
            ),
            (
                &TEMPLATE.replace("backoffLimit: 2", "parallelism: 3"),
                "parallelism",
            ),
        ] {
            let e = JobTemplate::parse("t.yaml", text).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("t.yaml"), "{text}: {e}");
        }
    }
}
