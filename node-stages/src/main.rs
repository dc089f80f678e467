//! kata-deploy-stage: one binary, a subcommand per stage. Exit codes: 0 done, 1 failed
//! (host as it was, or a state a re-run converges from), 2 bad configuration/input.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kata_deploy_stage::config::{load_config, NodeFacts, RestartMode, ValidConfig};
use kata_deploy_stage::error::StageError;
use kata_deploy_stage::hostcheck;
use kata_deploy_stage::hostfs::HostFs;
use kata_deploy_stage::label::{NodeLabeler, TaintMatch};
use kata_deploy_stage::restart::{
    ExecRestarter, NoRestarter, Restarter, SystemdRestarter, SYSTEMD_CALL_DEADLINE,
};
use kata_deploy_stage::selfreload::SelfReloading;
use kata_deploy_stage::stages::{self, Claims, StageEnv, StageReport};
use kata_deploy_stage::{checkpoint, cri};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stage {
    HostCheck,
    Artifacts,
    Cri,
    /// After cri: remove the files artifacts kept while the runtime still used them.
    PruneArtifacts,
    Label,
    Unlabel,
    RevertCri,
    RemoveArtifacts,
    /// Mark the node claimed by this install (API only; before the first host change).
    Claim,
    /// Drop the claim (API only; after remove-artifacts succeeded).
    Unclaim,
    /// Print, as JSON, the host directories each host stage writes under this configuration.
    WritableDirs,
    Install,
    Uninstall,
    Status,
    /// Copy this binary to --copy-to (the chart's emptyDir), to run it in the release image.
    CopySelf,
}

/// Who marks the node claimed around the host stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ClaimMode {
    /// The host stages claim (artifacts, cri) and unclaim (remove-artifacts) themselves.
    Inline,
    /// The separate `claim` / `unclaim` stages do it: the host stages make no API call and need
    /// no ServiceAccount token (the chart's per-node Jobs).
    External,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Privileged per-node install/uninstall stages for Kata Containers (kata-deploy job mode).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The stage configuration (rendered by the chart into a ConfigMap).
    #[arg(
        long,
        env = "KATA_STAGE_CONFIG",
        default_value = "/etc/kata-deploy/config.yaml"
    )]
    config: PathBuf,
    /// Prefix of every host path.
    #[arg(long, env = "KATA_HOST_ROOT", default_value = "/host")]
    host_root: PathBuf,
    /// The payload: a directory with SHA256SUMS (the stage image's own) or the official Kata
    /// release image's /opt/kata-artifacts (shim-components.json and tarballs/).
    #[arg(long, env = "KATA_PAYLOAD_DIR", default_value = "/opt/kata-payload")]
    payload: PathBuf,
    /// copy-self: where to write the copy of this binary.
    #[arg(long, env = "KATA_STAGE_COPY_TO", default_value = kata_deploy_stage::selfcopy::DEFAULT_DEST)]
    copy_to: PathBuf,
    /// Print what would change (file diffs, restart or not) and change nothing.
    #[arg(long, env = "KATA_STAGE_DRY_RUN")]
    dry_run: bool,
    /// Report format.
    #[arg(long, value_enum, default_value = "text", env = "KATA_STAGE_OUTPUT")]
    output: Output,
    /// How long to wait for the host lock held by another stage or install.
    #[arg(long, env = "KATA_STAGE_LOCK_TIMEOUT_SECONDS", default_value_t = 300)]
    lock_timeout_seconds: u64,
    /// Seconds between labelling and re-checking that the labels stuck (k3s/rke2 re-registration).
    #[arg(long, env = "KATA_STAGE_LABEL_RECHECK_SECONDS", default_value_t = 10)]
    label_recheck_seconds: u64,
    /// Who marks the node claimed: the host stages themselves (inline) or the separate claim /
    /// unclaim stages (external).
    #[arg(long, value_enum, env = "KATA_STAGE_CLAIMS", default_value = "inline")]
    claims: ClaimMode,
    /// The stage to run.
    #[arg(value_enum)]
    stage: Stage,
}

/// Claims through the Kubernetes API when the dispatcher gave us a node; skipped (with a
/// warning) in standalone runs without KATA_NODE_NAME.
struct KubeClaims<'a> {
    rt: &'a tokio::runtime::Runtime,
    facts: &'a NodeFacts,
    cfg: &'a ValidConfig,
    /// The claim / unclaim stages do it; the host stages make no API call.
    external: bool,
}

impl KubeClaims<'_> {
    fn run(&self, claim: bool) -> Result<(), StageError> {
        if self.external {
            tracing::debug!("claims are made by the separate claim / unclaim stages");
            return Ok(());
        }
        self.set(claim)
    }

    /// Claims or unclaims through the API (the claim / unclaim stages, or inline).
    fn set(&self, claim: bool) -> Result<(), StageError> {
        if self.facts.name.is_none() {
            tracing::warn!(
                "KATA_NODE_NAME not set (standalone run): the node is not marked claimed"
            );
            return Ok(());
        }
        let install = self.cfg.install();
        self.rt.block_on(async {
            let l = NodeLabeler::connect(self.facts).await?;
            if claim {
                l.claim(&install).await
            } else {
                l.unclaim(&install).await
            }
            .map(drop)
        })
    }
}

impl Claims for KubeClaims<'_> {
    fn claim(&self) -> Result<(), StageError> {
        self.run(true)
    }
    fn unclaim(&self) -> Result<(), StageError> {
        self.run(false)
    }
}

fn print(report: &StageReport, output: Output) {
    match output {
        Output::Text => print!("{}", report.text()),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        ),
    }
}

/// The runtime units systemd reports active (None when systemd cannot be asked): detection then
/// prefers the flavour that runs over a leftover one's directories.
fn active_runtime_units(host_root: &std::path::Path) -> Option<Vec<String>> {
    let systemd = SystemdRestarter::new(host_root).with_deadline(Duration::from_secs(5));
    let mut active = Vec::new();
    for unit in cri::all_runtime_units() {
        match systemd.status(unit) {
            Ok(st) if st.active => active.push(unit.to_string()),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "systemd not asked about runtime units");
                return None;
            }
        }
    }
    Some(active)
}

fn run(cli: &Cli) -> Result<(), StageError> {
    let mut facts = NodeFacts::from_env();
    let cfg = load_for_arch(cli, &facts)?;
    let fs = HostFs::new(&cli.host_root, cli.dry_run);
    let restarter = build_restarter(cli, &cfg, &fs, &mut facts);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let claims = KubeClaims {
        rt: &rt,
        facts: &facts,
        cfg: &cfg,
        external: cli.claims == ClaimMode::External,
    };
    let env = StageEnv {
        cfg: &cfg,
        facts: &facts,
        fs: &fs,
        payload_dir: &cli.payload,
        restarter: restarter.as_ref(),
        claims: &claims,
        lock_wait: Duration::from_secs(cli.lock_timeout_seconds),
    };
    let label = |install: bool| run_label(cli, &rt, &facts, &cfg, install);
    run_stage(cli, &env, &claims, &label)
}

/// The configuration for this node's architecture (shims it does not support are skipped).
fn load_for_arch(cli: &Cli, facts: &NodeFacts) -> Result<ValidConfig, StageError> {
    let arch = facts
        .arch
        .clone()
        .unwrap_or_else(|| kata_deploy_stage::shims::kube_arch(std::env::consts::ARCH).to_string());
    let (cfg, skipped) = load_config(&cli.config)?.for_arch(&arch)?;
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    if !skipped.is_empty() {
        tracing::info!(arch = %arch, shims = %skipped.join(","), "shims not supported on this architecture are skipped");
    }
    Ok(cfg)
}

/// How the runtime is restarted: systemd over D-Bus (asked first which runtime units are active,
/// for detection; k0s reloads its containerd itself), nothing, or an exec script.
fn build_restarter(
    cli: &Cli,
    cfg: &ValidConfig,
    fs: &HostFs,
    facts: &mut NodeFacts,
) -> Box<dyn Restarter> {
    match &cfg.restart {
        RestartMode::Systemd => {
            if cfg.cri.is_none() {
                facts.active_units = active_runtime_units(&cli.host_root);
            }
            let kind = cri::resolve_cri(fs, cfg, facts).ok();
            let socket = kind.map(|k| fs.host(std::path::Path::new(cri::cri_socket(k))));
            // A restart job of a slow flavour (k3s's unit is ready only when k3s is) may take
            // as long as the runtime may take to be ready.
            let deadline = cfg.runtime_ready_timeout(kind).max(SYSTEMD_CALL_DEADLINE);
            let systemd = Box::new(
                SystemdRestarter::new(&cli.host_root)
                    .with_cri_socket(socket)
                    .with_deadline(deadline),
            );
            if kind == Some(kata_deploy_stage::config::CriKind::K0s) {
                Box::new(SelfReloading::k0s(systemd, &cli.host_root))
            } else {
                systemd
            }
        }
        RestartMode::None => Box::new(NoRestarter),
        RestartMode::Exec(p) => Box::new(ExecRestarter { script: p.clone() }),
    }
}

/// The label (install) or unlabel stage: the node's labels through the API.
fn run_label(
    cli: &Cli,
    rt: &tokio::runtime::Runtime,
    facts: &NodeFacts,
    cfg: &ValidConfig,
    install: bool,
) -> Result<(), StageError> {
    if cli.dry_run {
        let stage = if install { "label" } else { "unlabel" };
        println!("{stage}: dry run, labels not changed");
        return Ok(());
    }
    rt.block_on(async {
        let l = NodeLabeler::connect(facts).await?;
        let i = cfg.install();
        if !install {
            return l.unlabel(&i).await.map(drop);
        }
        let handlers: Vec<String> = cfg.cfg.shims.iter().map(|s| i.handler_of(s)).collect();
        l.label_installed(
            &i,
            &handlers,
            Duration::from_secs(cfg.cfg.label_ready_timeout_seconds),
            Duration::from_secs(cli.label_recheck_seconds),
        )
        .await?;
        // The last step: Kata pods may land on the node from now on.
        let lift: Vec<TaintMatch> = cfg
            .cfg
            .startup_taints
            .iter()
            .filter_map(|t| TaintMatch::parse(t).ok())
            .collect();
        l.lift_startup_taints(&lift).await.map(drop)
    })
}

fn run_host_check(cli: &Cli, env: &StageEnv) -> Result<(), StageError> {
    let r = stages::host_check(env);
    match cli.output {
        Output::Text => print!("{}", hostcheck::render_text(&r.node, &r.findings)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default()),
    }
    r.into_result()
}

/// Runs the stage the command line names (install / uninstall: the whole pipeline).
fn run_stage(
    cli: &Cli,
    env: &StageEnv,
    claims: &KubeClaims,
    label: &dyn Fn(bool) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let out = cli.output;
    match cli.stage {
        Stage::HostCheck => run_host_check(cli, env),
        Stage::Artifacts => stages::run_artifacts(env).map(|r| print(&r, out)),
        Stage::Cri => stages::run_cri(env).map(|r| print(&r, out)),
        Stage::PruneArtifacts => stages::run_prune_artifacts(env).map(|r| print(&r, out)),
        Stage::Label => label(true),
        Stage::Unlabel => label(false),
        Stage::RevertCri => stages::run_revert_cri(env).map(|r| print(&r, out)),
        Stage::RemoveArtifacts => stages::run_remove_artifacts(env).map(|r| print(&r, out)),
        Stage::Status => stages::status(env).map(|r| print(&r, out)),
        Stage::CopySelf => unreachable!("copy-self runs before the configuration is read"),
        Stage::Claim | Stage::Unclaim if cli.dry_run => {
            println!("{:?}: dry run, labels not changed", cli.stage);
            Ok(())
        }
        Stage::Claim => claims.set(true),
        Stage::Unclaim => claims.set(false),
        Stage::WritableDirs => {
            let dirs = stages::writable_dirs(env.cfg);
            println!(
                "{}",
                serde_json::to_string_pretty(&dirs).unwrap_or_default()
            );
            Ok(())
        }
        Stage::Install => {
            run_host_check(cli, env)?;
            checkpoint("host-check");
            print(&stages::run_artifacts(env)?, out);
            checkpoint("artifacts");
            print(&stages::run_cri(env)?, out);
            checkpoint("cri");
            print(&stages::run_prune_artifacts(env)?, out);
            checkpoint("prune-artifacts");
            if env.facts.name.is_some() {
                label(true)
            } else {
                tracing::warn!("KATA_NODE_NAME not set: skipping the label stage");
                Ok(())
            }
        }
        Stage::Uninstall => {
            if env.facts.name.is_some() {
                label(false)?;
            }
            print(&stages::run_revert_cri(env)?, out);
            checkpoint("revert-cri");
            print(&stages::run_remove_artifacts(env)?, out);
            Ok(())
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("KATA_STAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if cli.output == Output::Json {
        sub.json().init()
    } else {
        sub.init()
    }
    let result = if cli.stage == Stage::CopySelf {
        kata_deploy_stage::selfcopy::copy_self(&cli.copy_to).map(|n| {
            println!("copy-self: {} bytes to {}", n, cli.copy_to.display());
        })
    } else {
        run(&cli)
    };
    if let Err(e) = result {
        let code = e.exit_code();
        tracing::error!(stage = ?cli.stage, error = %e, "stage failed");
        eprintln!("error: {e}");
        // In a pod, the kubelet puts this file in the container status: the dispatcher's report
        // and `kubectl describe` then say why the stage failed. Bounded by the kubelet's 4 KiB.
        let msg: String = format!("{e}").chars().take(4000).collect();
        let termination_log = std::path::Path::new("/dev/termination-log");
        if termination_log.exists() {
            let _ = std::fs::write(termination_log, msg);
        }
        std::process::exit(code);
    }
    Ok(())
}
