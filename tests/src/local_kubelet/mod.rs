//! `kata-local-kubelet`: a kubelet stand-in for "local" nodes.
//!
//! Pods bound to a node labelled `kata-testbed/local=true` run as host processes: each
//! container image maps to one of the project's built binaries (`--image NAME=PATH`, matched by
//! repository name), each process gets a private mount namespace with the pod's volumes bind
//! mounted (hostPath → `<hosts-dir>/<node>/<path>`, the node's fake host root), a pod-bound
//! ServiceAccount token, and the API server address in `KUBERNETES_SERVICE_HOST/PORT`. The
//! real pod status goes back through `pods/status`.
//!
//! Limits (documented, deliberate):
//! * restartPolicy is always `Never` (a container runs once; `OnFailure`/`Always` included);
//!   main containers run concurrently after the initContainers, in order;
//! * `kubectl logs` does not work (the API server proxies logs to a kubelet endpoint we do not
//!   serve): logs are files, `<work-dir>/<ns>_<pod>/<container>.log`, and the tail of each is
//!   printed (tracing WARN) when a pod fails;
//! * no probes, no resource limits, no securityContext: processes run as the stand-in's user
//!   (root) with the host's root filesystem plus the bind mounts; missing mount targets are
//!   created on the real filesystem (empty directories/files);
//! * a pod found already started by an earlier instance is failed, not re-run;
//! * container processes live in their own process groups: SIGTERM/SIGINT (or
//!   [`LocalKubeletHandle::shutdown`] / drop) kills them, a SIGKILLed stand-in leaves them behind;
//! * the test bed runs no node lifecycle controller, so the stand-in itself lifts the
//!   `node.kubernetes.io/not-ready` taint that admission puts on every new node once it reports
//!   the node Ready (and renews the node's Lease);
//! * `$(VAR)` references in command/args/env are expanded like Kubernetes does (`$$` → `$`).
//!
//! Running it (as root):
//!
//! ```text
//! kata-local-kubelet --kubeconfig $KATA_TESTBED_STATE/kubeconfig \
//!     --hosts-dir /tmp/hosts --work-dir /tmp/kubelet-work \
//!     --image kata-deploy-job-dispatcher=target/debug/kata-deploy-job-dispatcher \
//!     --image kata-deploy-stage=target/debug/kata-deploy-stage \
//!     --bind /tmp/payload=/opt/kata-payload:ro
//! ```
//!
//! then create nodes with [`local_node`] (label `kata-testbed/local=true`).
//! In-process use: [`LocalKubelet::spawn`] returns a handle whose [`LocalKubeletHandle::shutdown`]
//! (or drop) stops everything and kills the containers.

pub mod apiserver;
mod controller;
pub mod env;
pub mod error;
pub mod image;
pub mod node;
mod pod;
pub mod process;
pub mod status;
pub mod volumes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use error::{Error, Result};
pub use image::ImageMap;
pub use node::{local_node, DEFAULT_SELECTOR, LOCAL_LABEL};
pub use pod::request_pod_token;
pub use volumes::{parse_bind, Mount};

/// Settings of one stand-in instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// Admin kubeconfig (client-cert auth) of the cluster.
    pub kubeconfig: PathBuf,
    /// Root of the per-node fake host roots: `<hosts-dir>/<node>/`.
    pub hosts_dir: PathBuf,
    /// Per-pod scratch space and logs: `<work-dir>/<ns>_<pod>/`.
    pub work_dir: PathBuf,
    /// Image → binary table.
    pub images: ImageMap,
    /// Extra bind mounts for every container (e.g. the payload at `/opt/kata-payload`).
    pub binds: Vec<Mount>,
    /// Label selector of the nodes to serve.
    pub node_selector: String,
    /// Interval between node heartbeats.
    pub heartbeat: Duration,
}

impl Config {
    /// A config with the defaults for selector and heartbeat.
    pub fn new(kubeconfig: PathBuf, hosts_dir: PathBuf, work_dir: PathBuf) -> Self {
        Config {
            kubeconfig,
            hosts_dir,
            work_dir,
            images: ImageMap::default(),
            binds: vec![],
            node_selector: DEFAULT_SELECTOR.into(),
            heartbeat: Duration::from_secs(20),
        }
    }
}

/// Container processes alive right now: `<pod uid>/<container>` → pid (= process group).
type Procs = Arc<Mutex<BTreeMap<String, u32>>>;

/// State shared by every task of one instance.
struct Shared {
    client: Client,
    config: Config,
    api: apiserver::ApiEndpoint,
    procs: Procs,
}

/// Entry point of the stand-in.
pub struct LocalKubelet;

impl LocalKubelet {
    /// Connects to the cluster and starts serving local nodes in the background.
    pub async fn spawn(config: Config) -> Result<LocalKubeletHandle> {
        let api = apiserver::from_kubeconfig(&config.kubeconfig)?;
        let kc = Kubeconfig::read_from(&config.kubeconfig).map_err(|e| Error::Kubeconfig {
            path: config.kubeconfig.clone(),
            reason: e.to_string(),
        })?;
        let kcfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Kubeconfig {
                path: config.kubeconfig.clone(),
                reason: e.to_string(),
            })?;
        let client = Client::try_from(kcfg).map_err(|e| Error::kube("building client", e))?;
        for d in [&config.hosts_dir, &config.work_dir] {
            std::fs::create_dir_all(d).map_err(|e| Error::io("creating", d, e))?;
        }
        let procs = Procs::default();
        volumes::kubelet_started();
        let shared = Arc::new(Shared {
            client,
            config,
            api,
            procs: procs.clone(),
        });
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(controller::run(shared, rx));
        Ok(LocalKubeletHandle {
            shutdown: tx,
            task: Some(task),
            procs,
        })
    }
}

/// A running instance; dropping it kills every container process at once.
pub struct LocalKubeletHandle {
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    procs: Procs,
}

impl LocalKubeletHandle {
    /// Graceful stop: SIGTERM to every container, SIGKILL after a short grace, final statuses
    /// written, then the watch loops end.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
        self.kill_all();
    }

    /// Number of container processes currently running.
    pub fn running_containers(&self) -> usize {
        self.procs.lock().map(|p| p.len()).unwrap_or(0)
    }

    fn kill_all(&self) {
        if let Ok(procs) = self.procs.lock() {
            for pid in procs.values() {
                process::signal_group(*pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for LocalKubeletHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.kill_all();
        volumes::kubelet_stopped();
    }
}
