//! End-to-end tests of `kata-local-kubelet` against a real control plane.
//!
//! Needs a running test-bed cluster: `KATA_TESTBED_STATE=<state dir with kubeconfig>` (see
//! `hack/testenv/start.sh`). Without it the tests fail under `CI=true` and are skipped (with a
//! printed reason) otherwise. Needs root (mount namespaces).
//!
//! Each test creates its own namespace and local node, whose `kata-testbed/local` label value is
//! a per-test id that only its own in-process stand-in selects on, so tests (and other stand-ins
//! on the same cluster) do not serve each other's nodes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kata_testbed::cluster::in_ci;
use kata_testbed::local_kubelet::{
    local_node, Config, ImageMap, LocalKubelet, LocalKubeletHandle, LOCAL_LABEL,
};
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::json;

/// The image our tests map to `/bin/sh` (registry and tag are ignored by the mapping).
const SH_IMAGE: &str = "example.org/testbed/lk-sh:1";

fn state_dir() -> Option<PathBuf> {
    match std::env::var_os("KATA_TESTBED_STATE") {
        Some(s) => Some(PathBuf::from(s)),
        None if in_ci() => {
            panic!("KATA_TESTBED_STATE is not set (CI=true): start a cluster with hack/testenv/start.sh")
        }
        None => {
            eprintln!("SKIPPED: KATA_TESTBED_STATE is not set (start a cluster with hack/testenv/start.sh)");
            None
        }
    }
}

/// One test's world: namespace, local node, stand-in, scratch dirs.
struct Bed {
    client: Client,
    /// Per-test id: the value of the node's `kata-testbed/local` label.
    id: String,
    kubeconfig: PathBuf,
    ns: String,
    node: String,
    hosts: tempfile::TempDir,
    work: tempfile::TempDir,
    kubelet: Option<LocalKubeletHandle>,
}

impl Bed {
    /// A bed served by an in-process stand-in.
    async fn new(tag: &str) -> Option<Bed> {
        let mut bed = Bed::without_kubelet(tag).await?;
        let mut config = Config::new(
            bed.kubeconfig.clone(),
            bed.hosts.path().into(),
            bed.work.path().into(),
        );
        config.images = ImageMap::new([("lk-sh", "/bin/sh")]);
        config.node_selector = format!("{LOCAL_LABEL}={}", bed.id);
        config.heartbeat = Duration::from_secs(5);
        bed.kubelet = Some(LocalKubelet::spawn(config).await.expect("start stand-in"));
        Some(bed)
    }

    /// Namespace, node and scratch dirs only.
    async fn without_kubelet(tag: &str) -> Option<Bed> {
        let state = state_dir()?;
        let kubeconfig = state.join("kubeconfig");
        let kc = Kubeconfig::read_from(&kubeconfig).expect("reading kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
        let client = Client::try_from(cfg).expect("client");
        let id = format!(
            "{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                % 100_000
        );
        let ns = format!("lk-{id}");
        let node = format!("lk-node-{id}");
        let nss: Api<Namespace> = Api::all(client.clone());
        let mut n = Namespace::default();
        n.metadata.name = Some(ns.clone());
        nss.create(&PostParams::default(), &n)
            .await
            .expect("create namespace");
        // The local label carries this test's id instead of "true", so that neither another
        // test's stand-in nor a default-selector stand-in running on the same cluster serves it.
        let mut local = local_node(&node);
        local
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(LOCAL_LABEL.into(), id.clone());
        let nodes: Api<Node> = Api::all(client.clone());
        nodes
            .create(&PostParams::default(), &local)
            .await
            .expect("create node");

        Some(Bed {
            client,
            id,
            kubeconfig,
            ns,
            node,
            hosts: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
            kubelet: None,
        })
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn create_pod(&self, spec: serde_json::Value) -> Pod {
        let mut pod: Pod = serde_json::from_value(spec).expect("pod json");
        pod.spec.as_mut().unwrap().node_name = Some(self.node.clone());
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod")
    }

    /// Polls the pod until `done` holds; panics with its status and logs after `timeout`.
    async fn wait_pod(&self, name: &str, timeout: Duration, done: impl Fn(&Pod) -> bool) -> Pod {
        let start = Instant::now();
        loop {
            let p = self.pods().get(name).await.expect("get pod");
            if done(&p) {
                return p;
            }
            if start.elapsed() > timeout {
                panic!(
                    "pod {name} not as expected after {timeout:?}; status: {}\nlogs:\n{}",
                    serde_json::to_string_pretty(&p.status).unwrap(),
                    self.logs(name)
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn wait_finished(&self, name: &str) -> Pod {
        self.wait_pod(name, Duration::from_secs(90), |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await
    }

    fn pod_dir(&self, name: &str) -> PathBuf {
        self.work.path().join(format!("{}_{name}", self.ns))
    }

    fn logs(&self, name: &str) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.pod_dir(name)) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    out += &format!(
                        "--- {}\n{}",
                        e.path().display(),
                        std::fs::read_to_string(e.path()).unwrap_or_default()
                    );
                }
            }
        }
        out
    }

    fn node_root(&self) -> PathBuf {
        self.hosts.path().join(&self.node)
    }

    async fn teardown(mut self) {
        if let Some(k) = self.kubelet.take() {
            k.shutdown().await;
        }
        let nss: Api<Namespace> = Api::all(self.client.clone());
        let _ = nss.delete(&self.ns, &DeleteParams::default()).await;
        let nodes: Api<Node> = Api::all(self.client.clone());
        let _ = nodes.delete(&self.node, &DeleteParams::default()).await;
    }
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn terminated(
    p: &Pod,
    init: bool,
    idx: usize,
) -> k8s_openapi::api::core::v1::ContainerStateTerminated {
    let s = p.status.as_ref().expect("status");
    let list = if init {
        s.init_container_statuses.as_ref()
    } else {
        s.container_statuses.as_ref()
    };
    list.expect("container statuses")[idx]
        .state
        .as_ref()
        .and_then(|s| s.terminated.clone())
        .unwrap_or_else(|| panic!("container {idx} (init={init}) not terminated: {s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_pod_reports_exit_code_message_and_writes_fake_host_root() {
    let Some(bed) = Bed::new("fail").await else {
        return;
    };
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(bed.client.clone(), &bed.ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "cfg"}, "data": {"greeting": "hello"}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    // The script's target directory exists in the fake host root, as it would on a node.
    std::fs::create_dir_all(bed.node_root().join("var/lib/lk")).unwrap();
    bed.create_pod(json!({
        "metadata": {"name": "fail"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main",
                "image": SH_IMAGE,
                "args": ["-c", "echo \"$GREETING from $NODE in $NS ($UID_SET) $(pwd)\" > /host/var/lib/lk/out.txt; echo some log; printf 'custom failure' > /dev/termination-log; exit 3"],
                "env": [
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                    {"name": "UID_SET", "value": "uid=$(POD_UID)"},
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}}
                ],
                "workingDir": "/host/var/lib/lk",
                "volumeMounts": [{"name": "host", "mountPath": "/host"}]
            }],
            "volumes": [{"name": "host", "hostPath": {"path": "/"}}]
        }
    }))
    .await;
    let p = bed.wait_finished("fail").await;
    assert_eq!(phase(&p), "Failed", "{:?}", p.status);
    let t = terminated(&p, false, 0);
    assert_eq!(t.exit_code, 3);
    assert_eq!(t.reason.as_deref(), Some("Error"));
    assert_eq!(t.message.as_deref(), Some("custom failure"));
    let uid = p.metadata.uid.clone().unwrap();
    let out = std::fs::read_to_string(bed.node_root().join("var/lib/lk/out.txt")).unwrap();
    assert_eq!(
        out,
        format!(
            "hello from {} in {} (uid={uid}) /host/var/lib/lk\n",
            bed.node, bed.ns
        )
    );
    // The log is a file in the work dir.
    assert!(bed.logs("fail").contains("some log"));
    // The node is reported Ready with a machine ID from its fake host root.
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let n = nodes.get(&bed.node).await.unwrap();
    let st = n.status.unwrap();
    let ready = st
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    let info = st.node_info.unwrap();
    let mid = std::fs::read_to_string(bed.node_root().join("etc/machine-id")).unwrap();
    assert_eq!(info.machine_id, mid.trim());
    assert_eq!(info.container_runtime_version, "containerd://1.6.20");
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_to_logs_and_unmapped_image() {
    let Some(bed) = Bed::new("logs").await else {
        return;
    };
    bed.create_pod(json!({
        "metadata": {"name": "fallback"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                // Requests make the pod Burstable: status updates must leave qosClass alone.
                {"name": "a", "image": SH_IMAGE, "terminationMessagePolicy": "FallbackToLogsOnError",
                 "resources": {"requests": {"cpu": "10m"}},
                 "args": ["-c", "echo first; echo last line >&2; exit 1"]},
                {"name": "b", "image": "example.org/not-mapped:1"}
            ]
        }
    }))
    .await;
    let p = bed.wait_finished("fallback").await;
    assert_eq!(phase(&p), "Failed");
    let a = terminated(&p, false, 0);
    assert_eq!(a.exit_code, 1);
    assert_eq!(a.message.as_deref(), Some("first\nlast line"));
    let b = terminated(&p, false, 1);
    assert_eq!(b.exit_code, 128);
    assert_eq!(b.reason.as_deref(), Some("ErrImageNeverPull"));
    assert!(b.message.unwrap().contains("not-mapped"));
    bed.teardown().await;
}

/// The token file the process saw (admission-projected `kube-api-access-*` or our own).
fn find_token(dir: &Path) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(t) = find_token(&p) {
                return Some(t);
            }
        } else if p.file_name().is_some_and(|n| n == "token") {
            return Some(p);
        }
    }
    None
}

fn jwt_claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("JWT payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("claims json")
}

fn curl_available() -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v curl"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found && in_ci() {
        panic!("curl is needed by the ServiceAccount token test");
    }
    found
}

/// Script: GET the pod itself with the mounted token; prints the HTTP code.
const SELF_GET: &str = r#"SA=/var/run/secrets/kubernetes.io/serviceaccount
code=$(curl -sS -o /dev/null -w '%{http_code}' --cacert $SA/ca.crt \
  -H "Authorization: Bearer $(cat $SA/token)" \
  "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/$(cat $SA/namespace)/pods/$POD")"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_volumes_and_pod_bound_token() {
    let Some(bed) = Bed::new("ok").await else {
        return;
    };
    if !curl_available() {
        // curl_available() itself fails the test when in_ci(): only a developer machine skips.
        eprintln!("SKIPPED: curl not found");
        bed.teardown().await;
        return;
    }
    // A ServiceAccount allowed to read pods, and the default one that is not.
    let sas: Api<ServiceAccount> = Api::namespaced(bed.client.clone(), &bed.ns);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("reader".into());
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let roles: Api<Role> = Api::namespaced(bed.client.clone(), &bed.ns);
    let mut role = Role::default();
    role.metadata.name = Some("pod-reader".into());
    role.rules = Some(vec![PolicyRule {
        api_groups: Some(vec!["".into()]),
        resources: Some(vec!["pods".into()]),
        verbs: vec!["get".into()],
        ..Default::default()
    }]);
    roles.create(&PostParams::default(), &role).await.unwrap();
    let rbs: Api<RoleBinding> = Api::namespaced(bed.client.clone(), &bed.ns);
    let mut rb = RoleBinding::default();
    rb.metadata.name = Some("reader".into());
    rb.role_ref = RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: "Role".into(),
        name: "pod-reader".into(),
    };
    rb.subjects = Some(vec![Subject {
        kind: "ServiceAccount".into(),
        name: "reader".into(),
        namespace: Some(bed.ns.clone()),
        ..Default::default()
    }]);
    rbs.create(&PostParams::default(), &rb).await.unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(bed.client.clone(), &bed.ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "sec"}, "stringData": {"a": "secret-a", "b": "secret-b"}
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    let pod = |name: &str, sa: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": sa,
                "initContainers": [{
                    "name": "prepare", "image": SH_IMAGE,
                    "args": ["-c", "echo from-init > /scratch/init.txt"],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]
                }],
                "containers": [{
                    "name": "main", "image": SH_IMAGE,
                    "args": ["-c", format!("{SELF_GET}\nprintf '%s %s %s' \"$(cat /scratch/init.txt)\" \"$(cat /etc/lk-secret/only-b)\" \"$code\" > /dev/termination-log; [ \"$code\" = 200 ]")],
                    "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "volumeMounts": [
                        {"name": "scratch", "mountPath": "/scratch"},
                        {"name": "sec", "mountPath": "/etc/lk-secret"}
                    ]
                }],
                "volumes": [
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "sec", "secret": {"secretName": "sec", "items": [{"key": "b", "path": "only-b"}]}}
                ]
            }
        })
    };
    bed.create_pod(pod("allowed", "reader")).await;
    bed.create_pod(pod("denied", "default")).await;

    let p = bed.wait_finished("allowed").await;
    let init = terminated(&p, true, 0);
    assert_eq!(
        (init.exit_code, init.reason.as_deref()),
        (0, Some("Completed"))
    );
    let main = terminated(&p, false, 0);
    assert_eq!(
        main.message.as_deref(),
        Some("from-init secret-b 200"),
        "logs: {}",
        bed.logs("allowed")
    );
    assert_eq!(
        (main.exit_code, main.reason.as_deref()),
        (0, Some("Completed"))
    );
    assert_eq!(phase(&p), "Succeeded");

    // The token is bound to the pod, and the API server added the node it runs on.
    let token = find_token(&bed.pod_dir("allowed")).expect("token file");
    let claims = jwt_claims(&std::fs::read_to_string(token).unwrap());
    let k = &claims["kubernetes.io"];
    assert_eq!(k["pod"]["name"], "allowed", "{claims}");
    assert_eq!(k["pod"]["uid"], p.metadata.uid.clone().unwrap().as_str());
    assert_eq!(k["serviceaccount"]["name"], "reader");
    assert_eq!(k["node"]["name"], bed.node.as_str(), "{claims}");

    // Without the permission, the same request is forbidden.
    let d = bed.wait_finished("denied").await;
    let main = terminated(&d, false, 0);
    assert_eq!(main.message.as_deref(), Some("from-init secret-b 403"));
    assert_eq!(phase(&d), "Failed");
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_pod_kills_it_and_removes_the_object() {
    let Some(bed) = Bed::new("del").await else {
        return;
    };
    bed.create_pod(json!({
        "metadata": {"name": "sleeper"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "main", "image": SH_IMAGE,
                // Exits on SIGTERM (after a marker), proving the graceful signal arrives.
                "args": ["-c", "trap 'echo got TERM; exit 0' TERM; echo up; sleep 600 & wait"]
            }]
        }
    }))
    .await;
    bed.wait_pod("sleeper", Duration::from_secs(60), |p| {
        phase(p) == "Running"
    })
    .await;
    assert_eq!(bed.kubelet.as_ref().unwrap().running_containers(), 1);
    bed.pods()
        .delete("sleeper", &DeleteParams::default())
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        match bed.pods().get_opt("sleeper").await.unwrap() {
            None => break,
            Some(p) if start.elapsed() > Duration::from_secs(25) => {
                panic!("pod not removed: {:?}\n{}", p.status, bed.logs("sleeper"))
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
    assert_eq!(bed.kubelet.as_ref().unwrap().running_containers(), 0);
    assert!(
        bed.logs("sleeper").contains("got TERM"),
        "{}",
        bed.logs("sleeper")
    );
    bed.teardown().await;
}

/// The binary: flags, serving a node, and SIGTERM killing the containers (status written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_pods_and_stops_them_on_sigterm() {
    let Some(bed) = Bed::without_kubelet("bin").await else {
        return;
    };
    let log = bed.work.path().join("kubelet.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kata-local-kubelet"))
        .arg("--kubeconfig")
        .arg(&bed.kubeconfig)
        .arg("--hosts-dir")
        .arg(bed.hosts.path())
        .arg("--work-dir")
        .arg(bed.work.path())
        .args(["--image", "quay.io/x/lk-sh=/bin/sh"])
        .args(["--bind", "/etc/hostname=/opt/lk-extra/hostname:ro"])
        .args(["--node-selector", &format!("{LOCAL_LABEL}={}", bed.id)])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start kata-local-kubelet");
    // On a failed assertion, SIGTERM (not SIGKILL) so the stand-in still kills its containers.
    struct TermOnDrop(u32);
    impl Drop for TermOnDrop {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
        }
    }
    let _guard = TermOnDrop(child.id().unwrap());
    bed.create_pod(json!({
        "metadata": {"name": "long"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": SH_IMAGE,
                            // `$$$$`: Kubernetes turns `$$` into `$`, the shell gets `$$`.
                            "args": ["-c", "cat /opt/lk-extra/hostname; echo $$$$ > /tmp/lk-pid-$POD; sleep 600"],
                            "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}]}]
        }
    }))
    .await;
    let p = bed
        .wait_pod("long", Duration::from_secs(60), |p| phase(p) == "Running")
        .await;
    let pid_file = format!("/tmp/lk-pid-{}", p.metadata.uid.clone().unwrap());
    let start = Instant::now();
    let pid: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no pid file; logs: {}",
            bed.logs("long")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = std::fs::remove_file(&pid_file);
    let hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    assert!(
        bed.logs("long").contains(&hostname),
        "--bind not applied: {}",
        bed.logs("long")
    );

    // SIGTERM: the stand-in stops the container, reports it, and exits 0.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("kata-local-kubelet did not exit on SIGTERM")
        .unwrap();
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        unsafe { libc::kill(pid, 0) } != 0,
        "container process {pid} survived the stand-in"
    );
    let p = bed.wait_finished("long").await;
    assert_eq!(phase(&p), "Failed");
    let t = terminated(&p, false, 0);
    assert_eq!((t.exit_code, t.signal), (143, Some(15)));
    bed.teardown().await;
}
