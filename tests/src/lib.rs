
pub mod local_kubelet;
