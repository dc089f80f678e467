//! Fake host roots for local nodes: a directory that looks like the parts of a containerd node
//! the stages read and write, and a byte-exact snapshot to prove uninstall restores it.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Seeds `root` like a plain containerd 1.6 node: its default config (from the installed
/// containerd when present), a machine ID, `/dev/kvm`, a kubelet config and the runtime socket
/// directory. Existing files are kept, so re-seeding is harmless.
pub fn seed_containerd_node(root: &Path, machine_id: &str) -> Result<()> {
    let write_new = |rel: &str, body: &[u8]| -> Result<()> {
        let p = root.join(rel);
        if !p.exists() {
            std::fs::create_dir_all(p.parent().expect("relative paths have parents"))?;
            std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    };
    let config = std::process::Command::new("containerd")
        .args(["config", "default"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| o.stdout)
        .unwrap_or_else(|| {
            b"version = 2\n\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n".to_vec()
        });
    write_new("etc/containerd/config.toml", &config)?;
    write_new("etc/machine-id", format!("{machine_id}\n").as_bytes())?;
    // host-check looks for the KVM device node; a placeholder stands in for it here.
    write_new("dev/kvm", b"")?;
    write_new(
        "var/lib/kubelet/config.yaml",
        b"apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nruntimeRequestTimeout: 20m\n",
    )?;
    write_new(
        "etc/os-release",
        b"ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
    )?;
    std::fs::create_dir_all(root.join("run/containerd"))?;
    Ok(())
}

/// Every regular file under `root` with its SHA-256 (symlinks by target), for before/after
/// comparisons. Runtime scratch (`run/`) is left out.
pub fn snapshot(root: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let rel = path.strip_prefix(root)?.display().to_string();
        if rel == "run" {
            continue;
        }
        let ft = entry.file_type()?;
        if ft.is_symlink() {
            out.insert(rel, format!("-> {}", std::fs::read_link(&path)?.display()));
        } else if ft.is_dir() {
            walk(root, &path, out)?;
        } else {
            out.insert(rel, hex::encode(Sha256::digest(std::fs::read(&path)?)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeding_is_idempotent_and_snapshot_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        seed_containerd_node(dir.path(), "abc").unwrap();
        let before = snapshot(dir.path()).unwrap();
        assert!(before.contains_key("etc/containerd/config.toml"));
        assert!(before.contains_key("dev/kvm"));
        seed_containerd_node(dir.path(), "other").unwrap();
        assert_eq!(
            snapshot(dir.path()).unwrap(),
            before,
            "re-seeding keeps existing files"
        );
        std::fs::write(dir.path().join("etc/containerd/config.toml"), "changed").unwrap();
        assert_ne!(snapshot(dir.path()).unwrap(), before);
    }
}
