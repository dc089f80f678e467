//! Runs one pod: fetch what it references, materialise its volumes, run initContainers in
//! order and then the main containers (concurrently), reporting status along the way.
//!
//! restartPolicy is treated as `Never` whatever it says: a container runs once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodCondition, Secret, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use super::env::{container_env, expand, referenced_objects, EnvList, PodContext, PodObjects};
use super::error::{Error, Result};
use super::image::resolve_argv;
use super::node::LOCAL_IP;
use super::process::{self, ProcessSpec};
use super::status::{
    build_status, carry_transition_times, exit_reason, termination_message, CState,
    ContainerRecord, PodRecord,
};
use super::volumes::{
    container_mounts, plan_volume, prepare_host_path, service_account_files, wants_sa_mount,
    write_atomic, FileContent, MountInputs, PlannedVolume, VolumeFile, VolumeKind,
};
use super::Shared;

/// Asks a pod's runner to stop its containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopRequest {
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Delete the pod object (grace 0) once everything is down: it had a deletionTimestamp.
    pub delete: bool,
}

/// How long the runner waits for objects the pod needs to show up (default ServiceAccount,
/// `kube-root-ca.crt`...) before failing the pod.
const DEPENDENCY_WAIT: Duration = Duration::from_secs(30);

/// Which container of the pod.
#[derive(Debug, Clone, Copy)]
struct Slot {
    init: bool,
    index: usize,
}

/// A token file to keep fresh while the pod runs.
#[derive(Debug, Clone)]
struct TokenFile {
    path: PathBuf,
    audience: Option<String>,
    expiration_seconds: i64,
    mode: u32,
}

/// Per-volume host directory and whether it is always read-only.
type VolumeDirs = BTreeMap<String, (PathBuf, bool)>;

struct PodRun {
    shared: Arc<Shared>,
    pod: Pod,
    ns: String,
    name: String,
    uid: String,
    dir: PathBuf,
    ctx: PodContext,
    record: Mutex<PodRecord>,
    /// Conditions last written, to keep their transition times.
    last_conditions: std::sync::Mutex<Vec<PodCondition>>,
    stop: watch::Receiver<Option<StopRequest>>,
}

/// Runs the pod to completion (or until stopped) and reports its final status.
pub async fn run_pod(
    shared: Arc<Shared>,
    pod: Pod,
    node: String,
    stop: watch::Receiver<Option<StopRequest>>,
) {
    let run = match PodRun::new(shared, pod, node, stop) {
        Some(r) => r,
        None => return,
    };
    info!(pod = %run.key(), "starting pod");
    if let Err(e) = run.execute().await {
        warn!(pod = %run.key(), error = %e, "pod failed before its containers could run");
        run.fail_remaining("CreateContainerConfigError", &e.to_string())
            .await;
    }
    run.publish().await;
    let phase = super::status::phase(&*run.record.lock().await);
    info!(pod = %run.key(), phase, "pod finished");
    if phase == "Failed" {
        run.print_logs();
    }
    // Deleting the pod object (when it was deleted) is the controller's job: it waits for
    // this function to return, so there is no window between our check and our exit.
}

/// Deletes a pod with grace period 0 (what the kubelet does once the containers are gone).
pub async fn finalize_deletion(client: &Client, ns: &str, name: &str, uid: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => info!(pod = %format!("{ns}/{name}"), "pod deleted"),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => warn!(pod = %format!("{ns}/{name}"), error = %e, "deleting pod"),
    }
}

impl PodRun {
    fn new(
        shared: Arc<Shared>,
        pod: Pod,
        node: String,
        stop: watch::Receiver<Option<StopRequest>>,
    ) -> Option<Self> {
        let ns = pod.metadata.namespace.clone()?;
        let name = pod.metadata.name.clone()?;
        let uid = pod.metadata.uid.clone()?;
        let spec = pod.spec.as_ref()?;
        let has_init = spec.init_containers.as_ref().is_some_and(|v| !v.is_empty());
        let waiting = |c: &Container, reason: &str| {
            ContainerRecord::waiting(&c.name, c.image.as_deref().unwrap_or(""), reason)
        };
        let main_reason = if has_init {
            "PodInitializing"
        } else {
            "ContainerCreating"
        };
        let record = PodRecord {
            uid: uid.clone(),
            init: spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| waiting(c, "PodInitializing"))
                .collect(),
            main: spec
                .containers
                .iter()
                .map(|c| waiting(c, main_reason))
                .collect(),
            start_time: Timestamp::now(),
            ip: LOCAL_IP.into(),
        };
        let dir = shared.config.work_dir.join(format!("{ns}_{name}"));
        let ctx = PodContext {
            node_name: node,
            pod_ip: LOCAL_IP.into(),
            host_ip: LOCAL_IP.into(),
            api_host: shared.api.host.clone(),
            api_port: shared.api.port,
        };
        Some(PodRun {
            shared,
            pod,
            ns,
            name,
            uid,
            dir,
            ctx,
            record: Mutex::new(record),
            last_conditions: Default::default(),
            stop,
        })
    }

    fn key(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    fn stopped(&self) -> bool {
        self.stop.borrow().is_some()
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.shared.client.clone(), &self.ns)
    }

    /// Writes the current status through `pods/status` (serialised by the record lock, so an
    /// older state never overwrites a newer one). The UID in the patch makes it a precondition.
    async fn publish(&self) {
        let rec = self.record.lock().await;
        let mut status = build_status(&rec, &Timestamp::now());
        {
            let mut last = self.last_conditions.lock().unwrap();
            if let Some(new) = status.conditions.as_mut() {
                carry_transition_times(new, &last);
                *last = new.clone();
            }
        }
        let patch = json!({"metadata": {"uid": self.uid}, "status": status});
        for attempt in 0..3 {
            match self
                .pods()
                .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return,
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return,
                Err(e) => {
                    warn!(pod = %self.key(), attempt, error = %e, "writing pod status");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn set_state(&self, slot: Slot, state: CState, image_id: Option<String>) {
        {
            let mut rec = self.record.lock().await;
            let list = if slot.init {
                &mut rec.init
            } else {
                &mut rec.main
            };
            list[slot.index].state = state;
            if let Some(id) = image_id {
                list[slot.index].image_id = id;
            }
        }
        self.publish().await;
    }

    /// Marks the first unfinished initContainer (or every unfinished main container) as failed
    /// with a reason, so the pod ends Failed instead of hanging in Pending.
    async fn fail_remaining(&self, reason: &str, message: &str) {
        let mut rec = self.record.lock().await;
        let failed = |c: &mut ContainerRecord| {
            if !matches!(c.state, CState::Terminated { .. }) {
                c.state = CState::Terminated {
                    exit_code: 128,
                    signal: None,
                    reason: reason.into(),
                    message: Some(message.into()),
                    started: None,
                    finished: Timestamp::now(),
                };
            }
        };
        match rec
            .init
            .iter_mut()
            .find(|c| !matches!(c.state, CState::Terminated { .. }))
        {
            Some(c) => failed(c),
            None => rec.main.iter_mut().for_each(failed),
        }
    }

    fn print_logs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail = super::status::log_tail(text.as_bytes(), 40, 4096);
                warn!(pod = %self.key(), log = %p.display(), "container log (tail):\n{tail}");
            }
        }
    }

    async fn execute(&self) -> Result<()> {
        if self.dir.exists() {
            // A previous pod of the same name: its scratch space is stale.
            std::fs::remove_dir_all(&self.dir)
                .map_err(|e| Error::io("clearing pod dir", &self.dir, e))?;
        }
        for d in [self.dir.join("volumes"), self.dir.join("home")] {
            std::fs::create_dir_all(&d).map_err(|e| Error::io("creating", &d, e))?;
        }
        self.publish().await;

        let sa_name = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let sa = self.wait_service_account(&sa_name).await?;
        let (objects, planned) = self.fetch_and_plan().await?;
        let (volumes, mut tokens) = self.materialize(&planned, &sa_name).await?;
        let sa_dir = if wants_sa_mount(&self.pod, sa.automount_service_account_token) {
            let dir = self.dir.join("serviceaccount");
            let files = service_account_files(&self.shared.api.ca_pem, &self.ns);
            tokens.extend(self.write_files(&dir, &files, &sa_name).await?);
            Some(dir)
        } else {
            None
        };
        // Aborted when this function returns or is cancelled.
        let _refresher = AbortOnDrop(self.spawn_token_refresher(tokens, sa_name.clone()));

        let spec = self.pod.spec.clone().unwrap_or_default();
        let rc = RunContext {
            objects,
            volumes,
            sa_dir,
        };
        let mut init_ok = true;
        for (i, c) in spec.init_containers.iter().flatten().enumerate() {
            let code = self
                .run_container(
                    c,
                    Slot {
                        init: true,
                        index: i,
                    },
                    &rc,
                )
                .await;
            if code != Some(0) {
                init_ok = false;
                break;
            }
        }
        if init_ok {
            let runs = spec.containers.iter().enumerate().map(|(i, c)| {
                self.run_container(
                    c,
                    Slot {
                        init: false,
                        index: i,
                    },
                    &rc,
                )
            });
            join_all(runs).await;
        }
        Ok(())
    }

    async fn wait_service_account(&self, name: &str) -> Result<ServiceAccount> {
        let api: Api<ServiceAccount> = Api::namespaced(self.shared.client.clone(), &self.ns);
        let deadline = tokio::time::Instant::now() + DEPENDENCY_WAIT;
        loop {
            match api.get_opt(name).await {
                Ok(Some(sa)) => return Ok(sa),
                Ok(None) if tokio::time::Instant::now() < deadline => {}
                Ok(None) => {
                    return Err(Error::spec(
                        &self.key(),
                        "-",
                        format!("serviceaccount {name:?} not found"),
                    ))
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::kube(
                        format!("get serviceaccount {}/{name}", self.ns),
                        e,
                    ))
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn fetch_objects(&self) -> Result<PodObjects> {
        let (cms, secrets) = referenced_objects(&self.pod);
        let mut objs = PodObjects::default();
        let cm_api: Api<ConfigMap> = Api::namespaced(self.shared.client.clone(), &self.ns);
        for name in cms {
            let got = cm_api
                .get_opt(&name)
                .await
                .map_err(|e| Error::kube(format!("get configmap {}/{name}", self.ns), e))?;
            if let Some(cm) = got {
                let mut data: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                data.extend(
                    cm.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                objs.config_maps.insert(name, data);
            }
        }
        let s_api: Api<Secret> = Api::namespaced(self.shared.client.clone(), &self.ns);
        for name in secrets {
            let got = s_api
                .get_opt(&name)
                .await
                .map_err(|e| Error::kube(format!("get secret {}/{name}", self.ns), e))?;
            if let Some(s) = got {
                let mut data: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                data.extend(
                    s.string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                );
                objs.secrets.insert(name, data);
            }
        }
        Ok(objs)
    }

    /// Fetches referenced objects and plans the volumes, retrying for a while: right after a
    /// namespace is created, `kube-root-ca.crt` may not be published yet.
    async fn fetch_and_plan(&self) -> Result<(PodObjects, Vec<PlannedVolume>)> {
        let node_root = self.shared.config.hosts_dir.join(&self.ctx.node_name);
        let deadline = tokio::time::Instant::now() + DEPENDENCY_WAIT;
        loop {
            let objects = self.fetch_objects().await?;
            let planned: std::result::Result<Vec<_>, String> = self
                .pod
                .spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .map(|v| plan_volume(&self.pod, v, &objects, &self.ctx, &node_root))
                .collect();
            match planned {
                Ok(p) => return Ok((objects, p)),
                Err(e) if tokio::time::Instant::now() >= deadline || self.stopped() => {
                    return Err(Error::spec(&self.key(), "-", e))
                }
                Err(e) => {
                    info!(pod = %self.key(), reason = %e, "waiting for volume sources");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    async fn materialize(
        &self,
        planned: &[PlannedVolume],
        sa_name: &str,
    ) -> Result<(VolumeDirs, Vec<TokenFile>)> {
        let mut dirs = VolumeDirs::new();
        let mut tokens = vec![];
        for v in planned {
            let ro = v.always_read_only();
            let dir = match &v.kind {
                VolumeKind::HostPath { dir, type_ } => {
                    prepare_host_path(dir, type_).map_err(|e| Error::spec(&self.key(), "-", e))?;
                    dir.clone()
                }
                VolumeKind::EmptyDir => {
                    let d = self.dir.join("volumes").join(&v.name);
                    std::fs::create_dir_all(&d).map_err(|e| Error::io("creating", &d, e))?;
                    d
                }
                VolumeKind::Files(files) => {
                    let d = self.dir.join("volumes").join(&v.name);
                    std::fs::create_dir_all(&d).map_err(|e| Error::io("creating", &d, e))?;
                    tokens.extend(self.write_files(&d, files, sa_name).await?);
                    d
                }
            };
            dirs.insert(v.name.clone(), (dir, ro));
        }
        Ok((dirs, tokens))
    }

    async fn write_files(
        &self,
        dir: &std::path::Path,
        files: &[VolumeFile],
        sa_name: &str,
    ) -> Result<Vec<TokenFile>> {
        let mut tokens = vec![];
        for f in files {
            let path = dir.join(&f.path);
            let bytes = match &f.content {
                FileContent::Bytes(b) => b.clone(),
                FileContent::Token {
                    audience,
                    expiration_seconds,
                } => {
                    tokens.push(TokenFile {
                        path: path.clone(),
                        audience: audience.clone(),
                        expiration_seconds: *expiration_seconds,
                        mode: f.mode,
                    });
                    self.request_token(sa_name, audience.clone(), *expiration_seconds)
                        .await?
                        .into_bytes()
                }
            };
            write_atomic(&path, &bytes, f.mode).map_err(|e| Error::io("writing", &path, e))?;
        }
        Ok(tokens)
    }

    /// A TokenRequest bound to this pod: the API server adds the pod and node claims and
    /// invalidates the token once the pod is gone.
    async fn request_token(
        &self,
        sa: &str,
        audience: Option<String>,
        expiration_seconds: i64,
    ) -> Result<String> {
        request_pod_token(
            &self.shared.client,
            &self.ns,
            sa,
            &self.name,
            &self.uid,
            audience,
            expiration_seconds,
        )
        .await
    }

    fn spawn_token_refresher(
        &self,
        tokens: Vec<TokenFile>,
        sa: String,
    ) -> tokio::task::JoinHandle<()> {
        let client = self.shared.client.clone();
        let (ns, name, uid, key) = (
            self.ns.clone(),
            self.name.clone(),
            self.uid.clone(),
            self.key(),
        );
        tokio::spawn(async move {
            let Some(min) = tokens.iter().map(|t| t.expiration_seconds).min() else {
                return;
            };
            // Like the kubelet: refresh at 80% of the lifetime.
            let every = Duration::from_secs((min.max(600) as u64) * 4 / 5);
            loop {
                tokio::time::sleep(every).await;
                for t in &tokens {
                    match request_pod_token(
                        &client,
                        &ns,
                        &sa,
                        &name,
                        &uid,
                        t.audience.clone(),
                        t.expiration_seconds,
                    )
                    .await
                    {
                        Ok(tok) => {
                            if let Err(e) = write_atomic(&t.path, tok.as_bytes(), t.mode) {
                                warn!(pod = %key, error = %e, "refreshing token file");
                            }
                        }
                        Err(e) => warn!(pod = %key, error = %e, "refreshing token"),
                    }
                }
            }
        })
    }

    /// Runs one container; returns its exit code, or `None` when it was never started because
    /// the pod is being stopped.
    async fn run_container(&self, c: &Container, slot: Slot, rc: &RunContext) -> Option<i32> {
        if self.stopped() {
            return None;
        }
        let key = self.key();
        let prepared = self.prepare(c, rc);
        let spec = match prepared {
            Ok(s) => s,
            Err((reason, msg)) => {
                warn!(pod = %key, container = %c.name, reason, message = %msg, "container cannot run");
                self.terminate_unstarted(slot, reason, msg).await;
                return Some(128);
            }
        };
        let mut child = match process::spawn(&spec) {
            Ok(ch) => ch,
            Err(e) => {
                warn!(pod = %key, container = %c.name, error = %e, "container failed to start");
                self.terminate_unstarted(slot, "StartError", e.to_string())
                    .await;
                return Some(128);
            }
        };
        let pid = child.id().unwrap_or(0);
        let proc_key = format!("{}/{}", self.uid, c.name);
        self.shared
            .procs
            .lock()
            .unwrap()
            .insert(proc_key.clone(), pid);
        let started = Timestamp::now();
        info!(pod = %key, container = %c.name, pid, program = %spec.argv.program.display(), "container started");
        let image_id = format!("local-binary://{}", spec.argv.program.display());
        self.set_state(slot, CState::Running { started }, Some(image_id))
            .await;

        let mut stop = self.stop.clone();
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut terminating = false;
        let status = loop {
            tokio::select! {
                s = child.wait() => break s,
                changed = stop.changed(), if !terminating => {
                    terminating = true;
                    let grace = match changed {
                        Ok(()) => stop.borrow().map(|r| r.grace).unwrap_or_default(),
                        Err(_) => Duration::ZERO, // runner abandoned: no grace
                    };
                    info!(pod = %key, container = %c.name, ?grace, "stopping container");
                    process::signal_group(pid, libc::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + grace);
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or_else(tokio::time::Instant::now)), if kill_at.is_some() => {
                    process::signal_group(pid, libc::SIGKILL);
                    kill_at = None;
                }
            }
        };
        // The container is gone: so is anything it left running (as with a PID namespace).
        process::signal_group(pid, libc::SIGKILL);
        self.shared.procs.lock().unwrap().remove(&proc_key);
        let (exit_code, signal) = match status {
            Ok(s) => process::exit_code(s),
            Err(e) => {
                warn!(pod = %key, container = %c.name, error = %e, "waiting for container");
                (255, None)
            }
        };
        let file = std::fs::read(self.termination_file(c)).unwrap_or_default();
        let log = std::fs::read(&spec.log).unwrap_or_default();
        let message = termination_message(
            &file,
            c.termination_message_policy.as_deref(),
            exit_code,
            &log,
        );
        info!(pod = %key, container = %c.name, exit_code, "container exited");
        self.set_state(
            slot,
            CState::Terminated {
                exit_code,
                signal,
                reason: exit_reason(exit_code).into(),
                message,
                started: Some(started),
                finished: Timestamp::now(),
            },
            None,
        )
        .await;
        Some(exit_code)
    }

    async fn terminate_unstarted(&self, slot: Slot, reason: &str, message: String) {
        self.set_state(
            slot,
            CState::Terminated {
                exit_code: 128,
                signal: None,
                reason: reason.into(),
                message: Some(message),
                started: None,
                finished: Timestamp::now(),
            },
            None,
        )
        .await;
    }

    fn termination_file(&self, c: &Container) -> PathBuf {
        self.dir.join(format!("{}.termination-log", c.name))
    }

    /// Everything `process::spawn` needs; on error, the waiting/terminated reason and message.
    fn prepare(
        &self,
        c: &Container,
        rc: &RunContext,
    ) -> std::result::Result<ProcessSpec, (&'static str, String)> {
        let config_err = |m: String| ("CreateContainerConfigError", m);
        let image = c.image.clone().unwrap_or_default();
        let user_env = container_env(&self.pod, c, &rc.objects, &self.ctx).map_err(config_err)?;
        // Baseline a container image would provide; HOME points into the pod's scratch space
        // so nothing (e.g. a kube client looking for ~/.kube/config) sees the host's home.
        let mut env = EnvList::default();
        env.set(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        env.set("HOSTNAME", self.name.clone());
        env.set("HOME", self.dir.join("home").display().to_string());
        for (k, v) in user_env.0 {
            env.set(k, v);
        }
        let lookup = |n: &str| env.get(n).map(str::to_string);
        let command: Vec<String> = c
            .command
            .iter()
            .flatten()
            .map(|s| expand(s, lookup))
            .collect();
        let args: Vec<String> = c.args.iter().flatten().map(|s| expand(s, lookup)).collect();
        let mapped = self.shared.config.images.lookup(&image);
        let argv = resolve_argv(&image, mapped, &command, &args).ok_or_else(|| {
            (
                "ErrImageNeverPull",
                Error::UnmappedImage {
                    pod: self.key(),
                    container: c.name.clone(),
                    image: image.clone(),
                }
                .to_string(),
            )
        })?;
        let term_file = self.termination_file(c);
        std::fs::write(&term_file, b"")
            .map_err(|e| config_err(format!("{}: {e}", term_file.display())))?;
        let term_target = PathBuf::from(
            c.termination_message_path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/dev/termination-log".into()),
        );
        let inputs = MountInputs {
            volumes: rc.volumes.clone(),
            extra: &self.shared.config.binds,
            service_account: rc.sa_dir.clone(),
            termination: Some((term_file, term_target)),
        };
        let mounts = container_mounts(c, &env, &inputs).map_err(config_err)?;
        Ok(ProcessSpec {
            argv,
            env: env.0,
            working_dir: c
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .map(PathBuf::from),
            mounts,
            log: self.dir.join(format!("{}.log", c.name)),
        })
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What every container of a pod shares.
struct RunContext {
    objects: PodObjects,
    volumes: VolumeDirs,
    sa_dir: Option<PathBuf>,
}

/// Requests a ServiceAccount token bound to a pod (`boundObjectRef` kind Pod).
pub async fn request_pod_token(
    client: &Client,
    ns: &str,
    sa: &str,
    pod: &str,
    uid: &str,
    audience: Option<String>,
    expiration_seconds: i64,
) -> Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                uid: Some(uid.into()),
            }),
        },
        ..Default::default()
    };
    let resp = api
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .map_err(|e| Error::kube(format!("token for serviceaccount {ns}/{sa} (pod {pod})"), e))?;
    resp.status.map(|s| s.token).ok_or_else(|| {
        Error::spec(
            &format!("{ns}/{pod}"),
            "-",
            "TokenRequest returned no token",
        )
    })
}
