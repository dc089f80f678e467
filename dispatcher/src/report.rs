//! What a person reads: progress lines, the final per-node table, the termination message.

use crate::lifecycle::{Outcome, Progress};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// One progress line: counts, rate and ETA.
pub fn progress_line(p: &Progress, elapsed: Duration) -> String {
    let done = p.succeeded + p.failed;
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = done as f64 / secs;
    let eta = if rate > 0.0 && p.queued + p.running > 0 {
        format!("{:.0}s", (p.queued + p.running) as f64 / rate)
    } else {
        "-".into()
    };
    format!(
        "progress: {done}/{} done ({} succeeded, {} failed), {} running, {} queued, {:.1} nodes/min, ETA {eta}",
        p.total,
        p.succeeded,
        p.failed,
        p.running,
        p.queued,
        rate * 60.0
    )
}

/// The final per-node table, failures first so they are seen.
pub fn node_table(results: &BTreeMap<String, (Outcome, Option<Duration>)>) -> String {
    let width = results
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(4)
        .clamp(4, 60);
    let mut out = format!(
        "{:<width$}  {:<17}  {:>8}  REASON\n",
        "NODE", "RESULT", "DURATION"
    );
    let mut rows: Vec<_> = results.iter().collect();
    // Problems first so they are seen; O(N log N).
    rows.sort_by(|(a, (oa, _)), (b, (ob, _))| {
        (oa.is_ok(), *oa != Outcome::Succeeded, a).cmp(&(ob.is_ok(), *ob != Outcome::Succeeded, b))
    });
    for (node, (outcome, took)) in rows {
        let took = took
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{node:<width$}  {:<17}  {took:>8}  {}",
            outcome.word(),
            outcome.reason()
        );
    }
    out
}

/// A compact summary for the container's termination message (kubectl describe shows it), kept
/// under the kubelet's 4096-byte limit.
pub fn termination_summary(
    results: &BTreeMap<String, (Outcome, Option<Duration>)>,
    stopped: Option<&str>,
) -> String {
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (o, _) in results.values() {
        *counts.entry(o.word()).or_default() += 1;
    }
    let count = |w: &str| counts.get(w).copied().unwrap_or(0);
    let mut s = format!(
        "{} nodes: {} succeeded, {} failed, {} not started, {} still running",
        results.len(),
        count("succeeded"),
        count("failed"),
        count("not-started"),
        count("running")
    );
    for (word, label) in [
        ("already-installed", "already installed"),
        ("skipped", "skipped"),
        ("removed", "removed"),
    ] {
        if count(word) > 0 {
            let _ = write!(s, ", {} {label}", count(word));
        }
    }
    if let Some(why) = stopped {
        let _ = write!(s, "; stopped: {why}");
    }
    for (node, (o, _)) in results
        .iter()
        .filter(|(_, (o, _))| matches!(o, Outcome::Failed(_)))
    {
        let line = format!("\n{node}: {}", o.reason());
        if s.len() + line.len() > 3900 {
            s.push_str("\n… (see the dispatcher log for all nodes)");
            break;
        }
        s.push_str(&line);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> BTreeMap<String, (Outcome, Option<Duration>)> {
        let mut r = BTreeMap::new();
        r.insert(
            "a".to_string(),
            (Outcome::Succeeded, Some(Duration::from_millis(1500))),
        );
        r.insert(
            "b".to_string(),
            (Outcome::Failed("container cri exited 1: boom".into()), None),
        );
        r.insert(
            "c".to_string(),
            (Outcome::NotStarted("budget".into()), None),
        );
        r
    }

    #[test]
    fn table_lists_failures_first_with_reasons() {
        let t = node_table(&results());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NODE"));
        assert!(
            lines[1].starts_with("b ") && lines[1].contains("failed") && lines[1].contains("boom")
        );
        assert!(lines[3].starts_with("a ") && lines[3].contains("1.5s"));
    }

    #[test]
    fn summary_counts_and_is_bounded() {
        let s = termination_summary(&results(), Some("budget spent"));
        assert!(s.starts_with(
            "3 nodes: 1 succeeded, 1 failed, 1 not started, 0 still running; stopped: budget spent"
        ));
        assert!(s.contains("\nb: container cri exited 1: boom"));
        let mut many = BTreeMap::new();
        for i in 0..1000 {
            many.insert(format!("node-{i}"), (Outcome::Failed("x".repeat(50)), None));
        }
        assert!(termination_summary(&many, None).len() < 4096);
    }

    #[test]
    fn progress_has_rate_and_eta() {
        let p = Progress {
            succeeded: 10,
            failed: 0,
            running: 5,
            queued: 5,
            total: 20,
        };
        let line = progress_line(&p, Duration::from_secs(10));
        assert!(
            line.contains("10/20 done")
                && line.contains("60.0 nodes/min")
                && line.contains("ETA 10s"),
            "{line}"
        );
    }
}
