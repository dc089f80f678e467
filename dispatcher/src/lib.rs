//! kata-deploy job mode: the dispatcher that creates exactly one node-pinned Job per node.
//!
//! Pure core: [`select`] (which nodes), [`admission`] (taints, DaemonSet rules), [`naming`] (Job
//! names), [`template`] (per-node Jobs), [`cri_dir`] (each node's CRI configuration directory), [`lifecycle`] (the per-node state machine: dispatch,
//! replace, adopt, finish, abandon), [`canary`] (the first wave), [`status`] (reading Jobs and Pods), [`report`] (what a
//! person reads), [`summary`] (the rollout summary in a ConfigMap), [`recorded_selection`] (the install selection the retire run compares with), [`supersede`] (stopping the superseded dispatcher), [`single_flight`] (one dispatcher of a release at a time). I/O shell: [`kube_io`] (API calls with retries) and [`run`].

pub mod admission;
pub mod canary;
pub mod cli;
pub mod cri_dir;
pub mod kube_io;
pub mod lifecycle;
pub mod naming;
pub mod progress_io;
pub mod recorded_selection;
pub mod report;
pub mod run;
pub mod select;
pub mod single_flight;
pub mod status;
pub mod summary;
pub mod supersede;
pub mod template;
