//! Local nodes: the Node object tests create, and the status the stand-in keeps reporting
//! (Ready, nodeInfo, capacity) so the node lifecycle controller and the scheduler treat it as a
//! healthy node.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use super::env::{NODE_CPU, NODE_EPHEMERAL_STORAGE, NODE_MEMORY};

/// Label marking a node as served by `kata-local-kubelet`.
pub const LOCAL_LABEL: &str = "kata-testbed/local";
/// Default `--node-selector`.
pub const DEFAULT_SELECTOR: &str = "kata-testbed/local=true";
/// Node annotation overriding the reported `containerRuntimeVersion`.
pub const RUNTIME_VERSION_ANNOTATION: &str = "kata-testbed/container-runtime-version";
/// Node annotation overriding the reported `kubeletVersion`.
pub const KUBELET_VERSION_ANNOTATION: &str = "kata-testbed/kubelet-version";
/// Reported `containerRuntimeVersion` unless overridden.
pub const DEFAULT_RUNTIME_VERSION: &str = "containerd://1.6.20";
/// Reported `kubeletVersion` unless overridden.
pub const DEFAULT_KUBELET_VERSION: &str = "v1.34.4";
/// Address every local node and pod reports.
pub const LOCAL_IP: &str = "127.0.0.1";
/// Pods a local node advertises room for.
pub const NODE_PODS: &str = "110";

/// A Node object for a local node (create it, then run the stand-in).
pub fn local_node(name: &str) -> Node {
    let labels: BTreeMap<String, String> = [
        (LOCAL_LABEL, "true"),
        ("kubernetes.io/hostname", name),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut n = Node::default();
    n.metadata.name = Some(name.to_string());
    n.metadata.labels = Some(labels);
    n
}

/// A stable machine ID (32 hex) derived from the node UID, used when the file does not exist.
pub fn machine_id_from_uid(uid: &str) -> String {
    let hex: String = uid.chars().filter(char::is_ascii_hexdigit).collect();
    format!("{hex:0<32}")
        .chars()
        .take(32)
        .collect::<String>()
        .to_lowercase()
}

/// Reads `<node root>/etc/machine-id`, creating it if missing.
pub fn ensure_machine_id(node_root: &Path, uid: &str) -> std::io::Result<String> {
    let path = node_root.join("etc/machine-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let id = machine_id_from_uid(uid);
            std::fs::create_dir_all(node_root.join("etc"))?;
            std::fs::write(&path, format!("{id}\n"))?;
            Ok(id)
        }
    }
}

fn annotation<'a>(node: &'a Node, key: &str, default: &'a str) -> &'a str {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
        .unwrap_or(default)
}

/// Merge patch for `nodes/status`: Ready with a fresh heartbeat (keeping the transition time
/// while it was already Ready), pressure conditions False, nodeInfo, capacity and addresses.
pub fn node_status_patch(node: &Node, machine_id: &str, now: &Timestamp) -> Value {
    let name = node.metadata.name.clone().unwrap_or_default();
    let now_s = now.to_string();
    let old = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .cloned()
        .unwrap_or_default();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        let transition = old
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.to_string())
            .unwrap_or_else(|| now_s.clone());
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now_s, "lastTransitionTime": transition,
        })
    };
    let resources = json!({
        "cpu": NODE_CPU, "memory": NODE_MEMORY, "pods": NODE_PODS,
        "ephemeral-storage": NODE_EPHEMERAL_STORAGE,
    });
    json!({
        "status": {
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "kata-local-kubelet is posting ready status"),
            ],
            "nodeInfo": {
                "machineID": machine_id,
                "systemUUID": machine_id,
                "bootID": machine_id,
                "kernelVersion": "local",
                "osImage": "kata-testbed local node",
                "containerRuntimeVersion": annotation(node, RUNTIME_VERSION_ANNOTATION, DEFAULT_RUNTIME_VERSION),
                "kubeletVersion": annotation(node, KUBELET_VERSION_ANNOTATION, DEFAULT_KUBELET_VERSION),
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": LOCAL_IP},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        }
    })
}

/// Server-side-apply body for the node's Lease in `kube-node-lease` (the lifecycle
/// controller's primary liveness signal). Owned by the Node, so it goes away with it.
pub fn lease_body(node: &str, node_uid: &str, now: &Timestamp) -> Value {
    // MicroTime: RFC 3339 with microseconds.
    let renew = now.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": node, "namespace": "kube-node-lease",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}],
        },
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": renew},
    })
}

/// Taints the node lifecycle controller would lift from a Ready node.
pub const NOT_READY_TAINTS: &[&str] = &[
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

/// The node's taints without the not-ready/unreachable ones, or `None` when it has none of
/// them. The NodeRestriction/TaintNodesByCondition admission adds `not-ready` to every new node,
/// and the test bed runs no node lifecycle controller to lift it once the node is Ready, so the
/// stand-in does (otherwise nothing would ever be scheduled onto a local node).
pub fn taints_without_not_ready(node: &Node) -> Option<Vec<Taint>> {
    let taints = node.spec.as_ref()?.taints.as_ref()?;
    let kept: Vec<Taint> = taints
        .iter()
        .filter(|t| !NOT_READY_TAINTS.contains(&t.key.as_str()))
        .cloned()
        .collect();
    (kept.len() != taints.len()).then_some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn node_object() {
        let n = local_node("n1");
        assert_eq!(n.metadata.labels.unwrap()[LOCAL_LABEL], "true");
    }

    #[test]
    fn machine_ids() {
        assert_eq!(
            machine_id_from_uid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
        );
        assert_eq!(machine_id_from_uid("ab").len(), 32);
        let d = tempfile::tempdir().unwrap();
        let id = ensure_machine_id(d.path(), "ABCDEF").unwrap();
        assert!(id.starts_with("abcdef"));
        std::fs::write(d.path().join("etc/machine-id"), "kept\n").unwrap();
        assert_eq!(ensure_machine_id(d.path(), "x").unwrap(), "kept");
    }

    #[test]
    fn status_patch() {
        let then = Timestamp::from_second(1_600_000_000).unwrap();
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let mut n = local_node("n1");
        n.metadata.annotations = Some(
            [(
                RUNTIME_VERSION_ANNOTATION.to_string(),
                "containerd://2.0.5".to_string(),
            )]
            .into(),
        );
        n.status = Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                last_transition_time: Some(Time(then)),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let p = node_status_patch(&n, "mid", &now);
        let s = &p["status"];
        let ready = s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        assert_eq!(ready["lastTransitionTime"], then.to_string());
        assert_eq!(ready["lastHeartbeatTime"], now.to_string());
        assert_eq!(s["nodeInfo"]["machineID"], "mid");
        assert_eq!(
            s["nodeInfo"]["containerRuntimeVersion"],
            "containerd://2.0.5"
        );
        assert_eq!(s["nodeInfo"]["kubeletVersion"], DEFAULT_KUBELET_VERSION);
        assert_eq!(s["allocatable"]["pods"], NODE_PODS);
        let l = lease_body("n1", "uid-1", &now);
        assert_eq!(l["spec"]["renewTime"], "2023-11-14T22:13:20.000000Z");
        assert_eq!(l["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    }

    #[test]
    fn not_ready_taints_are_lifted() {
        let taint = |k: &str| Taint {
            key: k.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let mut n = local_node("n1");
        assert_eq!(taints_without_not_ready(&n), None);
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![taint("node.kubernetes.io/not-ready"), taint("keep")]),
            ..Default::default()
        });
        assert_eq!(taints_without_not_ready(&n), Some(vec![taint("keep")]));
        n.spec.as_mut().unwrap().taints = Some(vec![taint("keep")]);
        assert_eq!(taints_without_not_ready(&n), None);
    }
}
