//! The per-release rollout summary a person reads with one `kubectl` command while a run goes
//! on and after it ended: one key of a ConfigMap per dispatcher role (`--summary-configmap`,
//! `--summary-key`), a small YAML document with the counts, an ETA, the canary and every failed
//! node with its reason (the reason outlives the pod and the Job).
//!
//! Pure: the shell gathers a [`Snapshot`] and writes [`render`]'s text.

use crate::lifecycle::{Outcome, Progress, Results};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// At most this many failed nodes are listed (the ConfigMap stays small on a large fleet).
pub const MAX_FAILED_LISTED: usize = 100;
/// A reason longer than this is cut (with an ellipsis).
pub const MAX_REASON: usize = 400;

/// Where the run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Dispatching or waiting for Jobs.
    Running,
    /// Every targeted node ended well.
    Succeeded,
    /// Some node failed, or the run stopped early.
    Failed,
}

/// The canary wave as the summary shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CanaryView {
    /// The canary nodes (the first wave).
    pub nodes: Vec<String>,
    /// `waiting`, `running`, `passed` or `failed`.
    pub state: String,
}

/// What the summary is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The dispatcher's name prefix (which run this is).
    pub prefix: String,
    /// The run id (the dispatcher Job's UID in the chart).
    pub run: String,
    /// Where the run stands.
    pub phase: Phase,
    /// When the run started and when this was written (RFC 3339, UTC).
    pub started: String,
    /// When this was written.
    pub updated: String,
    /// Counts by word (succeeded, failed, running, queued, already-installed, …).
    pub counts: BTreeMap<String, usize>,
    /// Targeted nodes.
    pub total: usize,
    /// Estimated time left, when it can be told.
    pub eta: Option<Duration>,
    /// Failed nodes with their reasons.
    pub failed: BTreeMap<String, String>,
    /// The canary, when there is one.
    pub canary: Option<CanaryView>,
    /// Why the run stopped early.
    pub stopped: Option<String>,
}

#[derive(Serialize)]
struct Doc<'a> {
    prefix: &'a str,
    run: &'a str,
    phase: Phase,
    started: &'a str,
    updated: &'a str,
    total: usize,
    counts: &'a BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eta: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    canary: Option<&'a CanaryView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stopped: Option<&'a str>,
    #[serde(rename = "failedNodes", skip_serializing_if = "BTreeMap::is_empty")]
    failed: BTreeMap<&'a str, String>,
    #[serde(rename = "failedNotListed", skip_serializing_if = "is_zero")]
    failed_not_listed: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn cut(reason: &str) -> String {
    if reason.chars().count() <= MAX_REASON {
        return reason.to_owned();
    }
    let mut s: String = reason.chars().take(MAX_REASON).collect();
    s.push('…');
    s
}

/// The summary text (YAML).
pub fn render(s: &Snapshot) -> String {
    let failed: BTreeMap<&str, String> = s
        .failed
        .iter()
        .take(MAX_FAILED_LISTED)
        .map(|(n, r)| (n.as_str(), cut(r)))
        .collect();
    let doc = Doc {
        prefix: &s.prefix,
        run: &s.run,
        phase: s.phase,
        started: &s.started,
        updated: &s.updated,
        total: s.total,
        counts: &s.counts,
        eta: s
            .eta
            .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()),
        canary: s.canary.as_ref(),
        stopped: s.stopped.as_deref(),
        failed_not_listed: s.failed.len().saturating_sub(failed.len()),
        failed,
    };
    serde_yaml::to_string(&doc).expect("a summary always serializes")
}

/// Counts while the run goes on.
pub fn running_counts(p: &Progress) -> BTreeMap<String, usize> {
    [
        ("done", p.succeeded),
        ("failed", p.failed),
        ("running", p.running),
        ("queued", p.queued),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Counts by result word at the end of a run.
pub fn final_counts(results: &Results) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (o, _) in results.values() {
        *counts.entry(o.word().to_owned()).or_default() += 1;
    }
    counts
}

/// Failed nodes (and nodes left not started or running by a stopped run) with their reasons.
pub fn final_failures(results: &Results) -> BTreeMap<String, String> {
    results
        .iter()
        .filter(|(_, (o, _))| matches!(o, Outcome::Failed(_)))
        .map(|(n, (o, _))| (n.clone(), o.reason().to_owned()))
        .collect()
}

/// Time left: the nodes still to do, in waves of `parallelism`, at the mean time a node's Job
/// took so far; `None` before any Job ended or when nothing is left.
pub fn eta(p: &Progress, parallelism: usize, mean_job: Option<Duration>) -> Option<Duration> {
    let left = p.queued + p.running;
    let mean = mean_job?;
    if left == 0 {
        return None;
    }
    let waves = left.div_ceil(parallelism.max(1)) as u32;
    Some(mean * waves)
}

/// A running mean of Job durations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeanDuration {
    sum: Duration,
    n: u32,
}

impl MeanDuration {
    /// Adds one Job's duration.
    pub fn add(&mut self, d: Duration) {
        self.sum += d;
        self.n += 1;
    }

    /// The mean so far.
    pub fn mean(&self) -> Option<Duration> {
        (self.n > 0).then(|| self.sum / self.n)
    }
}

/// RFC 3339 (UTC, seconds) of a system time, without a date library.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn snapshot() -> Snapshot {
        Snapshot {
            prefix: "kd-install".into(),
            run: "uid-1".into(),
            phase: Phase::Running,
            started: "2026-01-01T00:00:00Z".into(),
            updated: "2026-01-01T00:01:00Z".into(),
            counts: running_counts(&Progress {
                succeeded: 3,
                failed: 1,
                running: 2,
                queued: 4,
                total: 10,
            }),
            total: 10,
            eta: Some(Duration::from_millis(90_500)),
            failed: [("n1".to_string(), "exit 2: no /dev/kvm".to_string())].into(),
            canary: Some(CanaryView {
                nodes: vec!["n0".into()],
                state: "passed".into(),
            }),
            stopped: None,
        }
    }

    #[test]
    fn the_summary_is_yaml_with_counts_eta_canary_and_failed_nodes() {
        let text = render(&snapshot());
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(v["phase"], "running");
        assert_eq!(v["total"], 10);
        assert_eq!(v["counts"]["queued"], 4);
        assert_eq!(v["counts"]["done"], 3);
        assert_eq!(v["eta"], "1m 30s");
        assert_eq!(v["canary"]["nodes"][0], "n0");
        assert_eq!(v["canary"]["state"], "passed");
        assert_eq!(v["failedNodes"]["n1"], "exit 2: no /dev/kvm");
        assert!(v.get("stopped").is_none() && v.get("failedNotListed").is_none());
    }

    #[test]
    fn a_large_failure_list_is_bounded_and_says_how_many_are_left_out() {
        let mut s = snapshot();
        s.failed = (0..MAX_FAILED_LISTED + 7)
            .map(|i| (format!("n{i:04}"), "x".repeat(MAX_REASON * 3)))
            .collect();
        let text = render(&s);
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(
            v["failedNodes"].as_mapping().unwrap().len(),
            MAX_FAILED_LISTED
        );
        assert_eq!(v["failedNotListed"], 7);
        let reason = v["failedNodes"]["n0000"].as_str().unwrap();
        assert_eq!(
            reason.chars().count(),
            MAX_REASON + 1,
            "cut with an ellipsis"
        );
        assert!(text.len() < 100 * 1024, "well under a ConfigMap's 1 MiB");
    }

    #[test]
    fn final_counts_and_failures_come_from_the_results() {
        let mut r = Results::new();
        r.insert("a".into(), (Outcome::Succeeded, None));
        r.insert("b".into(), (Outcome::Failed("boom".into()), None));
        r.insert("c".into(), (Outcome::NotStarted("budget".into()), None));
        r.insert("d".into(), (Outcome::AlreadyInstalled, None));
        let c = final_counts(&r);
        assert_eq!(
            (
                c["succeeded"],
                c["failed"],
                c["not-started"],
                c["already-installed"]
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(final_failures(&r), [("b".into(), "boom".into())].into());
    }

    #[test]
    fn eta_counts_waves_at_the_mean_job_time() {
        let p = Progress {
            succeeded: 4,
            failed: 0,
            running: 3,
            queued: 8,
            total: 15,
        };
        let mut m = MeanDuration::default();
        assert_eq!(eta(&p, 5, m.mean()), None, "no Job ended yet: no estimate");
        m.add(Duration::from_secs(10));
        m.add(Duration::from_secs(30));
        // 11 left, 5 at a time: 3 waves of 20 s.
        assert_eq!(eta(&p, 5, m.mean()), Some(Duration::from_secs(60)));
        let done = Progress {
            running: 0,
            queued: 0,
            ..p
        };
        assert_eq!(eta(&done, 5, m.mean()), None);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        assert_eq!(rfc3339(t), "2026-05-28T20:26:40Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }
}
