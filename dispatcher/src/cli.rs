//! Command line: every flag has an environment fallback so the chart can configure it either way.

use crate::canary::CanarySize;
use crate::lifecycle::Budget;
use crate::lifecycle::UnreadyPolicy;
use crate::recorded_selection::RecordedSelection;
use clap::{ArgAction, Parser, ValueEnum};
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

    /// At most this many per-node Jobs run at once (nodes still running a Job of an earlier run
    /// count too).
    #[arg(long, env = "DISPATCHER_PARALLELISM", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub parallelism: u32,

    /// Explicit node names (comma-separated); they win over --selector. A name with no Node
    /// fails with "node not found".
    #[arg(long, env = "DISPATCHER_NODES", value_delimiter = ',')]
    pub nodes: Vec<String>,

    /// Label selector; repeat it (or separate with ';' in the env var) for a union of AND-groups.
    #[arg(long = "selector", env = "DISPATCHER_SELECTORS", value_delimiter = ';')]
    pub selectors: Vec<String>,

    /// Leave out nodes matching this label selector even when selected; repeat it for a union
    /// (the retire run of an upgrade passes the install selection here).
    #[arg(
        long = "except-selector",
        env = "DISPATCHER_EXCEPT_SELECTORS",
        value_delimiter = ';'
    )]
    pub except_selectors: Vec<String>,

    /// Leave out these nodes (comma-separated) even when selected.
    #[arg(long, env = "DISPATCHER_EXCEPT_NODES", value_delimiter = ',')]
    pub except_nodes: Vec<String>,

    /// Only nodes that also match this label selector; repeat it for a union (the retire run of
    /// an upgrade passes the previous install selection: only nodes the values dropped).
    #[arg(
        long = "within-selector",
        env = "DISPATCHER_WITHIN_SELECTORS",
        value_delimiter = ';'
    )]
    pub within_selectors: Vec<String>,

    /// Only these nodes (comma-separated) among the selected; a name with no Node is ignored.
    #[arg(long, env = "DISPATCHER_WITHIN_NODES", value_delimiter = ',')]
    pub within_nodes: Vec<String>,

    /// On each success, remove the install record (annotation katacontainers.io/installed-by-<this
    /// prefix>) from the Node, so a later install of that prefix runs there again (the cleanup and
    /// retire runs pass the install dispatcher's prefix).
    #[arg(long, env = "DISPATCHER_FORGET_RECORD")]
    pub forget_record: Option<String>,

    /// Name of the Job running this dispatcher: per-node Jobs get an ownerReference to it and
    /// are garbage-collected with it.
    #[arg(long, env = "DISPATCHER_OWNER_JOB")]
    pub owner_job: Option<String>,

    /// Run id tying per-node Jobs to this run [default: the owner Job's UID, else random].
    #[arg(long, env = "DISPATCHER_RUN_ID")]
    pub run_id: Option<String>,

    /// Stop dispatching after this long (e.g. 30m, 90s, 1h30m); in-flight Jobs are reported as
    /// running.
    #[arg(long, env = "DISPATCHER_DEADLINE", default_value = "30m", value_parser = parse_duration)]
    pub deadline: Duration,

    /// After this many failed nodes no new Jobs are started (a bad template must not hit every
    /// node): a count (5), a percentage of the targeted nodes (10%), or 0 to never stop early.
    #[arg(long, env = "DISPATCHER_MAX_FAILURES", default_value = "5", value_parser = Budget::parse)]
    pub max_failures: Budget,

    /// The canary: this many nodes are dispatched first and must all succeed before any other
    /// node starts; one canary failure stops the run (whatever --max-failures says) and the
    /// report names the canary nodes. `auto`: 1 when more nodes need a Job than --parallelism
    /// starts at once, else none; `0`: no canary.
    #[arg(long, env = "DISPATCHER_CANARY", default_value = "0", value_parser = CanarySize::parse)]
    pub canary: CanarySize,

    /// A node whose Job has not finished this long after dispatch fails and its Job is deleted,
    /// freeing the slot (a pod stuck on an unreachable node). It also bounds a queued node's wait
    /// for a Job or pod of an earlier run (then the node fails naming it, which is left alone),
    /// and, with --supersede-prefix, the wait for each Job or pod of the superseded dispatcher
    /// [default: the template's activeDeadlineSeconds plus 2m, else 1h].
    #[arg(long, env = "DISPATCHER_NODE_TIMEOUT", value_parser = parse_duration)]
    pub node_timeout: Option<Duration>,

    /// How long NotReady or tainted nodes may keep the run waiting once nothing else is left
    /// (a node that just joined is NotReady and tainted for a few seconds); then they are
    /// reported (not started / skipped).
    #[arg(long, env = "DISPATCHER_UNREADY_GRACE", default_value = "2m", value_parser = parse_duration)]
    pub unready_grace: Duration,

    /// What a node that needs a Job but stayed NotReady past --unready-grace counts as: `fail`
    /// (not-started, exit 1) or `skip` (skipped, not a failure; the report names the node and
    /// what stays on it).
    #[arg(long, env = "DISPATCHER_UNREADY", value_enum, default_value_t = UnreadyPolicy::Fail)]
    pub unready: UnreadyPolicy,

    /// Dispatch to tainted nodes whatever the template tolerates (the cleanup dispatcher: a node
    /// tainted after install must still be cleaned). Without it, DaemonSet rules apply.
    #[arg(long, env = "DISPATCHER_IGNORE_TAINTS")]
    pub ignore_taints: bool,

    /// Record each success on the Node (annotation katacontainers.io/installed-by-<prefix> =
    /// `<template hash>.<machine ID>`) and skip nodes that tell this very template is installed:
    /// the record names this template and the node's current machine ID, the node carries
    /// --installed-label, and its runtime handlers (when it reports any) include every
    /// --expect-handler. An upgrade that changed nothing creates no Job. For the install
    /// dispatcher only.
    #[arg(long, env = "DISPATCHER_SKIP_INSTALLED")]
    pub skip_installed: bool,

    /// With --skip-installed: the label (KEY=VALUE) an installed node carries, e.g.
    /// katacontainers.io/kata-runtime=true; a node without it is installed again. Without this
    /// flag the label is not checked.
    #[arg(long, env = "DISPATCHER_INSTALLED_LABEL", value_parser = parse_label)]
    pub installed_label: Option<(String, String)>,

    /// With --skip-installed: a runtime handler an installed node reports in
    /// status.runtimeHandlers (repeat it, or separate with ',' in the env var); a node that
    /// reports handlers but not this one is installed again. Nodes that report no handlers
    /// (kubelet older than 1.30) are not checked.
    #[arg(
        long = "expect-handler",
        env = "DISPATCHER_EXPECT_HANDLERS",
        value_delimiter = ','
    )]
    pub expect_handlers: Vec<String>,

    /// Run every node again, whatever its install record says (records are still written with
    /// --skip-installed).
    #[arg(long, env = "DISPATCHER_REINSTALL_ALL")]
    pub reinstall_all: bool,

    /// Record each node's result as an Event on its Node (`kubectl describe node`).
    #[arg(long, env = "DISPATCHER_NODE_EVENTS", action = ArgAction::Set, default_value_t = true)]
    pub node_events: bool,

    /// Before anything else, delete this Job (the dispatcher this one supersedes, e.g. the install
    /// dispatcher when uninstalling) and wait until it is gone.
    #[arg(long, env = "DISPATCHER_SUPERSEDE_JOB")]
    pub supersede_job: Option<String>,

    /// Name prefix of the superseded dispatcher: its per-node Jobs are deleted and waited for
    /// (no Job or pod of it left) before nodes are discovered; on success its install record is
    /// removed from the Node.
    #[arg(long, env = "DISPATCHER_SUPERSEDE_PREFIX")]
    pub supersede_prefix: Option<String>,

    /// Bound on discovery (initial lists, stopping a superseded dispatcher).
    #[arg(long, env = "DISPATCHER_DISCOVERY_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub discovery_timeout: Duration,

    /// Wait until the selection has not changed for this long before dispatching (late labels).
    #[arg(long, env = "DISPATCHER_SETTLE", default_value = "0s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Fail (exit 2) when the selection is empty instead of warning and succeeding.
    #[arg(long, env = "DISPATCHER_REQUIRE_NODES")]
    pub require_nodes: bool,

    /// Print the plan (nodes, Job names) and create nothing.
    #[arg(long, env = "DISPATCHER_DRY_RUN")]
    pub dry_run: bool,

    /// Single flight (a scheduled reconcile run): when a Job matching this label selector (a
    /// Helm hook dispatcher of the release) is active, exit 0 at once having touched nothing.
    #[arg(long, env = "DISPATCHER_YIELD_TO")]
    pub yield_to: Option<String>,

    /// Single flight (a Helm hook run): first delete every Job matching this label selector (the
    /// release's reconcile runs; their per-node Jobs are orphaned, never cut short) other than
    /// --owner-job, and wait until they are gone (within --discovery-timeout).
    #[arg(long, env = "DISPATCHER_SUPERSEDE_RUNS")]
    pub supersede_runs: Option<String>,

    /// Before anything else, delete this CronJob (the release's reconcile CronJob, on
    /// uninstall) so no scheduled run starts any more; already gone is fine.
    #[arg(long, env = "DISPATCHER_REMOVE_CRONJOB")]
    pub remove_cronjob: Option<String>,

    /// Jobs to delete once every targeted node succeeded (the cleanup hook removes the install
    /// dispatcher's Job, which Helm leaves behind); their per-node Jobs are garbage-collected.
    #[arg(long, env = "DISPATCHER_REMOVE_ON_SUCCESS", value_delimiter = ',')]
    pub remove_on_success: Vec<String>,

    /// The per-node state label (e.g. katacontainers.io/kata-deploy-state): set to `pending`
    /// right before a node's Job is created and to `failed` when the node fails; the per-node
    /// stages write `installing`, `installed` and `cleaning` themselves. Without it no state is
    /// written.
    #[arg(long, env = "DISPATCHER_STATE_LABEL")]
    pub state_label: Option<String>,

    /// A ConfigMap in the namespace whose key --summary-key receives the rollout summary (counts,
    /// ETA, canary, failed nodes with their reasons) at the start, on every progress line that
    /// changed it and at the end: `kubectl get configmap NAME -o jsonpath='{.data.KEY}'`.
    #[arg(long, env = "DISPATCHER_SUMMARY_CONFIGMAP")]
    pub summary_configmap: Option<String>,

    /// The key of --summary-configmap this run writes (one per dispatcher role).
    #[arg(long, env = "DISPATCHER_SUMMARY_KEY", default_value = "summary", value_parser = parse_configmap_key)]
    pub summary_key: String,

    /// Only nodes the install selection recorded in --summary-configmap (key `selection`) covered:
    /// the retire run then retires nodes a change of values dropped, never a node whose label is
    /// missing for a moment. Without a record, no restriction.
    #[arg(
        long,
        env = "DISPATCHER_WITHIN_RECORDED",
        requires = "summary_configmap"
    )]
    pub within_recorded: bool,

    /// Once every targeted node succeeded, record this install selection in --summary-configmap
    /// (key `selection`), as JSON: {"nodes": [...], "selectors": [...]}.
    #[arg(long, env = "DISPATCHER_RECORD_SELECTION", requires = "summary_configmap", value_parser = parse_recorded_selection)]
    pub record_selection: Option<RecordedSelection>,

    /// With --record-selection: keep a record that is already there, and record whatever the
    /// outcome (a first install: it only ever claims nodes of its own selection).
    #[arg(
        long,
        env = "DISPATCHER_RECORD_IF_ABSENT",
        requires = "record_selection"
    )]
    pub record_if_absent: bool,

    /// Log format.
    #[arg(long, env = "DISPATCHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How often a progress line is printed (more than 0).
    #[arg(long, env = "DISPATCHER_PROGRESS_INTERVAL", default_value = "10s", value_parser = parse_positive_duration)]
    pub progress_interval: Duration,

    /// Where the summary goes for `kubectl describe` (skipped when its directory does not exist).
    #[arg(
        long,
        env = "DISPATCHER_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
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

/// Parses a duration with `humantime`: `0`, or one or more `<number><unit>` terms (the number may
/// have a decimal part, terms may be separated by spaces), e.g. `500ms`, `90s`, `30m`, `1h30m`,
/// `2h 5m`, `1.5h`. Units (case-sensitive): ns, us, ms, s/sec/secs/second/seconds,
/// m/min/mins/minute/minutes, h/hr/hrs/hour/hours, d/day/days, w/week/weeks, M/month/months,
/// y/year/years. A bare number other than 0 is refused (ambiguous).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?}: {e}; use e.g. 500ms, 90s, 30m or 1h30m"))
}

/// Parses `KEY=VALUE` (a label the Node must carry).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.trim().split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!(
            "invalid label {s:?}: use KEY=VALUE, e.g. katacontainers.io/kata-runtime=true"
        )),
    }
}

/// A ConfigMap data key: alphanumerics, '-', '_' or '.', at most 253 characters.
/// Parses --record-selection.
pub fn parse_recorded_selection(s: &str) -> Result<RecordedSelection, String> {
    RecordedSelection::parse(s)
}

/// Parses a ConfigMap key.
pub fn parse_configmap_key(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid ConfigMap key {s:?}: use letters, digits, '-', '_' or '.', e.g. install"
        ))
    }
}

/// [`parse_duration`] for periods: a zero period would make the progress timer spin (tokio
/// refuses it with a panic), so it is refused here, where the user can still fix the flag.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!(
            "invalid period {s:?}: it must be more than 0; use e.g. 10s"
        )),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_md_lists_every_flag() {
        use clap::CommandFactory;
        let doc = include_str!("../../ARCHITECTURE.md");
        let missing: Vec<String> = Args::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !["help", "version"].contains(l))
            .map(|l| format!("--{l}"))
            .filter(|f| !doc.contains(&format!("`{f} ")) && !doc.contains(&format!("`{f}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "ARCHITECTURE.md's flag list misses {missing:?}"
        );
    }

    #[test]
    fn durations_follow_humantime() {
        for (text, secs) in [
            ("500ms", 0.5),
            ("90s", 90.0),
            ("30m", 1800.0),
            ("1h30m", 5400.0),
            ("2h 5m", 7500.0),
            ("1.5h", 5400.0),
            ("1800s", 1800.0),
            ("0s", 0.0),
            ("0", 0.0),
            ("1d", 86400.0),
        ] {
            assert_eq!(parse_duration(text).unwrap().as_secs_f64(), secs, "{text}");
        }
        for bad in ["90", "1H", "m", "", "soon", "-1s", "+5s", ".5s", "1h,30m"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("invalid duration"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn max_failures_zero_means_no_budget_and_percentages_are_accepted() {
        // Was refused by the parser (range 1..) although the chart documents 0 = never stop.
        let a = Args::try_parse_from(["d", "--template", "t", "--max-failures", "0"]).unwrap();
        assert_eq!(a.max_failures, Budget::Unlimited);
        let a = Args::try_parse_from(["d", "--template", "t", "--max-failures", "10%"]).unwrap();
        assert_eq!(a.max_failures, Budget::Percent(10));
        let e =
            Args::try_parse_from(["d", "--template", "t", "--max-failures", "many"]).unwrap_err();
        assert!(e.to_string().contains("failure budget"), "{e}");
    }

    #[test]
    fn progress_interval_zero_is_refused_at_parse_time() {
        // Was accepted, then tokio::time::interval panicked on a zero period mid-run.
        let e = Args::try_parse_from(["d", "--template", "t", "--progress-interval", "0s"])
            .unwrap_err();
        assert!(e.to_string().contains("must be more than 0"), "{e}");
        let a =
            Args::try_parse_from(["d", "--template", "t", "--progress-interval", "1s"]).unwrap();
        assert_eq!(a.progress_interval, Duration::from_secs(1));
    }

    #[test]
    fn install_checks_parse() {
        let a = Args::try_parse_from([
            "d",
            "--template",
            "t",
            "--installed-label",
            "katacontainers.io/kata-runtime=true",
            "--expect-handler",
            "kata-qemu",
            "--expect-handler",
            "kata-clh",
            "--reinstall-all",
        ])
        .unwrap();
        assert_eq!(
            a.installed_label,
            Some(("katacontainers.io/kata-runtime".into(), "true".into()))
        );
        assert_eq!(a.expect_handlers, ["kata-qemu", "kata-clh"]);
        assert!(a.reinstall_all);
        let e = Args::try_parse_from(["d", "--template", "t", "--installed-label", "no-value"])
            .unwrap_err();
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
    }

    #[test]
    fn the_canary_is_a_count_or_auto() {
        let a = Args::try_parse_from(["d", "--template", "t"]).unwrap();
        assert_eq!(
            a.canary,
            CanarySize::Nodes(0),
            "off by default for the bare binary"
        );
        let a = Args::try_parse_from(["d", "--template", "t", "--canary", "auto"]).unwrap();
        assert_eq!(a.canary, CanarySize::Auto);
        let e = Args::try_parse_from(["d", "--template", "t", "--canary", "x"]).unwrap_err();
        assert!(e.to_string().contains("invalid canary"), "{e}");
    }

    #[test]
    fn the_summary_key_is_a_configmap_key() {
        let a = Args::try_parse_from(["d", "--template", "t"]).unwrap();
        assert_eq!(a.summary_key, "summary");
        let a = Args::try_parse_from(["d", "--template", "t", "--summary-key", "install"]).unwrap();
        assert_eq!(a.summary_key, "install");
        for bad in ["", "a/b", "a b"] {
            let e =
                Args::try_parse_from(["d", "--template", "t", "--summary-key", bad]).unwrap_err();
            assert!(
                e.to_string().contains("invalid ConfigMap key"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn parallelism_zero_is_rejected_by_the_parser() {
        let e = Args::try_parse_from(["d", "--template", "t", "--parallelism", "0"]).unwrap_err();
        assert!(e.to_string().contains("parallelism"), "{e}");
    }

    #[test]
    fn selectors_repeat_and_names_split() {
        let a = Args::try_parse_from([
            "d",
            "--template",
            "t",
            "--selector",
            "a in (x,y)",
            "--selector",
            "b",
            "--nodes",
            "n1,n2",
        ])
        .unwrap();
        assert_eq!(a.selectors, vec!["a in (x,y)", "b"]);
        assert_eq!(a.nodes, vec!["n1", "n2"]);
    }
}
