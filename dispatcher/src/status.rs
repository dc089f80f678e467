//! Reading Job and Pod status: has a per-node Job ended, and why did it fail.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

/// Where a Job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobPhase {
    /// Not finished (including `SuccessCriteriaMet` / `FailureTarget`, which precede the end).
    Running,
    /// `Complete=True`.
    Succeeded,
    /// `Failed=True`, with the condition's reason and message.
    Failed(String),
}

/// Reads the terminal conditions of a Job.
pub fn job_phase(job: &Job) -> JobPhase {
    let conditions = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    for c in conditions.into_iter().flatten() {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" => return JobPhase::Succeeded,
            "Failed" => {
                let reason = c.reason.clone().unwrap_or_else(|| "Failed".into());
                let message = c.message.clone().unwrap_or_default();
                return JobPhase::Failed(if message.is_empty() {
                    reason
                } else {
                    format!("{reason}: {message}")
                });
            }
            _ => {}
        }
    }
    JobPhase::Running
}

/// The most useful line about why a Job's pod failed: the first container (init containers first,
/// in order) that terminated with a non-zero exit code, with its termination message.
pub fn pod_failure_detail(pods: &[Pod]) -> Option<String> {
    for pod in pods {
        let status = pod.status.as_ref()?;
        let lists = [
            status.init_container_statuses.as_ref(),
            status.container_statuses.as_ref(),
        ];
        for cs in lists.into_iter().flatten().flatten() {
            let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref()) else {
                continue;
            };
            if t.exit_code == 0 {
                continue;
            }
            let mut line = format!("container {} exited {}", cs.name, t.exit_code);
            if let Some(reason) = t
                .reason
                .as_deref()
                .filter(|r| !r.is_empty() && *r != "Error")
            {
                line.push_str(&format!(" ({reason})"));
            }
            if let Some(msg) = t
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
            {
                line.push_str(": ");
                line.push_str(&one_line(msg, 300));
            }
            return Some(line);
        }
    }
    None
}

/// Collapses whitespace and truncates, so a report stays one line per node.
pub fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(conditions: serde_json::Value) -> Job {
        serde_json::from_value(
            json!({"metadata": {"name": "j"}, "status": {"conditions": conditions}}),
        )
        .unwrap()
    }

    #[test]
    fn terminal_conditions_end_a_job_and_interim_ones_do_not() {
        assert_eq!(job_phase(&job(json!([]))), JobPhase::Running);
        assert_eq!(
            job_phase(&job(
                json!([{"type": "SuccessCriteriaMet", "status": "True"}])
            )),
            JobPhase::Running
        );
        assert_eq!(
            job_phase(&job(json!([{"type": "FailureTarget", "status": "True"}]))),
            JobPhase::Running
        );
        assert_eq!(
            job_phase(&job(json!([{"type": "Complete", "status": "False"}]))),
            JobPhase::Running
        );
        assert_eq!(
            job_phase(&job(json!([{"type": "Complete", "status": "True"}]))),
            JobPhase::Succeeded
        );
        assert_eq!(
            job_phase(&job(
                json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}])
            )),
            JobPhase::Failed(
                "BackoffLimitExceeded: Job has reached the specified backoff limit".into()
            )
        );
        assert_eq!(
            job_phase(&job(
                json!([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}])
            )),
            JobPhase::Failed("DeadlineExceeded".into())
        );
    }

    #[test]
    fn failure_detail_names_the_first_failed_container_and_its_message() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {
                "initContainerStatuses": [
                    {"name": "host-check", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                     "state": {"terminated": {"exitCode": 0}}},
                    {"name": "artifacts", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                     "state": {"terminated": {"exitCode": 2, "reason": "Error", "message": "payload file\n bin/x   is corrupt"}}}
                ],
                "containerStatuses": [
                    {"name": "label", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                     "state": {"waiting": {"reason": "PodInitializing"}}}
                ]
            }
        }))
        .unwrap();
        assert_eq!(
            pod_failure_detail(&[pod]).unwrap(),
            "container artifacts exited 2: payload file bin/x is corrupt"
        );
        assert_eq!(pod_failure_detail(&[]), None);
    }

    #[test]
    fn one_line_truncates() {
        assert_eq!(one_line("a\n b", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }
}
