//! The label logic against a real API server (the project's test bed: `KATA_TESTBED_STATE`, or
//! a private control plane started by `kata_testbed::TestCluster`). Simulated (kwok) nodes have
//! no runtimeHandlers, which exercises "log and continue". Skips when the test bed is not
//! built, except with CI set, where it fails.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kata_deploy_stage::config::Install;
use kata_deploy_stage::label::NodeLabeler;
use kata_testbed::cluster::{in_ci, SimNode, TestCluster};
use kube::api::{Api, DeleteParams, Patch, PatchParams};

async fn labels(api: &Api<Node>, name: &str) -> BTreeMap<String, String> {
    api.get(name)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default()
}

fn ours(l: &BTreeMap<String, String>) -> Vec<String> {
    l.keys()
        .filter(|k| k.starts_with("katacontainers.io/"))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_lifecycle_against_a_real_api_server() {
    let cluster = match TestCluster::get().await {
        Ok(c) => c,
        Err(e) if !in_ci() => {
            eprintln!(
                "SKIPPED: no test bed ({e:#}); run hack/testenv/build.sh or set KATA_TESTBED_STATE"
            );
            return;
        }
        Err(e) => panic!("test bed unavailable in CI: {e:#}"),
    };
    let prefix = format!("kata-label-{}", std::process::id());
    let names = cluster
        .sim_nodes(&prefix, 1, &SimNode::default())
        .await
        .unwrap();
    let name = names[0].clone();
    let api: Api<Node> = Api::all(cluster.client.clone());
    let uid = api.get(&name).await.unwrap().metadata.uid.unwrap();
    let a = Install::new("", "/opt/kata");
    let b = Install::new("cicd", "/opt/kata");
    let la = NodeLabeler::with_client(cluster.client.clone(), name.clone(), uid.clone());
    let lb = NodeLabeler::with_client(cluster.client.clone(), name.clone(), uid.clone());

    // A node name reused by another machine (different UID) is never labelled.
    let wrong =
        NodeLabeler::with_client(cluster.client.clone(), name.clone(), "not-the-uid".into());
    let e = wrong.claim(&a).await.unwrap_err();
    assert!(e.to_string().contains("reused"), "{e}");
    assert!(ours(&labels(&api, &name).await).is_empty());

    // Claim before host changes; idempotent.
    assert!(la.claim(&a).await.unwrap());
    assert!(!la.claim(&a).await.unwrap());

    // Label once Ready (kwok), with no runtimeHandlers reported: log and continue. A label
    // wiped meanwhile (kubelet re-registration on k3s/rke2) is re-applied.
    let wiper = {
        let api = api.clone();
        let name = name.clone();
        tokio::spawn(async move {
            for _ in 0..300 {
                if labels(&api, &name)
                    .await
                    .contains_key("katacontainers.io/kata-runtime")
                {
                    let p = serde_json::json!({"metadata": {"labels": {"katacontainers.io/kata-runtime": null}}});
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&p))
                        .await
                        .unwrap();
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        })
    };
    la.label_installed(
        &a,
        &["kata-qemu".into()],
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert!(wiper.await.unwrap(), "the wiper never saw the label");
    let l = labels(&api, &name).await;
    assert_eq!(
        l.get("katacontainers.io/kata-runtime").map(String::as_str),
        Some("true"),
        "wiped label re-applied: {l:?}"
    );
    assert_eq!(
        l.get("katacontainers.io/kata-deploy-installed")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        l.get("kubernetes.io/hostname"),
        Some(&name),
        "foreign labels untouched"
    );

    // A second install; removing the first keeps the shared label.
    lb.claim(&b).await.unwrap();
    lb.label_installed(
        &b,
        &["kata-qemu-cicd".into()],
        Duration::from_secs(30),
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    la.unlabel(&a).await.unwrap();
    la.unclaim(&a).await.unwrap();
    let l = labels(&api, &name).await;
    assert_eq!(
        l.get("katacontainers.io/kata-deploy-state-cicd")
            .map(String::as_str),
        Some("installed"),
        "the second install's state: {l:?}"
    );
    assert_eq!(
        ours(&l),
        [
            "katacontainers.io/kata-deploy-claimed-cicd",
            "katacontainers.io/kata-deploy-installed-cicd",
            "katacontainers.io/kata-deploy-state-cicd",
            "katacontainers.io/kata-runtime"
        ]
    );
    lb.unlabel(&b).await.unwrap();
    assert_eq!(
        labels(&api, &name)
            .await
            .get("katacontainers.io/kata-deploy-state-cicd")
            .map(String::as_str),
        Some("cleaning")
    );
    lb.unclaim(&b).await.unwrap();
    assert!(ours(&labels(&api, &name).await).is_empty());
    // Unlabel on a clean node: no-op.
    assert!(!lb.unlabel(&b).await.unwrap());

    api.delete(&name, &DeleteParams::default()).await.unwrap();
}
