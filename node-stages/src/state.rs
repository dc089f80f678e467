//! What this install wrote on the host, recorded in its state directory
//! (`/var/lib/kata-deploy[-suffix]/`) so removal removes exactly that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Result, StageError};
use crate::hostfs::HostFs;

/// One installed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledFile {
    /// sha256 of what we wrote; None while a write may be in flight (crash recovery).
    pub sha256: Option<String>,
}

/// The artifacts manifest: every file and directory the artifacts stage created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactsManifest {
    /// Host paths of installed files.
    pub files: BTreeMap<PathBuf, InstalledFile>,
    /// Directories we created (removed when empty).
    pub dirs: Vec<PathBuf>,
    /// systemd units we installed and started.
    pub units: Vec<String>,
    /// True while an install is in progress (the file list is a superset of what exists).
    pub pending: bool,
}

/// Where one CRI file came from before we touched it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Original {
    /// The file did not exist: revert removes it.
    Absent,
    /// The file existed: a byte-exact copy is in the state directory.
    Backup {
        /// Host path of the backup copy.
        backup: PathBuf,
        /// sha256 of the original bytes.
        sha256: String,
    },
}

/// One CRI file we manage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriFile {
    /// Host path.
    pub path: PathBuf,
    /// How to restore it.
    pub original: Original,
    /// sha256 of what we last wrote (None before the first write).
    pub written_sha256: Option<String>,
    /// Whether we own the whole file (drop-in) or edited a file that others may edit too.
    pub whole_file: bool,
}

/// A restart we requested and whose effect is not yet verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRestart {
    /// Content hash the restart is meant to load.
    pub content: String,
    /// Boot id when requested (a reboot also loads the files).
    pub boot_id: String,
    /// CLOCK_MONOTONIC (µs) just before the restart was requested.
    pub requested_mono_us: u64,
    /// The files as they were before the unverified content was written: what a rollback
    /// restores, also when the stage that wrote them was killed by the restart.
    #[serde(default)]
    pub previous: Vec<PreviousFile>,
    /// The state record of before the unverified write, restored with the files on rollback so
    /// the record names what the runtime serves again. None in records of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_state: Option<Box<CriState>>,
}

/// One file as it was before an unverified write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousFile {
    /// Host path.
    pub path: PathBuf,
    /// Its content (UTF-8: runtime configuration is text); None: it did not exist.
    pub content: Option<String>,
}

/// State of the cri stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriState {
    /// The CRI flavour configured.
    pub cri: String,
    /// The unit restarted to load the config.
    pub unit: String,
    /// Files we wrote or edited.
    pub files: Vec<CriFile>,
    /// Handlers present in what we wrote (for surgical removal from shared files).
    pub handlers: Vec<String>,
    /// Content hash the running runtime is known to have loaded.
    pub loaded: Option<String>,
    /// A restart requested but not yet verified.
    pub pending: Option<PendingRestart>,
    /// Directories we created for our files (removed on revert when empty).
    #[serde(default)]
    pub created_dirs: Vec<PathBuf>,
    /// Whether what we wrote routes a handler to this install's nydus snapshotter (None in
    /// records of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nydus: Option<bool>,
}

/// What `stat` says about an installed file: if all of it is unchanged since we recorded it,
/// so is the content (any write or chmod moves `ctime`, which user space cannot set back), and a
/// no-op re-run need not re-hash hundreds of MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// Device id.
    pub dev: u64,
    /// Inode number (a rename-into-place gives a new one).
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// Status-change time, ns since the epoch.
    pub ctime_ns: i128,
}

/// A cache of `(sha256, stamp)` per installed file, beside the manifest. Only a cache: missing,
/// stale or corrupt means "hash the file again", never "trust it".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StampCache {
    /// Host path → content hash and the stamp it had when that hash was true.
    pub files: BTreeMap<PathBuf, (String, FileStamp)>,
}

/// File names in the state directory.
pub const ARTIFACTS_MANIFEST: &str = "installed-files.json";
/// Stamp cache file name (see [`StampCache`]).
pub const STAMP_CACHE: &str = "installed-stamps.json";
/// CRI state file name.
pub const CRI_STATE: &str = "cri.json";

/// Reads a JSON state file; missing is `None`, unreadable is an error naming the file.
pub fn read_json<T: DeserializeOwned>(fs: &HostFs, path: &Path) -> Result<Option<T>> {
    match fs.read(path)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            StageError::bad_input(
                path,
                format!("state file is corrupt: {e}"),
                "Inspect it; if the install is gone, delete the state directory and re-run",
            )
        }),
    }
}

/// Writes a JSON state file atomically (only when its content changes). Internal state is not
/// part of a dry run's report, so a dry run skips it.
pub fn write_json<T: Serialize>(fs: &HostFs, path: &Path, value: &T) -> Result<()> {
    if fs.dry_run() {
        return Ok(());
    }
    let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
    if fs.read(path)?.as_deref() == Some(&bytes[..]) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        fs.create_dir_all(parent)?;
    }
    fs.write_atomic(path, &bytes, 0o600)
}
