//! Typed errors for every stage. Each carries the file/field/node it is about and a hint that
//! tells the operator what to do next; `main.rs` maps them to exit codes.

use std::path::PathBuf;

/// Any failure of a stage.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The stage configuration file is unreadable or invalid (nothing was changed).
    #[error(
        "configuration {file}: {field}: {message}. Fix the chart values (or the file) and re-run"
    )]
    Config {
        file: PathBuf,
        field: String,
        message: String,
    },

    /// An input on the host or in the payload is malformed (nothing was changed).
    #[error("{file}: {message}. {hint}")]
    BadInput {
        file: PathBuf,
        message: String,
        hint: String,
    },

    /// A host file operation failed.
    #[error("{op} {path}: {source}. {hint}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
        hint: String,
    },

    /// Another stage or install holds the host lock.
    #[error("host lock {path} still held after {waited_secs}s by another kata-deploy stage or install. Wait for it to finish (or find the stuck process with `fuser {path}`) and re-run")]
    LockTimeout { path: PathBuf, waited_secs: u64 },

    /// host-check found blocking problems.
    #[error("host-check found {count} blocking problem(s) on node {node}: {summary}. Each problem is listed above with what to do; fix them and re-run (nothing was changed)")]
    HostCheck {
        node: String,
        count: usize,
        summary: String,
    },

    /// Pods still run on handlers the stage was about to remove.
    #[error("node {node}: {count} running pod(s) still use the runtime handler(s) {handlers} that this run removes: {pods}. Waited {waited}s (stage.runningKataPods.waitSeconds); nothing was changed. Move those pods off this node (kubectl drain {node}, or delete them) and re-run, or set stage.runningKataPods.force: true to remove the handlers anyway (those pods then lose their runtime)")]
    HandlersInUse {
        node: String,
        handlers: String,
        count: usize,
        pods: String,
        waited: u64,
    },

    /// This host is not the machine the dispatcher targeted (reused node name).
    #[error("node {node}: host machine ID {host} differs from the node's reported machine ID {expected}: the node name was reused by another machine. Nothing was changed; re-run the install (helm upgrade) so the dispatcher targets the current node")]
    IdentityMismatch {
        node: String,
        host: String,
        expected: String,
    },

    /// The Node object now has another UID than the one the dispatcher targeted.
    #[error("node {node}: UID is now {uid}, the dispatcher targeted {expected}: the node name was reused by another machine. Nothing was changed; re-run the install (helm upgrade) so the dispatcher targets the current node")]
    NodeReplaced {
        node: String,
        uid: String,
        expected: String,
    },

    /// The container runtime did not come back (or came back without our handlers).
    #[error("runtime {unit}: {message}. {hint}")]
    Runtime {
        unit: String,
        message: String,
        hint: String,
    },

    /// Restarting or querying a systemd unit failed.
    #[error("restarter: {message}. Check that the host's /run/dbus is mounted under the host root and the stage runs as root, or set restart: none and restart the runtime yourself")]
    Restarter { message: String },

    /// systemd ran a unit's job and the unit failed (e.g. a runtime refusing its configuration).
    #[error("{message}: systemd ran the job and the unit failed (a runtime refusing its configuration does this); see the unit's journal on the node")]
    UnitFailed { message: String },

    /// A Kubernetes API call failed.
    #[error("node {node}: {message}. {hint}")]
    Kube {
        node: String,
        message: String,
        hint: String,
    },

    /// A fault injected by a test (crash simulation).
    #[error("injected fault after {after} host writes (test only)")]
    InjectedFault { after: usize },
}

impl StageError {
    /// Process exit code per ARCHITECTURE.md: 2 for bad configuration or input, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            // Deterministic: the same pod would fail the same way (the chart's podFailurePolicy
            // fails the Job at once on 2 instead of retrying).
            StageError::Config { .. }
            | StageError::BadInput { .. }
            | StageError::HostCheck { .. } => 2,
            _ => 1,
        }
    }

    /// An I/O error with a hint derived from the error kind (read-only, disk full, permissions).
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc_erofs) if libc_erofs == rustix::io::Errno::ROFS.raw_os_error() => {
                "The host path is read-only in this container. The chart mounts writable only the directories each stage writes (stage.hostMounts: precise): if this node's CRI keeps its configuration elsewhere than stage.cri (or k8sDistribution) says, set it to this node's CRI (k3s, rke2, k0s, microk8s, crio, containerd); otherwise set stage.hostMounts: root. Standalone: mount the host root read-write".to_string()
            }
            Some(nospc) if nospc == rustix::io::Errno::NOSPC.raw_os_error() => {
                "The host filesystem is full: free space (host-check reports what is needed) and re-run; nothing half-written was left in place".to_string()
            }
            Some(acces) if acces == rustix::io::Errno::ACCESS.raw_os_error() || acces == rustix::io::Errno::PERM.raw_os_error() => {
                "Permission denied: the stage must run privileged as root".to_string()
            }
            _ => "Re-run the stage; it converges from any partial state".to_string(),
        };
        StageError::Io {
            op,
            path: path.into(),
            source,
            hint,
        }
    }

    /// A malformed-input error with its hint.
    pub fn bad_input(
        file: impl Into<PathBuf>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        StageError::BadInput {
            file: file.into(),
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// A configuration error about one field.
    pub fn config(
        file: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        StageError::Config {
            file: file.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Result alias for stage code.
pub type Result<T, E = StageError> = std::result::Result<T, E>;
