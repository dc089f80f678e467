//! Static facts about the built-in Kata shims: which runtime implements them, which
//! architectures they exist for, and whether they pass GPUs through.

/// Facts about one built-in shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimInfo {
    /// Shim name (configuration-<name>.toml in the payload).
    pub name: &'static str,
    /// Implemented by runtime-rs (runtime-rs/bin/containerd-shim-kata-v2) rather than the Go runtime.
    pub runtime_rs: bool,
    /// Architectures (Kubernetes names) the shim is built for.
    pub arches: &'static [&'static str],
    /// VFIO GPU passthrough: needs IOMMU groups and no host NVIDIA driver.
    pub gpu_passthrough: bool,
}

const fn shim(
    name: &'static str,
    runtime_rs: bool,
    arches: &'static [&'static str],
    gpu: bool,
) -> ShimInfo {
    ShimInfo {
        name,
        runtime_rs,
        arches,
        gpu_passthrough: gpu,
    }
}

const X86: &[&str] = &["amd64"];
const X86_ARM: &[&str] = &["amd64", "arm64"];
const ALL: &[&str] = &["amd64", "arm64", "s390x", "ppc64le"];

/// Every built-in shim, with upstream kata-deploy's names (its chart values and RUST_SHIMS):
/// `-runtime-rs` variants and dragonball/openvmm run on runtime-rs; the architectures are the
/// chart's default `supportedArches`.
pub const SHIMS: &[ShimInfo] = &[
    shim("clh", false, X86, false),
    shim("clh-azure", false, X86, false),
    shim("clh-runtime-rs", true, X86, false),
    shim("clh-azure-runtime-rs", true, X86, false),
    shim("dragonball", true, X86, false),
    shim("fc", false, X86, false),
    shim("qemu", false, ALL, false),
    shim("qemu-runtime-rs", true, ALL, false),
    shim("qemu-nvidia-cpu", false, X86_ARM, false),
    shim("qemu-nvidia-cpu-runtime-rs", true, X86_ARM, false),
    shim("qemu-nvidia-gpu", false, X86, true),
    shim("qemu-nvidia-gpu-runtime-rs", true, X86_ARM, true),
    shim("qemu-nvidia-gpu-snp", false, X86, true),
    shim("qemu-nvidia-gpu-snp-runtime-rs", true, X86, true),
    shim("qemu-nvidia-gpu-tdx", false, X86, true),
    shim("qemu-nvidia-gpu-tdx-runtime-rs", true, X86, true),
    shim("qemu-snp", false, X86, false),
    shim("qemu-snp-runtime-rs", true, X86, false),
    shim("qemu-tdx", false, X86, false),
    shim("qemu-tdx-runtime-rs", true, X86, false),
    shim("qemu-se", false, &["s390x"], false),
    shim("qemu-se-runtime-rs", true, &["s390x"], false),
    shim("qemu-coco-dev", false, &["amd64", "s390x"], false),
    shim(
        "qemu-coco-dev-runtime-rs",
        true,
        &["amd64", "arm64", "s390x"],
        false,
    ),
    shim("remote", false, &["amd64", "ppc64le", "s390x"], false),
    shim("openvmm-azure-runtime-rs", true, X86, false),
];

/// Looks a built-in shim up by name.
pub fn lookup(name: &str) -> Option<&'static ShimInfo> {
    SHIMS.iter().find(|s| s.name == name)
}

/// Names of all built-in shims (for error messages).
pub fn names() -> Vec<&'static str> {
    SHIMS.iter().map(|s| s.name).collect()
}

/// Maps `uname -m` spellings to Kubernetes architecture names.
pub fn kube_arch(machine: &str) -> &str {
    match machine {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_knows_runtime_rs_and_gpu() {
        assert!(lookup("dragonball").unwrap().runtime_rs);
        assert!(!lookup("qemu").unwrap().runtime_rs);
        assert!(lookup("qemu-nvidia-gpu-snp").unwrap().gpu_passthrough);
        assert!(lookup("nope").is_none());
        // Upstream's names (seed 004: kata-clh-runtime-rs); the pre-4.0 names are gone.
        assert!(
            lookup("clh-runtime-rs").unwrap().runtime_rs && !lookup("remote").unwrap().runtime_rs
        );
        assert!(lookup("cloud-hypervisor").is_none() && lookup("stratovirt").is_none());
        assert_eq!(SHIMS.len(), 26);
        assert_eq!(kube_arch("x86_64"), "amd64");
    }
}
