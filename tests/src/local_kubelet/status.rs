//! Pod status construction: what the runner knows about each container → a `PodStatus` (phase,
//! conditions, init and container statuses, termination messages). Pure.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// The kubelet's cap on a termination message read from the file.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// `FallbackToLogsOnError`: at most this many log lines...
pub const FALLBACK_LOG_LINES: usize = 80;
/// ...and at most this many bytes.
pub const FALLBACK_LOG_BYTES: usize = 2048;

/// Lifecycle of one container as the runner saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CState {
    /// Not started (yet).
    Waiting {
        /// e.g. `PodInitializing`, `ContainerCreating`.
        reason: String,
    },
    /// Process running.
    Running {
        /// Start time.
        started: Timestamp,
    },
    /// Process gone (or could not be started).
    Terminated {
        /// Exit code (128+signal when killed).
        exit_code: i32,
        /// Signal that killed it, if any.
        signal: Option<i32>,
        /// `Completed`, `Error`, or why it could not run.
        reason: String,
        /// Termination message.
        message: Option<String>,
        /// Start time (`None` when it never started).
        started: Option<Timestamp>,
        /// End time.
        finished: Timestamp,
    },
}

/// One container of the pod as tracked by the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRecord {
    /// Container name.
    pub name: String,
    /// Image as written in the spec.
    pub image: String,
    /// What ran for it (`imageID` in the status).
    pub image_id: String,
    /// State.
    pub state: CState,
}

/// Everything the status is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// Pod UID (for container IDs).
    pub uid: String,
    /// initContainers, in order.
    pub init: Vec<ContainerRecord>,
    /// Main containers.
    pub main: Vec<ContainerRecord>,
    /// When the runner accepted the pod.
    pub start_time: Timestamp,
    /// Dummy pod IP / host IP.
    pub ip: String,
}

impl ContainerRecord {
    /// A container that has not started yet.
    pub fn waiting(name: &str, image: &str, reason: &str) -> Self {
        ContainerRecord {
            name: name.into(),
            image: image.into(),
            image_id: String::new(),
            state: CState::Waiting {
                reason: reason.into(),
            },
        }
    }

    fn exit(&self) -> Option<i32> {
        match &self.state {
            CState::Terminated { exit_code, .. } => Some(*exit_code),
            _ => None,
        }
    }
}

/// Terminated-state reason for an exit code.
pub fn exit_reason(exit_code: i32) -> &'static str {
    if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// Last `lines` lines of a log, capped to its last `max_bytes` bytes.
pub fn log_tail(log: &[u8], lines: usize, max_bytes: usize) -> String {
    let text = String::from_utf8_lossy(log);
    let trimmed = text.strip_suffix('\n').unwrap_or(&text);
    let all: Vec<&str> = trimmed.split('\n').collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.len() <= max_bytes {
        return tail;
    }
    let mut cut = tail.len() - max_bytes;
    while !tail.is_char_boundary(cut) {
        cut += 1;
    }
    tail[cut..].to_string()
}

/// The termination message the kubelet would report: the message file (capped), or with
/// `FallbackToLogsOnError` and a failed container and an empty file, the log tail.
pub fn termination_message(
    file: &[u8],
    policy: Option<&str>,
    exit_code: i32,
    log: &[u8],
) -> Option<String> {
    let file = &file[..file.len().min(MAX_MESSAGE_BYTES)];
    if !file.is_empty() {
        return Some(String::from_utf8_lossy(file).into_owned());
    }
    if policy == Some("FallbackToLogsOnError") && exit_code != 0 && !log.is_empty() {
        return Some(log_tail(log, FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES));
    }
    None
}

/// Pod phase under restartPolicy Never: init failure → Failed; init pending → Pending; all main
/// containers done → Succeeded / Failed; any running → Running.
pub fn phase(rec: &PodRecord) -> &'static str {
    if rec.init.iter().any(|c| c.exit().is_some_and(|e| e != 0)) {
        return "Failed";
    }
    if !rec.init.iter().all(|c| c.exit() == Some(0)) {
        return "Pending";
    }
    let exits: Vec<Option<i32>> = rec.main.iter().map(ContainerRecord::exit).collect();
    if !exits.is_empty() && exits.iter().all(Option::is_some) {
        return if exits.iter().all(|e| *e == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        };
    }
    if rec
        .main
        .iter()
        .any(|c| matches!(c.state, CState::Running { .. } | CState::Terminated { .. }))
    {
        return "Running";
    }
    "Pending"
}

fn container_status(uid: &str, c: &ContainerRecord, is_init: bool) -> ContainerStatus {
    let t = |ts: &Timestamp| Time(*ts);
    let (state, ready, started) = match &c.state {
        CState::Waiting { reason } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: None,
                }),
                ..Default::default()
            },
            false,
            false,
        ),
        CState::Running { started } => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(t(started)),
                }),
                ..Default::default()
            },
            // A running main container is ready (we run no probes); init containers never are.
            !is_init,
            true,
        ),
        CState::Terminated {
            exit_code,
            signal,
            reason,
            message,
            started,
            finished,
        } => (
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *exit_code,
                    signal: *signal,
                    reason: Some(reason.clone()),
                    message: message.clone(),
                    started_at: started.as_ref().map(t),
                    finished_at: Some(t(finished)),
                    container_id: Some(container_id(uid, &c.name)),
                }),
                ..Default::default()
            },
            // The kubelet reports a completed init container as ready.
            is_init && *exit_code == 0,
            false,
        ),
    };
    let has_id = !matches!(c.state, CState::Waiting { .. });
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone(),
        container_id: has_id.then(|| container_id(uid, &c.name)),
        ready,
        started: Some(started),
        restart_count: 0,
        state: Some(state),
        ..Default::default()
    }
}

/// Container ID reported in statuses (no runtime: pod UID + name).
pub fn container_id(uid: &str, name: &str) -> String {
    format!("local://{uid}/{name}")
}

fn condition(type_: &str, ok: bool, reason: Option<&str>, now: &Timestamp) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.map(str::to_string),
        last_transition_time: Some(Time(*now)),
        ..Default::default()
    }
}

/// Keeps `lastTransitionTime` of conditions whose status did not change since `prev`.
pub fn carry_transition_times(new: &mut [PodCondition], prev: &[PodCondition]) {
    for c in new.iter_mut() {
        if let Some(p) = prev
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
        {
            c.last_transition_time = p.last_transition_time.clone();
        }
    }
}

/// Full pod status for the `pods/status` subresource.
pub fn build_status(rec: &PodRecord, now: &Timestamp) -> PodStatus {
    let phase = phase(rec);
    let initialized = rec.init.iter().all(|c| c.exit() == Some(0));
    let done = matches!(phase, "Succeeded" | "Failed");
    let all_running = !rec.main.is_empty()
        && rec
            .main
            .iter()
            .all(|c| matches!(c.state, CState::Running { .. }));
    let ready_reason = if done {
        Some("PodCompleted")
    } else if all_running {
        None
    } else {
        Some("ContainersNotReady")
    };
    let init_reason = if initialized {
        if done && !rec.init.is_empty() {
            Some("PodCompleted")
        } else {
            None
        }
    } else {
        Some("ContainersNotInitialized")
    };
    let conditions = vec![
        condition("PodReadyToStartContainers", true, None, now),
        condition("Initialized", initialized, init_reason, now),
        condition("Ready", all_running && !done, ready_reason, now),
        condition("ContainersReady", all_running && !done, ready_reason, now),
        condition("PodScheduled", true, None, now),
    ];
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some(rec.ip.clone()),
        host_ips: Some(vec![HostIP { ip: rec.ip.clone() }]),
        pod_ip: Some(rec.ip.clone()),
        pod_ips: Some(vec![PodIP { ip: rec.ip.clone() }]),
        start_time: Some(Time(rec.start_time)),
        // qosClass is left alone: the API server computes it at creation and rejects changes.
        init_container_statuses: (!rec.init.is_empty()).then(|| {
            rec.init
                .iter()
                .map(|c| container_status(&rec.uid, c, true))
                .collect()
        }),
        container_statuses: Some(
            rec.main
                .iter()
                .map(|c| container_status(&rec.uid, c, false))
                .collect(),
        ),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }

    fn term(name: &str, code: i32) -> ContainerRecord {
        ContainerRecord {
            state: CState::Terminated {
                exit_code: code,
                signal: None,
                reason: exit_reason(code).into(),
                message: Some(format!("{name} done")),
                started: Some(now()),
                finished: now(),
            },
            ..ContainerRecord::waiting(name, "img", "")
        }
    }

    fn running(name: &str) -> ContainerRecord {
        ContainerRecord {
            state: CState::Running { started: now() },
            ..ContainerRecord::waiting(name, "img", "")
        }
    }

    fn rec(init: Vec<ContainerRecord>, main: Vec<ContainerRecord>) -> PodRecord {
        PodRecord {
            uid: "u".into(),
            init,
            main,
            start_time: now(),
            ip: "127.0.0.1".into(),
        }
    }

    #[test]
    fn phases() {
        let w = |n| ContainerRecord::waiting(n, "img", "PodInitializing");
        assert_eq!(phase(&rec(vec![w("i")], vec![w("m")])), "Pending");
        assert_eq!(phase(&rec(vec![running("i")], vec![w("m")])), "Pending");
        assert_eq!(phase(&rec(vec![term("i", 1)], vec![w("m")])), "Failed");
        assert_eq!(phase(&rec(vec![term("i", 0)], vec![w("m")])), "Pending");
        assert_eq!(
            phase(&rec(vec![term("i", 0)], vec![running("m")])),
            "Running"
        );
        assert_eq!(
            phase(&rec(vec![], vec![term("a", 0), running("b")])),
            "Running"
        );
        assert_eq!(
            phase(&rec(vec![], vec![term("a", 0), term("b", 0)])),
            "Succeeded"
        );
        assert_eq!(
            phase(&rec(vec![], vec![term("a", 0), term("b", 3)])),
            "Failed"
        );
    }

    #[test]
    fn status_of_a_failed_pod() {
        let s = build_status(&rec(vec![term("init", 0)], vec![term("main", 3)]), &now());
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        let main = &s.container_statuses.as_ref().unwrap()[0];
        let t = main.state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(t.exit_code, 3);
        assert_eq!(t.reason.as_deref(), Some("Error"));
        assert_eq!(t.message.as_deref(), Some("main done"));
        assert!(!main.ready);
        let init = &s.init_container_statuses.as_ref().unwrap()[0];
        assert!(init.ready);
        assert_eq!(
            init.state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("Completed")
        );
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("PodCompleted"))
        );
        assert_eq!(s.pod_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(s.qos_class, None);
    }

    #[test]
    fn status_while_running() {
        let s = build_status(&rec(vec![], vec![running("main")]), &now());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert!(s.container_statuses.unwrap()[0].ready);
        assert!(s.init_container_statuses.is_none());
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
    }

    #[test]
    fn transition_times_carry_over() {
        let later = Timestamp::from_second(1_800_000_000).unwrap();
        let first = build_status(&rec(vec![], vec![running("m")]), &now());
        let mut second = build_status(&rec(vec![], vec![term("m", 0)]), &later);
        carry_transition_times(
            second.conditions.as_mut().unwrap(),
            first.conditions.as_ref().unwrap(),
        );
        let time = |s: &PodStatus, t: &str| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == t)
                .unwrap()
                .last_transition_time
                .clone()
                .unwrap()
                .0
        };
        assert_eq!(time(&second, "PodScheduled"), now());
        assert_eq!(time(&second, "Ready"), later);
    }

    #[test]
    fn termination_messages() {
        assert_eq!(
            termination_message(b"boom", None, 1, b"log").as_deref(),
            Some("boom")
        );
        assert_eq!(termination_message(b"", None, 1, b"log"), None);
        assert_eq!(
            termination_message(b"", Some("FallbackToLogsOnError"), 1, b"a\nb\n").as_deref(),
            Some("a\nb")
        );
        assert_eq!(
            termination_message(b"", Some("FallbackToLogsOnError"), 0, b"a\n"),
            None
        );
        let big = vec![b'x'; 5000];
        assert_eq!(
            termination_message(&big, None, 0, b"").unwrap().len(),
            MAX_MESSAGE_BYTES
        );
        let many: String = (0..100).map(|i| format!("l{i}\n")).collect();
        let t = log_tail(many.as_bytes(), 80, 2048);
        assert!(t.starts_with("l20\n") && t.ends_with("l99"), "{t}");
        assert_eq!(log_tail(b"abcdef", 80, 3), "def");
    }
}
