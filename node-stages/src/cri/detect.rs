//! Detection: which CRI the node runs, which unit loads its configuration, and the host files
//! the plan starts from (the only reads the plan needs).

use std::path::{Path, PathBuf};

use crate::config::{CriKind, NodeFacts, ValidConfig};
use crate::containerd;
use crate::error::{Result, StageError};
use crate::hostfs::HostFs;

/// Plain containerd's main configuration file.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// Plain containerd's drop-in directory (containerd ≥ 2.0).
pub const CONTAINERD_CONF_D: &str = "/etc/containerd/conf.d";
/// CRI-O's main configuration file.
pub const CRIO_CONFIG: &str = "/etc/crio/crio.conf";
/// CRI-O drop-in directory.
pub const CRIO_CONF_D: &str = "/etc/crio/crio.conf.d";
/// microk8s containerd template.
pub const MICROK8S_TEMPLATE: &str = "/var/snap/microk8s/current/args/containerd-template.toml";
/// k0s containerd drop-in directory.
pub const K0S_CONTAINERD_D: &str = "/etc/k0s/containerd.d";

/// Detects the CRI from the runtime version the kubelet reports and host paths.
pub fn detect_cri_from(
    runtime_version: Option<&str>,
    exists: &dyn Fn(&str) -> bool,
    active_units: Option<&[String]>,
) -> std::result::Result<CriKind, String> {
    let v = runtime_version.unwrap_or("");
    if v.starts_with("cri-o://") {
        return Ok(CriKind::Crio);
    }
    // A distribution's directories may outlive it (a reimaged or converted node): when systemd
    // was asked, they count only while one of the distribution's units is active.
    let runs = |kind: CriKind| {
        active_units.is_none_or(|a| flavour_units(kind).iter().any(|u| a.iter().any(|x| x == u)))
    };
    // rke2's containerd also reports "-k3s" versions: check rke2's tree first.
    if (exists("/var/lib/rancher/rke2/agent/etc/containerd") || exists("/etc/rancher/rke2"))
        && runs(CriKind::Rke2)
    {
        return Ok(CriKind::Rke2);
    }
    if (exists("/var/lib/rancher/k3s/agent/etc/containerd") || exists("/etc/rancher/k3s"))
        && runs(CriKind::K3s)
    {
        let agent = [
            "/etc/systemd/system/k3s-agent.service",
            "/usr/lib/systemd/system/k3s-agent.service",
        ]
        .iter()
        .any(|p| exists(p));
        let server = [
            "/etc/systemd/system/k3s.service",
            "/usr/lib/systemd/system/k3s.service",
        ]
        .iter()
        .any(|p| exists(p));
        let agent_runs = active_units.map(|a| a.iter().any(|u| u == "k3s-agent.service"));
        let server_runs = active_units.map(|a| a.iter().any(|u| u == "k3s.service"));
        let agent = agent_runs.map_or(agent && !server, |a| a && server_runs != Some(true));
        return Ok(if agent {
            CriKind::K3sAgent
        } else {
            CriKind::K3s
        });
    }
    if exists("/var/snap/microk8s/current/args") && runs(CriKind::Microk8s) {
        return Ok(CriKind::Microk8s);
    }
    if (exists("/etc/k0s") || exists("/var/lib/k0s")) && runs(CriKind::K0s) {
        return Ok(CriKind::K0s);
    }
    if v.starts_with("containerd://") || exists("/etc/containerd") {
        return Ok(CriKind::Containerd);
    }
    if exists("/etc/crio") {
        return Ok(CriKind::Crio);
    }
    Err(format!(
        "cannot tell which CRI this node runs (runtime version {v:?}; none of /etc/containerd, /etc/crio, /var/lib/rancher/{{k3s,rke2}}, /etc/k0s, /var/snap/microk8s exist). Set `cri:` in the configuration"
    ))
}

/// The CRI configured or detected on this host.
pub fn resolve_cri(fs: &HostFs, cfg: &ValidConfig, facts: &NodeFacts) -> Result<CriKind> {
    if let Some(k) = cfg.cri {
        return Ok(k);
    }
    if let Some(why) = &facts.cri_unknown {
        return Err(StageError::config(
            &cfg.file,
            "cri",
            format!("cri: auto, but the dispatcher could not tell which CRI configuration directory this node uses ({why}), so none is mounted writable. Set stage.cri to this node's CRI (containerd, crio, k3s, k3s-agent, rke2, k0s, microk8s)"),
        ));
    }
    detect_cri_from(
        facts.container_runtime_version.as_deref(),
        &|p| fs.exists(Path::new(p)),
        facts.active_units.as_deref(),
    )
    .map_err(|m| StageError::config(&cfg.file, "cri", m))
}

/// The systemd unit that (re)loads the runtime configuration.
pub fn runtime_unit(fs: &HostFs, kind: CriKind) -> String {
    let has_unit = |name: &str| {
        [
            "/etc/systemd/system",
            "/usr/lib/systemd/system",
            "/lib/systemd/system",
            "/usr/local/lib/systemd/system",
        ]
        .iter()
        .any(|d| fs.exists(&Path::new(d).join(name)))
    };
    match kind {
        CriKind::Containerd => "containerd.service".into(),
        CriKind::K3s => "k3s.service".into(),
        CriKind::K3sAgent => "k3s-agent.service".into(),
        CriKind::Rke2 => if has_unit("rke2-agent.service") && !has_unit("rke2-server.service") {
            "rke2-agent.service"
        } else {
            "rke2-server.service"
        }
        .into(),
        CriKind::K0s => if has_unit("k0scontroller.service") {
            "k0scontroller.service"
        } else {
            "k0sworker.service"
        }
        .into(),
        CriKind::Microk8s => "snap.microk8s.daemon-containerd.service".into(),
        CriKind::Crio => "crio.service".into(),
    }
}

/// Every unit that runs a flavour's runtime (what detection asks systemd about).
pub fn flavour_units(kind: CriKind) -> &'static [&'static str] {
    match kind {
        CriKind::Containerd => &["containerd.service"],
        CriKind::K3s | CriKind::K3sAgent => &["k3s.service", "k3s-agent.service"],
        CriKind::Rke2 => &["rke2-server.service", "rke2-agent.service"],
        CriKind::K0s => &["k0scontroller.service", "k0sworker.service"],
        CriKind::Microk8s => &["snap.microk8s.daemon-containerd.service"],
        CriKind::Crio => &["crio.service"],
    }
}

/// Every runtime unit of every flavour, once.
pub fn all_runtime_units() -> Vec<&'static str> {
    let mut v: Vec<&str> = [
        CriKind::Containerd,
        CriKind::K3s,
        CriKind::Rke2,
        CriKind::K0s,
        CriKind::Microk8s,
        CriKind::Crio,
    ]
    .into_iter()
    .flat_map(flavour_units)
    .copied()
    .collect();
    v.dedup();
    v
}

/// Units that may run a flavour's runtime: the one guessed from unit files first.
pub fn unit_candidates(guess: &str, kind: CriKind) -> Vec<String> {
    let all: &[&str] = match kind {
        CriKind::K3s | CriKind::K3sAgent | CriKind::Rke2 | CriKind::K0s => flavour_units(kind),
        _ => &[],
    };
    let mut out = vec![guess.to_string()];
    out.extend(all.iter().filter(|u| **u != guess).map(|u| u.to_string()));
    out
}

/// The first active unit among `candidates`, else the first candidate (pure).
pub fn choose_active_unit(candidates: &[String], active: &dyn Fn(&str) -> bool) -> String {
    candidates
        .iter()
        .find(|u| active(u))
        .unwrap_or(&candidates[0])
        .clone()
}

/// The CRI socket of a runtime flavour (host path).
pub fn cri_socket(kind: CriKind) -> &'static str {
    match kind {
        CriKind::Containerd => "/run/containerd/containerd.sock",
        CriKind::K3s | CriKind::K3sAgent | CriKind::Rke2 => "/run/k3s/containerd/containerd.sock",
        CriKind::K0s => "/run/k0s/containerd.sock",
        CriKind::Microk8s => "/var/snap/microk8s/common/run/containerd.sock",
        CriKind::Crio => "/var/run/crio/crio.sock",
    }
}

/// The containerd major version: from the node's reported runtime version, else guessed from
/// the existing configuration (version 3 means containerd 2.x).
pub fn containerd_major(facts: &NodeFacts, existing_config: Option<&str>) -> u64 {
    if let Some((major, _)) = facts
        .container_runtime_version
        .as_deref()
        .and_then(containerd::parse_runtime_version)
    {
        return major;
    }
    match existing_config
        .and_then(|t| containerd::parse(t).ok())
        .map(|d| containerd::detect_version(&d))
    {
        Some(v) if v.split_cri_plugins() => 2,
        _ => 1,
    }
}

/// The directory holding every file the cri stages write for a CRI (`None`: detected on the
/// node, where the containerd, CRI-O and k0s flavours all keep theirs under /etc). The chart
/// mounts exactly this writable (stage.hostMounts: precise); `host_stages` proves it suffices.
pub fn config_dir(kind: Option<CriKind>) -> PathBuf {
    let parent = |f: &str| {
        Path::new(f)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    match kind {
        None => PathBuf::from("/etc"),
        Some(CriKind::Containerd) => parent(CONTAINERD_CONFIG),
        Some(CriKind::Crio) => parent(CRIO_CONFIG),
        Some(CriKind::K3s | CriKind::K3sAgent) => k3s_dir("k3s"),
        Some(CriKind::Rke2) => k3s_dir("rke2"),
        Some(CriKind::K0s) => PathBuf::from(K0S_CONTAINERD_D),
        Some(CriKind::Microk8s) => parent(MICROK8S_TEMPLATE),
    }
}

/// k3s/rke2's containerd template for containerd 1.x, also rendered by k3s on containerd 2 when
/// there is no [`K3S_TEMPLATE_V3`].
pub const K3S_TEMPLATE_V2: &str = "config.toml.tmpl";
/// k3s/rke2's containerd template for containerd 2 (wins over [`K3S_TEMPLATE_V2`]).
pub const K3S_TEMPLATE_V3: &str = "config-v3.toml.tmpl";

/// k3s/rke2's containerd directory.
pub fn k3s_dir(dist: &str) -> PathBuf {
    PathBuf::from(format!("/var/lib/rancher/{dist}/agent/etc/containerd"))
}

/// What the plan needs from the host, read once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    /// The configuration containerd runs from (plain containerd's config.toml, the config k3s
    /// and rke2 rendered): its schema, and containerd's version when the kubelet does not say.
    pub runtime_config: Option<String>,
    /// CRI-O's main configuration (checked before anything is written).
    pub crio_config: Option<String>,
    /// The unit guessed from unit files (the cri stage then prefers the active one).
    pub unit_guess: String,
    /// k3s/rke2: the containerd templates present in the distribution's directory (file names).
    pub templates: Vec<String>,
}

/// Reads what the plan needs.
pub fn host_view(fs: &HostFs, kind: CriKind) -> Result<HostView> {
    let read_text = |p: &Path| -> Result<Option<String>> {
        Ok(fs
            .read(p)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    };
    let runtime_config = match kind {
        CriKind::Containerd => read_text(Path::new(CONTAINERD_CONFIG))?,
        CriKind::K3s | CriKind::K3sAgent => read_text(&k3s_dir("k3s").join("config.toml"))?,
        CriKind::Rke2 => read_text(&k3s_dir("rke2").join("config.toml"))?,
        _ => None,
    };
    let crio_config = if kind == CriKind::Crio {
        read_text(Path::new(CRIO_CONFIG))?
    } else {
        None
    };
    let templates = match kind {
        CriKind::K3s | CriKind::K3sAgent | CriKind::Rke2 => {
            let dir = k3s_dir(if kind == CriKind::Rke2 { "rke2" } else { "k3s" });
            [K3S_TEMPLATE_V2, K3S_TEMPLATE_V3]
                .into_iter()
                .filter(|t| fs.exists(&dir.join(t)))
                .map(str::to_string)
                .collect()
        }
        _ => Vec::new(),
    };
    Ok(HostView {
        runtime_config,
        crio_config,
        unit_guess: runtime_unit(fs, kind),
        templates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exists_in(paths: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |p| paths.contains(&p)
    }

    /// Leftover directories of a distribution (a reimaged or converted node) do not make it the
    /// node's CRI when systemd says its units do not run; the running flavour wins.
    #[test]
    fn leftover_directories_do_not_win_over_the_active_unit() {
        let units = |u: &[&str]| u.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let leftovers = exists_in(&[
            "/etc/k0s",
            "/var/snap/microk8s/current/args",
            "/etc/rancher/rke2",
            "/etc/containerd",
        ]);
        let plain = units(&["containerd.service"]);
        assert_eq!(
            detect_cri_from(Some("containerd://2.0.5"), &leftovers, Some(&plain)).unwrap(),
            CriKind::Containerd
        );
        // Not asked (no systemd): directories decide, as before.
        assert_eq!(
            detect_cri_from(Some("containerd://2.0.5"), &leftovers, None).unwrap(),
            CriKind::Rke2
        );
        let k0s = units(&["k0sworker.service"]);
        assert_eq!(
            detect_cri_from(Some("containerd://1.7.2"), &leftovers, Some(&k0s)).unwrap(),
            CriKind::K0s
        );
        // k3s agent vs server by which unit runs, whatever unit files exist.
        let both_files = exists_in(&[
            "/var/lib/rancher/k3s/agent/etc/containerd",
            "/etc/systemd/system/k3s.service",
            "/etc/systemd/system/k3s-agent.service",
        ]);
        let agent = units(&["k3s-agent.service"]);
        assert_eq!(
            detect_cri_from(Some("containerd://2.0.5-k3s1"), &both_files, Some(&agent)).unwrap(),
            CriKind::K3sAgent
        );
        assert_eq!(
            detect_cri_from(Some("containerd://2.0.5-k3s1"), &both_files, None).unwrap(),
            CriKind::K3s
        );
    }

    #[test]
    fn detects_distributions() {
        assert_eq!(
            detect_cri_from(Some("cri-o://1.31.0"), &exists_in(&[]), None).unwrap(),
            CriKind::Crio
        );
        assert_eq!(
            detect_cri_from(
                Some("containerd://1.7.27-k3s1"),
                &exists_in(&["/var/lib/rancher/rke2/agent/etc/containerd"]),
                None
            )
            .unwrap(),
            CriKind::Rke2
        );
        assert_eq!(
            detect_cri_from(
                Some("containerd://1.7.27-k3s1"),
                &exists_in(&[
                    "/var/lib/rancher/k3s/agent/etc/containerd",
                    "/etc/systemd/system/k3s-agent.service"
                ]),
                None
            )
            .unwrap(),
            CriKind::K3sAgent
        );
        assert_eq!(
            detect_cri_from(
                Some("containerd://1.7.27-k3s1"),
                &exists_in(&[
                    "/var/lib/rancher/k3s/agent/etc/containerd",
                    "/etc/systemd/system/k3s.service"
                ]),
                None
            )
            .unwrap(),
            CriKind::K3s
        );
        assert_eq!(
            detect_cri_from(None, &exists_in(&["/var/snap/microk8s/current/args"]), None).unwrap(),
            CriKind::Microk8s
        );
        assert_eq!(
            detect_cri_from(Some("containerd://1.7.2"), &exists_in(&["/etc/k0s"]), None).unwrap(),
            CriKind::K0s
        );
        assert_eq!(
            detect_cri_from(Some("containerd://2.0.5"), &exists_in(&[]), None).unwrap(),
            CriKind::Containerd
        );
        assert!(detect_cri_from(None, &exists_in(&[]), None)
            .unwrap_err()
            .contains("cri:"));
    }

    #[test]
    fn the_active_unit_is_restarted() {
        let c = unit_candidates("rke2-server.service", CriKind::Rke2);
        assert_eq!(c, ["rke2-server.service", "rke2-agent.service"]);
        assert_eq!(
            choose_active_unit(&c, &|u| u == "rke2-agent.service"),
            "rke2-agent.service"
        );
        assert_eq!(choose_active_unit(&c, &|_| true), "rke2-server.service");
        assert_eq!(
            choose_active_unit(&c, &|_| false),
            "rke2-server.service",
            "nothing active: the unit-file guess"
        );
        assert_eq!(
            unit_candidates("containerd.service", CriKind::Containerd),
            ["containerd.service"]
        );
    }

    #[test]
    fn containerd_major_prefers_reported_version() {
        let facts = NodeFacts {
            container_runtime_version: Some("containerd://2.1.0".into()),
            ..Default::default()
        };
        assert_eq!(containerd_major(&facts, Some("version = 2\n")), 2);
        assert_eq!(
            containerd_major(&NodeFacts::default(), Some("version = 3\n")),
            2
        );
        assert_eq!(containerd_major(&NodeFacts::default(), None), 1);
    }
}
