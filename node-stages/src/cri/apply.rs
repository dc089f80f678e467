//! Applying a plan: backups, the intent in the state file, then the files (through links,
//! keeping mode and owner); restoring what a revert or a dropped file needs.

use std::path::{Path, PathBuf};

use super::plan::{is_bare_k3s_template, parse_existing, split_base_include};
use super::CriContext;
use crate::config::Install;
use crate::containerd;
use crate::error::{Result, StageError};
use crate::hostfs::{sha256_hex, HostFs};
use crate::state::{write_json, CriFile, CriState, Original};

/// Removes what we added from a file someone else changed since we wrote it.
pub(super) fn strip_ours(
    path: &Path,
    current: &[u8],
    state: &CriState,
    imports: &[String],
    proxy: Option<&str>,
) -> Result<Vec<u8>> {
    // A template's text up to its base include stays as it is whatever is removed after it.
    let text = String::from_utf8_lossy(current).into_owned();
    let split = if is_k3s_template(path) {
        split_base_include(&text)
    } else {
        None
    };
    let mut doc = parse_existing(
        path,
        split
            .as_ref()
            .map_or(text.as_bytes(), |(_, rest)| rest.as_bytes()),
    )?;
    containerd::strip_kata(&mut doc, &state.handlers, proxy);
    for i in imports {
        containerd::remove_import(&mut doc, i);
    }
    let out = containerd::serialize(&doc);
    Ok(match split {
        Some((head, _)) => head + &out,
        None => out,
    }
    .into_bytes())
}

pub(super) fn backup_path(install: &Install, path: &Path) -> PathBuf {
    let name = path
        .display()
        .to_string()
        .trim_start_matches('/')
        .replace('/', "%");
    install.state_dir().join("backups").join(name)
}

pub(super) fn whole_paths_imported(state: &CriState) -> Vec<String> {
    state
        .files
        .iter()
        .filter(|f| f.whole_file)
        .map(|f| f.path.display().to_string())
        .collect()
}

/// One file change computed for this run.
#[derive(Debug, Clone)]
pub(super) struct Change {
    pub(super) path: PathBuf,
    /// What is on disk now (restored on rollback).
    pub(super) current: Option<Vec<u8>>,
    /// What it should be (None: removed).
    pub(super) new: Option<Vec<u8>>,
    /// Updated state entry (None: drop it from the state).
    pub(super) entry: Option<CriFile>,
    /// A new or refreshed pristine backup to write before anything else.
    pub(super) backup: Option<(PathBuf, Vec<u8>)>,
}

pub(super) fn restore_change(
    fs: &HostFs,
    state: &CriState,
    f: &CriFile,
    imports: &[String],
    proxy: &str,
) -> Result<Change> {
    let current = fs.read(&f.path)?;
    let cur_sha = current.as_deref().map(sha256_hex);
    let new = match &f.original {
        Original::Absent => {
            if f.whole_file || current.is_none() || cur_sha == f.written_sha256 {
                None
            } else {
                Some(strip_ours(
                    &f.path,
                    current.as_deref().unwrap(),
                    state,
                    imports,
                    Some(proxy),
                )?)
            }
        }
        Original::Backup { sha256, .. } if cur_sha.as_deref() == Some(sha256.as_str()) => {
            current.clone()
        }
        Original::Backup { backup, sha256 } => {
            if f.whole_file
                || cur_sha == f.written_sha256
                || cur_sha.as_deref() == Some(sha256.as_str())
                || current.is_none()
            {
                Some(fs.read(backup)?.ok_or_else(|| {
                    StageError::bad_input(backup, "backup recorded in the state but missing", "Restore the original runtime configuration by hand, then delete the state file and re-run")
                })?)
            } else {
                tracing::warn!(stage = "revert-cri", file = %f.path.display(), "file changed since kata-deploy wrote it; removing only our entries");
                Some(strip_ours(
                    &f.path,
                    current.as_deref().unwrap(),
                    state,
                    imports,
                    Some(proxy),
                )?)
            }
        }
    };
    // A k3s/rke2 template left with nothing of anyone's: as if none existed (k3s renders its
    // base), which is what the node had unless its owner kept a bare one.
    let new = new.filter(|b| !(is_k3s_template(&f.path) && is_bare_k3s_template(b)));
    Ok(Change {
        path: f.path.clone(),
        current,
        new,
        entry: None,
        backup: None,
    })
}

pub(super) fn is_k3s_template(p: &Path) -> bool {
    p.starts_with("/var/lib/rancher") && p.extension().is_some_and(|e| e == "tmpl")
}

pub(super) fn write_state(fs: &HostFs, path: &Path, state: &CriState) -> Result<()> {
    write_json(fs, path, state)
}

/// Writes backups, the state (intent), then the files whose content changes.
pub(super) fn write_changes(
    ctx: &CriContext,
    state: &mut CriState,
    state_path: &Path,
    changes: &[Change],
    install: &Install,
) -> Result<Vec<PathBuf>> {
    let fs = ctx.fs;
    for c in changes.iter().filter(|_| !fs.dry_run()) {
        if let Some((bp, bytes)) = &c.backup {
            if fs.read(bp)?.as_deref() != Some(bytes.as_slice()) {
                fs.create_dir_all(bp.parent().unwrap())?;
                fs.write_atomic(bp, bytes, 0o600)?;
            }
        }
    }
    fs.create_dir_all(&install.state_dir())?;
    write_state(fs, state_path, state)?;
    let mut changed = Vec::new();
    for c in changes {
        if c.current == c.new {
            continue;
        }
        match &c.new {
            Some(bytes) => {
                let created = fs.create_dir_all(c.path.parent().unwrap())?;
                if !created.is_empty() {
                    tracing::debug!(stage = "cri", dirs = ?created, "created directories");
                }
                fs.write_preserving(&c.path, bytes, 0o644)?;
            }
            None => {
                fs.remove_file(&c.path)?;
            }
        }
        tracing::info!(stage = "cri", file = %c.path.display(), "wrote");
        changed.push(c.path.clone());
    }
    Ok(changed)
}
