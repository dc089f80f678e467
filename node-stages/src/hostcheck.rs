//! host-check: read-only checks of this node against the configuration. Facts are collected
//! by a thin shell (`collect_facts`) and evaluated by a pure function (`evaluate`) that lists
//! every problem, not just the first.

use std::path::Path;

use serde::Serialize;

use crate::config::{CriKind, NodeFacts, ValidConfig};
use crate::containerd::parse_runtime_version;
use crate::cri;
use crate::hostfs::HostFs;
use crate::payload::Payload;
use crate::shims::kube_arch;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Blocks the install.
    Error,
    /// Likely to hurt workloads; the install proceeds.
    Warning,
    /// For the record.
    Info,
}

/// One host-check result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Severity.
    pub severity: Severity,
    /// Short check id (stable, for scripts).
    pub check: &'static str,
    /// What was found.
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

/// Facts about the host, collected read-only.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostFacts {
    /// Detected (or configured) CRI, or why detection failed.
    pub cri: Option<CriKind>,
    /// Detection error.
    pub cri_error: Option<String>,
    /// Runtime version reported by the kubelet.
    pub runtime_version: Option<String>,
    /// A runtime configuration file that does not parse: (path, error).
    pub broken_config: Option<(String, String)>,
    /// /dev/kvm exists.
    pub dev_kvm: bool,
    /// Node architecture (Kubernetes spelling).
    pub arch: String,
    /// Number of entries in /sys/kernel/iommu_groups.
    pub iommu_groups: usize,
    /// NVIDIA kernel modules loaded on the host (/proc/modules).
    pub nvidia_modules: Vec<String>,
    /// Content of /var/lib/kubelet/config.yaml, if present.
    pub kubelet_config: Option<String>,
    /// Kubelet version reported by the node.
    pub kubelet_version: Option<String>,
    /// Free bytes where the install prefix lives.
    pub free_bytes: Option<u64>,
    /// Bytes the payload needs.
    pub payload_bytes: Option<u64>,
    /// `payload_bytes` is the release tarballs' compressed size: the install needs more.
    pub payload_is_compressed: bool,
    /// /etc/machine-id of the host.
    pub host_machine_id: Option<String>,
    /// Machine ID the dispatcher saw on the Node object.
    pub expected_machine_id: Option<String>,
    /// k3s/rke2: `disable_snapshot_annotations` in the containerd config k3s rendered (None:
    /// not rendered yet). containerd's default when the key is absent is true.
    pub k3s_snapshot_annotations_disabled: Option<bool>,
}

/// Collects host facts (read-only).
pub fn collect_facts(
    fs: &HostFs,
    cfg: &ValidConfig,
    facts: &NodeFacts,
    payload: Option<&Payload>,
) -> HostFacts {
    let mut h = HostFacts {
        runtime_version: facts.container_runtime_version.clone(),
        kubelet_version: facts.kubelet_version.clone(),
        ..Default::default()
    };
    match cri::resolve_cri(fs, cfg, facts) {
        Ok(k) => h.cri = Some(k),
        Err(e) => h.cri_error = Some(e.to_string()),
    }
    if let Some(kind) = h.cri {
        if let Err(e) = cri::plan_cri_target(fs, cfg, facts, kind).and_then(|t| {
            for (p, d) in &t.files {
                if let Some(b) = fs.read(p)? {
                    cri::render_desired(p, d, Some(&b), &t.kata)?;
                }
            }
            Ok(())
        }) {
            h.broken_config = Some((String::new(), e.to_string()));
        }
    }
    h.dev_kvm = fs.exists(Path::new("/dev/kvm"));
    h.arch = facts
        .arch
        .clone()
        .unwrap_or_else(|| kube_arch(std::env::consts::ARCH).to_string());
    h.iommu_groups = fs.list_dir(Path::new("/sys/kernel/iommu_groups")).len();
    if let Ok(Some(m)) = fs.read(Path::new("/proc/modules")) {
        h.nvidia_modules = String::from_utf8_lossy(&m)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with("nvidia"))
            .map(str::to_string)
            .collect();
    }
    h.kubelet_config = fs
        .read(Path::new("/var/lib/kubelet/config.yaml"))
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    h.free_bytes = fs.free_bytes(&cfg.install().prefix);
    h.payload_bytes = payload.map(Payload::total_size);
    h.host_machine_id = fs
        .read(Path::new("/etc/machine-id"))
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string());
    h.expected_machine_id = facts.machine_id.clone();
    let k3s_dist = match h.cri {
        Some(CriKind::K3s | CriKind::K3sAgent) => Some("k3s"),
        Some(CriKind::Rke2) => Some("rke2"),
        _ => None,
    };
    if let Some(dist) = k3s_dist {
        let rendered = fs
            .read(
                &Path::new("/var/lib/rancher")
                    .join(dist)
                    .join("agent/etc/containerd/config.toml"),
            )
            .ok()
            .flatten();
        h.k3s_snapshot_annotations_disabled =
            rendered.map(|b| snapshot_annotations_disabled(&String::from_utf8_lossy(&b)));
    }
    h
}

/// Whether a containerd config leaves `disable_snapshot_annotations` true (its default), in
/// either schema's table.
pub fn snapshot_annotations_disabled(text: &str) -> bool {
    let Ok(doc) = crate::containerd::parse(text) else {
        return true;
    };
    let v = crate::containerd::detect_version(&doc);
    let mut t = Some(doc.as_item());
    for k in v.snapshot_flags_path() {
        t = t.and_then(|t| t.get(k));
    }
    t.and_then(|t| t.get("disable_snapshot_annotations"))
        .and_then(|i| i.as_bool())
        .unwrap_or(true)
}

/// Parses a Go duration ("2m", "20m0s", "1h30m", "90s") into seconds.
pub fn parse_go_duration(s: &str) -> Option<u64> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.trim().chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'s') {
            unit.push(chars.next().unwrap());
        }
        let v: f64 = num.parse().ok()?;
        num.clear();
        total += v * match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        any = true;
    }
    if !num.is_empty() || !any {
        return None;
    }
    Some(total as u64)
}

fn finding(
    severity: Severity,
    check: &'static str,
    message: String,
    hint: impl Into<String>,
) -> Finding {
    Finding {
        severity,
        check,
        message,
        hint: hint.into(),
    }
}

/// Evaluates host facts against the configuration. Pure.
pub fn evaluate(cfg: &ValidConfig, h: &HostFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    for w in &cfg.warnings {
        out.push(finding(
            Severity::Warning,
            "annotations",
            w.clone(),
            "Remove it from allowedHypervisorAnnotations unless pods really need it",
        ));
    }
    check_identity(h, &mut out);
    check_cri(cfg, h, &mut out);
    check_virtualization(cfg, h, &mut out);
    check_kubelet(cfg, h, &mut out);
    check_disk_space(cfg, h, &mut out);
    out.sort_by_key(|f| f.severity);
    out
}

/// A node name reused by another machine must not be mutated.
fn check_identity(h: &HostFacts, out: &mut Vec<Finding>) {
    use Severity::*;
    match (&h.host_machine_id, &h.expected_machine_id) {
        (Some(host), Some(exp)) if host != exp => out.push(finding(
            Error,
            "machine-id",
            format!("host /etc/machine-id {host} differs from the node's machine ID {exp}: the node name now belongs to another machine"),
            "Re-run the install (helm upgrade) so the dispatcher targets the current node; nothing will be changed here",
        )),
        (_, None) => out.push(finding(Info, "machine-id", "KATA_NODE_MACHINE_ID not set (standalone run): identity not checked".into(), "")),
        _ => {}
    }
}

/// The CRI, its version's support for what the shims ask, and its configuration.
fn check_cri(cfg: &ValidConfig, h: &HostFacts, out: &mut Vec<Finding>) {
    use Severity::*;
    match (h.cri, &h.cri_error) {
        (None, Some(e)) => out.push(finding(
            Error,
            "cri",
            e.clone(),
            "Set `cri:` explicitly in the chart values",
        )),
        (Some(kind), _) => {
            out.push(finding(
                Info,
                "cri",
                format!(
                    "runtime: {} ({})",
                    kind.as_str(),
                    h.runtime_version.as_deref().unwrap_or("version unknown")
                ),
                "",
            ));
            if kind.is_containerd() {
                check_containerd(cfg, h, kind, out);
            } else {
                check_crio(cfg, h, out);
            }
        }
        (None, None) => {}
    }
    if let Some((_, e)) = &h.broken_config {
        out.push(finding(
            Error,
            "cri-config",
            e.clone(),
            "Fix the runtime configuration; the install will not touch it while it is malformed",
        ));
    }
}

fn check_containerd(cfg: &ValidConfig, h: &HostFacts, kind: CriKind, out: &mut Vec<Finding>) {
    use Severity::*;
    let shims = &cfg.cfg.shims;
    let version = h.runtime_version.as_deref().and_then(parse_runtime_version);
    if let Some((maj, min)) = version {
        if (maj, min) < (1, 6) {
            out.push(finding(Error, "cri-version", format!("containerd {maj}.{min} is too old: Kata handlers need runtime_path (containerd >= 1.6)"), "Upgrade containerd to 1.7 or 2.x"));
        }
        if (maj, min) < (1, 7) && shims.iter().any(|s| s.containerd_snapshotter == "nydus") {
            out.push(finding(Error, "cri-version", format!("containerd {maj}.{min} has no runtime-specific snapshotters; guest pull with nydus needs containerd >= 1.7"), "Upgrade containerd or drop containerdSnapshotter: nydus"));
        }
        if maj < 2 && !cfg.cfg.multi_install_suffix.is_empty() {
            out.push(finding(Warning, "multi-install", format!("containerd {maj}.{min} has no drop-in support: this install edits the shared config in place"), "Multi-install is only fully isolated on containerd >= 2.0"));
        }
    }
    if matches!(kind, CriKind::K3s | CriKind::K3sAgent | CriKind::Rke2) && cfg.uses_nydus() {
        // Our template extends k3s's base, which defines the table holding the flag: we cannot
        // change it (a repeated key is a TOML error that stops k3s).
        match h.k3s_snapshot_annotations_disabled {
            Some(true) => out.push(finding(Error, "guest-pull", "k3s/rke2 renders containerd with disable_snapshot_annotations = true (its base template's value): images of guest-pull handlers would be pulled on the host, not in the guest".into(), "Provide your own config.toml.tmpl / config-v3.toml.tmpl (not extending {{ template \"base\" . }}) that sets disable_snapshot_annotations = false, or drop containerdSnapshotter: nydus")),
            Some(false) => {}
            None => out.push(finding(Warning, "guest-pull", "k3s/rke2 has not rendered its containerd config yet: cannot tell whether disable_snapshot_annotations is false, which guest pull needs".into(), "Re-run host-check once k3s/rke2 has started")),
        }
    }
    if let Some((2, min)) = version {
        if min < 2 && cfg.uses_nydus() {
            out.push(finding(Warning, "guest-pull", format!("containerd 2.{min} routes a pull to a handler's snapshotter only when the pod carries the annotation io.containerd.cri.runtime-handler (it ignores the CRI field the kubelet sets; proven on 2.0.5, 2.2.9 honours it)"), "Annotate guest-pull pods with io.containerd.cri.runtime-handler: <handler>, or upgrade containerd to >= 2.2"));
        }
    }
    if shims
        .iter()
        .any(|s| s.crio_pull_type == "guest-pull" && s.containerd_snapshotter.is_empty())
    {
        out.push(finding(
            Info,
            "guest-pull",
            "crioPullType is ignored on containerd".into(),
            "Use containerdSnapshotter: nydus for guest pull on containerd",
        ));
    }
}

fn check_crio(cfg: &ValidConfig, h: &HostFacts, out: &mut Vec<Finding>) {
    use Severity::*;
    let shims = &cfg.cfg.shims;
    let version = h.runtime_version.as_deref().and_then(parse_runtime_version);
    if let Some((maj, min)) = version {
        if (maj, min) < (1, 30) && shims.iter().any(|s| s.crio_pull_type == "guest-pull") {
            out.push(finding(
                Warning,
                "cri-version",
                format!("CRI-O {maj}.{min} may not support runtime_pull_image (guest pull)"),
                "Use a recent CRI-O for guest pull",
            ));
        }
    }
    if shims.iter().any(|s| !s.containerd_snapshotter.is_empty()) {
        out.push(finding(
            Info,
            "guest-pull",
            "containerdSnapshotter is ignored on CRI-O".into(),
            "Use crioPullType: guest-pull on CRI-O",
        ));
    }
}

/// The shims that pass a GPU through to the guest.
fn gpu_shims(cfg: &ValidConfig) -> Vec<&str> {
    cfg.cfg
        .shims
        .iter()
        .filter(|s| s.is_gpu_passthrough())
        .map(|s| s.name.as_str())
        .collect()
}

/// KVM, the architecture each shim supports, GPU passthrough prerequisites.
fn check_virtualization(cfg: &ValidConfig, h: &HostFacts, out: &mut Vec<Finding>) {
    use Severity::*;
    let shims = &cfg.cfg.shims;
    if !h.dev_kvm && shims.iter().any(|s| s.base() != "remote") {
        out.push(finding(Error, "kvm", "/dev/kvm is missing: Kata VMs cannot start".into(), "Enable virtualization in the BIOS / use a VM size with nested virtualization, and load kvm_intel or kvm_amd"));
    }
    for s in shims {
        let allowed = s.allowed_arches();
        if !allowed.contains(&h.arch.as_str()) {
            // supportedArches means "install it on those": elsewhere the shim is skipped.
            out.push(finding(
                Info,
                "arch",
                format!(
                    "shim {} supports {:?}, skipped on this node's {}",
                    s.name, allowed, h.arch
                ),
                String::new(),
            ));
        }
    }
    let gpu = gpu_shims(cfg);
    if gpu.is_empty() {
        return;
    }
    if h.iommu_groups == 0 {
        // Warnings: the shims install fine; only GPU passthrough pods cannot start here.
        out.push(finding(Warning, "iommu", format!("/sys/kernel/iommu_groups is empty: GPU passthrough ({}) needs IOMMU", gpu.join(", ")), "Enable VT-d/AMD-Vi and ACS in the BIOS and add intel_iommu=on or amd_iommu=on to the kernel command line"));
    }
    if !h.nvidia_modules.is_empty() {
        out.push(finding(Warning, "nvidia-driver", format!("host NVIDIA driver loaded ({}): VFIO passthrough needs the GPU unbound from it", h.nvidia_modules.join(", ")), "Remove the host NVIDIA driver (and blacklist nouveau) so the GPU Operator's VFIO manager can bind the GPU"));
    }
}

/// Kubelet timeouts and feature gates (warnings: the install still works).
fn check_kubelet(cfg: &ValidConfig, h: &HostFacts, out: &mut Vec<Finding>) {
    use Severity::*;
    let Some(text) = &h.kubelet_config else {
        out.push(finding(
            Info,
            "kubelet",
            "no /var/lib/kubelet/config.yaml: kubelet timeout and feature gates not checked".into(),
            "",
        ));
        return;
    };
    let doc: serde_yaml::Value = serde_yaml::from_str(text).unwrap_or(serde_yaml::Value::Null);
    let rrt = doc
        .get("runtimeRequestTimeout")
        .and_then(|v| v.as_str())
        .unwrap_or("2m");
    let pull = cfg.cfg.image_pull_timeout_seconds;
    match parse_go_duration(rrt) {
        Some(secs) if secs < pull => out.push(finding(
            Warning,
            "kubelet-timeout",
            format!("kubelet runtimeRequestTimeout {rrt} ({secs}s) is shorter than imagePullTimeoutSeconds {pull}: the kubelet gives up on large guest pulls first"),
            format!("Set runtimeRequestTimeout: {}m in /var/lib/kubelet/config.yaml and restart the kubelet", pull.div_ceil(60)),
        )),
        None => out.push(finding(Warning, "kubelet-timeout", format!("cannot parse kubelet runtimeRequestTimeout {rrt:?}"), "")),
        _ => {}
    }
    let gate = |name: &str| {
        doc.get("featureGates")
            .and_then(|g| g.get(name))
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    if cfg.cfg.shims.iter().any(|s| s.uses_guest_pull()) && !gate("RuntimeClassInImageCriApi") {
        out.push(finding(Warning, "kubelet-feature-gates", "kubelet feature gate RuntimeClassInImageCriApi is not enabled: guest pull with per-runtime snapshotters needs it".into(), "Add featureGates: {RuntimeClassInImageCriApi: true} to /var/lib/kubelet/config.yaml and restart the kubelet"));
    }
    let kubelet_minor = h.kubelet_version.as_deref().and_then(parse_runtime_version);
    if !gpu_shims(cfg).is_empty()
        && kubelet_minor.is_some_and(|v| v < (1, 34))
        && !gate("KubeletPodResourcesGet")
    {
        out.push(finding(Warning, "kubelet-feature-gates", "kubelet feature gate KubeletPodResourcesGet is not enabled (default only from 1.34): GPU shims use it to find allocated devices".into(), "Add featureGates: {KubeletPodResourcesGet: true} and restart the kubelet"));
    }
}

/// Space for the payload (written beside its target before the rename).
fn check_disk_space(cfg: &ValidConfig, h: &HostFacts, out: &mut Vec<Finding>) {
    let (Some(free), Some(need)) = (h.free_bytes, h.payload_bytes) else {
        return;
    };
    let need = need + need / 10;
    if free < need {
        out.push(finding(
            Severity::Error,
            "disk-space",
            format!(
                "{} MiB free under {}, the payload needs {} {} MiB{}",
                free >> 20,
                cfg.install().prefix.display(),
                if h.payload_is_compressed {
                    "more than"
                } else {
                    "about"
                },
                need >> 20,
                if h.payload_is_compressed {
                    " (the compressed size of the release components the enabled shims need)"
                } else {
                    ""
                }
            ),
            "Free space on that filesystem and re-run",
        ));
    }
}

/// Renders findings for humans.
pub fn render_text(node: &str, findings: &[Finding]) -> String {
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .count();
    let mut s = format!("host-check on {node}: {errors} error(s), {warnings} warning(s)\n");
    for f in findings {
        let tag = match f.severity {
            Severity::Error => "ERROR",
            Severity::Warning => "WARN ",
            Severity::Info => "info ",
        };
        s.push_str(&format!("  {tag} [{}] {}\n", f.check, f.message));
        if !f.hint.is_empty() && f.severity != Severity::Info {
            s.push_str(&format!("         -> {}\n", f.hint));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    fn cfg(yaml: &str) -> ValidConfig {
        parse_config(yaml, Path::new("c")).unwrap()
    }

    fn healthy() -> HostFacts {
        HostFacts {
            cri: Some(CriKind::Containerd),
            runtime_version: Some("containerd://2.2.9".into()),
            dev_kvm: true,
            arch: "amd64".into(),
            iommu_groups: 12,
            kubelet_config: Some(
                "runtimeRequestTimeout: 20m\nfeatureGates:\n  RuntimeClassInImageCriApi: true\n"
                    .into(),
            ),
            kubelet_version: Some("v1.34.1".into()),
            free_bytes: Some(10 << 30),
            payload_bytes: Some(1 << 30),
            host_machine_id: Some("abc".into()),
            expected_machine_id: Some("abc".into()),
            ..Default::default()
        }
    }

    fn errors(f: &[Finding]) -> Vec<&'static str> {
        f.iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.check)
            .collect()
    }

    #[test]
    fn healthy_gpu_host_passes() {
        let c = cfg("shims: [{name: qemu-nvidia-gpu, containerdSnapshotter: nydus}]\n");
        let f = evaluate(&c, &healthy());
        assert!(errors(&f).is_empty(), "{f:?}");
        assert!(!f.iter().any(|f| f.severity == Severity::Warning), "{f:?}");
    }

    #[test]
    fn lists_every_problem_not_just_the_first() {
        let c = cfg(
            "shims: [{name: qemu-nvidia-gpu, containerdSnapshotter: nydus}, {name: qemu-se}]\n",
        );
        let mut h = healthy();
        h.dev_kvm = false;
        h.iommu_groups = 0;
        h.nvidia_modules = vec!["nvidia".into(), "nvidia_uvm".into()];
        h.host_machine_id = Some("other".into());
        h.runtime_version = Some("containerd://1.6.20".into());
        h.free_bytes = Some(1 << 20);
        let f = evaluate(&c, &h);
        let e = errors(&f);
        for want in ["machine-id", "cri-version", "kvm", "disk-space"] {
            assert!(e.contains(&want), "missing {want} in {e:?}");
        }
        let of = |sev: Severity| {
            f.iter()
                .filter(|x| x.severity == sev)
                .map(|x| x.check)
                .collect::<Vec<_>>()
        };
        for want in ["iommu", "nvidia-driver"] {
            assert!(
                of(Severity::Warning).contains(&want),
                "GPU prerequisites warn: {f:?}"
            );
        }
        assert!(
            of(Severity::Info).contains(&"arch"),
            "an unsupported shim is reported as skipped: {f:?}"
        );
    }

    #[test]
    fn k3s_guest_pull_needs_snapshot_annotations_enabled() {
        assert!(snapshot_annotations_disabled(
            &String::from_utf8(
                std::fs::read(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/k3s-generated-config.toml"
                ))
                .unwrap()
            )
            .unwrap()
        ));
        assert!(!snapshot_annotations_disabled("version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\ndisable_snapshot_annotations = false\n"));
        assert!(
            snapshot_annotations_disabled("version = 3\n"),
            "containerd's default is true"
        );
        let c = cfg("cri: k3s\nshims: [{name: qemu-coco-dev, containerdSnapshotter: nydus}]\n");
        let mut h = HostFacts {
            cri: Some(CriKind::K3s),
            runtime_version: Some("containerd://1.7.27-k3s1".into()),
            dev_kvm: true,
            arch: "amd64".into(),
            k3s_snapshot_annotations_disabled: Some(true),
            ..Default::default()
        };
        let f = evaluate(&c, &h);
        assert!(
            f.iter().any(|x| x.severity == Severity::Error
                && x.check == "guest-pull"
                && x.message.contains("disable_snapshot_annotations = true")),
            "{f:?}"
        );
        h.k3s_snapshot_annotations_disabled = Some(false);
        assert!(
            !evaluate(&c, &h)
                .iter()
                .any(|x| x.check == "guest-pull" && x.severity != Severity::Info),
            "{:?}",
            evaluate(&c, &h)
        );
    }

    #[test]
    fn kubelet_timeout_and_gates_warn() {
        let c = cfg("imagePullTimeoutSeconds: 1800\nshims: [{name: qemu-coco-dev, containerdSnapshotter: nydus}]\n");
        let mut h = healthy();
        h.kubelet_config =
            Some("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n".into());
        let f = evaluate(&c, &h);
        let warns: Vec<_> = f
            .iter()
            .filter(|f| f.severity == Severity::Warning)
            .map(|f| f.check)
            .collect();
        assert_eq!(warns, ["kubelet-timeout", "kubelet-feature-gates"]);
        assert!(f
            .iter()
            .any(|f| f.hint.contains("runtimeRequestTimeout: 30m")));
        assert!(errors(&f).is_empty());
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("2m"), Some(120));
        assert_eq!(parse_go_duration("20m0s"), Some(1200));
        assert_eq!(parse_go_duration("1h30m"), Some(5400));
        assert_eq!(parse_go_duration("90s"), Some(90));
        assert_eq!(parse_go_duration("1500ms"), Some(1));
        assert_eq!(parse_go_duration("abc"), None);
        assert_eq!(parse_go_duration("10"), None);
    }
}
