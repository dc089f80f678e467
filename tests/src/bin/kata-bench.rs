//! Rollout benchmark: the real dispatcher against N simulated nodes with parallelism P and a
//! simulated per-node Job duration D. Prints one Markdown row per run (see BENCHMARKS.md).
//!
//!   kata-bench --nodes 1000 --parallelism 100 --duration 3 [--header] [--upgrade] [--uninstall]
//!
//! With `--upgrade`, both runs record installs on the Nodes (`--skip-installed`) and a second
//! run (a new run id, as after `helm upgrade`) with the same template follows the first; its wall
//! time, Jobs created and requests are printed as a second line. With `--uninstall`, the cleanup
//! dispatcher follows, as the chart runs it, with every install Job still there: its wall time,
//! requests by verb and peak RSS are printed as a line.

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
    /// Then measure the uninstall (cleanup dispatcher) with every install Job kept.
    #[arg(long)]
    uninstall: bool,
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
    let install = run_dispatcher(&env, &flags).await?;
    let first = first_job
        .lock()
        .expect("lock")
        .map(|t| t.duration_since(install.start));
    print_install_row(&args, &cluster, &env, &observer, &install, first)?;
    if args.upgrade {
        let run_id = flags.len() - 2;
        flags[run_id] = "bench-2";
        let run = measure(&cluster, &env, &flags).await?;
        println!(
            "upgrade with nothing changed: N={} wall {:.1}s, Jobs created {}, requests {} ({:.3} per node), peak RSS {:.1} MiB",
            args.nodes, run.wall, run.job_creates, run.requests,
            run.requests as f64 / args.nodes as f64, run.rss_mib
        );
    }
    if args.uninstall {
        // The cleanup dispatcher as the chart runs it: it first waits until no Job or pod of the
        // install prefix is left (every per-node Job kept, listed page by page, metadata only),
        // then one Job per node under its own prefix, tolerating every taint.
        let uninstall = [
            "--selector",
            selector.as_str(),
            "--parallelism",
            par.as_str(),
            "--name-prefix",
            "kata-cleanup",
            "--supersede-prefix",
            "kata-deploy",
            "--ignore-taints",
            "--progress-interval",
            "30s",
            "--deadline",
            "2h",
            "--run-id",
            "bench-3",
        ];
        let run = measure(&cluster, &env, &uninstall).await?;
        println!(
            "uninstall with all {} install Jobs kept: N={} P={} wall {:.1}s, Jobs created {}, requests {} ({:.3} per node: {}), peak RSS {:.1} MiB",
            args.nodes, args.nodes, args.parallelism, run.wall, run.job_creates, run.requests,
            run.requests as f64 / args.nodes as f64, run.verbs, run.rss_mib
        );
    }
    Ok(())
}

/// One dispatcher run: when it started, how long it took, its peak RSS.
struct Run {
    start: Instant,
    wall: std::time::Duration,
    maxrss_kib: i64,
}

/// Runs the release dispatcher with `flags` to its end (exit 0 required).
async fn run_dispatcher(env: &DispatcherEnv, flags: &[&str]) -> Result<Run> {
    let mut cmd = env.command(flags)?;
    cmd.env("RUST_LOG", "warn");
    let start = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("spawning the dispatcher")?;
    let pid = child.id() as i32;
    let hwm = watch_vm_hwm(pid);
    let status = tokio::task::spawn_blocking(move || wait_exit(pid)).await??;
    // Not rusage's ru_maxrss: after exec it also counts the forking process's resident set
    // (this benchmark's own watches of thousands of objects), whatever the dispatcher used.
    let maxrss_kib = hwm.load(std::sync::atomic::Ordering::Relaxed) as i64;
    let wall = start.elapsed();
    drop(child);
    if status != 0 {
        bail!("dispatcher {flags:?} exited {status}");
    }
    Ok(Run {
        start,
        wall,
        maxrss_kib,
    })
}

/// A later run's figures, its requests counted from the audit log (the difference).
struct Measured {
    wall: f64,
    job_creates: usize,
    requests: usize,
    verbs: String,
    rss_mib: f64,
}

async fn measure(cluster: &TestCluster, env: &DispatcherEnv, flags: &[&str]) -> Result<Measured> {
    let job_creates = || -> Result<usize> {
        Ok(
            kata_testbed::rollout::audit_by_resource(cluster, &env.user)?
                .get(&("create".into(), "jobs".into()))
                .copied()
                .unwrap_or(0),
        )
    };
    let before_jobs = job_creates()?;
    let before = cluster.audit_requests(&env.user)?;
    let run = run_dispatcher(env, flags).await?;
    // Audit entries land asynchronously: give the log a moment.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let after = cluster.audit_requests(&env.user)?;
    let verbs: Vec<String> = after
        .iter()
        .map(|(v, n)| (v, n - before.get(v).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .map(|(v, n)| format!("{v} {n}"))
        .collect();
    Ok(Measured {
        wall: run.wall.as_secs_f64(),
        job_creates: job_creates()? - before_jobs,
        requests: after.values().sum::<usize>() - before.values().sum::<usize>(),
        verbs: verbs.join(", "),
        rss_mib: run.maxrss_kib as f64 / 1024.0,
    })
}

/// The install run's Markdown row (and the header with --header).
fn print_install_row(
    args: &Args,
    cluster: &TestCluster,
    env: &DispatcherEnv,
    observer: &ActiveObserver,
    run: &Run,
    first: Option<std::time::Duration>,
) -> Result<()> {
    let requests = cluster.audit_requests(&env.user)?;
    let total: usize = requests.values().sum();
    let waves = args.nodes.div_ceil(args.parallelism.min(args.nodes).max(1));
    let ideal = waves as f64 * args.duration;
    let per_node = observer
        .mean_job_duration()
        .context("no finished Job observed")?
        .as_secs_f64();
    let wall = run.wall.as_secs_f64();
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
        wall,
        ideal,
        wall / ideal,
        per_node,
        wall / (waves as f64 * per_node),
        observer.max_active(),
        total as f64 / args.nodes as f64,
        verbs.join(", "),
        run.maxrss_kib as f64 / 1024.0,
        first.map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64())),
    );
    if observer.max_active() > args.parallelism {
        bail!(
            "parallelism violated: {} active > {}",
            observer.max_active(),
            args.parallelism
        );
    }
    Ok(())
}

/// The dispatcher's own peak resident set (VmHWM of its address space, KiB), read every 50 ms
/// until it exits (the last value read).
fn watch_vm_hwm(pid: i32) -> Arc<std::sync::atomic::AtomicU64> {
    let hwm = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let out = hwm.clone();
    std::thread::spawn(move || {
        let path = format!("/proc/{pid}/status");
        while let Ok(status) = std::fs::read_to_string(&path) {
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                out.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    hwm
}

/// Waits for `pid` and returns its exit code (128 + signal when killed).
fn wait_exit(pid: i32) -> Result<i32> {
    let mut status = 0;
    // SAFETY: plain waitpid on our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r < 0 {
        bail!("waitpid failed: {}", std::io::Error::last_os_error());
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
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
