//! Which host directory holds a node's CRI configuration, from facts the dispatcher already
//! reads (the runtime version the kubelet reports, the distributions' own node labels and
//! annotations). With `stage.cri: auto`, the chart's cri containers get exactly that directory
//! writable instead of the whole `/etc`; a node whose CRI cannot be told gets no directory and
//! fails in host-check, before any host change, with a message saying what to set.

use std::collections::BTreeMap;

/// The pod-template annotation naming the hostPath volume the dispatcher points at each node's
/// CRI configuration directory.
pub const ANNOTATION_CRI_VOLUME: &str = "katacontainers.io/cri-config-volume";
/// The environment variable telling the stages why the node's CRI directory is unknown.
pub const ENV_CRI_UNKNOWN: &str = "KATA_NODE_CRI_UNKNOWN";

/// What the dispatcher knows of a node's CRI configuration directory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CriDir {
    /// Not read (a node known only by name): the template's volume is left as it is.
    #[default]
    NotRead,
    /// This directory.
    Known(String),
    /// Cannot be told: why.
    Unknown(String),
}

impl CriDir {
    /// From the node's runtime version, labels and annotations.
    pub fn of_node(
        runtime_version: &str,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) -> Self {
        match cri_config_dir(runtime_version, labels, annotations) {
            Ok(d) => CriDir::Known(d.to_string()),
            Err(why) => CriDir::Unknown(why),
        }
    }
}

/// The node's CRI configuration directory, or why it cannot be told (pure).
pub fn cri_config_dir(
    runtime_version: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<&'static str, String> {
    let has_key =
        |m: &BTreeMap<String, String>, prefix: &str| m.keys().any(|k| k.starts_with(prefix));
    if runtime_version.starts_with("cri-o://") {
        return Ok("/etc/crio");
    }
    if !runtime_version.starts_with("containerd://") {
        return Err(format!(
            "its runtime {runtime_version:?} is neither containerd nor CRI-O"
        ));
    }
    // rke2 and k3s both run a "-k3s" containerd; their own annotations tell them apart.
    if has_key(annotations, "rke2.io/") {
        return Ok("/var/lib/rancher/rke2/agent/etc/containerd");
    }
    if has_key(annotations, "k3s.io/") || runtime_version.contains("-k3s") {
        return Ok("/var/lib/rancher/k3s/agent/etc/containerd");
    }
    if has_key(labels, "microk8s.io/") {
        return Ok("/var/snap/microk8s/current/args");
    }
    if has_key(labels, "node.k0sproject.io/") {
        return Ok("/etc/k0s/containerd.d");
    }
    Ok("/etc/containerd")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn each_distribution_gets_its_own_directory() {
        let none = m(&[]);
        let dir = |v: &str, l: &BTreeMap<String, String>, a: &BTreeMap<String, String>| {
            cri_config_dir(v, l, a)
        };
        assert_eq!(
            dir("containerd://2.0.5", &none, &none),
            Ok("/etc/containerd")
        );
        assert_eq!(dir("cri-o://1.31.2", &none, &none), Ok("/etc/crio"));
        assert_eq!(
            dir(
                "containerd://2.0.5-k3s1",
                &none,
                &m(&[("k3s.io/node-args", "[]")])
            ),
            Ok("/var/lib/rancher/k3s/agent/etc/containerd")
        );
        // rke2's containerd reports a -k3s version too: its annotations decide.
        assert_eq!(
            dir(
                "containerd://2.0.5-k3s1",
                &none,
                &m(&[("rke2.io/node-args", "[]")])
            ),
            Ok("/var/lib/rancher/rke2/agent/etc/containerd")
        );
        assert_eq!(
            dir(
                "containerd://1.6.28",
                &m(&[("microk8s.io/cluster", "true")]),
                &none
            ),
            Ok("/var/snap/microk8s/current/args")
        );
        assert_eq!(
            dir(
                "containerd://1.7.24",
                &m(&[("node.k0sproject.io/role", "worker")]),
                &none
            ),
            Ok("/etc/k0s/containerd.d")
        );
        let e = dir("docker://24.0.7", &none, &none).unwrap_err();
        assert!(e.contains("docker://24.0.7"), "{e}");
        assert!(dir("", &none, &none).is_err());
    }
}
