//! The one stage configuration (rendered by the chart into a ConfigMap) plus the node facts the
//! dispatcher passes as environment, validated up front so bad input never reaches the host.
//!
//! File format (see `examples/config.yaml`; unknown fields are rejected by name):
//! ```yaml
//! multiInstallSuffix: ""          # "" or a DNS label; appended to every host path, handler, label marker
//! debug: false
//! installPrefix: /opt/kata         # host path; becomes /opt/kata-<suffix> in multi-install
//! imagePullTimeoutSeconds: 1200    # create_container_timeout + agent.image_pull_timeout
//! cri: auto                        # auto | containerd | k3s | k3s-agent | rke2 | k0s | microk8s | crio
//! restart: systemd                 # systemd | none | exec:/path/to/script (tests, custom hosts)
//! runtimeReadyTimeoutSeconds: 0      # 0: per flavour (300 s k3s/rke2/microk8s, else 120 s)
//! labelReadyTimeoutSeconds: 120
//! shims:
//!   - name: qemu-nvidia-gpu        # handler = kata-<name>[-<suffix>]
//!     baseConfig: qemu-nvidia-gpu  # = name for built-in shims; the base shim for custom runtimes
//!     supportedArches: [amd64]
//!     dropIn: ""
//!     allowedHypervisorAnnotations: []
//!     containerdSnapshotter: ""    # "" | nydus
//!     crioPullType: ""             # "" | guest-pull
//!     agentHttpsProxy: ""          # optional: agent.https_proxy=<v> in kernel_params
//!     agentNoProxy: ""             # optional: agent.no_proxy=<v> in kernel_params
//!     forceGuestPull: false        # optional: [runtime] experimental_force_guest_pull = true
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StageError};
use crate::shims::{self, ShimInfo};

/// The stage configuration file, exactly as the chart renders it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StageConfig {
    /// "" or a DNS label appended to every host path, handler and label of this install.
    #[serde(default)]
    pub multi_install_suffix: String,
    /// Enable debug logging in the runtime, agent and hypervisor.
    #[serde(default)]
    pub debug: bool,
    /// Host directory of the install (suffixed in multi-install).
    #[serde(default = "default_prefix")]
    pub install_prefix: String,
    /// One knob for create_container_timeout and agent.image_pull_timeout.
    #[serde(default = "default_pull_timeout")]
    pub image_pull_timeout_seconds: u64,
    /// Which CRI/distribution to configure; `auto` detects it.
    #[serde(default = "default_cri")]
    pub cri: String,
    /// How the runtime is restarted: `systemd`, `none`, or `exec:<path>`.
    #[serde(default = "default_restart")]
    pub restart: String,
    /// How long the runtime may take to come back after a restart; 0 (the default): per flavour
    /// (see [`ValidConfig::runtime_ready_timeout`]).
    #[serde(default)]
    pub runtime_ready_timeout_seconds: u64,
    /// How long the cri / revert-cri stages wait for running pods of a handler they are about
    /// to remove to go away before failing (default 60).
    #[serde(default = "default_running_pods_wait")]
    pub running_pods_wait_seconds: u64,
    /// Remove handlers even under running pods (those pods lose their runtime).
    #[serde(default)]
    pub force_handler_removal: bool,
    /// How long the label stage waits for the node to report Ready and our handlers.
    #[serde(default = "default_label_ready")]
    pub label_ready_timeout_seconds: u64,
    /// The enabled shims (built-in and custom runtimes).
    #[serde(default)]
    pub shims: Vec<ShimConfig>,
    /// Taints the label stage removes from its own Node once it labelled it
    /// (`key[=value][:Effect]`, upstream's startupTaints).
    #[serde(default)]
    pub startup_taints: Vec<String>,
}

/// Name of our nydus snapshotter everywhere (containerd proxy plugin, socket and state
/// directories, systemd unit), as upstream kata-deploy names it: distinct from a standalone
/// nydus-snapshotter (`nydus`, /run/containerd-nydus, nydus-snapshotter.service) on the node.
pub const NYDUS_FOR_KATA: &str = "nydus-for-kata-tee";

/// One enabled shim or custom runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShimConfig {
    /// Shim name (host paths of its configuration); the handler is `kata-<name>[-<suffix>]`
    /// unless `handler` is set.
    pub name: String,
    /// The CRI handler to register, when not the derived `kata-<name>[-<suffix>]` (a custom
    /// runtime's own handler, as upstream accepts it). Never for a built-in shim.
    #[serde(default)]
    pub handler: String,
    /// The built-in shim whose configuration this one starts from (= name for built-ins).
    #[serde(default)]
    pub base_config: String,
    /// Architectures (Kubernetes names: amd64, arm64, s390x, ppc64le) the shim may run on.
    #[serde(default)]
    pub supported_arches: Vec<String>,
    /// A Kata configuration drop-in written as config.d/50-user-overrides.toml.
    #[serde(default)]
    pub drop_in: String,
    /// Hypervisor annotations added to enable_annotations.
    #[serde(default)]
    pub allowed_hypervisor_annotations: Vec<String>,
    /// Runtime-specific containerd snapshotter: "" or "nydus" (guest pull).
    #[serde(default)]
    pub containerd_snapshotter: String,
    /// CRI-O pull type: "" or "guest-pull".
    #[serde(default)]
    pub crio_pull_type: String,
    /// The guest agent's HTTPS proxy (chart: `shims.<shim>.agent.httpsProxy`), passed as upstream
    /// does: `agent.https_proxy=<value>` in the shim's kernel_params; "" sets nothing.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_https_proxy: String,
    /// The guest agent's no-proxy list (chart: `shims.<shim>.agent.noProxy`):
    /// `agent.no_proxy=<value>` in the shim's kernel_params; "" sets nothing.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_no_proxy: String,
    /// Forced guest pull (chart: `shims.<shim>.containerd.forceGuestPull`): the shim's
    /// configuration gets `[runtime] experimental_force_guest_pull = true`, as upstream writes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_guest_pull: bool,
}

fn default_prefix() -> String {
    "/opt/kata".into()
}
fn default_pull_timeout() -> u64 {
    1200
}
fn default_cri() -> String {
    "auto".into()
}
fn default_restart() -> String {
    "systemd".into()
}
fn default_running_pods_wait() -> u64 {
    60
}
fn default_label_ready() -> u64 {
    120
}

/// Which CRI (and distribution flavour) a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CriKind {
    /// Plain containerd (/etc/containerd).
    Containerd,
    /// k3s server (embedded containerd, config template).
    K3s,
    /// k3s agent.
    K3sAgent,
    /// rke2 (embedded containerd, config template).
    Rke2,
    /// k0s (containerd.d drop-ins).
    K0s,
    /// microk8s (snap, containerd-template.toml).
    Microk8s,
    /// CRI-O.
    Crio,
}

impl CriKind {
    /// Parses the `cri` config value; `auto` yields None.
    pub fn parse(s: &str) -> Option<Option<CriKind>> {
        Some(Some(match s {
            "auto" => return Some(None),
            "containerd" => CriKind::Containerd,
            "k3s" => CriKind::K3s,
            "k3s-agent" => CriKind::K3sAgent,
            "rke2" => CriKind::Rke2,
            "k0s" => CriKind::K0s,
            "microk8s" => CriKind::Microk8s,
            "crio" => CriKind::Crio,
            _ => return None,
        }))
    }

    /// The config-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CriKind::Containerd => "containerd",
            CriKind::K3s => "k3s",
            CriKind::K3sAgent => "k3s-agent",
            CriKind::Rke2 => "rke2",
            CriKind::K0s => "k0s",
            CriKind::Microk8s => "microk8s",
            CriKind::Crio => "crio",
        }
    }

    /// Whether the runtime is (some flavour of) containerd.
    pub fn is_containerd(self) -> bool {
        !matches!(self, CriKind::Crio)
    }
}

/// How the runtime gets restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartMode {
    /// systemctl (in the host's mount namespace when the host root is not `/`).
    Systemd,
    /// Never restart; the operator does it.
    None,
    /// Run `<path> restart|status|start|stop <unit>` (tests, unusual hosts).
    Exec(PathBuf),
}

/// Hypervisor annotations Kata marks restricted (R): they let a pod choose host binaries/paths.
pub const RESTRICTED_ANNOTATIONS: &[&str] = &[
    "entropy_source",
    "file_mem_backend",
    "jailer_path",
    "path",
    "vhost_user_store_path",
    "virtio_fs_daemon",
    "ctlpath",
];

/// A configuration that passed validation, with warnings worth showing.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// The parsed file.
    pub cfg: StageConfig,
    /// Where it was read from (for messages).
    pub file: PathBuf,
    /// The CRI forced by the config, or None for auto-detection.
    pub cri: Option<CriKind>,
    /// Parsed restart mode.
    pub restart: RestartMode,
    /// Non-fatal findings (e.g. restricted annotations allowed).
    pub warnings: Vec<String>,
}

impl ValidConfig {
    /// The configuration as it applies to a node of `arch`: shims not supported there are left
    /// out (that is what `supportedArches` means), and their names returned. A node on which no
    /// enabled shim can run is a configuration error.
    pub fn for_arch(mut self, arch: &str) -> Result<(Self, Vec<String>)> {
        let (kept, skipped): (Vec<ShimConfig>, Vec<ShimConfig>) =
            std::mem::take(&mut self.cfg.shims)
                .into_iter()
                .partition(|s| s.allowed_arches().contains(&arch));
        if kept.is_empty() {
            return Err(StageError::Config {
                file: self.file.clone(),
                field: "shims".into(),
                message: format!(
                    "none of the enabled shims ({}) supports this node's architecture {arch}: enable a shim for {arch}, or exclude {arch} nodes with job.nodeSelectorExpressions on kubernetes.io/arch",
                    skipped.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        self.cfg.shims = kept;
        Ok((self, skipped.into_iter().map(|s| s.name).collect()))
    }

    /// Names of this install (paths, handlers, labels).
    pub fn install(&self) -> Install {
        Install::new(&self.cfg.multi_install_suffix, &self.cfg.install_prefix)
    }

    /// How long the runtime of `kind` may take to come back after a restart: the configured
    /// value, else 300 s where the restart is the whole distribution's agent (k3s, rke2,
    /// microk8s: upstream waits as long) and 120 s for a plain runtime. Too short a deadline
    /// rolls back a healthy slow restart, at the cost of two more restarts.
    pub fn runtime_ready_timeout(&self, kind: Option<CriKind>) -> std::time::Duration {
        let secs = match (self.cfg.runtime_ready_timeout_seconds, kind) {
            (0, Some(CriKind::K3s | CriKind::K3sAgent | CriKind::Rke2 | CriKind::Microk8s)) => 300,
            (0, _) => 120,
            (s, _) => s,
        };
        std::time::Duration::from_secs(secs)
    }

    /// Whether any shim pulls images in the guest via nydus (containerd).
    pub fn uses_nydus(&self) -> bool {
        self.cfg
            .shims
            .iter()
            .any(|s| s.containerd_snapshotter == "nydus")
    }
}

/// Reads and validates a configuration file.
pub fn load_config(path: &Path) -> Result<ValidConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StageError::config(
            path,
            "<file>",
            format!("cannot read: {e} (mount the kata-deploy stage ConfigMap or pass --config)"),
        )
    })?;
    parse_config(&text, path)
}

/// Parses and validates configuration text; `file` is only used in messages.
pub fn parse_config(text: &str, file: &Path) -> Result<ValidConfig> {
    let cfg: StageConfig = serde_yaml::from_str(text).map_err(|e| {
        // serde names the unknown/mistyped field in its message; keep it verbatim.
        StageError::config(file, field_from_serde(&e.to_string()), e.to_string())
    })?;
    validate(cfg, file)
}

fn field_from_serde(msg: &str) -> String {
    // "unknown field `foo`, expected one of ..." -> foo
    msg.split('`').nth(1).unwrap_or("<document>").to_string()
}

/// Whether `s` is an RFC 1123 DNS label.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Builds the error for a field of the configuration file.
type FieldError<'a> = &'a dyn Fn(&str, String) -> StageError;

fn validate(cfg: StageConfig, file: &Path) -> Result<ValidConfig> {
    let err = |field: &str, msg: String| StageError::config(file, field, msg);
    validate_install(&cfg, &err)?;
    let cri = CriKind::parse(&cfg.cri).ok_or_else(|| {
        err(
            "cri",
            format!(
                "{:?} is not one of auto, containerd, k3s, k3s-agent, rke2, k0s, microk8s, crio",
                cfg.cri
            ),
        )
    })?;
    let restart = match cfg.restart.as_str() {
        "systemd" => RestartMode::Systemd,
        "none" => RestartMode::None,
        s if s.starts_with("exec:") && s.len() > 5 => RestartMode::Exec(PathBuf::from(&s[5..])),
        s => {
            return Err(err(
                "restart",
                format!("{s:?} is not one of systemd, none, exec:<path>"),
            ))
        }
    };
    if cfg.shims.is_empty() {
        return Err(err(
            "shims",
            "no shim is enabled; enable at least one shim in the chart values".into(),
        ));
    }
    let install = Install::new(&cfg.multi_install_suffix, &cfg.install_prefix);
    let mut warnings = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut handlers = std::collections::BTreeSet::new();
    for (i, shim) in cfg.shims.iter().enumerate() {
        let f = |name: &str| format!("shims[{i}].{name}");
        if !seen.insert(shim.name.clone()) {
            return Err(err(&f("name"), format!("{:?} is listed twice", shim.name)));
        }
        let handler = validate_shim_identity(shim, &install, &f, &err)?;
        if !handlers.insert(handler.clone()) {
            return Err(err(&f("handler"), format!("handler {handler:?} is registered by another shim of this configuration; every shim needs its own handler")));
        }
        validate_shim_options(shim, &f, &err, &mut warnings)?;
    }
    Ok(ValidConfig {
        cfg,
        file: file.to_path_buf(),
        cri,
        restart,
        warnings,
    })
}

/// The install-wide fields: suffix, prefix, startup taints, image-pull timeout.
fn validate_install(cfg: &StageConfig, err: FieldError) -> Result<()> {
    let suffix = &cfg.multi_install_suffix;
    if !suffix.is_empty() {
        if !is_dns_label(suffix) {
            return Err(err("multiInstallSuffix", format!("{suffix:?} is not a DNS label (lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit)")));
        }
        // The longest name derived from the suffix is the claim label's name part.
        if suffix.len() > 63 - "kata-deploy-claimed-".len() {
            return Err(err("multiInstallSuffix", format!("{suffix:?} is too long: labels like katacontainers.io/kata-deploy-claimed-<suffix> must stay within 63 characters; use at most 43")));
        }
    }
    if !cfg.install_prefix.starts_with('/')
        || cfg.install_prefix.contains("..")
        || cfg.install_prefix.trim_end_matches('/').is_empty()
    {
        return Err(err(
            "installPrefix",
            format!(
                "{:?} must be an absolute host path like /opt/kata",
                cfg.install_prefix
            ),
        ));
    }
    for t in &cfg.startup_taints {
        crate::label::TaintMatch::parse(t).map_err(|m| err("startupTaints", m))?;
    }
    if cfg.image_pull_timeout_seconds == 0 {
        return Err(err(
            "imagePullTimeoutSeconds",
            "must be greater than 0 (default 1200)".into(),
        ));
    }
    Ok(())
}

/// A shim's name, handler and base configuration; returns its handler.
fn validate_shim_identity(
    shim: &ShimConfig,
    install: &Install,
    f: &dyn Fn(&str) -> String,
    err: FieldError,
) -> Result<String> {
    if !is_dns_label(&shim.name) {
        return Err(err(
            &f("name"),
            format!("{:?} is not a DNS label", shim.name),
        ));
    }
    let handler = install.handler_of(shim);
    let built_in = shims::lookup(&shim.name).is_some();
    if !shim.handler.is_empty() {
        if !is_dns_label(&shim.handler) {
            return Err(err(&f("handler"), format!("{:?} is not a handler name: use a DNS label (lowercase letters, digits and '-', at most 63 characters)", shim.handler)));
        }
        if built_in {
            return Err(err(&f("handler"), format!("built-in shim {:?} always registers handler {:?}; leave handler empty, or define a custom runtime with its own name", shim.name, install.handler(&shim.name))));
        }
    } else if !is_dns_label(&handler) {
        return Err(err(&f("name"), format!("handler {handler:?} would exceed 63 characters; shorten the shim name or the suffix")));
    }
    let base = shim.base();
    if shims::lookup(base).is_none() {
        return Err(err(
            &f("baseConfig"),
            format!(
                "unknown shim {base:?}; known shims: {}",
                shims::names().join(", ")
            ),
        ));
    }
    if built_in && base != shim.name {
        return Err(err(&f("baseConfig"), format!("built-in shim {:?} must use baseConfig {:?} (or be left empty); use a different name for a custom runtime", shim.name, shim.name)));
    }
    Ok(handler)
}

/// A shim's options: architectures, drop-in, annotations, guest pull, agent proxies.
fn validate_shim_options(
    shim: &ShimConfig,
    f: &dyn Fn(&str) -> String,
    err: FieldError,
    warnings: &mut Vec<String>,
) -> Result<()> {
    for arch in &shim.supported_arches {
        if !["amd64", "arm64", "s390x", "ppc64le"].contains(&arch.as_str()) {
            return Err(err(
                &f("supportedArches"),
                format!("{arch:?} is not one of amd64, arm64, s390x, ppc64le"),
            ));
        }
    }
    if !shim.drop_in.trim().is_empty() {
        if let Err(e) = shim.drop_in.parse::<toml_edit::DocumentMut>() {
            return Err(err(
                &f("dropIn"),
                format!("is not valid TOML: {}", e.to_string().trim()),
            ));
        }
    }
    for a in &shim.allowed_hypervisor_annotations {
        if a.is_empty()
            || !a
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(err(&f("allowedHypervisorAnnotations"), format!("{a:?} is not a hypervisor annotation name (e.g. default_memory, kernel_params)")));
        }
        if RESTRICTED_ANNOTATIONS.contains(&a.as_str()) {
            warnings.push(format!(
                "shim {}: allowing restricted annotation {a:?} lets pods choose host paths; its values are still limited by the valid_* list in the base configuration",
                shim.name
            ));
        }
    }
    for (field, value, allowed) in [
        (
            "containerdSnapshotter",
            &shim.containerd_snapshotter,
            "nydus",
        ),
        ("crioPullType", &shim.crio_pull_type, "guest-pull"),
    ] {
        if !value.is_empty() && value != allowed {
            return Err(err(
                &f(field),
                format!("{value:?} is not supported; use \"\" or \"{allowed}\""),
            ));
        }
    }
    for (field, chart_key, value) in [
        (
            "agentHttpsProxy",
            "agent.httpsProxy",
            &shim.agent_https_proxy,
        ),
        ("agentNoProxy", "agent.noProxy", &shim.agent_no_proxy),
    ] {
        if let Some(why) = crate::katacfg::kernel_param_value_problem(value) {
            return Err(err(&f(field), format!("{value:?} (chart: shims.{}.{chart_key}) cannot go on the guest kernel command line, where the stage passes it (kernel_params of the shim's configuration): it contains {why}. Remove it (a no-proxy list is comma-separated, without spaces)", shim.name)));
        }
    }
    Ok(())
}

impl ShimConfig {
    /// Architectures this shim is installed on: its `supportedArches`, else the shim's own list.
    pub fn allowed_arches(&self) -> Vec<&str> {
        if self.supported_arches.is_empty() {
            self.info().arches.to_vec()
        } else {
            self.supported_arches.iter().map(String::as_str).collect()
        }
    }

    /// The built-in shim this one is based on.
    pub fn base(&self) -> &str {
        if self.base_config.is_empty() {
            &self.name
        } else {
            &self.base_config
        }
    }

    /// Static facts about the base shim (validated to exist).
    pub fn info(&self) -> &'static ShimInfo {
        shims::lookup(self.base()).expect("validated shim")
    }

    /// Whether the shim passes GPUs through with VFIO (needs IOMMU, no host driver).
    pub fn is_gpu_passthrough(&self) -> bool {
        self.info().gpu_passthrough
    }

    /// Whether the shim pulls images inside the guest.
    pub fn uses_guest_pull(&self) -> bool {
        self.containerd_snapshotter == "nydus" || self.crio_pull_type == "guest-pull"
    }
}

/// Every name of one install: host paths, handlers, label keys. Nothing is shared between installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    /// "" or the multi-install suffix.
    pub suffix: String,
    /// The install prefix on the host (already suffixed).
    pub prefix: PathBuf,
}

impl Install {
    /// Derives the names from the suffix and the configured prefix.
    pub fn new(suffix: &str, install_prefix: &str) -> Self {
        let base = install_prefix.trim_end_matches('/');
        let prefix = if suffix.is_empty() {
            PathBuf::from(base)
        } else {
            PathBuf::from(format!("{base}-{suffix}"))
        };
        Install {
            suffix: suffix.to_string(),
            prefix,
        }
    }

    /// `base` or `base-<suffix>`.
    pub fn suffixed(&self, base: &str) -> String {
        if self.suffix.is_empty() {
            base.to_string()
        } else {
            format!("{base}-{}", self.suffix)
        }
    }

    /// The derived CRI handler / RuntimeClass handler of a shim name: `kata-<name>[-<suffix>]`.
    pub fn handler(&self, shim: &str) -> String {
        self.suffixed(&format!("kata-{shim}"))
    }

    /// The CRI handler a configured shim registers: its own `handler`, else the derived one.
    pub fn handler_of(&self, shim: &ShimConfig) -> String {
        if shim.handler.is_empty() {
            self.handler(&shim.name)
        } else {
            shim.handler.clone()
        }
    }

    /// containerd runtime_type for a configured shim.
    pub fn runtime_type(&self, shim: &ShimConfig) -> String {
        format!("io.containerd.{}.v2", self.handler_of(shim))
    }

    /// Host path of the shim binary (go runtime or runtime-rs).
    pub fn shim_binary(&self, shim: &ShimConfig) -> PathBuf {
        if shim.info().runtime_rs {
            self.prefix.join("runtime-rs/bin/containerd-shim-kata-v2")
        } else {
            self.prefix.join("bin/containerd-shim-kata-v2")
        }
    }

    /// Directory holding a shim's own configuration and its config.d drop-ins.
    pub fn shim_config_dir(&self, shim: &str) -> PathBuf {
        self.prefix
            .join("share/defaults/kata-containers/runtimes")
            .join(shim)
    }

    /// The ConfigPath given to the shim.
    pub fn shim_config_path(&self, shim: &str) -> PathBuf {
        self.shim_config_dir(shim)
            .join(format!("configuration-{shim}.toml"))
    }

    /// Per-install state directory (installed-file manifest, CRI backups).
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(self.suffixed("/var/lib/kata-deploy"))
    }

    /// File name of our CRI drop-ins.
    pub fn dropin_file_name(&self) -> String {
        format!("{}.toml", self.suffixed("kata-deploy"))
    }

    /// containerd proxy snapshotter name for nydus.
    pub fn nydus_snapshotter(&self) -> String {
        self.suffixed(NYDUS_FOR_KATA)
    }

    /// nydus snapshotter gRPC socket.
    pub fn nydus_socket(&self) -> String {
        format!(
            "/run/{}/containerd-nydus-grpc.sock",
            self.suffixed(NYDUS_FOR_KATA)
        )
    }

    /// systemd unit running the nydus snapshotter of this install.
    pub fn nydus_unit(&self) -> String {
        format!("{}.service", self.suffixed(NYDUS_FOR_KATA))
    }

    /// Label marking a node whose host this install may have touched (set before any change).
    pub fn claimed_label(&self) -> String {
        format!("katacontainers.io/{}", self.suffixed("kata-deploy-claimed"))
    }

    /// Per-install state label (`kubectl get nodes -L <key>`): `installing` (claim), `installed`
    /// (label), `cleaning` (unlabel), gone after unclaim; the dispatcher writes `pending` before
    /// it creates a node's Job and `failed` when the Job failed.
    pub fn state_label(&self) -> String {
        format!("katacontainers.io/{}", self.suffixed("kata-deploy-state"))
    }

    /// Per-install marker label (tells whether another install still serves the node).
    pub fn marker_label(&self) -> String {
        format!(
            "katacontainers.io/{}",
            self.suffixed("kata-deploy-installed")
        )
    }
}

/// The shared label every install sets once its handlers are served.
pub const RUNTIME_LABEL: &str = "katacontainers.io/kata-runtime";
/// Prefix shared by every install's marker label.
pub const MARKER_LABEL_PREFIX: &str = "katacontainers.io/kata-deploy-installed";

/// Node facts from the dispatcher (environment of the per-node Job).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeFacts {
    /// KATA_NODE_NAME.
    pub name: Option<String>,
    /// KATA_NODE_UID.
    pub uid: Option<String>,
    /// KATA_NODE_MACHINE_ID.
    pub machine_id: Option<String>,
    /// KATA_NODE_CONTAINER_RUNTIME_VERSION, e.g. containerd://2.0.5.
    pub container_runtime_version: Option<String>,
    /// KATA_NODE_KUBELET_VERSION.
    pub kubelet_version: Option<String>,
    /// KATA_NODE_ARCH.
    pub arch: Option<String>,
    /// The runtime units systemd reports active (None: not asked, e.g. no systemd): a flavour's
    /// leftover directories do not make it the node's CRI when its units do not run.
    pub active_units: Option<Vec<String>>,
    /// KATA_NODE_CRI_UNKNOWN: why the dispatcher could not tell this node's CRI configuration
    /// directory (with `cri: auto` the Job then mounts none of it writable).
    pub cri_unknown: Option<String>,
}

impl NodeFacts {
    /// Reads the KATA_NODE_* environment; empty values count as unset.
    pub fn from_env() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        NodeFacts {
            name: get("KATA_NODE_NAME"),
            uid: get("KATA_NODE_UID"),
            machine_id: get("KATA_NODE_MACHINE_ID"),
            container_runtime_version: get("KATA_NODE_CONTAINER_RUNTIME_VERSION"),
            kubelet_version: get("KATA_NODE_KUBELET_VERSION"),
            arch: get("KATA_NODE_ARCH"),
            active_units: None,
            cri_unknown: get("KATA_NODE_CRI_UNKNOWN"),
        }
    }

    /// Node name for messages.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| "<this host>".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/config.yaml");

    fn parse(s: &str) -> Result<ValidConfig> {
        parse_config(s, Path::new("cfg.yaml"))
    }

    #[test]
    fn shims_not_supported_on_the_node_arch_are_left_out() {
        let c = |y: &str| parse_config(y, Path::new("cfg.yaml")).unwrap();
        let (cfg, skipped) = c(
            "shims: [{name: qemu}, {name: qemu-se}, {name: qemu-tdx, supportedArches: [amd64]}]\n",
        )
        .for_arch("amd64")
        .unwrap();
        assert_eq!(
            cfg.cfg
                .shims
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["qemu", "qemu-tdx"]
        );
        assert_eq!(skipped, ["qemu-se"]);
        let e = c("shims: [{name: qemu-se}]\n")
            .for_arch("amd64")
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains(
                "none of the enabled shims (qemu-se) supports this node's architecture amd64"
            ),
            "{e}"
        );
    }

    #[test]
    fn example_config_parses() {
        let v = parse(EXAMPLE).unwrap();
        assert_eq!(v.cfg.shims[0].name, "qemu-nvidia-gpu");
        assert_eq!(v.restart, RestartMode::Systemd);
        assert_eq!(v.cri, None);
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let e = parse("shims: []\nbogusField: 1\n").unwrap_err().to_string();
        assert!(e.contains("bogusField"), "{e}");
        let e = parse("shims:\n- name: qemu\n  snapshoter: nydus\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshoter"), "{e}");
    }

    #[test]
    fn suffix_must_be_dns_label() {
        for bad in ["Foo", "-a", "a_b", "a.b"] {
            let e = parse(&format!(
                "multiInstallSuffix: {bad:?}\nshims: [{{name: qemu}}]\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("multiInstallSuffix"), "{e}");
        }
        assert!(parse("multiInstallSuffix: cicd\nshims: [{name: qemu}]\n").is_ok());
    }

    #[test]
    fn unknown_shim_and_bad_dropin_are_named() {
        let e = parse("shims: [{name: qemoo}]\n").unwrap_err().to_string();
        assert!(
            e.contains("shims[0].baseConfig") && e.contains("qemoo"),
            "{e}"
        );
        let e = parse("shims: [{name: qemu, dropIn: \"[hypervisor\"}]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shims[0].dropIn"), "{e}");
        let e = parse("shims: [{name: qemu}, {name: qemu}]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn custom_runtime_needs_known_base() {
        let v = parse("shims: [{name: my-gpu, baseConfig: qemu-nvidia-gpu}]\n").unwrap();
        assert!(v.cfg.shims[0].is_gpu_passthrough());
        assert!(parse("shims: [{name: qemu, baseConfig: clh}]\n").is_err());
    }

    #[test]
    fn agent_proxy_and_forced_guest_pull_are_read_and_checked_per_shim() {
        let v = parse("shims: [{name: qemu-tdx, agentHttpsProxy: 'http://proxy:3128', agentNoProxy: '.svc,10.0.0.0/8', forceGuestPull: true}, {name: qemu}]\n").unwrap();
        let (tdx, qemu) = (&v.cfg.shims[0], &v.cfg.shims[1]);
        assert_eq!(
            (tdx.agent_https_proxy.as_str(), tdx.agent_no_proxy.as_str()),
            ("http://proxy:3128", ".svc,10.0.0.0/8")
        );
        assert!(tdx.force_guest_pull && !qemu.force_guest_pull);
        assert!(qemu.agent_https_proxy.is_empty() && qemu.agent_no_proxy.is_empty());
        for (bad, field, key) in [
            (
                "[{name: qemu, agentHttpsProxy: 'http://a b:1'}]",
                "shims[0].agentHttpsProxy",
                "shims.qemu.agent.httpsProxy",
            ),
            (
                "[{name: qemu}, {name: qemu-snp, agentNoProxy: '\"10.0.0.0/8\"'}]",
                "shims[1].agentNoProxy",
                "shims.qemu-snp.agent.noProxy",
            ),
        ] {
            let e = parse(&format!("shims: {bad}\n")).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            let e = e.to_string();
            assert!(
                e.contains(field) && e.contains(key) && e.contains("kernel command line"),
                "{bad}: {e}"
            );
        }
        // upstream's spelling is the chart's, not the stage's
        let e = parse("shims: [{name: qemu, httpsProxy: x}]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("httpsProxy"), "{e}");
    }

    #[test]
    fn restricted_annotations_warn() {
        let v =
            parse("shims: [{name: qemu, allowedHypervisorAnnotations: [default_memory, path]}]\n")
                .unwrap();
        assert_eq!(v.warnings.len(), 1);
        assert!(v.warnings[0].contains("\"path\""));
    }

    #[test]
    fn a_custom_runtime_keeps_its_own_handler_even_with_a_suffix() {
        // Was impossible: the handler was always kata-<name>-<suffix> (seed 004's example handler
        // was refused once a suffix was set).
        let v = parse(
            "multiInstallSuffix: cicd\nshims: [{name: qemu}, {name: gpu-custom, baseConfig: qemu-nvidia-gpu, handler: my-gpu}]\n",
        )
        .unwrap();
        let i = v.install();
        let h: Vec<String> = v.cfg.shims.iter().map(|s| i.handler_of(s)).collect();
        assert_eq!(h, ["kata-qemu-cicd", "my-gpu"]);
        assert_eq!(i.runtime_type(&v.cfg.shims[1]), "io.containerd.my-gpu.v2");
        for (bad, field, why) in [
            (
                "[{name: qemu, handler: my-qemu}]",
                "shims[0].handler",
                "built-in shim",
            ),
            (
                "[{name: c, baseConfig: qemu, handler: My_GPU}]",
                "shims[0].handler",
                "DNS label",
            ),
            (
                "[{name: qemu}, {name: c, baseConfig: qemu, handler: kata-qemu}]",
                "shims[1].handler",
                "another shim",
            ),
        ] {
            let e = parse(&format!("shims: {bad}\n")).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn install_names_are_suffixed() {
        let i = Install::new("cicd", "/opt/kata/");
        assert_eq!(i.prefix, PathBuf::from("/opt/kata-cicd"));
        assert_eq!(i.handler("qemu"), "kata-qemu-cicd");
        let v = parse("multiInstallSuffix: cicd\nshims: [{name: qemu}]\n").unwrap();
        assert_eq!(
            i.runtime_type(&v.cfg.shims[0]),
            "io.containerd.kata-qemu-cicd.v2"
        );
        assert_eq!(i.state_dir(), PathBuf::from("/var/lib/kata-deploy-cicd"));
        assert_eq!(
            i.claimed_label(),
            "katacontainers.io/kata-deploy-claimed-cicd"
        );
        let d = Install::new("", "/opt/kata");
        assert_eq!(d.handler("qemu"), "kata-qemu");
        assert_eq!(
            d.nydus_socket(),
            "/run/nydus-for-kata-tee/containerd-nydus-grpc.sock"
        );
        assert_eq!(d.nydus_unit(), "nydus-for-kata-tee.service");
        assert_eq!(d.nydus_snapshotter(), "nydus-for-kata-tee");
        assert_eq!(d.marker_label(), "katacontainers.io/kata-deploy-installed");
    }
}
