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

/// The most useful line about why a Job's pods failed. A container that ran and exited non-zero
/// says the most (the first such, init containers first, in order, over all pods); failing
/// that, why a pod never ran its containers: the kubelet rejected it (`OutOfcpu`,
/// `NodeAffinity`, ...), a container could not start (`ImagePullBackOff`, `ErrImagePull`, ...)
/// or it could not be scheduled. Without this, such a Job reads as a bare
/// `BackoffLimitExceeded` / `DeadlineExceeded`.
pub fn pod_failure_detail(pods: &[Pod]) -> Option<String> {
    pods.iter()
        .find_map(failed_container)
        .or_else(|| pods.iter().find_map(pod_not_running))
}

fn failed_container(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let lists = [
        status.init_container_statuses.as_ref(),
        status.container_statuses.as_ref(),
    ];
    lists.into_iter().flatten().flatten().find_map(|cs| {
        let t = cs.state.as_ref()?.terminated.as_ref()?;
        if t.exit_code == 0 {
            return None;
        }
        let reason = t.reason.as_deref().filter(|r| *r != "Error");
        let head = format!("container {} exited {}", cs.name, t.exit_code);
        Some(with_reason(head, reason, t.message.as_deref()))
    })
}

/// Waiting reasons that are part of an ordinary start, not a diagnosis.
const ORDINARY_WAITS: [&str; 2] = ["PodInitializing", "ContainerCreating"];

fn pod_not_running(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if let Some(reason) = status.reason.as_deref().filter(|r| !r.is_empty()) {
        let line = with_reason("pod failed".into(), Some(reason), status.message.as_deref());
        return Some(match pod_reason_hint(reason) {
            Some(hint) => format!("{line}; {hint}"),
            None => line,
        });
    }
    let lists = [
        status.init_container_statuses.as_ref(),
        status.container_statuses.as_ref(),
    ];
    let waiting = lists.into_iter().flatten().flatten().find_map(|cs| {
        let w = cs.state.as_ref()?.waiting.as_ref()?;
        let reason = w
            .reason
            .as_deref()
            .filter(|r| !ORDINARY_WAITS.contains(r))?;
        let head = format!("container {} waiting", cs.name);
        Some(with_reason(head, Some(reason), w.message.as_deref()))
    });
    if waiting.is_some() {
        return waiting;
    }
    let conditions = status.conditions.iter().flatten();
    conditions
        .filter(|c| c.type_ == "PodScheduled" && c.status == "False")
        .find(|c| c.reason.as_deref() == Some("Unschedulable"))
        .map(|c| {
            with_reason(
                "pod not scheduled".into(),
                c.reason.as_deref(),
                c.message.as_deref(),
            )
        })
}

/// What to do about a pod the kubelet refused or stopped (`status.reason`), when it is clear.
fn pod_reason_hint(reason: &str) -> Option<&'static str> {
    match reason {
        r if r.starts_with("OutOf") => {
            Some("the kubelet rejected it: free resources on the node or lower the template's requests")
        }
        "NodeAffinity" | "NodeSelector" | "NodeName" => {
            Some("the kubelet rejected it: the node no longer matches the template's node constraints; fix the template or the node's labels")
        }
        "Evicted" => Some("the node is under resource pressure; check kubectl describe node"),
        _ => None,
    }
}

/// `head (reason): message`, on one line, leaving out what is empty.
fn with_reason(mut line: String, reason: Option<&str>, message: Option<&str>) -> String {
    if let Some(reason) = reason.filter(|r| !r.is_empty()) {
        line.push_str(&format!(" ({reason})"));
    }
    if let Some(msg) = message.map(str::trim).filter(|m| !m.is_empty()) {
        line.push_str(": ");
        line.push_str(&one_line(msg, 300));
    }
    line
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

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "status": status})).unwrap()
    }

    #[test]
    fn failure_detail_reads_kubelet_rejections() {
        // Was a bare BackoffLimitExceeded: the kubelet refused the pod before any container ran.
        let rejected = pod(json!({"phase": "Failed", "reason": "OutOfcpu",
            "message": "Pod was rejected: Node didn't have enough resource: cpu, requested: 500, used: 3900, capacity: 4000"}));
        let d = pod_failure_detail(&[rejected]).unwrap();
        assert!(
            d.contains("OutOfcpu") && d.contains("requested: 500"),
            "{d}"
        );
        assert!(
            d.contains("lower the template's requests"),
            "what to do: {d}"
        );
        let deadline = pod(json!({"phase": "Failed", "reason": "DeadlineExceeded",
            "message": "Pod was active on the node longer than the specified deadline"}));
        let d = pod_failure_detail(&[deadline]).unwrap();
        assert!(
            d.contains("DeadlineExceeded") && !d.contains("rejected"),
            "{d}"
        );
        let affinity = pod(json!({"phase": "Failed", "reason": "NodeAffinity",
            "message": "Pod Predicate NodeAffinity failed"}));
        let d = pod_failure_detail(&[affinity]).unwrap();
        assert!(d.contains("NodeAffinity") && d.contains("Predicate"), "{d}");
    }

    #[test]
    fn failure_detail_reads_waiting_containers() {
        let waiting = |reason: &str| {
            pod(json!({"phase": "Pending", "initContainerStatuses": [
                {"name": "host-check", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"waiting": {"reason": reason, "message": "Back-off pulling image \"stage:9\""}}}]}))
        };
        for reason in ["ImagePullBackOff", "ErrImagePull"] {
            let d = pod_failure_detail(&[waiting(reason)]).unwrap();
            assert!(
                d.contains("host-check") && d.contains(reason) && d.contains("stage:9"),
                "{d}"
            );
        }
        // Ordinary start-up waits say nothing.
        assert_eq!(pod_failure_detail(&[waiting("PodInitializing")]), None);
        assert_eq!(pod_failure_detail(&[waiting("ContainerCreating")]), None);
    }

    #[test]
    fn failure_detail_reads_an_unschedulable_condition() {
        let p = pod(json!({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/3 nodes are available: 3 Insufficient memory."}]}));
        let d = pod_failure_detail(&[p]).unwrap();
        assert!(
            d.contains("Unschedulable") && d.contains("Insufficient memory"),
            "{d}"
        );
    }

    #[test]
    fn a_failed_container_wins_over_a_later_pods_wait_and_a_pod_without_status_is_skipped() {
        let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "p0"}})).unwrap();
        let failed = pod(json!({"containerStatuses": [
            {"name": "label", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 1, "message": "no token"}}}]}));
        let pulling = pod(json!({"containerStatuses": [
            {"name": "label", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"waiting": {"reason": "ErrImagePull"}}}]}));
        assert_eq!(
            pod_failure_detail(&[bare, pulling, failed]).unwrap(),
            "container label exited 1: no token"
        );
    }

    #[test]
    fn one_line_truncates() {
        assert_eq!(one_line("a\n b", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }
}
