//! Test bed for kata-deploy job mode: a real control plane ([`cluster`]), the dispatcher fixture
//! ([`rollout`]), the fault-injecting API proxy ([`faults`]), the kubelet stand-in for local
//! nodes ([`local_kubelet`]) and real nodes (systemd + containerd + kubelet, [`realnode`]).

pub mod cluster;
pub mod faults;
pub mod figures;
pub mod helmsteps;
pub mod hostroot;
pub mod local_kubelet;
pub mod probe;
pub mod realnode;
pub mod rollout;
