//! Binary edge: parse flags, set up logging, run, print the report, exit with the right code.

use clap::Parser;
use kata_deploy_job_dispatcher::cli::{Args, LogFormat};
use kata_deploy_job_dispatcher::{report, run};
use std::process::ExitCode;

const EXIT_FAILED: u8 = 1;
const EXIT_COULD_NOT_START: u8 = 2;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn,tower=warn,hyper=warn".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn write_termination_log(args: &Args, text: &str) {
    let path = &args.termination_log;
    if path.parent().is_some_and(|p| p.is_dir()) && (path.exists() || !path.starts_with("/dev")) {
        if let Err(e) = std::fs::write(path, text) {
            tracing::debug!(path = %path.display(), error = %e, "cannot write the termination message");
        }
    }
}

/// The API client, with kube's own silent retry of 429/503/504 turned off: `kube_io::with_retry`
/// is the one retry layer (it honours Retry-After, bounds the time spent and counts every retry
/// for the report), so attempts do not multiply across two layers.
async fn api_client() -> Result<kube::Client, Box<dyn std::error::Error>> {
    let mut config = kube::Config::infer().await?;
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    // Two worker threads: the work is I/O bound and the hook pod has a small CPU limit.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = runtime.block_on(async {
        let client = match api_client().await {
            Ok(c) => c,
            Err(e) => return Err(anyhow::anyhow!("cannot build a Kubernetes client: {e}. Run in a pod with a ServiceAccount, or set KUBECONFIG")),
        };
        run::run(args.clone(), client).await.map_err(anyhow::Error::from)
    });
    match outcome {
        Ok(summary) => {
            if !summary.results.is_empty() {
                print!("{}", report::node_table(&summary.results));
            }
            let mut text =
                report::termination_summary(&summary.results, summary.stopped.as_deref());
            if let Some(c) = &summary.canary {
                text = format!("canary ({}): {}\n{text}", c.state, c.nodes.join(", "));
            }
            println!("{text}");
            if summary.retries > 0 {
                println!(
                    "API retries: {} (transient errors retried and watches resumed)",
                    summary.retries
                );
            }
            write_termination_log(&args, &text);
            if summary.all_succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
        Err(e) => {
            let text = format!("error: {e:#}");
            eprintln!("{text}");
            write_termination_log(&args, &text);
            ExitCode::from(EXIT_COULD_NOT_START)
        }
    }
}
