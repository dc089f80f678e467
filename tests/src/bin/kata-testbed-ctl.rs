//! Small control tool for scripts driving the test bed (the demo, manual debugging).
//!
//!   kata-testbed-ctl nodes --local 2 --sim 20 --hosts-dir DIR [--prefix demo]

use anyhow::Result;
use clap::{Parser, Subcommand};
use kata_testbed::cluster::{SimNode, TestCluster};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    about = "Drive the kata-deploy test bed (KATA_TESTBED_STATE must name a running cluster)"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create local nodes (fake host roots, served by kata-local-kubelet) and simulated kwok nodes.
    Nodes {
        /// Local nodes to create.
        #[arg(long, default_value_t = 0)]
        local: usize,
        /// Simulated nodes to create.
        #[arg(long, default_value_t = 0)]
        sim: usize,
        /// Directory of the local nodes' fake host roots.
        #[arg(long)]
        hosts_dir: PathBuf,
        /// Node name prefix.
        #[arg(long, default_value = "demo")]
        prefix: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if std::env::var_os("KATA_TESTBED_STATE").is_none() {
        anyhow::bail!("KATA_TESTBED_STATE is not set: start a cluster with hack/testenv/start.sh and source its env file");
    }
    let cluster = TestCluster::get().await?;
    match args.command {
        Command::Nodes {
            local,
            sim,
            hosts_dir,
            prefix,
        } => {
            let local = cluster
                .local_nodes(
                    &format!("{prefix}-local"),
                    local,
                    &hosts_dir,
                    "true",
                    &BTreeMap::new(),
                )
                .await?;
            let sim = cluster
                .sim_nodes(&format!("{prefix}-sim"), sim, &SimNode::default())
                .await?;
            for n in local.iter().chain(&sim) {
                println!("{n}");
            }
        }
    }
    Ok(())
}
