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
pub mod hostcheck;
pub mod hostfs;
pub mod katacfg;
pub mod label;
pub mod lock;
pub mod payload;
pub mod restart;
pub mod shims;
pub mod stages;
pub mod state;
