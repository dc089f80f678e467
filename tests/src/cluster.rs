//! `TestCluster`: a real control plane for tests, started by `hack/testenv/start.sh` or reused
//! from `KATA_TESTBED_STATE`, with helpers to make simulated nodes, per-test namespaces,
//! ServiceAccount identities with real tokens, and audit-log request counts.

use anyhow::{bail, Context, Result};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The repository root (tests run from their crate directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A built binary of this workspace (`cargo build --workspace --bins` must have run).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let profile = std::env::var("KATA_TEST_PROFILE").unwrap_or_else(|_| "debug".into());
    let path = target.join(profile).join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo build --workspace --bins` first (hack/test.sh does)",
            path.display()
        );
    }
    Ok(path)
}

/// A binary built by `hack/testenv/build.sh` (in `$KATA_TESTENV_CACHE/bin`).
pub fn testenv_bin(name: &str) -> PathBuf {
    std::env::var_os("KATA_TESTENV_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/testenv"))
        .join("bin")
        .join(name)
}

/// A running control plane.
pub struct TestCluster {
    state: PathBuf,
    owned: bool,
    /// Admin client.
    pub client: Client,
    /// API server URL.
    pub server: String,
}

/// The machine-wide registry of test-bed run ids and real-node slots (hack/testenv/lib.sh).
pub const TESTBED_REGISTRY: &str = "/run/kata-testbed";

/// Whether missing test-bed pieces must fail the test (CI) rather than skip it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

static NAMESPACE_SEQ: AtomicUsize = AtomicUsize::new(0);

impl TestCluster {
    /// Connects to the cluster in `KATA_TESTBED_STATE`, or starts a private one (stopped on drop,
    /// and by a watchdog if this process dies).
    pub async fn get() -> Result<Self> {
        if let Ok(state) = std::env::var("KATA_TESTBED_STATE") {
            return Self::connect(PathBuf::from(state), false).await;
        }
        Self::private().await
    }

    /// Always starts a cluster of this test's own (for faults that would disturb other tests,
    /// such as restarting the API server). Stopped on drop.
    pub async fn private() -> Result<Self> {
        let script = repo_root().join("hack/testenv/start.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(["--owner-pid", &std::process::id().to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}); build the test bed with hack/testenv/build.sh",
                script.display(),
                out.status
            );
        }
        let state = String::from_utf8(out.stdout)?
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        Self::connect(PathBuf::from(state), true).await
    }

    async fn connect(state: PathBuf, owned: bool) -> Result<Self> {
        let kubeconfig = state.join("kubeconfig");
        let client = client_from_kubeconfig(&kubeconfig).await?;
        let server = std::fs::read_to_string(&kubeconfig)?
            .lines()
            .find_map(|l| {
                l.split("server: \"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .map(str::to_owned)
            })
            .context("kubeconfig has no server")?;
        Ok(Self {
            state,
            owned,
            client,
            server,
        })
    }

    /// The state directory (kubeconfig, pki, audit.log, logs).
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The run id hack/testenv/start.sh claimed for this test bed (its Service range is
    /// 198.18.<id>.0/24; hack/testenv/lib.sh).
    pub fn run_id(&self) -> Result<u32> {
        let path = self.state.join("run-id");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} is not a run id: {text:?}", path.display()))
    }

    /// Path of the admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.state.join("kubeconfig")
    }

    /// A fresh namespace for one test (tests run in parallel).
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NAMESPACE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await?;
        // The token controller needs the default ServiceAccount before pods can be created.
        let sa: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &name);
        wait_until(
            Duration::from_secs(30),
            "default ServiceAccount",
            || async { Ok(sa.get_opt("default").await?.is_some()) },
        )
        .await?;
        Ok(name)
    }

    /// Creates simulated (kwok) nodes named `<prefix>-<i>` with realistic status; returns names
    /// once kwok has initialised every one (Ready) and each reports exactly the requested
    /// `nodeInfo` (runtime version, machine ID), so no test sees a half-made node.
    pub async fn sim_nodes(
        &self,
        prefix: &str,
        count: usize,
        spec: &SimNode,
    ) -> Result<Vec<String>> {
        let api: Api<Node> = Api::all(self.client.clone());
        let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
        let batch = format!("{:016x}", fxhash(prefix) as u64);
        let chunks: Vec<Vec<String>> = names.chunks(50).map(<[String]>::to_vec).collect();
        for chunk in chunks {
            let futs = chunk
                .iter()
                .map(|name| create_sim_node(&api, name, spec, &batch));
            for r in futures::future::join_all(futs).await {
                r?;
            }
        }
        await_sim_nodes_initialised(&api, &names, spec, &batch).await?;
        if !spec.taints.iter().any(|(k, _, _)| k == NOT_READY_TAINT) {
            for chunk in names.chunks(50) {
                let futs = chunk.iter().map(|n| lift_not_ready_taint(&api, n));
                for r in futures::future::join_all(futs).await {
                    r?;
                }
            }
        }
        Ok(names)
    }

    /// Creates local nodes `<prefix>-<i>` with fake host roots seeded under `hosts_dir`, labelled
    /// `kata-testbed/local=<local_value>` (a stand-in serves the nodes of one value); returns names.
    pub async fn local_nodes(
        &self,
        prefix: &str,
        count: usize,
        hosts_dir: &Path,
        local_value: &str,
        extra_labels: &BTreeMap<String, String>,
    ) -> Result<Vec<String>> {
        let api: Api<Node> = Api::all(self.client.clone());
        let mut names = Vec::new();
        for i in 0..count {
            let name = format!("{prefix}-{i}");
            crate::hostroot::seed_containerd_node(&hosts_dir.join(&name), &test_machine_id(&name))?;
            let mut labels = extra_labels.clone();
            labels.insert(crate::local_kubelet::LOCAL_LABEL.into(), local_value.into());
            labels.insert("kubernetes.io/hostname".into(), name.clone());
            labels.insert("kubernetes.io/os".into(), "linux".into());
            labels.insert("kubernetes.io/arch".into(), "amd64".into());
            let node: Node =
                serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
            api.create(&PostParams::default(), &node)
                .await
                .with_context(|| format!("creating local node {name}"))?;
            names.push(name);
        }
        Ok(names)
    }

    /// A client that acts as `namespace/sa` with a real token (RBAC really applies).
    pub async fn sa_client(&self, namespace: &str, sa: &str) -> Result<Client> {
        client_from_kubeconfig(&self.sa_kubeconfig(namespace, sa).await?).await
    }

    /// Writes a kubeconfig for `namespace/sa` (for binaries under test) and returns its path.
    pub async fn sa_kubeconfig(&self, namespace: &str, sa: &str) -> Result<PathBuf> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        if api.get_opt(sa).await?.is_none() {
            api.create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": sa}}))?,
            )
            .await?;
        }
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token: TokenRequest = api
            .create_subresource("token", sa, &PostParams::default(), &req)
            .await?;
        let token = token
            .status
            .context("token request returned no status")?
            .token;
        self.token_kubeconfig(&token, &format!("sa-{namespace}-{sa}"), Some(namespace))
    }

    /// Writes a kubeconfig that authenticates with `token` and returns its path.
    pub fn token_kubeconfig(
        &self,
        token: &str,
        name: &str,
        namespace: Option<&str>,
    ) -> Result<PathBuf> {
        let path = self.state.join(format!("{name}.kubeconfig"));
        let ca = self.state.join("pki/ca.crt");
        let namespace = namespace.unwrap_or("default");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: u\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: t\n  context: {{cluster: t, user: u, namespace: {namespace}}}\ncurrent-context: t\n",
                self.server,
                ca.display()
            ),
        )?;
        Ok(path)
    }

    /// A `helm` command for this cluster (`$HELM`, else the test bed's build).
    pub fn helm(&self) -> tokio::process::Command {
        let helm = std::env::var_os("HELM")
            .map(PathBuf::from)
            .unwrap_or_else(|| testenv_bin("helm"));
        let mut cmd = tokio::process::Command::new(helm);
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("HELM_CACHE_HOME", self.state.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.state.join("helm/config"))
            .env("HELM_DATA_HOME", self.state.join("helm/data"));
        cmd
    }

    /// Runs `helm ARGS` against this cluster; whether it succeeded and what it printed (echoed to
    /// the test's output).
    pub async fn run_helm(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = self
            .helm()
            .args(args)
            .output()
            .await
            .context("running helm")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("--- helm {args:?} -> {:?}\n{text}", out.status.code());
        Ok((out.status.success(), text))
    }

    /// Kills the API server, keeps it down for `down`, starts it again and waits until it is
    /// ready (`hack/testenv/restart-apiserver.sh`). Only on a [`TestCluster::private`] cluster.
    pub async fn restart_apiserver(&self, down: Duration) -> Result<()> {
        if !self.owned {
            bail!("restart_apiserver would disturb every other test: use TestCluster::private()");
        }
        let st = tokio::process::Command::new("bash")
            .arg(repo_root().join("hack/testenv/restart-apiserver.sh"))
            .arg(&self.state)
            .arg(down.as_secs().max(1).to_string())
            .status()
            .await?;
        if !st.success() {
            bail!("restart-apiserver.sh failed ({st})");
        }
        Ok(())
    }

    /// Requests by `user` recorded in the audit log, by verb (`create`, `list`, `watch`, ...).
    pub fn audit_requests(&self, user: &str) -> Result<BTreeMap<String, usize>> {
        let text =
            std::fs::read_to_string(self.state.join("audit.log")).context("reading audit.log")?;
        let mut counts = BTreeMap::new();
        for line in text.lines() {
            let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if ev["user"]["username"] == user && ev["stage"] == "ResponseComplete" {
                *counts
                    .entry(ev["verb"].as_str().unwrap_or("?").to_owned())
                    .or_default() += 1;
            }
        }
        Ok(counts)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if self.owned {
            // KATA_KEEP_TESTBED=1 keeps the state directory (audit log, component logs) to debug.
            let keep = std::env::var_os("KATA_KEEP_TESTBED").is_some_and(|v| v == "1");
            let _ = std::process::Command::new("bash")
                .arg(repo_root().join("hack/testenv/stop.sh"))
                .arg(&self.state)
                .args(keep.then_some("--keep"))
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
}

/// How simulated nodes look.
#[derive(Debug, Clone)]
pub struct SimNode {
    /// Extra labels.
    pub labels: BTreeMap<String, String>,
    /// Taints as (key, value, effect).
    pub taints: Vec<(String, String, String)>,
    /// e.g. `containerd://2.0.5`.
    pub container_runtime_version: String,
}

impl Default for SimNode {
    fn default() -> Self {
        Self {
            labels: BTreeMap::new(),
            taints: vec![],
            container_runtime_version: "containerd://2.0.5".into(),
        }
    }
}

/// The taint the API server puts on every new Node; the node-lifecycle controller lifts it once
/// the node is Ready. The test bed runs no such controller.
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";

/// Removes the not-ready taint from a Ready node, as the node-lifecycle controller would.
async fn lift_not_ready_taint(api: &Api<Node>, name: &str) -> Result<()> {
    let node = api.get(name).await?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    let kept: Vec<_> = taints.iter().filter(|t| t.key != NOT_READY_TAINT).collect();
    if kept.len() != taints.len() {
        // The whole list, merge-patched without a resourceVersion: kwok's heartbeats write the
        // status, not the spec, so nothing else changes the list meanwhile.
        let patch = json!({"spec": {"taints": kept}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("lifting the not-ready taint of {name}"))?;
    }
    Ok(())
}

/// Label grouping the simulated nodes of one `sim_nodes` call (waited on as a batch).
const SIM_BATCH_LABEL: &str = "kata-testbed/sim-batch";

async fn create_sim_node(api: &Api<Node>, name: &str, spec: &SimNode, batch: &str) -> Result<()> {
    let mut labels = spec.labels.clone();
    labels.insert(SIM_BATCH_LABEL.into(), batch.into());
    labels.insert("kubernetes.io/hostname".into(), name.into());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), "amd64".into());
    labels.insert("type".into(), "kwok".into());
    let mut taints: Vec<serde_json::Value> = spec
        .taints
        .iter()
        .map(|(k, v, e)| json!({"key": k, "value": v, "effect": e}))
        .collect();
    // Keeps the scheduler from placing unpinned pods (a dispatcher) on a node that runs nothing.
    taints.push(json!({"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}));
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
        "spec": {"taints": taints},
    }))?;
    api.create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating node {name}"))?;
    let machine_id = test_machine_id(name);
    let status = json!({"status": {"nodeInfo": {
        "machineID": machine_id, "systemUUID": machine_id, "bootID": "", "kernelVersion": "6.1.0",
        "osImage": "Debian GNU/Linux 12", "containerRuntimeVersion": spec.container_runtime_version,
        "kubeletVersion": "v1.34.4", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("setting status of node {name}"))?;
    Ok(())
}

/// The machine ID a simulated or local test node is given (stable per name).
pub fn test_machine_id(name: &str) -> String {
    format!("{:032x}", fxhash(name))
}

/// Waits until kwok has initialised every node of a batch (Ready) and checks that each reports
/// the `nodeInfo` the test set. kwok's node stages (hack/testenv/kwok-stages.yaml) never write
/// nodeInfo, so a mismatch here means that guarantee broke: fail loudly rather than let a test
/// read kwok's own values.
async fn await_sim_nodes_initialised(
    api: &Api<Node>,
    names: &[String],
    spec: &SimNode,
    batch: &str,
) -> Result<()> {
    let wanted: std::collections::BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let params = kube::api::ListParams::default().labels(&format!("{SIM_BATCH_LABEL}={batch}"));
    let deadline = Duration::from_secs(60 + names.len() as u64 / 50);
    let start = Instant::now();
    loop {
        let mut ready = 0;
        for node in api.list(&params).await?.items {
            let name = node.metadata.name.clone().unwrap_or_default();
            if !wanted.contains(name.as_str()) {
                continue;
            }
            let status = node.status.unwrap_or_default();
            let is_ready = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if !is_ready {
                continue;
            }
            let info = status.node_info.unwrap_or_default();
            if info.container_runtime_version != spec.container_runtime_version
                || info.machine_id != test_machine_id(&name)
            {
                bail!(
                    "simulated node {name} reports runtime {:?} and machine ID {:?}, not the {:?} and {:?} the test set: \
                     something other than the test wrote status.nodeInfo (check the node stages in hack/testenv/kwok-stages.yaml)",
                    info.container_runtime_version, info.machine_id, spec.container_runtime_version, test_machine_id(&name)
                );
            }
            ready += 1;
        }
        let missing = names.len() - ready;
        if missing == 0 {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("{missing} of {} simulated nodes not Ready after {deadline:?}: is kwok running (hack/testenv/start.sh)?", names.len());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A stable non-cryptographic hash (machine IDs of simulated nodes).
fn fxhash(s: &str) -> u128 {
    s.bytes().fold(0xcbf29ce484222325u128, |h, b| {
        (h ^ u128::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// A client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    Ok(Client::try_from(config_from_kubeconfig(path).await?)?)
}

/// The client configuration a kubeconfig file describes (to adjust before making a client).
pub async fn config_from_kubeconfig(path: &Path) -> Result<kube::Config> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
}

/// Polls `check` until it returns true, failing after `timeout` with `what` in the message.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
