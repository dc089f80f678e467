//! Every manifest the chart renders, for the default values and each example values file, is
//! accepted by the real API server (server-side dry run), and so are the per-node Job templates
//! once the dispatcher has pinned them to a node.

use anyhow::{bail, Context, Result};
use kata_testbed::cluster::{repo_root, TestCluster};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

const CLUSTER_SCOPED: &[&str] = &[
    "ClusterRole",
    "ClusterRoleBinding",
    "RuntimeClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "Namespace",
];

async fn dry_run_create(cluster: &TestCluster, ns: &str, obj: &serde_json::Value) -> Result<()> {
    let api_version = obj["apiVersion"].as_str().context("apiVersion")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = obj["kind"].as_str().context("kind")?;
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    // An object may name its own namespace (the dispatcher's Node-Events Role lives in "default").
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or(ns);
    let api: Api<DynamicObject> = if CLUSTER_SCOPED.contains(&kind) {
        Api::all_with(cluster.client.clone(), &ar)
    } else {
        Api::namespaced_with(cluster.client.clone(), ns, &ar)
    };
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    api.create(&pp, &serde_json::from_value(obj.clone())?)
        .await
        .with_context(|| format!("the API server rejected {kind} {}", obj["metadata"]["name"]))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_manifests_pass_server_side_dry_run() -> Result<()> {
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("manifests").await?;
    let chart = repo_root().join("chart/kata-deploy");
    let variants: Vec<Vec<String>> = vec![
        vec![],
        vec![
            "-f".into(),
            chart
                .join("try-kata-nvidia-gpu.values.yaml")
                .display()
                .to_string(),
        ],
        vec![
            "-f".into(),
            chart.join("try-kata-tee.values.yaml").display().to_string(),
        ],
        vec![
            "--set".into(),
            "env.multiInstallSuffix=cicd".into(),
            "--set".into(),
            "shims.qemu.containerd.snapshotter=nydus".into(),
        ],
        vec![
            "--set".into(),
            "runtimeClasses.createDefault=true".into(),
            "--set".into(),
            format!("verification.namespace={ns}"),
            "--set-file".into(),
            format!(
                "verification.pod={}",
                repo_root()
                    .join("chart/fixtures/verification-pod.yaml")
                    .display()
            ),
        ],
    ];
    // Upstream-shaped values (our fixtures with upstream kata-deploy's keys and shapes) install too.
    let fixtures = repo_root().join("chart/fixtures");
    let mut names: Vec<String> = std::fs::read_dir(&fixtures)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("upstream-") && !n.contains("daemonset"))
        .collect();
    names.sort();
    assert!(names.len() >= 7, "the upstream-shaped fixtures: {names:?}");
    let variants: Vec<Vec<String>> = variants
        .into_iter()
        .chain(
            names
                .iter()
                .map(|n| vec!["-f".into(), fixtures.join(n).display().to_string()]),
        )
        .collect();
    let mut checked = 0;
    for extra in variants {
        let out = cluster
            .helm()
            .args([
                "template",
                "kata-deploy",
                chart.to_str().unwrap(),
                "--namespace",
                &ns,
                "--kube-version",
                "1.34.4",
            ])
            .args([
                "--api-versions",
                "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
            ])
            .args(&extra)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "helm template {extra:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8(out.stdout)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let obj: serde_json::Value = serde::Deserialize::deserialize(doc)?;
            if obj.is_null() {
                continue;
            }
            let mut obj = obj;
            if obj["kind"] == "Pod" {
                // The verification hook Pod names a RuntimeClass that a dry run never created.
                assert!(
                    obj["spec"]["runtimeClassName"].is_string(),
                    "the verification Pod keeps its RuntimeClass"
                );
                obj["spec"]
                    .as_object_mut()
                    .context("Pod spec")?
                    .remove("runtimeClassName");
            }
            dry_run_create(&cluster, &ns, &obj)
                .await
                .with_context(|| format!("values {extra:?}"))?;
            checked += 1;
            // The per-node Job templates, pinned as the dispatcher pins them.
            if obj["kind"] == "ConfigMap" && obj["data"]["install-job.yaml"].is_string() {
                for key in ["install-job.yaml", "cleanup-job.yaml"] {
                    let mut job: serde_json::Value =
                        serde_yaml::from_str(obj["data"][key].as_str().unwrap())?;
                    job["metadata"]["name"] =
                        format!("probe-{}", key.trim_end_matches(".yaml")).into();
                    job["spec"]["template"]["spec"]["nodeName"] = "some-node".into();
                    dry_run_create(&cluster, &ns, &job)
                        .await
                        .with_context(|| format!("{key} with values {extra:?}"))?;
                    checked += 1;
                }
            }
        }
    }
    assert!(
        checked > 100,
        "expected every object of every rendering, checked {checked}"
    );
    Ok(())
}

/// `helm install` with bad values on the real cluster: refused with an error naming the value,
/// and nothing is left behind (no release, no object in the namespace or cluster-wide).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_refused_and_install_nothing() -> Result<()> {
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("badvalues").await?;
    let chart = repo_root().join("chart/kata-deploy");
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "parallelism 0",
            &["--set", "job.parallelism=0"],
            "/job/parallelism",
        ),
        (
            "suffix not a DNS label",
            &["--set", "env.multiInstallSuffix=CI_run"],
            "/env/multiInstallSuffix",
        ),
        (
            "DaemonSet mode",
            &["--set", "deploymentMode=daemonset"],
            "this chart implements job mode",
        ),
        (
            "no shim enabled",
            &["--set", "shims.disableAll=true"],
            "no shim is enabled",
        ),
        (
            "unknown selector operator",
            &[
                "--set-json",
                r#"job.nodeSelectorExpressions=[{"key":"a","operator":"Equals","values":["x"]}]"#,
            ],
            "operator",
        ),
        (
            "restricted annotation without opt-in",
            &[
                "--set-json",
                r#"shims.qemu.allowedHypervisorAnnotations=["path"]"#,
            ],
            "allowRestrictedAnnotations",
        ),
        (
            "upstream NFD subchart",
            &["--set", "node-feature-discovery.enabled=true"],
            "helm install nfd",
        ),
        (
            "a malformed startupTaints entry",
            &[
                "--set-json",
                r#"startupTaints=["katacontainers.io/kata-runtime:Sometimes"]"#,
            ],
            "key[=value][:Effect]",
        ),
        (
            "upstream containerd.configDir",
            &["--set", "containerd.configDir=/etc/my-containerd"],
            "containerd.configDir",
        ),
        (
            "agent proxy the kernel command line cannot carry",
            &[
                "--set",
                "shims.qemu-snp.agent.httpsProxy=http://proxy:3128 x",
            ],
            "shims.qemu-snp.agent.httpsProxy",
        ),
    ];
    for (i, (name, values, want)) in cases.iter().enumerate() {
        let release = format!("bad-{i}");
        let out = cluster
            .helm()
            .args([
                "install",
                &release,
                chart.to_str().unwrap(),
                "--namespace",
                &ns,
                "--wait",
                "--timeout",
                "60s",
            ])
            .args(*values)
            .output()
            .await?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: helm install succeeded");
        assert!(
            err.contains(want),
            "{name}: the error should name {want:?}: {err}"
        );
        let selector = format!("app.kubernetes.io/instance={release}");
        for (group, version, kind) in [
            ("batch", "v1", "Job"),
            ("", "v1", "ConfigMap"),
            ("", "v1", "ServiceAccount"),
            ("", "v1", "Secret"),
            ("rbac.authorization.k8s.io", "v1", "Role"),
            ("rbac.authorization.k8s.io", "v1", "RoleBinding"),
            ("rbac.authorization.k8s.io", "v1", "ClusterRole"),
            ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
            ("node.k8s.io", "v1", "RuntimeClass"),
        ] {
            let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
            let api: Api<DynamicObject> = if CLUSTER_SCOPED.contains(&kind) {
                Api::all_with(cluster.client.clone(), &ar)
            } else {
                Api::namespaced_with(cluster.client.clone(), &ns, &ar)
            };
            let left = api
                .list(&kube::api::ListParams::default().labels(&selector))
                .await?;
            assert!(
                left.items.is_empty(),
                "{name}: {kind} left behind: {:?}",
                left.items
                    .iter()
                    .map(|o| o.metadata.name.clone())
                    .collect::<Vec<_>>()
            );
        }
        // Helm keeps release records as Secrets labelled owner=helm,name=<release>.
        let secrets: Api<DynamicObject> = Api::namespaced_with(
            cluster.client.clone(),
            &ns,
            &ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Secret")),
        );
        let records = secrets
            .list(&kube::api::ListParams::default().labels(&format!("owner=helm,name={release}")))
            .await?;
        assert!(
            records.items.is_empty(),
            "{name}: a Helm release record was left"
        );
    }
    Ok(())
}
