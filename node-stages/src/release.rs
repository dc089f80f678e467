//! The official Kata release image as the payload: upstream kata-deploy's layout (3.32 and 4.x),
//! read as published, never rebuilt:
//!
//! ```text
//! /opt/kata-artifacts/tarballs/kata-static-<component>.tar.zst   one per component, opt/kata/... entries
//! /opt/kata-artifacts/shim-components.json                       shim -> architecture -> components
//! /opt/kata-artifacts/nydus-snapshotter/                          containerd-nydus-grpc, nydus-overlayfs
//! /opt/kata-artifacts/versions.yaml                               4.x only: installed as <prefix>/versions.yaml
//! ```
//!
//! This module is the pure core: the manifest's schema, which components the enabled shims need
//! on this architecture, which tar entries are acceptable (nothing may land outside the install
//! prefix) and the per-component index (a digest per file) that lets an unchanged re-run compare
//! without decompressing anything. Streaming lives in `release_io`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StageError};

/// The component manifest, relative to the payload directory.
pub const SHIM_COMPONENTS: &str = "shim-components.json";
/// The tarballs' directory, relative to the payload directory.
pub const TARBALLS_DIR: &str = "tarballs";
/// 4.x: the release's versions.yaml, installed as `<prefix>/versions.yaml` (as upstream does).
pub const VERSIONS_YAML: &str = "versions.yaml";
/// The host cache of the selected components' indexes, in the install's state directory.
pub const RELEASE_INDEX: &str = "release-index.json";
/// Every tarball entry the install takes lives under this directory (`./opt/kata` also accepted).
pub const TAR_PREFIX: &str = "opt/kata";
/// Absolute symlink targets under this prefix point into the install.
pub const ABS_PREFIX: &str = "/opt/kata";
/// Base configurations are kept as text in the index (katacfg renders from them).
pub const CONFIG_DIR: &str = "share/defaults/kata-containers";
/// Largest base configuration kept as text.
pub const MAX_TEXT_BYTES: u64 = 1 << 20;

/// `shim-components.json`: for each shim and release architecture (`x86_64`, `aarch64`,
/// `s390x`, `ppc64le`), the components it needs. Other keys (`_comment`) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ShimComponents {
    /// shim -> release architecture -> component names.
    pub shims: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

/// The tarball file name of a component.
pub fn tarball_name(component: &str) -> String {
    format!("kata-static-{component}.tar.zst")
}

/// Whether `name` is a plausible component name (it becomes a file name).
fn valid_component(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Parses `shim-components.json`, refusing component names that are not plain file-name parts.
pub fn parse_shim_components(text: &str, file: &Path) -> Result<ShimComponents> {
    let sc: ShimComponents = serde_json::from_str(text).map_err(|e| {
        StageError::bad_input(
            file,
            format!("not the release's component manifest ({{\"shims\": {{<shim>: {{<arch>: [<component>...]}}}}}}): {e}"),
            "Use an official kata-deploy release image (3.32 or later) or one built the same way",
        )
    })?;
    for (shim, arches) in &sc.shims {
        for (arch, comps) in arches {
            if let Some(bad) = comps.iter().find(|c| !valid_component(c)) {
                return Err(StageError::bad_input(
                    file,
                    format!("shims.{shim}.{arch} names component {bad:?}, which is not a plain name"),
                    "The payload image is damaged or not a Kata release: use an official kata-deploy image",
                ));
            }
        }
    }
    Ok(sc)
}

/// The release's spelling of a Kubernetes architecture.
pub fn release_arch(kube_arch: &str) -> &str {
    match kube_arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        other => other,
    }
}

/// The components the given (base) shims need on this architecture, sorted, each once. A shim
/// the release does not ship for this architecture is refused: installing nothing for it would
/// leave a handler without its VM.
pub fn select_components(
    sc: &ShimComponents,
    shims: &[&str],
    kube_arch: &str,
    file: &Path,
) -> Result<BTreeSet<String>> {
    let arch = release_arch(kube_arch);
    let mut out = BTreeSet::new();
    for shim in shims {
        let Some(arches) = sc.shims.get(*shim) else {
            return Err(StageError::bad_input(
                file,
                format!(
                    "the release has no entry for shim {shim:?} (it lists {})",
                    sc.shims.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
                "Disable the shim in the chart values, or use a release image (payload.image) that ships it",
            ));
        };
        let Some(comps) = arches.get(arch) else {
            return Err(StageError::bad_input(
                file,
                format!(
                    "the release ships shim {shim:?} for {} but not for this node's architecture {arch}",
                    arches.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
                "Restrict the shim's supportedArches in the chart values, or use a release that supports it",
            ));
        };
        out.extend(comps.iter().cloned());
    }
    Ok(out)
}

/// Where a tar entry goes, relative to the install prefix. `Ok(None)`: not part of the install
/// (the `opt/kata` root itself, its parents, anything outside `opt/kata`, as upstream skips).
/// Refused: absolute paths and any `..`.
pub fn entry_rel(raw: &Path) -> std::result::Result<Option<PathBuf>, String> {
    if raw.is_absolute() {
        return Err("absolute path".into());
    }
    if raw.components().any(|c| c == Component::ParentDir) {
        return Err("path with '..'".into());
    }
    let parts: Vec<&std::ffi::OsStr> = raw
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect();
    let prefix: Vec<&std::ffi::OsStr> = Path::new(TAR_PREFIX)
        .components()
        .map(|c| c.as_os_str())
        .collect();
    if parts.len() <= prefix.len() || parts[..prefix.len()] != prefix[..] {
        return Ok(None);
    }
    Ok(Some(parts[prefix.len()..].iter().collect()))
}

/// The target a symbolic link at `link` (relative to the prefix) is installed with: relative
/// targets must resolve inside the prefix; absolute targets under `/opt/kata` become relative
/// (so they follow a custom prefix); any other absolute target is refused.
pub fn symlink_target(link: &Path, target: &Path) -> std::result::Result<PathBuf, String> {
    let rel_target = if target.is_absolute() {
        let Ok(inside) = target.strip_prefix(ABS_PREFIX) else {
            return Err(format!(
                "link to {} points outside {ABS_PREFIX}",
                target.display()
            ));
        };
        // Relative from the link's directory: up past what they do not share, then down.
        let dir: Vec<Component> = link
            .parent()
            .map(|p| p.components().collect())
            .unwrap_or_default();
        let to: Vec<Component> = inside.components().collect();
        let common = dir.iter().zip(&to).take_while(|(a, b)| a == b).count();
        let mut p: PathBuf = std::iter::repeat_n("..", dir.len() - common).collect();
        p.extend(&to[common..]);
        p
    } else {
        target.to_path_buf()
    };
    let mut depth = link.components().count() as i64 - 1;
    for c in rel_target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            _ => return Err(format!("link target {} is not relative", target.display())),
        }
        if depth < 0 {
            return Err(format!(
                "link to {} leaves the install prefix",
                target.display()
            ));
        }
    }
    if rel_target.as_os_str().is_empty() {
        return Err("empty link target".into());
    }
    Ok(rel_target)
}

/// One installable entry of a component tarball.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum IndexEntry {
    /// A regular file (or a hard link: `from` names the entry carrying the content).
    File {
        /// sha256 of the content.
        sha256: String,
        /// Size in bytes.
        size: u64,
        /// 0o755 when any execute bit is set, else 0o644 (no setuid, no odd modes).
        mode: u32,
        /// The entry whose bytes are the content (itself, or a hard link's target).
        from: PathBuf,
    },
    /// A symbolic link with this (validated, relative) target.
    Symlink {
        /// Relative target.
        target: PathBuf,
    },
}

/// What one component tarball installs, by path relative to the prefix; cached on the host
/// keyed by the tarball's sha256, so an unchanged re-run compares without decompressing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentIndex {
    /// sha256 of the `.tar.zst` file.
    pub tarball_sha256: String,
    /// Entries by relative path.
    pub entries: BTreeMap<PathBuf, IndexEntry>,
    /// Base configurations (under `share/defaults/kata-containers`) as text.
    pub texts: BTreeMap<PathBuf, String>,
}

/// Installable mode of a tar entry's mode bits.
pub fn install_mode(tar_mode: u32) -> u32 {
    if tar_mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// Whether an entry's text is kept in the index (a base configuration).
pub fn keeps_text(rel: &Path, size: u64) -> bool {
    size <= MAX_TEXT_BYTES
        && rel.starts_with(CONFIG_DIR)
        && rel.extension().is_some_and(|e| e == "toml")
}

/// One selected file of the merged release: which component carries it and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedEntry {
    /// The component.
    pub component: String,
    /// The entry.
    pub entry: IndexEntry,
}

/// Merges the selected components' indexes in name order; a path two components both carry
/// goes to the later one (upstream extracts in that order, the later overwriting). Returns the
/// merged entries and the paths whose content differed (worth a warning).
pub fn merge(
    indexes: &BTreeMap<String, ComponentIndex>,
) -> (BTreeMap<PathBuf, MergedEntry>, Vec<PathBuf>) {
    let mut out: BTreeMap<PathBuf, MergedEntry> = BTreeMap::new();
    let mut clashes = Vec::new();
    for (component, idx) in indexes {
        for (rel, entry) in &idx.entries {
            let new = MergedEntry {
                component: component.clone(),
                entry: entry.clone(),
            };
            if let Some(old) = out.insert(rel.clone(), new) {
                if !same_content(&old.entry, entry) {
                    clashes.push(rel.clone());
                }
            }
        }
    }
    (out, clashes)
}

fn same_content(a: &IndexEntry, b: &IndexEntry) -> bool {
    match (a, b) {
        (IndexEntry::File { sha256: x, .. }, IndexEntry::File { sha256: y, .. }) => x == y,
        (IndexEntry::Symlink { target: x }, IndexEntry::Symlink { target: y }) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{
      "_comment": ["Maps each runtime class to the component tarballs it requires per architecture."],
      "shims": {
        "qemu": {
          "x86_64":  ["shim-v2-go", "qemu", "virtiofsd", "kernel", "rootfs-image"],
          "aarch64": ["shim-v2-go", "qemu", "virtiofsd", "kernel", "rootfs-image", "ovmf"]
        },
        "qemu-runtime-rs": {"x86_64": ["shim-v2-rust", "qemu", "virtiofsd", "kernel", "rootfs-image"]},
        "qemu-snp": {"x86_64": ["shim-v2-go", "qemu", "kernel", "rootfs-image-confidential", "ovmf-sev"]}
      }
    }"#;

    #[test]
    fn selects_each_component_once_for_the_node_architecture() {
        let sc = parse_shim_components(JSON, Path::new("S")).unwrap();
        let got =
            select_components(&sc, &["qemu", "qemu-runtime-rs"], "amd64", Path::new("S")).unwrap();
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [
                "kernel",
                "qemu",
                "rootfs-image",
                "shim-v2-go",
                "shim-v2-rust",
                "virtiofsd"
            ]
        );
        let arm = select_components(&sc, &["qemu"], "arm64", Path::new("S")).unwrap();
        assert!(arm.contains("ovmf") && !arm.contains("shim-v2-rust"));
    }

    #[test]
    fn a_shim_the_release_lacks_is_refused_by_name() {
        let sc = parse_shim_components(JSON, Path::new("/p/S")).unwrap();
        let e = select_components(&sc, &["fc"], "amd64", Path::new("/p/S"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"fc\"") && e.contains("/p/S"), "{e}");
        let e = select_components(&sc, &["qemu-snp"], "arm64", Path::new("/p/S"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("aarch64") && e.contains("x86_64"), "{e}");
    }

    #[test]
    fn manifest_with_bad_shape_or_names_is_refused() {
        for bad in [
            "{}",
            r#"{"shims": {"qemu": ["x"]}}"#,
            r#"{"shims": {"qemu": {"x86_64": ["../../etc"]}}}"#,
            r#"{"shims": {"qemu": {"x86_64": ["a/b"]}}}"#,
            "not json",
        ] {
            let e = parse_shim_components(bad, Path::new("/p/S")).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains("/p/S"), "{bad}: {e}");
        }
    }

    #[test]
    fn entries_outside_opt_kata_are_skipped_escapes_refused() {
        let ok = |s: &str| entry_rel(Path::new(s)).unwrap();
        assert_eq!(ok("opt/kata/bin/x"), Some(PathBuf::from("bin/x")));
        assert_eq!(ok("./opt/kata/bin/x"), Some(PathBuf::from("bin/x")));
        assert_eq!(ok("./opt/kata/"), None);
        assert_eq!(ok("opt/"), None);
        assert_eq!(ok("./"), None);
        assert_eq!(ok("usr/bin/kata-deploy"), None);
        assert_eq!(ok("opt/katax/bin"), None);
        assert!(entry_rel(Path::new("/opt/kata/bin/x")).is_err());
        assert!(entry_rel(Path::new("opt/kata/../../etc/passwd")).is_err());
        assert!(entry_rel(Path::new("opt/kata/bin/../x")).is_err());
    }

    #[test]
    fn links_stay_inside_and_absolute_ones_follow_the_prefix() {
        let t = |l: &str, t: &str| symlink_target(Path::new(l), Path::new(t));
        assert_eq!(
            t(
                "share/kata-containers/vmlinux.container",
                "vmlinux-6.12.container"
            )
            .unwrap(),
            PathBuf::from("vmlinux-6.12.container")
        );
        assert_eq!(
            t("bin/qemu", "/opt/kata/libexec/qemu").unwrap(),
            PathBuf::from("../libexec/qemu")
        );
        assert_eq!(t("x", "/opt/kata/y").unwrap(), PathBuf::from("y"));
        assert_eq!(
            t("share/k/a", "/opt/kata/share/k/b").unwrap(),
            PathBuf::from("b")
        );
        assert!(t("share/a", "../b").is_ok());
        for (l, bad) in [
            ("share/a", "../../etc/shadow"),
            ("a", "../x"),
            ("bin/sh", "/bin/busybox"),
            ("bin/x", "/opt/katax/y"),
            ("bin/x", ""),
        ] {
            assert!(t(l, bad).is_err(), "{l} -> {bad}");
        }
    }

    fn file(sha: &str) -> IndexEntry {
        IndexEntry::File {
            sha256: sha.into(),
            size: 1,
            mode: 0o644,
            from: "x".into(),
        }
    }

    #[test]
    fn merge_lets_the_later_component_win_and_reports_differences() {
        let mut a = ComponentIndex::default();
        a.entries.insert("bin/x".into(), file("1"));
        a.entries.insert("share/same".into(), file("s"));
        let mut b = ComponentIndex::default();
        b.entries.insert("bin/x".into(), file("2"));
        b.entries.insert("share/same".into(), file("s"));
        let idx = BTreeMap::from([("a".to_string(), a), ("b".to_string(), b)]);
        let (m, clashes) = merge(&idx);
        assert_eq!(m[Path::new("bin/x")].component, "b");
        assert_eq!(m[Path::new("bin/x")].entry, file("2"));
        assert_eq!(clashes, vec![PathBuf::from("bin/x")]);
    }

    #[test]
    fn modes_are_normalised_and_configs_kept_as_text() {
        assert_eq!(install_mode(0o4755), 0o755);
        assert_eq!(install_mode(0o600), 0o644);
        assert!(keeps_text(
            Path::new(
                "share/defaults/kata-containers/runtime-rs/configuration-qemu-runtime-rs.toml"
            ),
            900
        ));
        assert!(!keeps_text(Path::new("share/kata-containers/x.toml"), 9));
        assert!(!keeps_text(
            Path::new("share/defaults/kata-containers/configuration-qemu.toml"),
            MAX_TEXT_BYTES + 1
        ));
    }
}
