//! `kata-local-kubelet`: runs pods bound to local nodes as host processes (see
//! `kata_testbed::local_kubelet`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kata_testbed::local_kubelet::{
    parse_bind, Config, ImageMap, LocalKubelet, Mount, DEFAULT_SELECTOR,
};
use tokio::signal::unix::{signal, SignalKind};

/// Kubelet stand-in for local test-bed nodes: runs the project's real binaries as processes.
///
/// Container logs are files (<work-dir>/<ns>_<pod>/<container>.log): `kubectl logs` does not
/// work against local nodes.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Admin kubeconfig of the cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Directory of per-node fake host roots (<hosts-dir>/<node>/...).
    #[arg(long)]
    hosts_dir: PathBuf,
    /// Per-pod scratch directories and container logs.
    #[arg(long)]
    work_dir: PathBuf,
    /// Image repository name → binary, e.g. kata-deploy-stage=/path/to/kata-deploy-stage.
    #[arg(long = "image", value_name = "NAME=PATH", value_parser = ImageMap::parse_flag)]
    images: Vec<(String, PathBuf)>,
    /// Extra bind mount for every container, SRC=DST or SRC=DST:ro.
    #[arg(long = "bind", value_name = "SRC=DST[:ro]", value_parser = parse_bind)]
    binds: Vec<Mount>,
    /// Label selector of the nodes to serve.
    #[arg(long, default_value = DEFAULT_SELECTOR)]
    node_selector: String,
    /// Seconds between node status heartbeats.
    #[arg(long, default_value_t = 20)]
    heartbeat_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    for (name, path) in &args.images {
        anyhow::ensure!(
            path.is_file(),
            "--image {name}={}: no such file",
            path.display()
        );
    }
    let mut config = Config::new(args.kubeconfig, args.hosts_dir, args.work_dir);
    config.images = ImageMap::new(args.images);
    config.binds = args.binds;
    config.node_selector = args.node_selector;
    config.heartbeat = Duration::from_secs(args.heartbeat_seconds.max(1));
    let handle = LocalKubelet::spawn(config)
        .await
        .context("starting kata-local-kubelet")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down: stopping containers");
    handle.shutdown().await;
    Ok(())
}
