//! The host filesystem shell: every host path goes through `--host-root`, every write is atomic
//! (temp file beside the target, fsync, rename, fsync the directory), dry-run records instead
//! of writing, and tests can inject a crash after any number of mutating operations.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::error::{Result, StageError};
use crate::state::FileStamp;

/// Suffix of temp files written beside their target before the rename.
pub const TEMP_SUFFIX: &str = ".kata-deploy-new";

#[derive(Debug, Default)]
struct Faults {
    /// Fail the mutating operation with this index (0-based) and every one after it.
    fail_at: Option<usize>,
    done: usize,
}

/// Host filesystem rooted at `--host-root`.
#[derive(Debug)]
pub struct HostFs {
    root: PathBuf,
    dry_run: bool,
    faults: Mutex<Faults>,
    planned: Mutex<Vec<String>>,
    durable: std::sync::atomic::AtomicBool,
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl HostFs {
    /// A host filesystem under `root`; with `dry_run` nothing is written, changes are recorded.
    pub fn new(root: impl Into<PathBuf>, dry_run: bool) -> Self {
        HostFs {
            root: root.into(),
            dry_run,
            faults: Mutex::new(Faults::default()),
            planned: Mutex::new(Vec::new()),
            durable: true.into(),
        }
    }

    /// Test hook: skip fsync (tests simulate crashes, not power loss, and fsync dominates their
    /// run time). Production always syncs.
    pub fn set_durable(&self, durable: bool) {
        self.durable
            .store(durable, std::sync::atomic::Ordering::Relaxed);
    }

    fn durable(&self) -> bool {
        self.durable.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Test hook: the `n`-th mutating operation (0-based) and all later ones fail, like a crash.
    pub fn fail_at_op(&self, n: Option<usize>) {
        let mut f = self.faults.lock().unwrap();
        f.fail_at = n;
        f.done = 0;
    }

    /// Number of mutating operations performed so far (tests enumerate crash points with it).
    pub fn ops_done(&self) -> usize {
        self.faults.lock().unwrap().done
    }

    /// Whether this is a dry run.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The host root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Changes a dry run would have made, in order.
    pub fn planned(&self) -> Vec<String> {
        self.planned.lock().unwrap().clone()
    }

    /// Records a planned change (dry run) or an informational line.
    pub fn plan(&self, line: String) {
        self.planned.lock().unwrap().push(line);
    }

    /// Maps a host path (absolute, as seen on the node) to the path under the host root.
    pub fn host(&self, p: &Path) -> PathBuf {
        let rel: PathBuf = p
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.root.join(rel)
    }

    fn fault_point(&self) -> Result<()> {
        let mut f = self.faults.lock().unwrap();
        if let Some(n) = f.fail_at {
            if f.done >= n {
                return Err(StageError::InjectedFault { after: n });
            }
        }
        f.done += 1;
        Ok(())
    }

    /// Follows symbolic links of a host path's last component inside the host root (an
    /// absolute link target is a host path, as on the node). Returns the host path of the final
    /// target, which may not exist; `p` itself when it is not a link.
    pub fn resolve(&self, p: &Path) -> Result<PathBuf> {
        let mut cur = p.to_path_buf();
        for _ in 0..40 {
            match fs::symlink_metadata(self.host(&cur)) {
                Ok(md) if md.file_type().is_symlink() => {
                    let target = fs::read_link(self.host(&cur))
                        .map_err(|e| StageError::io("read link", &cur, e))?;
                    let joined = if target.is_absolute() {
                        target
                    } else {
                        cur.parent().unwrap_or(Path::new("/")).join(target)
                    };
                    cur = normalize(&joined);
                }
                _ => return Ok(cur),
            }
        }
        Err(StageError::bad_input(
            p,
            "too many levels of symbolic links",
            "Fix the link chain on the host and re-run; nothing was changed",
        ))
    }

    /// Mode bits, owner and group of a host file (after following links), None when missing.
    pub fn file_meta(&self, p: &Path) -> Result<Option<(u32, u32, u32)>> {
        use std::os::unix::fs::MetadataExt;
        let target = self.resolve(p)?;
        match fs::metadata(self.host(&target)) {
            Ok(md) => Ok(Some((md.mode() & 0o7777, md.uid(), md.gid()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StageError::io("stat", p, e)),
        }
    }

    /// Rewrites a configuration file someone else owns the way an editor that cares would:
    /// through a symbolic link to its target (the link stays), keeping the target's mode, owner
    /// and group; a new file gets `new_mode` (owner: us). Atomic like [`Self::write_atomic`].
    pub fn write_preserving(&self, p: &Path, bytes: &[u8], new_mode: u32) -> Result<()> {
        let target = self.resolve(p)?;
        let meta = self.file_meta(&target)?;
        let mode = meta.map_or(new_mode, |m| m.0);
        if self.dry_run {
            return self.write_atomic(&target, bytes, mode);
        }
        let tmp = self.stage_bytes(&target, bytes, mode)?;
        if let Some((_, uid, gid)) = meta {
            use std::os::unix::fs::MetadataExt;
            let mine =
                fs::metadata(self.host(&tmp)).map_err(|e| StageError::io("stat", &tmp, e))?;
            if mine.uid() != uid || mine.gid() != gid {
                if let Err(e) = std::os::unix::fs::chown(self.host(&tmp), Some(uid), Some(gid)) {
                    self.discard_temp(&tmp);
                    return Err(StageError::io("chown", &target, e));
                }
                // chown clears set-id bits: put the mode back.
                fs::set_permissions(self.host(&tmp), fs::Permissions::from_mode(mode))
                    .map_err(|e| StageError::io("chmod", &target, e))?;
            }
        }
        self.rename_into_place(&tmp, &target)
    }

    /// Reads a host file (following links inside the host root); a missing file is `None`.
    pub fn read(&self, p: &Path) -> Result<Option<Vec<u8>>> {
        let p = &self.resolve(p)?;
        match fs::read(self.host(p)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StageError::io("read", p, e)),
        }
    }

    /// Whether a host path, following links inside the host root, is a regular file.
    pub fn resolves_to_file(&self, p: &Path) -> Result<bool> {
        let p = self.resolve(p)?;
        Ok(fs::metadata(self.host(&p)).is_ok_and(|m| m.is_file()))
    }

    /// Whether a host path exists (any file type).
    pub fn exists(&self, p: &Path) -> bool {
        fs::symlink_metadata(self.host(p)).is_ok()
    }

    /// Entries of a host directory (names), empty when missing.
    pub fn list_dir(&self, p: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.host(p))
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// sha256 of a host file, streaming; `None` when missing.
    pub fn sha256_file(&self, p: &Path) -> Result<Option<String>> {
        let mut f = match File::open(self.host(p)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StageError::io("open", p, e)),
        };
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).map_err(|e| StageError::io("read", p, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(Some(hex::encode(h.finalize())))
    }

    /// The stamp of a regular host file (None if missing or not a regular file).
    pub fn stamp(&self, p: &Path) -> Result<Option<FileStamp>> {
        use std::os::unix::fs::MetadataExt;
        match fs::symlink_metadata(self.host(p)) {
            Ok(md) if md.is_file() => Ok(Some(FileStamp {
                dev: md.dev(),
                ino: md.ino(),
                size: md.size(),
                mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
                ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StageError::io("stat", p, e)),
        }
    }

    /// Creates a directory and its missing parents; returns the host paths it created.
    pub fn create_dir_all(&self, p: &Path) -> Result<Vec<PathBuf>> {
        let mut missing = Vec::new();
        let mut cur = Some(p);
        while let Some(c) = cur {
            if c.as_os_str().is_empty() || c == Path::new("/") || self.exists(c) {
                break;
            }
            missing.push(c.to_path_buf());
            cur = c.parent();
        }
        missing.reverse();
        for d in &missing {
            if self.dry_run {
                continue;
            }
            self.fault_point()?;
            match fs::create_dir(self.host(d)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StageError::io("create directory", d, e)),
            }
        }
        Ok(missing)
    }

    /// Temp path beside a target: `.<name>.kata-deploy-new`.
    pub fn temp_for(p: &Path) -> PathBuf {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        p.with_file_name(format!(".{name}{TEMP_SUFFIX}"))
    }

    /// Writes a file atomically (temp beside it, fsync, rename, fsync the directory).
    /// In a dry run, records a diff instead. Parent directories must exist.
    pub fn write_atomic(&self, p: &Path, bytes: &[u8], mode: u32) -> Result<()> {
        if self.dry_run {
            let old = self.read(p)?;
            self.plan(describe_change(p, old.as_deref(), Some(bytes)));
            return Ok(());
        }
        let tmp = self.stage_bytes(p, bytes, mode)?;
        self.rename_into_place(&tmp, p)
    }

    /// Copies `src` (a path in the stage container) to a temp file beside the host path `dest`,
    /// hashing while copying; fails (removing the temp) if the hash is not `expected_sha`.
    pub fn stage_copy(
        &self,
        src: &Path,
        dest: &Path,
        expected_sha: &str,
        mode: u32,
    ) -> Result<PathBuf> {
        if self.dry_run {
            return Ok(Self::temp_for(dest));
        }
        let mut input = File::open(src).map_err(|e| {
            StageError::bad_input(
                src,
                format!("payload file cannot be opened: {e}"),
                "The stage image is incomplete: rebuild or re-pull it",
            )
        })?;
        let (tmp, got) = self.stage_reader(&mut input, dest, mode)?;
        if got == expected_sha {
            return Ok(tmp);
        }
        let _ = fs::remove_file(self.host(&tmp));
        Err(StageError::bad_input(
            src,
            format!("payload file is corrupt: sha256 {got} but SHA256SUMS says {expected_sha}"),
            "The stage image is damaged: re-pull it (nothing on the host was changed)",
        ))
    }

    /// Streams `input` to a temp file beside the host path `dest`, returning the temp path and
    /// the sha256 of what was written (the caller compares it and discards a mismatch). A read
    /// error (a truncated or corrupt stream) removes the temp and is bad input about `dest`'s
    /// source; a write error is an I/O error about `dest`.
    pub fn stage_reader(
        &self,
        input: &mut dyn Read,
        dest: &Path,
        mode: u32,
    ) -> Result<(PathBuf, String)> {
        let tmp = Self::temp_for(dest);
        if self.dry_run {
            return Ok((tmp, String::new()));
        }
        self.fault_point()?;
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(self.host(&tmp))
            .map_err(|e| StageError::io("write", dest, e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let res = loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(Err(e)),
            };
            h.update(&buf[..n]);
            if let Err(e) = out.write_all(&buf[..n]) {
                break Err(Ok(e));
            }
        };
        let res = res.and_then(|()| {
            out.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(Ok)?;
            if self.durable() {
                out.sync_all().map_err(Ok)?;
            }
            Ok(())
        });
        match res {
            Ok(()) => Ok((tmp, hex::encode(h.finalize()))),
            Err(read_or_write) => {
                let _ = fs::remove_file(self.host(&tmp));
                Err(match read_or_write {
                    Err(e) => StageError::bad_input(
                        dest,
                        format!("its source could not be read: {e}"),
                        "The payload is damaged: re-pull the image (nothing on the host was changed)",
                    ),
                    Ok(e) => StageError::io("write", dest, e),
                })
            }
        }
    }

    /// Writes bytes to a temp file beside the host path `dest` (renamed into place later).
    pub fn stage_bytes(&self, dest: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf> {
        let tmp = Self::temp_for(dest);
        if self.dry_run {
            return Ok(tmp);
        }
        self.fault_point()?;
        let res = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(self.host(&tmp))?;
            f.write_all(bytes)?;
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            if self.durable() {
                f.sync_all()
            } else {
                Ok(())
            }
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(self.host(&tmp));
            return Err(StageError::io("write", dest, e));
        }
        Ok(tmp)
    }

    /// The target of a host path that is a symbolic link (None: not a link, or missing).
    pub fn read_link(&self, p: &Path) -> Result<Option<PathBuf>> {
        match fs::symlink_metadata(self.host(p)) {
            Ok(md) if md.file_type().is_symlink() => fs::read_link(self.host(p))
                .map(Some)
                .map_err(|e| StageError::io("read link", p, e)),
            _ => Ok(None),
        }
    }

    /// Creates a symbolic link beside the host path `dest` (renamed into place later, replacing
    /// whatever is there atomically).
    pub fn stage_symlink(&self, dest: &Path, target: &Path) -> Result<PathBuf> {
        let tmp = Self::temp_for(dest);
        if self.dry_run {
            return Ok(tmp);
        }
        self.fault_point()?;
        let _ = fs::remove_file(self.host(&tmp));
        std::os::unix::fs::symlink(target, self.host(&tmp))
            .map_err(|e| StageError::io("create link", dest, e))?;
        Ok(tmp)
    }

    /// Best-effort removal of a temp file on an error path (never fails, never counts as an op
    /// unless it really removes something).
    pub fn discard_temp(&self, tmp: &Path) {
        if !self.dry_run && self.exists(tmp) && self.fault_point().is_ok() {
            let _ = fs::remove_file(self.host(tmp));
        }
    }

    /// Renames a temp file over its target and fsyncs the directory (never writes in place,
    /// so a running binary is replaced, not modified: no "Text file busy").
    pub fn rename_into_place(&self, tmp: &Path, dest: &Path) -> Result<()> {
        if self.dry_run {
            return Ok(());
        }
        self.fault_point()?;
        fs::rename(self.host(tmp), self.host(dest))
            .map_err(|e| StageError::io("rename into place", dest, e))?;
        self.sync_parent(dest)
    }

    fn sync_parent(&self, p: &Path) -> Result<()> {
        if !self.durable() {
            return Ok(());
        }
        if let Some(parent) = self.host(p).parent() {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Removes a host file; a missing file is not an error. Returns whether it existed.
    pub fn remove_file(&self, p: &Path) -> Result<bool> {
        if !self.exists(p) {
            return Ok(false);
        }
        if self.dry_run {
            let old = self.read(p).ok().flatten();
            self.plan(describe_change(p, old.as_deref(), None));
            return Ok(true);
        }
        self.fault_point()?;
        match fs::remove_file(self.host(p)) {
            Ok(()) => {
                self.sync_parent(p)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StageError::io("remove", p, e)),
        }
    }

    /// Removes a directory if it exists and is empty.
    pub fn remove_dir_if_empty(&self, p: &Path) -> Result<()> {
        let h = self.host(p);
        let empty = fs::read_dir(&h)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Ok(());
        }
        // A directory the chart mounts into the stage's container (stage.hostMounts: precise)
        // cannot be removed from inside it (EBUSY, or EROFS under the read-only host root): it
        // stays, empty.
        if is_mount_root(&h) {
            tracing::info!(path = %p.display(), "kept, empty: it is a mount point of this container");
            return Ok(());
        }
        if self.dry_run {
            self.plan(format!("remove empty directory {}", p.display()));
            return Ok(());
        }
        self.fault_point()?;
        match fs::remove_dir(&h) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StageError::io("remove directory", p, e)),
        }
    }

    /// Free bytes on the filesystem holding `p` (or its nearest existing ancestor).
    pub fn free_bytes(&self, p: &Path) -> Option<u64> {
        let mut cur = Some(self.host(p));
        while let Some(c) = cur {
            if let Ok(st) = rustix::fs::statvfs(&c) {
                return Some(st.f_bavail * st.f_frsize);
            }
            cur = c.parent().map(Path::to_path_buf);
        }
        None
    }
}

/// `a/./b/../c` → `a/c` (lexically, as the kernel resolves a link target relative to its directory).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Human description of a file change: a unified diff for text, sizes for binaries.
pub fn describe_change(p: &Path, old: Option<&[u8]>, new: Option<&[u8]>) -> String {
    match (old, new) {
        (Some(o), Some(n)) if o == n => format!("unchanged {}", p.display()),
        (None, None) => format!("absent {}", p.display()),
        (_, None) => format!("remove {}", p.display()),
        (o, Some(n)) => {
            let verb = if o.is_some() { "modify" } else { "create" };
            let old_text = o.map(std::str::from_utf8);
            match (old_text, std::str::from_utf8(n)) {
                (Some(Ok(ot)), Ok(nt)) => {
                    let diff = similar::TextDiff::from_lines(ot, nt);
                    format!(
                        "{verb} {}\n{}",
                        p.display(),
                        diff.unified_diff()
                            .context_radius(2)
                            .header("current", "new")
                    )
                }
                (None, Ok(nt)) if nt.len() < 8192 => {
                    let diff = similar::TextDiff::from_lines("", nt);
                    format!(
                        "{verb} {}\n{}",
                        p.display(),
                        diff.unified_diff().header("/dev/null", "new")
                    )
                }
                _ => format!("{verb} {} ({} bytes)", p.display(), n.len()),
            }
        }
    }
}

/// Whether `path` is the root of a mount (statx STATX_ATTR_MOUNT_ROOT; false when the kernel
/// cannot tell, before Linux 5.8).
pub fn is_mount_root(path: &Path) -> bool {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    statx(
        CWD,
        path,
        AtFlags::NO_AUTOMOUNT | AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::empty(),
    )
    .map(|r| {
        r.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
            && r.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
    })
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_roots_are_recognised() {
        assert!(is_mount_root(Path::new("/proc")), "/proc is a mount");
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("plain")).unwrap();
        assert!(!is_mount_root(&d.path().join("plain")), "a plain directory");
        assert!(!is_mount_root(&d.path().join("missing")), "a missing path");
    }

    #[test]
    fn preserving_write_goes_through_links_and_keeps_mode_and_owner() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let fs = HostFs::new(d.path(), false);
        std::fs::create_dir_all(d.path().join("etc/real")).unwrap();
        std::fs::create_dir_all(d.path().join("etc/containerd")).unwrap();
        let target = d.path().join("etc/real/config.toml");
        std::fs::write(&target, "a").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&target, Some(4242), Some(4343)).unwrap();
        // An absolute link target is a host path: resolved under the host root.
        std::os::unix::fs::symlink(
            "/etc/real/config.toml",
            d.path().join("etc/containerd/config.toml"),
        )
        .unwrap();
        let p = Path::new("/etc/containerd/config.toml");
        assert_eq!(fs.read(p).unwrap().as_deref(), Some(&b"a"[..]));
        fs.write_preserving(p, b"b", 0o644).unwrap();
        assert_eq!(
            std::fs::read_link(d.path().join("etc/containerd/config.toml")).unwrap(),
            Path::new("/etc/real/config.toml")
        );
        let md = std::fs::metadata(&target).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid()),
            (0o600, 4242, 4343)
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"b");
        // A new file gets the default mode.
        fs.write_preserving(Path::new("/etc/containerd/new.toml"), b"c", 0o644)
            .unwrap();
        assert_eq!(
            std::fs::metadata(d.path().join("etc/containerd/new.toml"))
                .unwrap()
                .mode()
                & 0o7777,
            0o644
        );
        // A link loop is an error naming the file, not a hang.
        std::os::unix::fs::symlink("/etc/loop", d.path().join("etc/loop")).unwrap();
        assert!(fs
            .write_preserving(Path::new("/etc/loop"), b"x", 0o644)
            .unwrap_err()
            .to_string()
            .contains("symbolic links"));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let fs_ = HostFs::new(d.path(), false);
        fs_.create_dir_all(Path::new("/etc/x")).unwrap();
        fs_.write_atomic(Path::new("/etc/x/a.toml"), b"one", 0o644)
            .unwrap();
        fs_.write_atomic(Path::new("/etc/x/a.toml"), b"two", 0o644)
            .unwrap();
        assert_eq!(fs::read(d.path().join("etc/x/a.toml")).unwrap(), b"two");
        assert_eq!(
            fs_.list_dir(Path::new("/etc/x")),
            vec!["a.toml".to_string()]
        );
    }

    #[test]
    fn dry_run_changes_nothing_and_reports_diff() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a"), "x = 1\n").unwrap();
        let fs_ = HostFs::new(d.path(), true);
        fs_.write_atomic(Path::new("/a"), b"x = 2\n", 0o644)
            .unwrap();
        fs_.remove_file(Path::new("/a")).unwrap();
        assert_eq!(fs::read(d.path().join("a")).unwrap(), b"x = 1\n");
        let p = fs_.planned();
        assert!(p[0].contains("-x = 1") && p[0].contains("+x = 2"), "{p:?}");
        assert!(p[1].starts_with("remove"));
    }

    #[test]
    fn injected_fault_fails_that_op_and_all_later() {
        let d = tempfile::tempdir().unwrap();
        let fs_ = HostFs::new(d.path(), false);
        fs_.fail_at_op(Some(1));
        fs_.write_atomic(Path::new("/a"), b"1", 0o644).unwrap_err(); // op0 temp ok, op1 rename fails
        assert!(!d.path().join("a").exists());
        assert!(matches!(
            fs_.remove_file(Path::new("/.a.kata-deploy-new")),
            Err(StageError::InjectedFault { .. })
        ));
    }

    #[test]
    fn corrupt_payload_is_rejected_without_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::write(&src, "payload").unwrap();
        let fs_ = HostFs::new(d.path(), false);
        let e = fs_
            .stage_copy(&src, Path::new("/dest"), "00", 0o755)
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("corrupt"));
        assert_eq!(fs_.list_dir(Path::new("/")), vec!["src".to_string()]);
    }
}
