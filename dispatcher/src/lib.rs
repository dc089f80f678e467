//! kata-deploy job mode: the dispatcher that creates exactly one node-pinned Job per node.
//!
//! Pure core: [`select`] (which nodes), [`naming`] (Job names), [`template`] (per-node Jobs),
//! [`pacing`] (the rollout state machine), [`status`] (reading Jobs and Pods), [`report`]
//! (what a person reads). I/O shell: [`kube_io`] (API calls with retries) and [`run`].

pub mod cli;
pub mod kube_io;
pub mod naming;
pub mod pacing;
pub mod report;
pub mod run;
pub mod select;
pub mod status;
pub mod template;
