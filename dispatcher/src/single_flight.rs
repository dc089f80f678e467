//! One dispatcher of a release at a time. The Helm hook runs (install, retire, cleanup) win over
//! the scheduled reconcile runs (the CronJob's Jobs, `concurrencyPolicy: Forbid` among
//! themselves):
//!
//! - a reconcile run starts only when no hook dispatcher Job of the release is active
//!   (`--yield-to SELECTOR`); otherwise it exits 0 at once, having touched nothing;
//! - a hook run first deletes every reconcile run still going (`--supersede-runs SELECTOR`,
//!   orphaning their per-node Jobs, which are never cut short: the lifecycle waits for a running
//!   Job of another run) and waits until they are gone;
//! - the cleanup run first deletes the reconcile CronJob (`--remove-cronjob NAME`), so no new run
//!   starts during or after uninstall.
//!
//! Whichever starts first, the two never dispatch at the same time: a reconcile run that checked
//! before a hook started is deleted by that hook before it dispatches.

use crate::kube_io::ClusterApi;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, ListParams, PropagationPolicy};
use std::time::Duration;
use tracing::info;

/// A dispatcher Job as single-flight reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunObs {
    /// Job name.
    pub name: String,
    /// Job UID.
    pub uid: String,
    /// It has a Complete or Failed condition.
    pub finished: bool,
    /// It has a deletionTimestamp.
    pub deleting: bool,
}

impl RunObs {
    /// From a listed Job.
    pub fn of(job: &Job) -> Self {
        let finished = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
            });
        Self {
            name: job.metadata.name.clone().unwrap_or_default(),
            uid: job.metadata.uid.clone().unwrap_or_default(),
            finished,
            deleting: job.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// The active run (other than `own`) this run must yield to, if any: unfinished and not being
/// deleted.
pub fn blocking_run<'a>(runs: &'a [RunObs], own: Option<&str>) -> Option<&'a RunObs> {
    runs.iter()
        .find(|r| !r.finished && !r.deleting && Some(r.name.as_str()) != own)
}

/// The runs to stop (every matching run other than `own`, finished or not: a finished one is
/// gone at once) and whether any is left to wait for.
pub fn to_stop<'a>(runs: &'a [RunObs], own: Option<&str>) -> Vec<&'a RunObs> {
    runs.iter()
        .filter(|r| Some(r.name.as_str()) != own && !r.deleting)
        .collect()
}

async fn list_runs(api: &ClusterApi, selector: &str) -> Result<Vec<RunObs>, kube::Error> {
    let jobs: &Api<Job> = &api.jobs;
    let lp = ListParams::default().labels(selector);
    Ok(jobs.list(&lp).await?.items.iter().map(RunObs::of).collect())
}

/// `--yield-to`: the name of an active run of `selector` (other than `own`), if any.
pub async fn must_yield(
    api: &ClusterApi,
    selector: &str,
    own: Option<&str>,
) -> Result<Option<String>, kube::Error> {
    let runs = list_runs(api, selector).await?;
    Ok(blocking_run(&runs, own).map(|r| r.name.clone()))
}

/// `--supersede-runs`: deletes every run of `selector` but `own` (orphaning its per-node Jobs)
/// and waits until none is left, within `limit`. Returns the names stopped.
pub async fn stop_runs(
    api: &ClusterApi,
    selector: &str,
    own: Option<&str>,
    limit: Duration,
) -> Result<Vec<String>, String> {
    let until = tokio::time::Instant::now() + limit;
    let orphan = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..DeleteParams::default()
    };
    let mut stopped = Vec::new();
    loop {
        let runs = list_runs(api, selector).await.map_err(|e| e.to_string())?;
        let left: Vec<&RunObs> = runs
            .iter()
            .filter(|r| Some(r.name.as_str()) != own)
            .collect();
        if left.is_empty() {
            return Ok(stopped);
        }
        for r in to_stop(&runs, own) {
            info!(job = %r.name, "stopping a scheduled reconcile run of this release first");
            match api.jobs.delete(&r.name, &orphan).await {
                Ok(_) => stopped.push(r.name.clone()),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(format!("delete Job {}: {e}", r.name)),
            }
        }
        if tokio::time::Instant::now() >= until {
            let names: Vec<&str> = left.iter().map(|r| r.name.as_str()).collect();
            return Err(format!("still there: {names:?}"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `--remove-cronjob`: deletes the release's reconcile CronJob (its Jobs are orphaned and
/// stopped by `--supersede-runs`); already gone is fine.
pub async fn remove_cronjob(api: &ClusterApi, name: &str) -> Result<(), kube::Error> {
    let orphan = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..DeleteParams::default()
    };
    match api.cronjobs.delete(name, &orphan).await {
        Ok(_) => {
            info!(cronjob = %name, "removed the reconcile CronJob: no scheduled run starts any more");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, finished: bool, deleting: bool) -> RunObs {
        RunObs {
            name: name.into(),
            uid: format!("uid-{name}"),
            finished,
            deleting,
        }
    }

    #[test]
    fn a_reconcile_run_yields_only_to_an_active_hook_run() {
        let runs = [run("install", true, false), run("retire", false, true)];
        assert_eq!(
            blocking_run(&runs, None),
            None,
            "finished or going away: no wait"
        );
        let runs = [run("install", false, false)];
        assert_eq!(
            blocking_run(&runs, None).map(|r| r.name.as_str()),
            Some("install")
        );
        assert_eq!(blocking_run(&runs, Some("install")), None, "never itself");
    }

    #[test]
    fn a_hook_stops_every_other_run_once() {
        let runs = [
            run("rec-1", false, false),
            run("rec-2", true, false),
            run("rec-3", false, true),
            run("me", false, false),
        ];
        let names: Vec<&str> = to_stop(&runs, Some("me"))
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["rec-1", "rec-2"],
            "not itself, not one already going away"
        );
    }

    #[test]
    fn a_job_is_finished_by_its_conditions() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "j", "uid": "u"},
            "status": {"conditions": [{"type": "Complete", "status": "True"}]}
        }))
        .unwrap();
        assert!(RunObs::of(&job).finished);
        let job: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "j"}, "spec": {"suspend": true, "template": {}}
        }))
        .unwrap();
        assert!(!RunObs::of(&job).finished, "a suspended Job is active");
    }
}
