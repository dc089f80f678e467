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

/// For each `(handler, shim binary)`: a pod with that RuntimeClass on `node`, and the shim
/// call containerd made for its sandbox, which must be that binary's `start` for the sandbox id.
/// The pods are deleted afterwards. `tag` keeps pod names unique across calls.
pub async fn probe_handlers(
    cluster: &TestCluster,
    node: &RealNode,
    handlers: &[(String, String)],
    tag: &str,
) -> Result<BTreeMap<String, ProbeResult>> {
    ensure_runtime_classes(cluster, handlers.iter().map(|(h, _)| h.as_str())).await?;
    // A node just rebooted takes a moment to report Ready again; its kubelet admits pods then.
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
    .await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let mut names = BTreeMap::new();
    for (handler, _) in handlers {
        let name = format!("probe-{}-{tag}", handler.replace('_', "-")).to_lowercase();
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
        names.insert(handler.clone(), name);
    }
    let outcome = collect(cluster, node, handlers, &names).await;
    for name in names.values() {
        let _ = pods
            .delete(name, &DeleteParams::default().grace_period(0))
            .await;
    }
    outcome
}

async fn collect(
    cluster: &TestCluster,
    node: &RealNode,
    handlers: &[(String, String)],
    names: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, ProbeResult>> {
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
    let failure = |pod: String| {
        let events = events.clone();
        async move {
            let list = events
                .list(&ListParams::default().fields(&format!("involvedObject.name={pod}")))
                .await?;
            Ok::<_, anyhow::Error>(
                list.items
                    .iter()
                    .filter(|e| e.reason.as_deref() == Some("FailedCreatePodSandBox"))
                    .filter_map(|e| e.message.clone())
                    .find(|m| sandbox_id(m).is_some()),
            )
        }
    };
    let mut out = BTreeMap::new();
    for (handler, shim) in handlers {
        let pod = names[handler].clone();
        let waited = wait_until(
            Duration::from_secs(60),
            &format!("the sandbox of probe pod {pod} ({handler}) to fail in our shim"),
            || async { Ok(failure(pod.clone()).await?.is_some()) },
        )
        .await;
        if let Err(e) = waited {
            let seen: Vec<_> = events
                .list(&ListParams::default().fields(&format!("involvedObject.name={pod}")))
                .await
                .map(|l| {
                    l.items
                        .into_iter()
                        .map(|e| format!("{:?}: {:?}", e.reason, e.message))
                        .collect()
                })
                .unwrap_or_default();
            // What containerd runs with (its effective configuration) says why a handler failed.
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
        let message = failure(pod.clone()).await?.unwrap_or_default();
        let sandbox = sandbox_id(&message).unwrap_or_default();
        let record = node.exec(&["cat", SHIM_RECORD]).unwrap_or_default();
        let Some(call) = record
            .lines()
            .find(|l| l.contains(&format!("-id {sandbox} start")))
        else {
            bail!("{handler} on {}: no shim call for sandbox {sandbox} (message: {message}); shim record:\n{record}", node.name);
        };
        if !call.starts_with(shim.as_str()) {
            bail!(
                "{handler} on {}: containerd started {call:?}, not our shim {shim}",
                node.name
            );
        }
        out.insert(
            handler.clone(),
            ProbeResult {
                message,
                sandbox,
                shim_call: call.to_string(),
            },
        );
    }
    Ok(out)
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
    fn the_sandbox_id_is_read_from_the_kubelets_message() {
        let m = "Failed to create pod sandbox: rpc error: code = Unknown desc = failed to start sandbox \"cd91\": failed to create containerd task";
        assert_eq!(sandbox_id(m).as_deref(), Some("cd91"));
        assert_eq!(sandbox_id("Failed to create pod sandbox: no runtime"), None);
    }
}
