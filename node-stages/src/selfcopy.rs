//! `kata-deploy-stage copy-self`: the per-node install Job's first init container copies this
//! static binary into an emptyDir, so the artifacts containers can run it inside the official
//! Kata release image (distroless: no shell, no cp), where the payload is. Written beside the
//! destination, synced, then renamed: a retried pod never runs a half-written binary.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{Result, StageError};

/// Where the chart's emptyDir holds the copy.
pub const DEFAULT_DEST: &str = "/kata-stage/kata-deploy-stage";

/// Copies the running executable to `dest` (mode 0755), atomically.
pub fn copy_self(dest: &Path) -> Result<u64> {
    let exe = std::env::current_exe().map_err(|e| StageError::io("read", "/proc/self/exe", e))?;
    copy_file(&exe, dest)
}

/// Copies `src` to `dest` (mode 0755) through a temp file beside it.
pub fn copy_file(src: &Path, dest: &Path) -> Result<u64> {
    let name = dest.file_name().ok_or_else(|| {
        StageError::bad_input(
            dest,
            "not a file path",
            "Pass --copy-to <dir>/kata-deploy-stage",
        )
    })?;
    let tmp = dest.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let mut input = File::open(src).map_err(|e| StageError::io("read", src, e))?;
    let res = (|| -> std::io::Result<u64> {
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o755)
            .open(&tmp)?;
        let n = std::io::copy(&mut input, &mut out)?;
        out.set_permissions(fs::Permissions::from_mode(0o755))?;
        out.flush()?;
        out.sync_all()?;
        fs::rename(&tmp, dest)?;
        Ok(n)
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        StageError::io("write", dest, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_executable_and_replaces_an_old_copy() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::write(&src, b"binary").unwrap();
        let dest = d.path().join("kata-deploy-stage");
        fs::write(&dest, b"old").unwrap();
        assert_eq!(copy_file(&src, &dest).unwrap(), 6);
        assert_eq!(fs::read(&dest).unwrap(), b"binary");
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            2,
            "no temp file left"
        );
        let e = copy_file(&src, &d.path().join("missing-dir/x")).unwrap_err();
        assert!(e.to_string().contains("missing-dir"), "{e}");
    }
}
