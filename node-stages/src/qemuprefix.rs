//! QEMU under a custom install prefix or suffix. A Kata release's QEMU is built for `/opt/kata`:
//! it looks for its firmware (BIOS, option ROMs) in `/opt/kata/share/kata-<artifact>/qemu`, which
//! does not exist when the release is installed elsewhere. Upstream kata-deploy then points the
//! configuration's hypervisor `path` at a wrapper that adds `-L <prefix>/share/kata-<artifact>/qemu/`
//! (`create_qemu_wrapper_script`, binary/src/artifacts/install.rs); so does this stage, with the
//! same file name and content. Pure: the caller installs the wrapper like any generated file.

use std::path::{Path, PathBuf};

use toml_edit::{value, DocumentMut};

use crate::katacfg::PAYLOAD_PREFIX;

/// The wrapper for a QEMU binary under a custom prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuWrapper {
    /// `<qemu binary>-installation-prefix`, beside the binary.
    pub path: PathBuf,
    /// The script (bash, as upstream's).
    pub content: String,
}

/// The QEMU artifact a binary belongs to: `qemu-system-x86_64` -> `qemu`,
/// `qemu-system-x86_64-snp-experimental` -> `qemu-snp-experimental` (upstream names a suffixed
/// build's binary and its share directory with the same suffix).
pub fn qemu_artifact(binary_name: &str) -> Option<String> {
    let rest = binary_name.strip_prefix("qemu-system-")?;
    let suffix = rest.find('-').map(|i| &rest[i..]).unwrap_or("");
    Some(format!("qemu{suffix}"))
}

/// For a configuration already relocated to `prefix` (not `/opt/kata`) whose hypervisor is QEMU
/// under that prefix: the wrapper, and the configuration text with `path` pointing at it. `None`
/// for the default prefix, other hypervisors, or a QEMU outside the prefix (left as it is).
pub fn wrap_qemu(relocated: &str, prefix: &Path) -> Option<(QemuWrapper, String)> {
    let prefix = prefix.to_string_lossy();
    if prefix == PAYLOAD_PREFIX {
        return None;
    }
    let mut doc: DocumentMut = relocated.parse().ok()?;
    let qemu = doc.get_mut("hypervisor")?.get_mut("qemu")?;
    let path = qemu.get("path")?.as_str()?.to_string();
    let binary = path.strip_prefix(&format!("{prefix}/bin/"))?;
    let artifact = qemu_artifact(binary)?;
    let wrapper = QemuWrapper {
        path: PathBuf::from(format!("{path}-installation-prefix")),
        content: format!(
            "#!/usr/bin/env bash\n\nexec {path} \"$@\" -L {prefix}/share/kata-{artifact}/qemu/\n"
        ),
    };
    qemu["path"] = value(wrapper.path.to_string_lossy().as_ref());
    Some((wrapper, doc.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "[hypervisor.qemu]\npath = \"/opt/kata-t/bin/qemu-system-x86_64\"\nkernel = \"/opt/kata-t/share/kata-containers/vmlinux.container\"\nvalid_hypervisor_paths = [\"/opt/kata-t/bin/qemu-system-x86_64\"]\n";

    #[test]
    fn a_custom_prefix_gets_upstreams_wrapper_with_the_firmware_directory() {
        let (w, cfg) = wrap_qemu(CFG, Path::new("/opt/kata-t")).unwrap();
        assert_eq!(
            w.path,
            PathBuf::from("/opt/kata-t/bin/qemu-system-x86_64-installation-prefix")
        );
        assert_eq!(
            w.content,
            "#!/usr/bin/env bash\n\nexec /opt/kata-t/bin/qemu-system-x86_64 \"$@\" -L /opt/kata-t/share/kata-qemu/qemu/\n"
        );
        let doc: DocumentMut = cfg.parse().unwrap();
        assert_eq!(
            doc["hypervisor"]["qemu"]["path"].as_str(),
            Some("/opt/kata-t/bin/qemu-system-x86_64-installation-prefix")
        );
        // Everything else is as it was.
        assert_eq!(
            cfg.replace(
                "qemu-system-x86_64-installation-prefix\"",
                "qemu-system-x86_64\""
            ),
            CFG
        );
    }

    #[test]
    fn default_prefix_other_hypervisors_and_outside_binaries_are_left_alone() {
        let default = CFG.replace("/opt/kata-t/", "/opt/kata/");
        assert_eq!(wrap_qemu(&default, Path::new("/opt/kata")), None);
        let clh = "[hypervisor.clh]\npath = \"/opt/kata-t/bin/cloud-hypervisor\"\n";
        assert_eq!(wrap_qemu(clh, Path::new("/opt/kata-t")), None);
        let host = "[hypervisor.qemu]\npath = \"/usr/bin/qemu-system-x86_64\"\n";
        assert_eq!(wrap_qemu(host, Path::new("/opt/kata-t")), None);
    }

    #[test]
    fn suffixed_builds_use_their_own_share_directory() {
        assert_eq!(qemu_artifact("qemu-system-x86_64").as_deref(), Some("qemu"));
        assert_eq!(
            qemu_artifact("qemu-system-x86_64-snp-experimental").as_deref(),
            Some("qemu-snp-experimental")
        );
        assert_eq!(qemu_artifact("qemu-system-ppc64").as_deref(), Some("qemu"));
        assert_eq!(qemu_artifact("cloud-hypervisor"), None);
        let snp = CFG.replace("qemu-system-x86_64", "qemu-system-x86_64-tdx-experimental");
        let (w, _) = wrap_qemu(&snp, Path::new("/opt/kata-t")).unwrap();
        assert!(w
            .content
            .ends_with("-L /opt/kata-t/share/kata-qemu-tdx-experimental/qemu/\n"));
    }
}
