//! Runs one container as a host process in its own mount namespace.
//!
//! The process keeps the host's root filesystem (it runs host binaries) but gets a private mount
//! namespace in which every planned volume is bind-mounted onto its mountPath, so the stage
//! binary's `/host` really is the node's fake host root and the ServiceAccount files appear at
//! the usual path, without touching what other processes see.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

use super::error::{Error, Result};
use super::image::Argv;
use super::volumes::{ensure_target, Mount};

/// Everything needed to start one container process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Program and arguments.
    pub argv: Argv,
    /// Complete environment (nothing is inherited from the kubelet).
    pub env: Vec<(String, String)>,
    /// Working directory inside the container view (`/` when unset).
    pub working_dir: Option<PathBuf>,
    /// Bind mounts, parents first.
    pub mounts: Vec<Mount>,
    /// File receiving stdout and stderr.
    pub log: PathBuf,
}

/// One prepared mount, as C strings, so the post-fork code does not allocate.
struct RawMount {
    source: CString,
    target: CString,
    read_only: bool,
    error_line: Vec<u8>,
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        Error::io(
            "NUL in path",
            p,
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })
}

/// Starts the process. Mount targets missing on the real filesystem are created first.
pub fn spawn(spec: &ProcessSpec) -> Result<Child> {
    let mut raw = Vec::with_capacity(spec.mounts.len());
    for m in &spec.mounts {
        ensure_target(&m.source, &m.target)
            .map_err(|e| Error::io("creating mount target", &m.target, e))?;
        raw.push(RawMount {
            source: cstring(&m.source)?,
            target: cstring(&m.target)?,
            read_only: m.read_only,
            error_line: format!(
                "kata-local-kubelet: bind mount {} -> {} failed\n",
                m.source.display(),
                m.target.display()
            )
            .into_bytes(),
        });
    }
    let cwd = cstring(spec.working_dir.as_deref().unwrap_or(Path::new("/")))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(|e| Error::io("opening log", &spec.log, e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Error::io("opening log", &spec.log, e))?;

    let mut cmd = Command::new(&spec.argv.program);
    cmd.args(&spec.argv.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Own process group: deleting the pod signals the whole tree the container started.
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe libc
    // calls on memory prepared before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            let fail = |msg: &[u8]| {
                let err = std::io::Error::last_os_error();
                libc::write(2, msg.as_ptr().cast(), msg.len());
                Err(err)
            };
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail(b"kata-local-kubelet: unshare(CLONE_NEWNS) failed\n");
            }
            // Without this, the binds below would propagate back to the host's namespace.
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return fail(b"kata-local-kubelet: making / rprivate failed\n");
            }
            for m in &raw {
                if libc::mount(
                    m.source.as_ptr(),
                    m.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                {
                    return fail(&m.error_line);
                }
                if m.read_only
                    && libc::mount(
                        std::ptr::null(),
                        m.target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ) != 0
                {
                    return fail(&m.error_line);
                }
            }
            // After the mounts, so a workingDir inside a volume is the mounted one.
            if libc::chdir(cwd.as_ptr()) != 0 {
                return fail(b"kata-local-kubelet: chdir to workingDir failed\n");
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| Error::io("starting", &spec.argv.program, e))
}

/// Exit code and signal of a finished process, container style (killed by N → 128+N).
pub fn exit_code(status: std::process::ExitStatus) -> (i32, Option<i32>) {
    match (status.code(), status.signal()) {
        (Some(c), _) => (c, None),
        (None, Some(s)) => (128 + s, Some(s)),
        (None, None) => (255, None),
    }
}

/// Sends a signal to a container's process group (ignores "no such process").
pub fn signal_group(pid: u32, signal: i32) {
    // SAFETY: plain syscall; a negative pid addresses the process group.
    unsafe {
        libc::kill(-(pid as i32), signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let s = std::process::ExitStatus::from_raw(3 << 8);
        assert_eq!(exit_code(s), (3, None));
        let s = std::process::ExitStatus::from_raw(9);
        assert_eq!(exit_code(s), (137, Some(9)));
    }

    /// Needs root (mount namespaces): skipped otherwise, except in CI, where it fails.
    #[tokio::test]
    async fn runs_with_private_binds() {
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                !crate::cluster::in_ci(),
                "runs_with_private_binds needs root (mount namespaces); CI runs as root"
            );
            eprintln!("skipped: needs root for mount namespaces");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("hello"), "hi\n").unwrap();
        let target = d.path().join("target");
        let ro_target = d.path().join("ro");
        let log = d.path().join("c.log");
        let spec = ProcessSpec {
            argv: Argv {
                program: "/bin/sh".into(),
                args: vec![
                    "-c".into(),
                    format!(
                        "cat {t}/hello; echo \"$FOO $(pwd)\"; touch {r}/x 2>/dev/null && echo writable; exit 4",
                        t = target.display(),
                        r = ro_target.display()
                    ),
                ],
            },
            env: vec![("FOO".into(), "bar".into()), ("PATH".into(), "/usr/bin:/bin".into())],
            working_dir: Some(target.clone()),
            mounts: vec![
                Mount {
                    source: src.clone(),
                    target: target.clone(),
                    read_only: false,
                },
                Mount {
                    source: src.clone(),
                    target: ro_target.clone(),
                    read_only: true,
                },
            ],
            log: log.clone(),
        };
        let mut child = spawn(&spec).unwrap();
        let status = child.wait().await.unwrap();
        let out = std::fs::read_to_string(&log).unwrap();
        assert_eq!(exit_code(status), (4, None), "log: {out}");
        assert_eq!(out, format!("hi\nbar {}\n", target.display()));
        // Outside the namespace the target is still the empty directory we created.
        assert!(std::fs::read_dir(&target).unwrap().next().is_none());
    }
}
