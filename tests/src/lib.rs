//! Test bed for kata-deploy job mode: a real control plane ([`cluster`]), the dispatcher fixture
//! ([`rollout`]), the fault-injecting API proxy ([`faults`]) and the kubelet stand-in for local
//! nodes ([`local_kubelet`]).

pub mod cluster;
pub mod faults;
pub mod hostroot;
pub mod rollout;
pub mod local_kubelet;
