//! Streaming the release's component tarballs (`kata-static-<component>.tar.zst`): one pass that
//! indexes a tarball (every entry validated and hashed, nothing written; cached on the host by
//! the tarball's sha256) and one that stages exactly the entries the install writes, each beside
//! its target. Both read the zstd stream once, front to back; nothing is unpacked to a scratch
//! directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::artifacts::NYDUS_PAYLOAD_DIR;
use crate::error::{Result, StageError};
use crate::hostfs::HostFs;
use crate::payload::{Origin, Payload, PayloadFile};
use crate::release::{self, ComponentIndex, IndexEntry};

const DAMAGED: &str =
    "The payload image is damaged or not a Kata release: re-pull it or use an official kata-deploy image (nothing on the host was changed)";

fn bad(tarball: &Path, message: impl Into<String>) -> StageError {
    StageError::bad_input(tarball, message, DAMAGED)
}

/// sha256 of a file in the payload image.
pub fn sha256_path(p: &Path) -> Result<String> {
    let mut f = File::open(p).map_err(|e| bad(p, format!("cannot be read: {e}")))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| bad(p, format!("cannot be read: {e}")))?;
    Ok(hex::encode(h.finalize()))
}

fn open_archive(tarball: &Path) -> Result<tar::Archive<zstd::Decoder<'static, BufReader<File>>>> {
    let f = File::open(tarball).map_err(|e| {
        bad(
            tarball,
            format!("a component the enabled shims need is missing from the payload image: {e}"),
        )
    })?;
    let dec = zstd::Decoder::new(f).map_err(|e| bad(tarball, format!("not zstd: {e}")))?;
    Ok(tar::Archive::new(dec))
}

/// Reads a whole tarball, validating and hashing every entry under `opt/kata`, writing nothing.
/// Refused: absolute paths, `..`, links leaving the prefix, hard links to unknown entries,
/// device/fifo entries, and any decompression or tar error (a truncated stream).
pub fn index_tarball(tarball: &Path, tarball_sha256: String) -> Result<ComponentIndex> {
    let mut ar = open_archive(tarball)?;
    let mut idx = ComponentIndex {
        tarball_sha256,
        ..Default::default()
    };
    let corrupt = |e: std::io::Error| bad(tarball, format!("truncated or corrupt archive: {e}"));
    for entry in ar.entries().map_err(corrupt)? {
        let mut e = entry.map_err(corrupt)?;
        let raw = e.path().map_err(corrupt)?.into_owned();
        let refuse = |why: String| bad(tarball, format!("entry {}: {why}", raw.display()));
        let Some(rel) = release::entry_rel(&raw).map_err(&refuse)? else {
            continue;
        };
        match e.header().entry_type() {
            EntryType::Directory => {}
            EntryType::Regular | EntryType::Continuous => {
                let size = e.size();
                let mode = release::install_mode(e.header().mode().map_err(corrupt)?);
                let (sha256, text) =
                    hash_entry(&mut e, release::keeps_text(&rel, size)).map_err(corrupt)?;
                if let Some(t) = text {
                    idx.texts.insert(rel.clone(), t);
                }
                let from = rel.clone();
                idx.entries.insert(
                    rel,
                    IndexEntry::File {
                        sha256,
                        size,
                        mode,
                        from,
                    },
                );
            }
            EntryType::Symlink => {
                let target = e
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| refuse("symbolic link without a target".into()))?;
                let target = release::symlink_target(&rel, &target).map_err(&refuse)?;
                idx.texts.remove(&rel);
                idx.entries.insert(rel, IndexEntry::Symlink { target });
            }
            EntryType::Link => {
                let target = e
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| refuse("hard link without a target".into()))?
                    .into_owned();
                let t_rel = release::entry_rel(&target)
                    .map_err(&refuse)?
                    .ok_or_else(|| refuse(format!("hard link to {} outside opt/kata", target.display())))?;
                let Some(IndexEntry::File { sha256, size, mode, from }) = idx.entries.get(&t_rel).cloned() else {
                    return Err(refuse(format!("hard link to {}, which is not an earlier file of the archive", target.display())));
                };
                if let Some(t) = idx.texts.get(&t_rel).cloned() {
                    idx.texts.insert(rel.clone(), t);
                }
                idx.entries.insert(rel, IndexEntry::File { sha256, size, mode, from });
            }
            other => {
                return Err(refuse(format!(
                    "unsupported entry type {other:?} (only files, directories and links are installed)"
                )))
            }
        }
    }
    Ok(idx)
}

/// sha256 of an entry's bytes, and the bytes as text when `keep` (and UTF-8).
fn hash_entry(e: &mut dyn Read, keep: bool) -> std::io::Result<(String, Option<String>)> {
    let mut h = Sha256::new();
    let mut text = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = e.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if keep {
            text.write_all(&buf[..n])?;
        }
    }
    let text = keep.then(|| String::from_utf8(text).ok()).flatten();
    Ok((hex::encode(h.finalize()), text))
}

/// Where the bytes of one tarball entry go: host path, expected sha256, mode.
pub type Wanted = BTreeMap<PathBuf, Vec<(PathBuf, String, u32)>>;

/// Streams a tarball once, staging each wanted entry (by its path relative to `opt/kata`) beside
/// every host path that takes its bytes; pushes `(temp, dest)` onto `staged` as it goes (so the
/// caller can undo). An entry whose bytes differ from the index is skipped (a later duplicate in
/// the archive may carry them); a wanted entry never matched fails the run.
pub fn stage_from_tarball(
    fs: &HostFs,
    tarball: &Path,
    wanted: &Wanted,
    staged: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<()> {
    let mut ar = open_archive(tarball)?;
    let mut missing: BTreeSet<&PathBuf> = wanted.keys().collect();
    let corrupt = |e: std::io::Error| bad(tarball, format!("truncated or corrupt archive: {e}"));
    for entry in ar.entries().map_err(corrupt)? {
        let mut e = entry.map_err(corrupt)?;
        if !matches!(
            e.header().entry_type(),
            EntryType::Regular | EntryType::Continuous
        ) {
            continue;
        }
        let raw = e.path().map_err(corrupt)?.into_owned();
        let Ok(Some(rel)) = release::entry_rel(&raw) else {
            continue;
        };
        let Some((key, dests)) = wanted.get_key_value(&rel) else {
            continue;
        };
        if !missing.contains(key) {
            continue; // a duplicate of an entry already staged
        }
        let Some(((first, sha, mode), rest)) = dests.split_first() else {
            continue;
        };
        let (tmp, got) = fs.stage_reader(&mut e, first, *mode)?;
        if !fs.dry_run() && got != *sha {
            fs.discard_temp(&tmp);
            continue;
        }
        staged.push((tmp.clone(), first.clone()));
        for (dest, sha, mode) in rest {
            let t = fs.stage_copy(&fs.host(&tmp), dest, sha, *mode)?;
            staged.push((t, dest.clone()));
        }
        missing.remove(key);
    }
    if let Some(m) = missing.first() {
        return Err(bad(
            tarball,
            format!(
                "entry opt/kata/{} is not in the archive as indexed (the image changed during the run?)",
                m.display()
            ),
        ));
    }
    Ok(())
}

/// The tarball of a component in a release payload directory.
pub fn tarball_path(dir: &Path, component: &str) -> PathBuf {
    dir.join(release::TARBALLS_DIR)
        .join(release::tarball_name(component))
}

/// The components the enabled (base) shims need, each tarball checked present: what host-check
/// verifies without reading any tarball, and the first step of `open_release`.
pub fn select_release(dir: &Path, shims: &[&str], kube_arch: &str) -> Result<BTreeSet<String>> {
    let mpath = dir.join(release::SHIM_COMPONENTS);
    let text =
        std::fs::read_to_string(&mpath).map_err(|e| bad(&mpath, format!("cannot be read: {e}")))?;
    let sc = release::parse_shim_components(&text, &mpath)?;
    let comps = release::select_components(&sc, shims, kube_arch, &mpath)?;
    for c in &comps {
        let p = tarball_path(dir, c);
        if !p.is_file() {
            return Err(StageError::bad_input(
                &p,
                format!("component {c:?}, which {} lists for the enabled shims, is missing from the payload image", mpath.display()),
                "Use a complete release image (payload.image), or disable the shims that need it (nothing on the host was changed)",
            ));
        }
    }
    Ok(comps)
}

/// Opens a release payload for the enabled (base) shims on this architecture: the selected
/// components' indexes (from `cache` when a tarball's sha256 is unchanged, else by reading it
/// once), merged; the nydus snapshotter's binaries when `nydus`; 4.x's `versions.yaml`. Every
/// tarball is validated here, before any host change.
pub fn open_release(
    dir: &Path,
    shims: &[&str],
    kube_arch: &str,
    cache: &BTreeMap<String, ComponentIndex>,
    nydus: bool,
) -> Result<Payload> {
    let mut indexes = BTreeMap::new();
    for c in select_release(dir, shims, kube_arch)? {
        let p = tarball_path(dir, &c);
        let sha = sha256_path(&p)?;
        let idx = match cache.get(&c) {
            Some(i) if i.tarball_sha256 == sha => i.clone(),
            _ => {
                tracing::info!(component = %c, "indexing the component tarball (validated and hashed, nothing written)");
                index_tarball(&p, sha)?
            }
        };
        indexes.insert(c, idx);
    }
    let (merged, clashes) = release::merge(&indexes);
    if !clashes.is_empty() {
        tracing::warn!(paths = ?clashes, "several components carry these files with different content: the last component in name order wins, as upstream extracts them");
    }
    let mut payload = Payload {
        dir: dir.to_path_buf(),
        files: BTreeMap::new(),
        symlinks: BTreeMap::new(),
        texts: BTreeMap::new(),
        release: None,
    };
    for (rel, m) in merged {
        match m.entry {
            IndexEntry::File {
                sha256,
                size,
                mode,
                from,
            } => {
                if let Some(t) = indexes[&m.component].texts.get(&rel) {
                    payload.texts.insert(rel.clone(), t.clone());
                }
                let tarball = tarball_path(dir, &m.component);
                payload.files.insert(
                    rel.clone(),
                    PayloadFile {
                        rel,
                        sha256,
                        size,
                        mode,
                        origin: Origin::Tarball { tarball, from },
                    },
                );
            }
            IndexEntry::Symlink { target } => {
                payload.symlinks.insert(rel, target);
            }
        }
    }
    payload.files.extend(plain_files(dir, nydus)?);
    payload.release = Some(indexes);
    Ok(payload)
}

/// The release's files outside the tarballs: 4.x's `versions.yaml` and, when a shim uses guest
/// pull, the nydus snapshotter's binaries (its templates are not used: the stage renders its own).
fn plain_files(dir: &Path, nydus: bool) -> Result<BTreeMap<PathBuf, PayloadFile>> {
    let mut plain = vec![PathBuf::from(release::VERSIONS_YAML)];
    if nydus {
        for bin in ["containerd-nydus-grpc", "nydus-overlayfs"] {
            plain.push(Path::new(NYDUS_PAYLOAD_DIR).join(bin));
        }
    }
    let mut out = BTreeMap::new();
    for rel in plain {
        let full = dir.join(&rel);
        let Ok(md) = std::fs::metadata(&full) else {
            continue;
        };
        if !md.is_file() {
            continue;
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = release::install_mode(md.permissions().mode());
        let sha256 = sha256_path(&full)?;
        let file = PayloadFile {
            rel: rel.clone(),
            sha256,
            size: md.len(),
            mode,
            origin: Origin::Dir(full),
        };
        out.insert(rel, file);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar entry with a raw (unchecked) name, so tests can write what tar::Builder refuses.
    fn raw(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: EntryType, link: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(if name.contains("/bin/") { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn tarball(dir: &Path, entries: &[(&str, EntryType, &str, &[u8])]) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        for (n, k, l, d) in entries {
            raw(&mut b, n, *k, l, d);
        }
        let tar = b.into_inner().unwrap();
        let p = dir.join("kata-static-x.tar.zst");
        std::fs::write(&p, zstd::encode_all(&tar[..], 3).unwrap()).unwrap();
        p
    }

    #[test]
    fn indexes_files_links_and_hard_links_keeping_configs() {
        let d = tempfile::tempdir().unwrap();
        let cfg = "share/defaults/kata-containers/configuration-qemu.toml";
        let p = tarball(
            d.path(),
            &[
                ("./opt/kata/", EntryType::Directory, "", b""),
                ("./opt/kata/bin/qemu", EntryType::Regular, "", b"q"),
                (
                    "./opt/kata/bin/qemu2",
                    EntryType::Link,
                    "./opt/kata/bin/qemu",
                    b"",
                ),
                (
                    "./opt/kata/share/k/vmlinux.container",
                    EntryType::Symlink,
                    "/opt/kata/share/k/vmlinux-1",
                    b"",
                ),
                (
                    &format!("opt/kata/{cfg}"),
                    EntryType::Regular,
                    "",
                    b"[hypervisor.qemu]\n",
                ),
                ("usr/bin/other", EntryType::Regular, "", b"skipped"),
            ],
        );
        let idx = index_tarball(&p, "sha".into()).unwrap();
        assert_eq!(idx.entries.len(), 4, "{:?}", idx.entries);
        let IndexEntry::File {
            mode, from, sha256, ..
        } = &idx.entries[Path::new("bin/qemu2")]
        else {
            panic!()
        };
        assert_eq!((*mode, from.as_path()), (0o755, Path::new("bin/qemu")));
        assert_eq!(*sha256, crate::hostfs::sha256_hex(b"q"));
        assert_eq!(
            idx.entries[Path::new("share/k/vmlinux.container")],
            IndexEntry::Symlink {
                target: "vmlinux-1".into()
            }
        );
        assert_eq!(idx.texts[Path::new(cfg)], "[hypervisor.qemu]\n");
    }

    #[test]
    fn escaping_entries_are_refused_naming_the_entry() {
        for (name, kind, link) in [
            ("opt/kata/../../etc/passwd", EntryType::Regular, ""),
            ("/opt/kata/bin/x", EntryType::Regular, ""),
            ("opt/kata/bin/sh", EntryType::Symlink, "/bin/busybox"),
            (
                "opt/kata/share/x",
                EntryType::Symlink,
                "../../../etc/shadow",
            ),
            ("opt/kata/bin/y", EntryType::Link, "etc/passwd"),
            ("opt/kata/dev/null", EntryType::Char, ""),
        ] {
            let d = tempfile::tempdir().unwrap();
            let p = tarball(d.path(), &[(name, kind, link, b"x")]);
            let e = index_tarball(&p, String::new()).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{name}");
            let msg = e.to_string();
            assert!(
                msg.contains(name) && msg.contains("kata-static-x.tar.zst"),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_truncated_stream_is_refused_wherever_it_is_cut() {
        let d = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let p = tarball(
            d.path(),
            &[
                ("opt/kata/bin/a", EntryType::Regular, "", &big),
                ("opt/kata/bin/b", EntryType::Regular, "", b"b"),
            ],
        );
        let full = std::fs::read(&p).unwrap();
        assert!(index_tarball(&p, String::new()).is_ok());
        for cut in [full.len() - 1, full.len() - 8, full.len() / 2, 20] {
            std::fs::write(&p, &full[..cut]).unwrap();
            let e = index_tarball(&p, String::new()).unwrap_err().to_string();
            assert!(e.contains("truncated or corrupt"), "cut at {cut}: {e}");
        }
    }
}
