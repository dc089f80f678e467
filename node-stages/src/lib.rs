//! kata-deploy-stage: the privileged per-node stages of kata-deploy's job mode.
//!
//! A pure core (config, shims, katacfg, containerd, crio, hostcheck evaluation, artifacts
//! planning, label patches) and a thin I/O shell (hostfs, lock, restart, kube in label).

pub mod artifacts;
pub mod config;
pub mod containerd;
pub mod cri;
pub mod cri_client;
pub mod crio;
pub mod error;
pub mod guestassets;
pub mod hostcheck;
pub mod hostfs;
pub mod inuse;
pub mod katacfg;
pub mod label;
pub mod lock;
pub mod payload;
pub mod qemuprefix;
pub mod release;
pub mod release_io;
pub mod restart;
pub mod selfcopy;
pub mod selfreload;
pub mod shims;
pub mod stages;
pub mod state;

/// Fault-test hook: with `KATA_STAGE_STOP_AT=<point>` the process stops itself (SIGSTOP) on
/// reaching that point, so a test can SIGKILL it exactly there and prove the kill landed before
/// the work after it. Points: each stage's name once it finished (`install` pipeline), and
/// `cri-restarted` right after the runtime's restart job finished, before it is verified.
pub fn checkpoint(point: &str) {
    if std::env::var("KATA_STAGE_STOP_AT").is_ok_and(|p| p == point) {
        tracing::warn!(point, "KATA_STAGE_STOP_AT: stopped here for a fault test");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
    }
}
