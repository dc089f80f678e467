//! Rollout benchmark: the real dispatcher against N simulated nodes with parallelism P and a
//! simulated per-node Job duration D. Prints one Markdown row per run (see BENCHMARKS.md).
//!
//!   kata-bench --nodes 1000 --parallelism 100 --duration 3 [--header] [--upgrade]
//!
//! With `--upgrade`, both runs record installs on the Nodes (`--skip-installed`) and a second
//! run (a new run id, as after `helm upgrade`) with the same template follows the first; its wall
//! time, Jobs created and requests are printed as a second line.

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kata_testbed::cluster::{SimNode, TestCluster};
use kata_testbed::rollout::{ActiveObserver, DispatcherEnv, EnvOptions};
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Simulated nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Dispatcher parallelism.
    #[arg(long, default_value_t = 10)]
    parallelism: usize,
    /// Simulated per-node Job duration in seconds.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Print the Markdown header first.
    #[arg(long)]
    header: bool,
    /// Then measure an upgrade that changed nothing (see the module doc).
    #[arg(long)]
    upgrade: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = TestCluster::get().await?;
    let ns = cluster.namespace("bench").await?;
    let mut spec = SimNode::default();
    spec.labels.insert("kata-test/group".into(), ns.clone());
    let t = Instant::now();
    cluster.sim_nodes(&ns, args.nodes, &spec).await?;
    eprintln!(
        "created {} simulated nodes in {:.1}s",
        args.nodes,
        t.elapsed().as_secs_f64()
    );
    let env = DispatcherEnv::setup(
        &cluster,
        &ns,
        &EnvOptions {
            duration: format!("{}ms", (args.duration * 1000.0) as u64),
        },
    )
    .await?;
    let observer = ActiveObserver::start(&cluster, &ns, "katacontainers.io/dispatcher=kata-deploy");
    let first_job = first_job_watch(&cluster, &ns);

    let selector = format!("kata-test/group={ns}");
    let par = args.parallelism.to_string();
    let mut flags = vec![
        "--selector",
        selector.as_str(),
        "--parallelism",
        par.as_str(),
        "--progress-interval",
        "30s",
        "--deadline",
        "2h",
        "--run-id",
        "bench-1",
    ];
    if args.upgrade {
        flags.push("--skip-installed");
    }
    let mut cmd = env.command(&flags)?;
    cmd.env("RUST_LOG", "warn");
    let start = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("spawning the dispatcher")?;
    let pid = child.id() as i32;
    let (status, maxrss_kib) = tokio::task::spawn_blocking(move || wait_with_rusage(pid)).await??;
    let wall = start.elapsed();
    drop(child);
    if status != 0 {
        bail!("dispatcher exited {status}");
    }
    let first = first_job
        .lock()
        .expect("lock")
        .map(|t| t.duration_since(start));
    let requests = cluster.audit_requests(&env.user)?;
    let total: usize = requests.values().sum();
    let waves = args.nodes.div_ceil(args.parallelism.min(args.nodes).max(1));
    let ideal = waves as f64 * args.duration;
    let per_node = observer
        .mean_job_duration()
        .context("no finished Job observed")?
        .as_secs_f64();
    let ideal_measured = waves as f64 * per_node;
    if args.header {
        println!("| N | P | D | wall | ideal ceil(N/P)×D | ratio | measured per-node time | ratio vs measured | max active | requests/node | requests by verb | peak RSS | first Job |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    }
    let verbs: Vec<String> = requests.iter().map(|(v, n)| format!("{v} {n}")).collect();
    println!(
        "| {} | {} | {:.1}s | {:.1}s | {:.1}s | {:.3} | {:.2}s | {:.3} | {} | {:.2} | {} | {:.1} MiB | {} |",
        args.nodes,
        args.parallelism,
        args.duration,
        wall.as_secs_f64(),
        ideal,
        wall.as_secs_f64() / ideal,
        per_node,
        wall.as_secs_f64() / ideal_measured,
        observer.max_active(),
        total as f64 / args.nodes as f64,
        verbs.join(", "),
        maxrss_kib as f64 / 1024.0,
        first.map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64())),
    );
    if observer.max_active() > args.parallelism {
        bail!(
            "parallelism violated: {} active > {}",
            observer.max_active(),
            args.parallelism
        );
    }
    if args.upgrade {
        let job_creates = || -> Result<usize> {
            Ok(
                kata_testbed::rollout::audit_by_resource(&cluster, &env.user)?
                    .get(&("create".into(), "jobs".into()))
                    .copied()
                    .unwrap_or(0),
            )
        };
        let before_jobs = job_creates()?;
        let before_total: usize = cluster.audit_requests(&env.user)?.values().sum();
        let run_id = flags.len() - 2;
        flags[run_id] = "bench-2";
        let mut cmd = env.command(&flags)?;
        cmd.env("RUST_LOG", "warn");
        let start = Instant::now();
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .context("spawning the dispatcher")?;
        let pid = child.id() as i32;
        let (status, maxrss_kib) =
            tokio::task::spawn_blocking(move || wait_with_rusage(pid)).await??;
        let wall = start.elapsed();
        drop(child);
        if status != 0 {
            bail!("upgrade run exited {status}");
        }
        // Audit entries land asynchronously: give the log a moment.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let created = job_creates()? - before_jobs;
        let requests: usize =
            cluster.audit_requests(&env.user)?.values().sum::<usize>() - before_total;
        println!(
            "upgrade with nothing changed: N={} wall {:.1}s, Jobs created {created}, requests {requests} ({:.3} per node), peak RSS {:.1} MiB",
            args.nodes,
            wall.as_secs_f64(),
            requests as f64 / args.nodes as f64,
            maxrss_kib as f64 / 1024.0
        );
    }
    Ok(())
}

/// Waits for `pid` and returns (exit code, peak resident set in KiB) from the kernel's rusage.
fn wait_with_rusage(pid: i32) -> Result<(i32, i64)> {
    let mut status = 0;
    // SAFETY: plain wait4 on our own child; rusage is a plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r < 0 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Ok((code, usage.ru_maxrss))
}

fn first_job_watch(cluster: &TestCluster, ns: &str) -> Arc<Mutex<Option<Instant>>> {
    let seen = Arc::new(Mutex::new(None));
    let api: Api<Job> = Api::namespaced(cluster.client.clone(), ns);
    let out = seen.clone();
    tokio::spawn(async move {
        let mut s = Box::pin(
            watcher::watcher(
                api,
                watcher::Config::default().labels("katacontainers.io/dispatcher=kata-deploy"),
            )
            .default_backoff(),
        );
        while let Some(ev) = s.next().await {
            if let Ok(Event::Apply(_)) = ev {
                out.lock().expect("lock").get_or_insert_with(Instant::now);
                break;
            }
        }
    });
    seen
}
