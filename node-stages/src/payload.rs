//! The payload: either our own directory with a `SHA256SUMS` manifest (`<hex>  <relative path>`
//! lines, sha256sum format; the stage image's `/opt/kata-payload`, air-gapped bundles, tests) or
//! the official Kata release image's layout (`release`, opened by `release_io::open_release`).
//! Both are read into the same listing: every file with its digest and where its bytes are.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Result, StageError};

/// One payload file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadFile {
    /// Path relative to the payload root (and to the install prefix).
    pub rel: PathBuf,
    /// Expected sha256 (hex).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Unix mode bits to install with.
    pub mode: u32,
    /// Where the bytes are.
    pub origin: Origin,
}

/// Where a payload file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file in the payload image.
    Dir(PathBuf),
    /// An entry of a component tarball of the release (`from`: relative to `opt/kata`).
    Tarball {
        /// The `.tar.zst` file.
        tarball: PathBuf,
        /// The entry carrying the bytes.
        from: PathBuf,
    },
}

/// The verified listing of a payload directory.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The payload directory (in the stage container).
    pub dir: PathBuf,
    /// Files by relative path.
    pub files: BTreeMap<PathBuf, PayloadFile>,
    /// Symbolic links (`SYMLINKS`: `<relative path> -> <relative target>`), installed as links
    /// (a Kata release links `vmlinux.container` and `kata-containers.img` to versioned files).
    pub symlinks: BTreeMap<PathBuf, PathBuf>,
    /// Text of files read without their own file in the image (the release's base
    /// configurations, kept by the index).
    pub texts: BTreeMap<PathBuf, String>,
    /// The release layout: the selected components' indexes (cached on the host by digest).
    pub release: Option<BTreeMap<String, crate::release::ComponentIndex>>,
}

/// Parses `SYMLINKS` lines (`<relative path> -> <target>`): both relative, the target resolving
/// inside the payload (no absolute targets, no escaping with `..`).
pub fn parse_symlinks(text: &str, file: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |why: &str| {
            StageError::bad_input(
                file,
                format!("line {}: {why}: {line:?}", i + 1),
                "Regenerate SYMLINKS (hack/make-test-payload.sh does) and rebuild the stage image",
            )
        };
        let (link, target) = line
            .split_once(" -> ")
            .ok_or_else(|| bad("expected \"<path> -> <target>\""))?;
        let (link, target) = (PathBuf::from(link), PathBuf::from(target));
        if link.as_os_str().is_empty()
            || !link.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(bad("link path must be relative without '..'"));
        }
        // The target, resolved from the link's directory, must stay inside the payload.
        let mut depth = link.components().count() as i64 - 1;
        for c in target.components() {
            match c {
                Component::Normal(_) => depth += 1,
                Component::ParentDir => depth -= 1,
                Component::CurDir => {}
                _ => return Err(bad("target must be relative")),
            }
            if depth < 0 {
                return Err(bad("target leaves the payload"));
            }
        }
        out.push((link, target));
    }
    Ok(out)
}

/// Parses SHA256SUMS text into (relative path, hex) pairs.
pub fn parse_sha256sums(text: &str, file: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| {
            StageError::bad_input(file, format!("line {}: {why}: {line:?}", i + 1), "Regenerate SHA256SUMS with `sha256sum` (hack/make-test-payload.sh does) and rebuild the stage image")
        };
        let (hash, rest) = line
            .split_once(' ')
            .ok_or_else(|| bad("expected \"<sha256>  <path>\""))?;
        // sha256sum writes "<hex>  <path>" (text) or "<hex> *<path>" (binary mode).
        let path = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .ok_or_else(|| bad("expected two spaces or ' *' after the hash"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("not a sha256 hex digest"));
        }
        let rel = PathBuf::from(path.strip_prefix("./").unwrap_or(path));
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(bad("path must be relative without '..'"));
        }
        out.push((rel, hash.to_ascii_lowercase()));
    }
    if out.is_empty() {
        return Err(StageError::bad_input(
            file,
            "lists no files",
            "The stage image payload is empty: rebuild the image",
        ));
    }
    Ok(out)
}

impl Payload {
    /// Reads `<dir>/SHA256SUMS` and checks every listed file exists as a regular file.
    /// Hashes are verified while copying (see `HostFs::stage_copy`).
    pub fn open(dir: &Path) -> Result<Payload> {
        let sums = dir.join("SHA256SUMS");
        let text = std::fs::read_to_string(&sums).map_err(|e| {
            StageError::bad_input(&sums, format!("cannot read the payload manifest: {e}"), "Pass --payload (env KATA_PAYLOAD_DIR) pointing at the payload directory of the stage image")
        })?;
        let mut files = BTreeMap::new();
        for (rel, sha256) in parse_sha256sums(&text, &sums)? {
            let full = dir.join(&rel);
            let md = std::fs::metadata(&full).map_err(|e| {
                StageError::bad_input(&full, format!("listed in SHA256SUMS but missing: {e}"), "The stage image is incomplete: rebuild or re-pull it (nothing on the host was changed)")
            })?;
            if !md.is_file() {
                return Err(StageError::bad_input(
                    &full,
                    "listed in SHA256SUMS but not a regular file",
                    "Rebuild the stage image",
                ));
            }
            let mode = if md.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            files.insert(
                rel.clone(),
                PayloadFile {
                    origin: Origin::Dir(full),
                    rel,
                    sha256,
                    size: md.len(),
                    mode,
                },
            );
        }
        let mut symlinks = BTreeMap::new();
        let links_file = dir.join("SYMLINKS");
        match std::fs::read_to_string(&links_file) {
            Ok(text) => {
                for (link, target) in parse_symlinks(&text, &links_file)? {
                    let full = dir.join(&link);
                    match std::fs::read_link(&full) {
                        Ok(t) if t == target => {}
                        other => return Err(StageError::bad_input(&full, format!("listed in SYMLINKS as a link to {} but is {other:?}", target.display()), "The stage image is incomplete: rebuild or re-pull it (nothing on the host was changed)")),
                    }
                    symlinks.insert(link, target);
                }
            }
            // No SYMLINKS (a payload made by hand from a release tarball): the links are the
            // directory's own, each checked to stay inside the payload. A configuration naming
            // a kernel or image the payload still lacks is refused later (`check_references`).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                symlinks = derive_symlinks(dir)?;
                tracing::info!(payload = %dir.display(), links = symlinks.len(), "no SYMLINKS file: installing the payload directory's own symbolic links");
            }
            Err(e) => {
                return Err(StageError::bad_input(
                    &links_file,
                    format!("cannot be read: {e}"),
                    "Rebuild the stage image",
                ))
            }
        }
        Ok(Payload {
            dir: dir.to_path_buf(),
            files,
            symlinks,
            texts: BTreeMap::new(),
            release: None,
        })
    }

    /// Total payload size in bytes.
    pub fn total_size(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }

    /// Reads a payload file as text (base configurations).
    pub fn read_text(&self, rel: &Path) -> Result<String> {
        if let Some(t) = self.texts.get(rel) {
            return Ok(t.clone());
        }
        let full = match self.files.get(rel).map(|f| &f.origin) {
            Some(Origin::Dir(p)) => p.clone(),
            _ => self.dir.join(rel),
        };
        std::fs::read_to_string(&full).map_err(|e| {
            StageError::bad_input(
                &full,
                format!("cannot read payload file: {e}"),
                "Rebuild or re-pull the stage image",
            )
        })
    }
}

/// The symbolic links of a payload directory, by path relative to it; each target must stay
/// inside the payload (an absolute `/opt/kata/...` target is made relative).
pub fn derive_symlinks(dir: &Path) -> Result<BTreeMap<PathBuf, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let full = dir.join(&rel_dir);
        let rd = std::fs::read_dir(&full).map_err(|e| {
            StageError::bad_input(
                &full,
                format!("cannot be listed: {e}"),
                "Rebuild the stage image",
            )
        })?;
        for ent in rd.flatten() {
            let rel = rel_dir.join(ent.file_name());
            let Ok(ft) = ent.file_type() else { continue };
            if ft.is_dir() {
                stack.push(rel);
            } else if ft.is_symlink() {
                let target = std::fs::read_link(ent.path()).unwrap_or_default();
                let target = crate::release::symlink_target(&rel, &target).map_err(|why| {
                    StageError::bad_input(
                        ent.path(),
                        format!("symbolic link refused: {why}"),
                        "Make the payload's links relative and inside it, or list them in SYMLINKS",
                    )
                })?;
                out.insert(rel, target);
            }
        }
    }
    Ok(out)
}

/// The kernel, image and initrd a shim's base configuration names under `/opt/kata` must be in
/// a payload directory (a file or a link): one made by hand without its links is refused here,
/// before any host change. For the release layout a gap is only logged (its shim-components.json
/// is upstream's word on what a shim needs); the remote hypervisor's are not local files.
pub fn check_references(payload: &Payload, rel: &Path, text: &str) -> Result<()> {
    let Ok(doc) = text.parse::<toml_edit::DocumentMut>() else {
        return Ok(()); // katacfg reports invalid TOML with its own message
    };
    let Some(hvs) = doc.get("hypervisor").and_then(|h| h.as_table_like()) else {
        return Ok(());
    };
    for (name, hv) in hvs.iter() {
        if name == "remote" {
            continue; // the peer-pods VM's kernel and image live in the cloud, not on the host
        }
        for key in ["kernel", "image", "initrd"] {
            let Some(path) = hv.get(key).and_then(|v| v.as_str()) else {
                continue;
            };
            let Some(inside) = path
                .strip_prefix(crate::katacfg::PAYLOAD_PREFIX)
                .and_then(|p| p.strip_prefix('/'))
            else {
                continue;
            };
            let inside = Path::new(inside);
            if !payload.files.contains_key(inside) && !payload.symlinks.contains_key(inside) {
                if payload.release.is_some() {
                    // The release's own manifest says what each shim needs: a gap there is
                    // upstream's to fix, and refusing would block a release that may still work.
                    tracing::warn!(config = %rel.display(), key, path, "the base configuration names a file none of the shim's components in shim-components.json carries");
                    continue;
                }
                let what = "A payload directory made from a release must keep the release's symbolic links (tar keeps them) or list them in SYMLINKS (\"<path> -> <target>\" lines)";
                return Err(StageError::bad_input(
                    payload.dir.join(rel),
                    format!("names {key} = {path:?}, which the payload does not contain"),
                    format!("{what}; nothing on the host was changed"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_stay_inside_the_payload() {
        let v = parse_symlinks(
            "share/k/vmlinux.container -> vmlinux-6.12.container\n",
            Path::new("L"),
        )
        .unwrap();
        assert_eq!(
            v[0],
            (
                PathBuf::from("share/k/vmlinux.container"),
                PathBuf::from("vmlinux-6.12.container")
            )
        );
        assert!(parse_symlinks("a/b -> ../c\n", Path::new("L")).is_ok());
        for bad in [
            "a -> /etc/shadow",
            "a -> ../x",
            "a/b -> ../../x",
            "../a -> b",
            "a b",
        ] {
            assert!(
                parse_symlinks(bad, Path::new("/p/SYMLINKS"))
                    .unwrap_err()
                    .to_string()
                    .contains("/p/SYMLINKS"),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_sha256sum_format() {
        let h = "a".repeat(64);
        let v = parse_sha256sums(&format!("{h}  bin/x\n{h} *./share/y\n"), Path::new("S")).unwrap();
        assert_eq!(v[0].0, PathBuf::from("bin/x"));
        assert_eq!(v[1].0, PathBuf::from("share/y"));
    }

    #[test]
    fn rejects_bad_lines_naming_the_file() {
        let h = "a".repeat(64);
        for bad in [
            format!("{h}  ../etc/passwd"),
            "zz  bin/x".to_string(),
            format!("{h}bin/x"),
            format!("{h}  /abs"),
        ] {
            let e = parse_sha256sums(&bad, Path::new("/p/SHA256SUMS"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("/p/SHA256SUMS"), "{e}");
        }
    }

    #[test]
    fn missing_listed_file_is_bad_input() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("SHA256SUMS"),
            format!("{}  bin/gone\n", "b".repeat(64)),
        )
        .unwrap();
        let e = Payload::open(d.path()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("bin/gone"));
    }
}
