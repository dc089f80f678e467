//! The watch loops: local nodes (by label selector) → one task per node that heartbeats the
//! node and watches the pods bound to it, starting, stopping and finalising them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{pin_mut, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::node::{ensure_machine_id, lease_body, node_status_patch, taints_without_not_ready};
use super::pod::{finalize_deletion, run_pod, StopRequest};
use super::Shared;

/// How long a pod's processes get on kubelet shutdown before SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const FIELD_MANAGER: &str = "kata-local-kubelet";

/// A task handle that aborts its task when dropped, so dropping (aborting) the stand-in's main
/// task tears down every node and pod task below it, unless detached first.
struct Owned(Option<JoinHandle<()>>);

impl Owned {
    fn spawn(f: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Owned(Some(tokio::spawn(f)))
    }

    /// Lets the task run on its own (e.g. a pod runner that still has to kill processes).
    fn detach(mut self) -> Option<JoinHandle<()>> {
        self.0.take()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// Watches local nodes and serves each one until `shutdown` flips to true.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let cfg = watcher::Config::default().labels(&shared.config.node_selector);
    let stream = watcher(nodes, cfg).default_backoff();
    pin_mut!(stream);
    let mut served: BTreeMap<String, (watch::Sender<bool>, Owned)> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    loop {
        let ev = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            ev = stream.next() => ev,
        };
        let ev = match ev {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                warn!(error = %e, "node watch error (retrying)");
                continue;
            }
            None => break,
        };
        let mut gone = vec![];
        match ev {
            watcher::Event::Init => seen.clear(),
            watcher::Event::InitApply(n) | watcher::Event::Apply(n) => {
                let Some(name) = n.metadata.name.clone() else {
                    continue;
                };
                seen.insert(name.clone());
                served.entry(name.clone()).or_insert_with(|| {
                    info!(node = %name, "serving local node");
                    let (tx, rx) = watch::channel(false);
                    (tx, Owned::spawn(serve_node(shared.clone(), name, rx)))
                });
            }
            watcher::Event::InitDone => {
                gone = served
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
            }
            watcher::Event::Delete(n) => gone.extend(n.metadata.name),
        }
        for name in gone {
            if let Some((tx, h)) = served.remove(&name) {
                info!(node = %name, "node gone (or no longer local): stopping its pods");
                let _ = tx.send(true);
                if let Some(h) = h.detach() {
                    let _ = h.await;
                }
            }
        }
    }
    for (_, (tx, _)) in served.iter() {
        let _ = tx.send(true);
    }
    for (_, (_, h)) in served {
        if let Some(h) = h.detach() {
            let _ = h.await;
        }
    }
}

/// One pod known to this node.
struct PodEntry {
    stop: watch::Sender<Option<StopRequest>>,
    /// Flips to true when the runner is done (it never ran for pods found finished).
    done: watch::Receiver<bool>,
    /// The runner, if the pod runs here.
    runner: Option<Owned>,
}

impl PodEntry {
    /// Forgets the pod but lets its runner finish stopping it.
    fn release(mut self) {
        if let Some(r) = self.runner.take() {
            r.detach();
        }
    }
}

/// Grace period for stopping a pod: the deletion's, else the spec's, else 30s.
fn grace_of(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(secs.max(0) as u64)
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

async fn serve_node(shared: Arc<Shared>, node: String, mut shutdown: watch::Receiver<bool>) {
    let heartbeat = Owned::spawn(heartbeat_loop(shared.clone(), node.clone()));
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher(pods, cfg).default_backoff();
    pin_mut!(stream);
    let mut table: BTreeMap<String, PodEntry> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    loop {
        let ev = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            ev = stream.next() => ev,
        };
        let ev = match ev {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                warn!(node = %node, error = %e, "pod watch error (retrying)");
                continue;
            }
            None => break,
        };
        match ev {
            watcher::Event::Init => seen.clear(),
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                if let Some(uid) = p.metadata.uid.clone() {
                    seen.insert(uid);
                }
                on_pod(&shared, &node, &mut table, p);
            }
            watcher::Event::InitDone => {
                let gone: Vec<String> = table
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for uid in gone {
                    if let Some(e) = table.remove(&uid) {
                        stop_once(&e, Duration::ZERO, false);
                        e.release();
                    }
                }
            }
            watcher::Event::Delete(p) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if let Some(e) = table.remove(&uid) {
                    stop_once(&e, grace_of(&p), false);
                    e.release();
                }
            }
        }
    }
    drop(heartbeat);
    // Shutdown: stop every pod's processes and wait for the runners to record it.
    let mut waits = vec![];
    for e in table.values() {
        stop_once(e, SHUTDOWN_GRACE, false);
        let mut done = e.done.clone();
        waits.push(async move {
            let _ = done.wait_for(|d| *d).await;
        });
    }
    let _ = tokio::time::timeout(
        SHUTDOWN_GRACE + Duration::from_secs(10),
        futures::future::join_all(waits),
    )
    .await;
}

fn stop_once(e: &PodEntry, grace: Duration, delete: bool) {
    e.stop.send_if_modified(|s| {
        if s.is_none() {
            *s = Some(StopRequest { grace, delete });
            true
        } else {
            false
        }
    });
}

/// Reacts to a pod add/update: start it once, stop it on deletion, finalise deleted pods.
fn on_pod(shared: &Arc<Shared>, node: &str, table: &mut BTreeMap<String, PodEntry>, pod: Pod) {
    let (Some(uid), Some(ns), Some(name)) = (
        pod.metadata.uid.clone(),
        pod.metadata.namespace.clone(),
        pod.metadata.name.clone(),
    ) else {
        return;
    };
    let deleting = pod.metadata.deletion_timestamp.is_some();
    if let Some(e) = table.get(&uid) {
        if deleting && e.stop.borrow().is_none_or(|s| !s.delete) {
            info!(pod = %format!("{ns}/{name}"), "pod deleted: stopping containers");
            // Even a runner already stopping for another reason must now delete.
            e.stop.send_replace(Some(StopRequest {
                grace: grace_of(&pod),
                delete: true,
            }));
            let mut done = e.done.clone();
            let client = shared.client.clone();
            tokio::spawn(async move {
                let _ = done.wait_for(|d| *d).await;
                finalize_deletion(&client, &ns, &name, &uid).await;
            });
        }
        return;
    }
    let (stop_tx, stop_rx) = watch::channel(None);
    let (done_tx, done_rx) = watch::channel(false);
    let started_before = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .is_some();
    if deleting {
        // Never ran here (or finished before we saw it): nothing to kill.
        let _ = done_tx.send(true);
        stop_tx.send_replace(Some(StopRequest {
            grace: Duration::ZERO,
            delete: true,
        }));
        let client = shared.client.clone();
        let (ns2, name2, uid2) = (ns.clone(), name.clone(), uid.clone());
        tokio::spawn(async move { finalize_deletion(&client, &ns2, &name2, &uid2).await });
    } else if is_terminal(&pod) {
        let _ = done_tx.send(true);
    } else if started_before {
        // Started by an earlier instance of this stand-in: its processes are gone and running
        // it twice could repeat non-idempotent work, so it is failed instead.
        let _ = done_tx.send(true);
        let client = shared.client.clone();
        let uid = uid.clone();
        tokio::spawn(async move {
            let api: Api<Pod> = Api::namespaced(client, &ns);
            let patch = json!({
                "metadata": {"uid": uid},
                "status": {"phase": "Failed", "reason": "LocalKubeletRestarted",
                           "message": "kata-local-kubelet restarted while the pod was running"},
            });
            if let Err(e) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                warn!(pod = %format!("{ns}/{name}"), error = %e, "failing orphaned pod");
            }
        });
    }
    let runner = (!deleting && !is_terminal(&pod) && !started_before).then(|| {
        let shared = shared.clone();
        let node = node.to_string();
        Owned::spawn(async move {
            run_pod(shared, pod, node, stop_rx).await;
            let _ = done_tx.send(true);
        })
    });
    table.insert(
        uid,
        PodEntry {
            stop: stop_tx,
            done: done_rx,
            runner,
        },
    );
}

async fn heartbeat_loop(shared: Arc<Shared>, node: String) {
    loop {
        if let Err(e) = heartbeat(&shared, &node).await {
            warn!(node = %node, error = %e, "node heartbeat failed");
        }
        tokio::time::sleep(shared.config.heartbeat).await;
    }
}

/// One heartbeat: node status (Ready, nodeInfo, capacity) and the node Lease.
pub async fn heartbeat(shared: &Shared, node: &str) -> super::error::Result<()> {
    use super::error::Error;
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let n = nodes
        .get(node)
        .await
        .map_err(|e| Error::kube(format!("get node {node}"), e))?;
    let root = shared.config.hosts_dir.join(node);
    let uid = n.metadata.uid.clone().unwrap_or_default();
    let machine_id =
        ensure_machine_id(&root, &uid).map_err(|e| Error::io("writing machine-id", &root, e))?;
    let now = Timestamp::now();
    // The returned object carries the resourceVersion the taint update below must match.
    let n = nodes
        .patch_status(
            node,
            &PatchParams::default(),
            &Patch::Merge(node_status_patch(&n, &machine_id, &now)),
        )
        .await
        .map_err(|e| Error::kube(format!("patch node status {node}"), e))?;
    if let Some(taints) = taints_without_not_ready(&n) {
        // resourceVersion makes this a compare-and-swap: a concurrent taint change wins and
        // the next heartbeat retries.
        let patch = json!({
            "metadata": {"resourceVersion": n.metadata.resource_version},
            "spec": {"taints": taints},
        });
        match nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => info!(node = %node, "lifted not-ready taint"),
            // Not fatal: the Lease below still gets renewed.
            Err(e) => warn!(node = %node, error = %e, "lifting not-ready taint (will retry)"),
        }
    }
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), "kube-node-lease");
    leases
        .patch(
            node,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(lease_body(node, &uid, &now)),
        )
        .await
        .map_err(|e| Error::kube(format!("renew lease {node}"), e))?;
    Ok(())
}
