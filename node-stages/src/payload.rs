//! The payload shipped in the stage image: a directory with a `SHA256SUMS` manifest
//! (`<hex>  <relative path>` lines, sha256sum format).

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
                    rel,
                    sha256,
                    size: md.len(),
                    mode,
                },
            );
        }
        let mut symlinks = BTreeMap::new();
        let links_file = dir.join("SYMLINKS");
        if let Ok(text) = std::fs::read_to_string(&links_file) {
            for (link, target) in parse_symlinks(&text, &links_file)? {
                let full = dir.join(&link);
                match std::fs::read_link(&full) {
                    Ok(t) if t == target => {}
                    other => return Err(StageError::bad_input(&full, format!("listed in SYMLINKS as a link to {} but is {other:?}", target.display()), "The stage image is incomplete: rebuild or re-pull it (nothing on the host was changed)")),
                }
                symlinks.insert(link, target);
            }
        }
        Ok(Payload {
            dir: dir.to_path_buf(),
            files,
            symlinks,
        })
    }

    /// Total payload size in bytes.
    pub fn total_size(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }

    /// Reads a payload file as text (base configurations).
    pub fn read_text(&self, rel: &Path) -> Result<String> {
        let full = self.dir.join(rel);
        std::fs::read_to_string(&full).map_err(|e| {
            StageError::bad_input(
                &full,
                format!("cannot read payload file: {e}"),
                "Rebuild or re-pull the stage image",
            )
        })
    }
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
