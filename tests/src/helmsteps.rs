//! Day-2 steps through `helm` and the dispatcher on real nodes: a release configuration (which
//! shims, guest pull, a custom runtime, debug, which nodes), its values file, and the check that
//! every real node serves exactly what the release says after the step.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use crate::cluster::{wait_until, TestCluster};
use crate::probe::{probe_handlers, Reach};
use crate::realnode::RealNode;

/// The node label a narrowed selection adds to `job.nodeSelector`.
pub const NARROW_LABEL: &str = "kata-testbed/helm-walk";
/// The label the install stages put on a node that serves this release's runtimes.
pub const KATA_LABEL: &str = "katacontainers.io/kata-runtime";
/// The chart's default install prefix.
pub const PREFIX: &str = "/opt/kata";
/// The unit of the nydus snapshotter the chart installs for guest pull.
pub const NYDUS_UNIT: &str = "nydus-for-kata-tee.service";
/// Its socket.
pub const NYDUS_SOCKET: &str = "/run/nydus-for-kata-tee/containerd-nydus-grpc.sock";

/// One configuration of the release: what a day-2 `helm upgrade` changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReleaseShape {
    pub qemu: bool,
    pub runtime_rs: bool,
    pub coco: bool,
    /// coco-dev pulls in the guest through nydus (only while the 1.6 node is not selected).
    pub guest_pull: bool,
    /// A custom runtime with its own handler (`team-sandbox`, based on qemu).
    pub custom: bool,
    pub debug: bool,
    /// Only nodes carrying [`NARROW_LABEL`] are selected.
    pub narrowed: bool,
}

impl ReleaseShape {
    /// The values file of this shape (on top of the chart's defaults).
    pub fn values_yaml(&self) -> String {
        let selector = if self.narrowed {
            format!("{{kata-testbed/real: \"true\", {NARROW_LABEL}: \"true\"}}")
        } else {
            "{kata-testbed/real: \"true\"}".to_string()
        };
        let snapshotter = if self.guest_pull { "nydus" } else { "\"\"" };
        format!(
            "debug: {debug}
shims:
  disableAll: true
  qemu: {{enabled: {qemu}}}
  qemu-runtime-rs: {{enabled: {rs}}}
  qemu-coco-dev: {{enabled: {coco}, containerd: {{snapshotter: {snapshotter}}}}}
customRuntimes:
  enabled: {custom}
  runtimes:
    team:
      baseConfig: qemu
      runtimeClass: |
        kind: RuntimeClass
        apiVersion: node.k8s.io/v1
        metadata: {{name: team-sandbox}}
        handler: team-sandbox
job:
  nodeSelector: {selector}
  dispatcher:
    nodeSelector: {{kata-testbed/real: \"true\"}}
",
            debug = self.debug,
            qemu = self.qemu,
            rs = self.runtime_rs,
            coco = self.coco,
            custom = self.custom,
        )
    }

    /// Each handler the release serves, with what its pod must reach: the shim binary
    /// containerd starts for it, or, with guest pull, our nydus snapshotter.
    pub fn handlers(&self) -> Vec<(String, Reach)> {
        let go = Reach::Shim(format!("{PREFIX}/bin/containerd-shim-kata-v2"));
        let rs = Reach::Shim(format!("{PREFIX}/runtime-rs/bin/containerd-shim-kata-v2"));
        let coco = if self.guest_pull {
            Reach::Snapshotter(NYDUS_SOCKET.into())
        } else {
            go.clone()
        };
        [
            (self.qemu, "kata-qemu", go.clone()),
            (self.runtime_rs, "kata-qemu-runtime-rs", rs),
            (self.coco, "kata-qemu-coco-dev", coco),
            (self.custom, "team-sandbox", go),
        ]
        .into_iter()
        .filter(|(on, _, _)| *on)
        .map(|(_, h, reach)| (h.to_string(), reach))
        .collect()
    }
}

/// The kata handlers (and the custom one) the kubelet of `name` reports (containerd >= 2 only).
async fn reported_handlers(nodes: &Api<Node>, name: &str) -> Result<BTreeSet<String>> {
    Ok(nodes
        .get(name)
        .await?
        .status
        .and_then(|s| s.runtime_handlers)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|h| h.name)
        .filter(|n| n.starts_with("kata") || n == "team-sandbox")
        .collect())
}

/// After step `step`: every selected node is labelled, serves exactly the release's handlers
/// (kubelet's report where containerd gives one), a pod of each reaches our shim, and nydus
/// runs iff guest pull is on; every other node has no label, no handler and nothing under the
/// prefix.
pub async fn check_release(
    cluster: &TestCluster,
    real: &[&RealNode],
    selected: &dyn Fn(&RealNode) -> bool,
    shape: &ReleaseShape,
    step: &str,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let want: BTreeSet<String> = shape.handlers().into_iter().map(|(h, _)| h).collect();
    for n in real {
        let on = selected(n);
        let ctx = |what: &str| format!("{step}: {} ({}): {what}", n.name, n.flavour);
        let label = nodes
            .get(&n.name)
            .await?
            .metadata
            .labels
            .unwrap_or_default()
            .get(KATA_LABEL)
            .cloned();
        ensure!(
            label.as_deref() == on.then_some("true"),
            "{}",
            ctx(&format!("label {KATA_LABEL}={label:?}"))
        );
        if n.flavour != "debian" {
            let expect = if on { want.clone() } else { BTreeSet::new() };
            wait_until(
                Duration::from_secs(60),
                &ctx("kubelet's runtimeHandlers"),
                || {
                    let (nodes, expect) = (nodes.clone(), expect.clone());
                    async move { Ok(reported_handlers(&nodes, &n.name).await? == expect) }
                },
            )
            .await
            .with_context(|| ctx(&format!("want exactly {expect:?}")))?;
        }
        let nydus = n
            .exec(&["systemctl", "is-active", NYDUS_UNIT])
            .unwrap_or_default();
        ensure!(
            (nydus.trim() == "active") == (on && shape.guest_pull),
            "{}",
            ctx(&format!("nydus is {:?}", nydus.trim()))
        );
        if on {
            probe_handlers(cluster, n, &shape.handlers(), step)
                .await
                .with_context(|| ctx("probe pods"))?;
        } else {
            let left: Vec<_> = std::fs::read_dir(n.path(PREFIX))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            ensure!(
                left.is_empty(),
                "{}",
                ctx(&format!("left under {PREFIX}: {left:?}"))
            );
        }
    }
    Ok(())
}

/// `helm upgrade` of the release to `shape` (a values file beside the cluster's state).
pub async fn upgrade_to(cluster: &TestCluster, chart: &str, shape: &ReleaseShape) -> Result<()> {
    let values = cluster
        .state()
        .join(format!("values-{:x}.yaml", shape_tag(shape)));
    std::fs::write(&values, shape.values_yaml())?;
    let values = values.to_str().context("utf-8 path")?.to_string();
    let args = [
        "upgrade",
        "kata-deploy",
        chart,
        "--namespace",
        "kata-system",
        "-f",
        &values,
        "--wait",
        "--timeout",
        "5m",
    ];
    let (ok, out) = cluster.run_helm(&args).await?;
    ensure!(ok, "helm upgrade to {shape:?} failed: {out}");
    Ok(())
}

fn shape_tag(shape: &ReleaseShape) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    shape.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_exactly_the_shape() {
        let s = ReleaseShape {
            qemu: true,
            coco: true,
            guest_pull: true,
            narrowed: true,
            ..Default::default()
        };
        let v: serde_yaml::Value = serde_yaml::from_str(&s.values_yaml()).unwrap();
        assert_eq!(v["shims"]["qemu"]["enabled"], serde_yaml::Value::Bool(true));
        assert_eq!(
            v["shims"]["qemu-runtime-rs"]["enabled"],
            serde_yaml::Value::Bool(false)
        );
        assert_eq!(
            v["shims"]["qemu-coco-dev"]["containerd"]["snapshotter"],
            "nydus"
        );
        assert_eq!(v["job"]["nodeSelector"][NARROW_LABEL], "true");
        assert_eq!(
            v["customRuntimes"]["enabled"],
            serde_yaml::Value::Bool(false)
        );
        let h: Vec<_> = s.handlers().into_iter().map(|(h, _)| h).collect();
        assert_eq!(h, ["kata-qemu", "kata-qemu-coco-dev"]);
    }
}
