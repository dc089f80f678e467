//! Pods that prove a runtime handler reaches our shim on a real node: one pod per handler (its
//! RuntimeClass created when missing), pinned to the node; the test payload's shims cannot start a
//! VM, so each sandbox fails in the shim, and the shim's record on the node
//! (`/run/kata-deploy-test-payload.log`, "$0 $@" per call, `hack/make-test-payload.sh`) shows
//! which binary containerd started for that pod's sandbox.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::cluster::{wait_until, TestCluster};
use crate::realnode::RealNode;

/// Where the test payload's shims record each call, on the node.
pub const SHIM_RECORD: &str = "/run/kata-deploy-test-payload.log";

/// What one handler's probe pod showed: the sandbox containerd tried, and the shim call for it.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    /// The pod's FailedCreatePodSandBox message.
    pub message: String,
    /// The sandbox id in that message.
    pub sandbox: String,
    /// The shim's recorded `start` call for that sandbox (the binary and its arguments).
    pub shim_call: String,
}

/// The sandbox id in a kubelet's "failed to start sandbox \"<id>\"" message (pure).
pub fn sandbox_id(message: &str) -> Option<String> {
    let rest = message.split("failed to start sandbox \"").nth(1)?;
    rest.split('"').next().map(str::to_string)
}

/// For each `(handler, shim binary)`, one after the other: a pod with that RuntimeClass on
/// `node`, and the shim calls containerd made for its sandbox, which must be that binary's
/// `start`. containerd >= 1.7 names the sandbox in the kubelet's message; 1.6 does not, so the
/// calls are those recorded while the pod existed (each pod is gone before the next starts).
/// `tag` keeps pod names unique across calls.
pub async fn probe_handlers(
    cluster: &TestCluster,
    node: &RealNode,
    handlers: &[(String, Reach)],
    tag: &str,
) -> Result<BTreeMap<String, ProbeResult>> {
    ensure_runtime_classes(cluster, handlers.iter().map(|(h, _)| h.as_str())).await?;
    wait_node_ready(cluster, node).await?;
    let mut out = BTreeMap::new();
    for (handler, reach) in handlers {
        let shim = match reach {
            Reach::Shim(shim) => shim,
            Reach::Snapshotter(socket) => {
                let message = probe_snapshotter(cluster, node, handler, socket, tag).await?;
                out.insert(
                    handler.clone(),
                    ProbeResult {
                        message,
                        sandbox: String::new(),
                        shim_call: String::new(),
                    },
                );
                continue;
            }
        };
        let name = pod_name(handler, tag);
        let before = shim_record(node).lines().count();
        create_probe_pod(cluster, node, handler, &name).await?;
        let found = sandbox_failure(cluster, node, handler, &name).await;
        let after = shim_record(node);
        delete_and_wait(cluster, &name).await?;
        let message = found?;
        let sandbox = sandbox_id(&message);
        let calls: Vec<&str> = after
            .lines()
            .skip(before)
            .filter(|l| l.ends_with(" start"))
            .filter(|l| {
                sandbox
                    .as_ref()
                    .is_none_or(|id| l.contains(&format!("-id {id} ")))
            })
            .collect();
        // The test shim answers `start` with its banner, which containerd puts in the message:
        // that names the shim that ran even when its record of the call is missing (seen once on
        // containerd 2.4.2 after an upgrade, not explained yet).
        let banner = if shim.contains("runtime-rs") {
            "containerd-shim-kata-v2 (runtime-rs) (kata-deploy test payload)"
        } else {
            "containerd-shim-kata-v2 (go runtime) (kata-deploy test payload)"
        };
        let Some(call) = calls.first().map(|c| c.to_string()).or_else(|| {
            message
                .contains(banner)
                .then(|| format!("(no record; the sandbox's message shows {banner:?})"))
        }) else {
            bail!("{handler} on {}: no shim start for its sandbox {sandbox:?} (message: {message}); shim record:\n{after}", node.name);
        };
        if let Some(other) = calls.iter().find(|c| !c.starts_with(shim.as_str())) {
            bail!(
                "{handler} on {}: containerd started {other:?}, not our shim {shim}",
                node.name
            );
        }
        out.insert(
            handler.clone(),
            ProbeResult {
                message,
                sandbox: sandbox.unwrap_or_default(),
                shim_call: call,
            },
        );
    }
    Ok(out)
}

/// What a handler's pod must reach on a node whose Kata is the test payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// This shim binary is started for the pod's sandbox.
    Shim(String),
    /// The pod's image is unpacked through the snapshotter at this socket (guest pull: the test
    /// payload's nydus stand-in does not serve it, so the sandbox fails there, naming it).
    Snapshotter(String),
}

/// A guest-pull handler's pod: containerd prepares its sandbox image through our snapshotter.
async fn probe_snapshotter(
    cluster: &TestCluster,
    node: &RealNode,
    handler: &str,
    socket: &str,
    tag: &str,
) -> Result<String> {
    let name = pod_name(handler, tag);
    create_probe_pod(cluster, node, handler, &name).await?;
    let found = sandbox_failure(cluster, node, handler, &name).await;
    delete_and_wait(cluster, &name).await?;
    let message = found?;
    anyhow::ensure!(
        message.contains(socket),
        "{handler} on {}: the sandbox did not go through our snapshotter {socket}: {message}",
        node.name
    );
    Ok(message)
}

/// A valid pod name for `handler`'s probe (`tag` may be any text: a step's description).
fn pod_name(handler: &str, tag: &str) -> String {
    let raw = format!("probe-{handler}-{tag}").to_lowercase();
    let mut name: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

fn shim_record(node: &RealNode) -> String {
    node.exec(&["cat", SHIM_RECORD]).unwrap_or_default()
}

/// A node just rebooted takes a moment to report Ready again; its kubelet admits pods then.
async fn wait_node_ready(cluster: &TestCluster, node: &RealNode) -> Result<()> {
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    wait_until(
        Duration::from_secs(120),
        &format!("node {} Ready before the probe pods", node.name),
        || async {
            let conds = nodes
                .get(&node.name)
                .await?
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default();
            Ok(conds
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"))
        },
    )
    .await
}

async fn create_probe_pod(
    cluster: &TestCluster,
    node: &RealNode,
    handler: &str,
    name: &str,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node.name, "runtimeClassName": handler,
                 "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
                                 "imagePullPolicy": "Never"}]}
    }))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating probe pod {name}"))?;
    Ok(())
}

/// Deletes the pod and waits until it is gone: its kubelet then makes no further attempt.
async fn delete_and_wait(cluster: &TestCluster, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let _ = pods
        .delete(name, &DeleteParams::default().grace_period(0))
        .await;
    wait_until(
        Duration::from_secs(60),
        &format!("probe pod {name} gone"),
        || async { Ok(pods.get_opt(name).await?.is_none()) },
    )
    .await
}

/// The pod's FailedCreatePodSandBox message; on a timeout, its events and containerd's
/// effective configuration of the handler (what explains a handler that does not start).
async fn sandbox_failure(
    cluster: &TestCluster,
    node: &RealNode,
    handler: &str,
    pod: &str,
) -> Result<String> {
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
    let list = || async {
        let l = events
            .list(&ListParams::default().fields(&format!("involvedObject.name={pod}")))
            .await?;
        Ok::<_, anyhow::Error>(l.items)
    };
    let failure = |items: &[Event]| {
        items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("FailedCreatePodSandBox"))
            .filter_map(|e| e.message.clone())
            .find(|m| m.contains("start"))
    };
    let waited = wait_until(
        Duration::from_secs(60),
        &format!("the sandbox of probe pod {pod} ({handler}) to fail in our shim"),
        || async { Ok(failure(&list().await?).is_some()) },
    )
    .await;
    if let Err(e) = waited {
        let seen: Vec<_> = list()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|e| format!("{:?}: {:?}", e.reason, e.message))
            .collect();
        let dump = ["/opt/containerd/bin/containerd", "containerd"]
            .iter()
            .find_map(|bin| node.exec(&[bin, "config", "dump"]).ok())
            .unwrap_or_default();
        let runtime: Vec<&str> = dump
            .lines()
            .skip_while(|l| !l.contains(&format!("runtimes.{handler}]")))
            .take(12)
            .collect();
        bail!(
            "{e:#}; the pod's events: {seen:?}; containerd's effective {handler} runtime:\n{}",
            runtime.join("\n")
        );
    }
    Ok(failure(&list().await?).unwrap_or_default())
}

/// A RuntimeClass per handler (named after it), created when missing.
async fn ensure_runtime_classes<'a>(
    cluster: &TestCluster,
    handlers: impl Iterator<Item = &'a str>,
) -> Result<()> {
    let rcs: Api<RuntimeClass> = Api::all(cluster.client.clone());
    for h in handlers {
        if rcs.get_opt(h).await?.is_some() {
            continue;
        }
        let rc: RuntimeClass = serde_json::from_value(serde_json::json!({
            "metadata": {"name": h}, "handler": h
        }))?;
        rcs.create(&PostParams::default(), &rc)
            .await
            .with_context(|| format!("creating RuntimeClass {h}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_pod_names_are_valid_whatever_the_tag() {
        assert_eq!(
            pod_name("kata-qemu", "selection narrowed, guest pull on"),
            "probe-kata-qemu-selection-narrowed--guest-pull-on"
        );
        let long = pod_name("kata-qemu-runtime-rs", &"x".repeat(100));
        assert!(long.len() <= 63 && !long.ends_with('-'), "{long}");
    }

    #[test]
    fn the_sandbox_id_is_read_from_the_kubelets_message() {
        let m = "Failed to create pod sandbox: rpc error: code = Unknown desc = failed to start sandbox \"cd91\": failed to create containerd task";
        assert_eq!(sandbox_id(m).as_deref(), Some("cd91"));
        assert_eq!(sandbox_id("Failed to create pod sandbox: no runtime"), None);
    }
}
