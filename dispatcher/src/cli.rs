//! Command line: every flag has an environment fallback so the chart can configure it either way.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// Creates exactly one node-pinned Job per selected node, at most --parallelism at a time,
/// tracks them to the end and reports per node.
///
/// Exit codes: 0 every targeted node succeeded; 1 some node failed or the run stopped early;
/// 2 the run could not start (bad input, RBAC denied, owner Job missing) and nothing was created.
#[derive(Debug, Clone, Parser)]
#[command(name = "kata-deploy-job-dispatcher", version, about, long_about = None)]
pub struct Args {
    /// The per-node Job template: a YAML batch/v1 Job without nodeName.
    #[arg(long, env = "DISPATCHER_TEMPLATE")]
    pub template: PathBuf,

    /// Prefix of the per-node Job names; also identifies this dispatcher's Jobs.
    #[arg(long, env = "DISPATCHER_NAME_PREFIX", default_value = "kata-deploy")]
    pub name_prefix: String,

    /// Namespace of the per-node Jobs [default: $POD_NAMESPACE, then the ServiceAccount namespace].
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,

    /// At most this many per-node Jobs run at once (capped at the number of nodes).
    #[arg(long, env = "DISPATCHER_PARALLELISM", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub parallelism: u32,

    /// Explicit node names (comma-separated); they win over --selector.
    #[arg(long, env = "DISPATCHER_NODES", value_delimiter = ',')]
    pub nodes: Vec<String>,

    /// Label selector; repeat it (or separate with ';' in the env var) for a union of AND-groups.
    #[arg(long = "selector", env = "DISPATCHER_SELECTORS", value_delimiter = ';')]
    pub selectors: Vec<String>,

    /// Name of the Job running this dispatcher: per-node Jobs get an ownerReference to it and
    /// are garbage-collected with it.
    #[arg(long, env = "DISPATCHER_OWNER_JOB")]
    pub owner_job: Option<String>,

    /// Run id tying per-node Jobs to this run [default: the owner Job's UID, else random].
    #[arg(long, env = "DISPATCHER_RUN_ID")]
    pub run_id: Option<String>,

    /// Stop dispatching after this long (e.g. 30m, 90s); in-flight Jobs are reported as running.
    #[arg(long, env = "DISPATCHER_DEADLINE", default_value = "30m", value_parser = parse_duration)]
    pub deadline: Duration,

    /// After this many failed nodes no new Jobs are started (a bad template must not hit every node).
    #[arg(long, env = "DISPATCHER_MAX_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_failures: u32,

    /// Wait until the selection has not changed for this long before dispatching (late labels).
    #[arg(long, env = "DISPATCHER_SETTLE", default_value = "0s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Fail (exit 2) when the selection is empty instead of warning and succeeding.
    #[arg(long, env = "DISPATCHER_REQUIRE_NODES")]
    pub require_nodes: bool,

    /// Print the plan (nodes, Job names) and create nothing.
    #[arg(long, env = "DISPATCHER_DRY_RUN")]
    pub dry_run: bool,

    /// Jobs to delete once every targeted node succeeded (the cleanup hook removes the install
    /// dispatcher's Job, which Helm leaves behind); their per-node Jobs are garbage-collected.
    #[arg(long, env = "DISPATCHER_REMOVE_ON_SUCCESS", value_delimiter = ',')]
    pub remove_on_success: Vec<String>,

    /// Log format.
    #[arg(long, env = "DISPATCHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How often a progress line is printed.
    #[arg(long, env = "DISPATCHER_PROGRESS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub progress_interval: Duration,

    /// Where the summary goes for `kubectl describe` (skipped when its directory does not exist).
    #[arg(long, env = "DISPATCHER_TERMINATION_LOG", default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses `500ms`, `90s`, `30m`, `2h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}: use e.g. 500ms, 90s, 30m or 2h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit {unit:?} in {s:?}: use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("10 days").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn parallelism_zero_is_rejected_by_the_parser() {
        let e = Args::try_parse_from(["d", "--template", "t", "--parallelism", "0"]).unwrap_err();
        assert!(e.to_string().contains("parallelism"), "{e}");
    }

    #[test]
    fn selectors_repeat_and_names_split() {
        let a = Args::try_parse_from(["d", "--template", "t", "--selector", "a in (x,y)", "--selector", "b", "--nodes", "n1,n2"]).unwrap();
        assert_eq!(a.selectors, vec!["a in (x,y)", "b"]);
        assert_eq!(a.nodes, vec!["n1", "n2"]);
    }
}
