//! Restarting and querying host services (the container runtime, the nydus snapshotter).
//! systemd through `systemctl` (entered into the host's namespaces when the host root is not
//! `/`), an `exec:` script for unusual hosts and tests, or any [`Restarter`] trait object.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Result, StageError};

/// What a unit is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitStatus {
    /// The unit is active (running).
    pub active: bool,
    /// CLOCK_MONOTONIC (µs) when it last became active, if known.
    pub active_since_mono_us: Option<u64>,
}

/// Restarts and queries host services. Implementations must be idempotent.
pub trait Restarter: Send + Sync {
    /// Restarts a unit (starting it if stopped).
    fn restart(&self, unit: &str) -> Result<()>;
    /// Current status of a unit.
    fn status(&self, unit: &str) -> Result<UnitStatus>;
    /// Reloads unit files, enables and starts a unit we installed.
    fn enable_now(&self, unit: &str) -> Result<()>;
    /// Stops and disables a unit we installed (missing units are fine).
    fn disable_now(&self, unit: &str) -> Result<()>;
    /// The runtime handlers the runtime behind `unit` serves, if this restarter can ask it
    /// (None: unknown; then an active unit restarted after our request is taken as loaded).
    fn served_handlers(&self, _unit: &str) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
}

/// CLOCK_MONOTONIC now, in µs (same clock as systemd's *TimestampMonotonic).
pub fn monotonic_now_us() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The kernel's boot id (a reboot since a requested restart also loaded the files).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// systemctl, optionally entered into PID 1's namespaces (the stage runs in a container).
#[derive(Debug, Clone)]
pub struct SystemdRestarter {
    enter_host_mount_ns: bool,
    /// Whose mount namespace is the host's: PID 1 (with hostPID); tests use another process.
    host_pid: u32,
    cri_socket: Option<PathBuf>,
}

impl SystemdRestarter {
    /// When the host root is not `/`, systemctl runs in PID 1's mount namespace (needs hostPID).
    pub fn new(host_root: &Path) -> Self {
        SystemdRestarter { enter_host_mount_ns: host_root != Path::new("/"), host_pid: 1, cri_socket: None }
    }

    /// Also ask the runtime itself (CRI Status on this socket, a path in the stage container)
    /// which handlers it serves.
    pub fn with_cri_socket(mut self, socket: Option<PathBuf>) -> Self {
        self.cri_socket = socket;
        self
    }

    /// `program args` to run on the host: in PID 1's mount namespace when the stage runs in a
    /// container, so the host's systemctl talks to the host's systemd.
    fn host_command(&self, program: &str, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        if self.enter_host_mount_ns {
            // setns in the child before exec rather than nsenter(1): the stage image holds no
            // tools besides our binary.
            let ns = format!("/proc/{}/ns/mnt", self.host_pid);
            let host_mnt = std::fs::File::open(&ns).map_err(|e| StageError::Restarter {
                message: format!("cannot open {ns} ({e}): the stage pod needs hostPID: true and privileges to restart the runtime"),
            })?;
            use std::os::unix::process::CommandExt;
            // SAFETY: pre_exec runs in the forked, single-threaded child; setns is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    use std::os::fd::AsFd;
                    rustix::thread::move_into_link_name_space(host_mnt.as_fd(), Some(rustix::thread::LinkNameSpaceType::Mount))
                        .map_err(std::io::Error::from)
                });
            }
        }
        Ok(cmd)
    }

    fn systemctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.host_command("systemctl", args)?;
        let out = cmd.output().map_err(|e| StageError::Restarter { message: format!("cannot run systemctl {}: {e}", args.join(" ")) })?;
        if !out.status.success() {
            return Err(StageError::Restarter {
                message: format!("systemctl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Parses `systemctl show -p ActiveState -p ActiveEnterTimestampMonotonic` output.
pub fn parse_systemctl_show(out: &str) -> UnitStatus {
    let mut st = UnitStatus { active: false, active_since_mono_us: None };
    for line in out.lines() {
        if let Some(v) = line.strip_prefix("ActiveState=") {
            st.active = v.trim() == "active";
        } else if let Some(v) = line.strip_prefix("ActiveEnterTimestampMonotonic=") {
            st.active_since_mono_us = v.trim().parse().ok().filter(|v| *v > 0);
        }
    }
    st
}

impl Restarter for SystemdRestarter {
    fn restart(&self, unit: &str) -> Result<()> {
        self.systemctl(&["restart", unit]).map(drop)
    }
    fn status(&self, unit: &str) -> Result<UnitStatus> {
        self.systemctl(&["show", "-p", "ActiveState", "-p", "ActiveEnterTimestampMonotonic", unit]).map(|o| parse_systemctl_show(&o))
    }
    fn enable_now(&self, unit: &str) -> Result<()> {
        self.systemctl(&["daemon-reload"])?;
        self.systemctl(&["enable", "--now", unit]).map(drop)
    }
    fn served_handlers(&self, _unit: &str) -> Result<Option<Vec<String>>> {
        cri_served_handlers(self.cri_socket.as_deref())
    }
    fn disable_now(&self, unit: &str) -> Result<()> {
        // A unit that is already gone is fine (removal must be a no-op on a clean node).
        let _ = self.systemctl(&["disable", "--now", unit]);
        self.systemctl(&["daemon-reload"]).map(drop)
    }
}

/// Handlers served by the runtime at `socket`: None when there is no socket to ask (unknown),
/// an error while the runtime does not answer (still starting, CRI plugin not loaded).
pub fn cri_served_handlers(socket: Option<&Path>) -> Result<Option<Vec<String>>> {
    let Some(socket) = socket.filter(|s| s.exists()) else { return Ok(None) };
    crate::cri_client::query_status(socket, std::time::Duration::from_secs(5))
        // A runtime that reports handlers in neither form (older CRI-O) cannot tell us: unknown.
        .map(|r| Some(r.handlers()).filter(|h| !h.is_empty()))
        .map_err(|message| StageError::Restarter { message })
}

/// `exec:<script>`: `<script> restart|status|enable|disable <unit>`; `status` prints
/// `active <monotonic µs>` or `inactive`; `handlers <unit>` may print the served handlers.
#[derive(Debug, Clone)]
pub struct ExecRestarter {
    /// The script.
    pub script: PathBuf,
}

impl ExecRestarter {
    fn run(&self, verb: &str, unit: &str) -> Result<String> {
        let out = Command::new(&self.script).args([verb, unit]).output().map_err(|e| StageError::Restarter {
            message: format!("cannot run {} {verb} {unit}: {e}", self.script.display()),
        })?;
        if !out.status.success() {
            return Err(StageError::Restarter {
                message: format!("{} {verb} {unit} failed: {}", self.script.display(), String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Restarter for ExecRestarter {
    fn restart(&self, unit: &str) -> Result<()> {
        self.run("restart", unit).map(drop)
    }
    fn status(&self, unit: &str) -> Result<UnitStatus> {
        let out = self.run("status", unit)?;
        let mut it = out.split_whitespace();
        let active = it.next() == Some("active");
        Ok(UnitStatus { active, active_since_mono_us: it.next().and_then(|v| v.parse().ok()) })
    }
    fn enable_now(&self, unit: &str) -> Result<()> {
        self.run("enable", unit).map(drop)
    }
    fn disable_now(&self, unit: &str) -> Result<()> {
        self.run("disable", unit).map(drop)
    }
}

/// `restart: none`: never touches services; the operator restarts the runtime.
#[derive(Debug, Clone, Default)]
pub struct NoRestarter;

impl Restarter for NoRestarter {
    fn restart(&self, unit: &str) -> Result<()> {
        tracing::warn!(unit, "restart: none: the runtime was NOT restarted; restart it yourself to load the new configuration");
        Ok(())
    }
    fn status(&self, _unit: &str) -> Result<UnitStatus> {
        Ok(UnitStatus { active: true, active_since_mono_us: None })
    }
    fn enable_now(&self, unit: &str) -> Result<()> {
        tracing::warn!(unit, "restart: none: not starting the unit; start it yourself");
        Ok(())
    }
    fn disable_now(&self, _unit: &str) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_commands_run_in_the_hosts_mount_namespace() {
        // Stand-in for the host: a process in a mount namespace of its own (needs root).
        let mut other = std::process::Command::new("unshare").args(["-m", "--propagation", "private", "sleep", "30"]).spawn().expect("unshare");
        let ns_of = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).map(|p| p.display().to_string());
        let mine = ns_of("self").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let theirs = loop {
            let ns = ns_of(&other.id().to_string()).unwrap();
            if ns != mine || std::time::Instant::now() > deadline {
                break ns;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_ne!(theirs, mine, "unshare -m did not create a mount namespace (run the tests as root)");
        let mut r = SystemdRestarter::new(Path::new("/host"));
        assert!(r.enter_host_mount_ns, "a container host root enters the host namespace");
        r.host_pid = other.id();
        let out = r.host_command("readlink", &["/proc/self/ns/mnt"]).unwrap().output().unwrap();
        let _ = other.kill();
        assert!(out.status.success(), "setns failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), theirs);
        assert!(!SystemdRestarter::new(Path::new("/")).enter_host_mount_ns, "on the host itself nothing is entered");
    }

    #[test]
    fn parses_systemctl_show() {
        let st = parse_systemctl_show("ActiveState=active\nActiveEnterTimestampMonotonic=123456\n");
        assert_eq!(st, UnitStatus { active: true, active_since_mono_us: Some(123456) });
        let st = parse_systemctl_show("ActiveState=failed\nActiveEnterTimestampMonotonic=0\n");
        assert_eq!(st, UnitStatus { active: false, active_since_mono_us: None });
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_now_us();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_now_us() > a);
    }
}
