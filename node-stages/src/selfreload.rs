//! Runtimes whose supervisor reloads drop-ins by itself. k0s's containerd component watches
//! `/etc/k0s/containerd.d` and restarts the containerd it supervises when a file there changes
//! (debounced 3 s; k0s `pkg/component/worker/containerd`). Restarting the k0s unit instead would
//! restart the whole k0s worker, kubelet included. So for k0s a "restart" only waits, and the
//! runtime's status is the supervised containerd process's (k0s's pid file, the process's start
//! time): the stage's restart, verification and rollback logic is unchanged.

use std::path::{Path, PathBuf};

use crate::error::{Result, StageError};
use crate::restart::{Restarter, UnitStatus};

/// k0s's pid file of the containerd it supervises (`<RunDir>/containerd.pid`).
pub const K0S_CONTAINERD_PID_FILE: &str = "/run/k0s/containerd.pid";

/// A [`Restarter`] for a runtime its supervisor restarts when its drop-ins change: the units in
/// `units` are never restarted, their status is that of the process named by the pid file.
pub struct SelfReloading {
    inner: Box<dyn Restarter>,
    units: Vec<String>,
    pid_file: PathBuf,
    proc_dir: PathBuf,
}

impl SelfReloading {
    /// k0s on the host at `host_root`; every other call goes to `inner`.
    pub fn k0s(inner: Box<dyn Restarter>, host_root: &Path) -> Self {
        SelfReloading {
            inner,
            units: vec!["k0scontroller.service".into(), "k0sworker.service".into()],
            pid_file: host_root.join(K0S_CONTAINERD_PID_FILE.trim_start_matches('/')),
            proc_dir: host_root.join("proc"),
        }
    }

    fn ours(&self, unit: &str) -> bool {
        self.units.iter().any(|u| u == unit)
    }

    /// The supervised process's status: active while its pid file names a live process, since
    /// that process's start.
    fn process_status(&self) -> Result<UnitStatus> {
        let down = UnitStatus {
            active: false,
            active_since_mono_us: None,
        };
        let Ok(pid) = std::fs::read_to_string(&self.pid_file) else {
            return Ok(down);
        };
        let pid = pid.trim();
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            return Err(StageError::Runtime {
                unit: K0S_CONTAINERD_PID_FILE.into(),
                message: format!("{} holds {pid:?}, not a pid", self.pid_file.display()),
                hint: "check that k0s runs containerd on this node".into(),
            });
        }
        let Ok(stat) = std::fs::read_to_string(self.proc_dir.join(pid).join("stat")) else {
            return Ok(down);
        };
        let ticks = rustix::param::clock_ticks_per_second();
        Ok(match parse_proc_start_us(&stat, ticks) {
            Some((state, since)) if state != 'Z' && state != 'X' => UnitStatus {
                active: true,
                active_since_mono_us: Some(since),
            },
            _ => down,
        })
    }
}

/// A process's state and start time (µs since boot) from its `/proc/<pid>/stat` line (pure).
/// The command name may hold spaces and parentheses: fields are counted after its last `)`.
pub fn parse_proc_start_us(stat: &str, ticks_per_second: u64) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: field 3 (state) is fields[0], field 22 (starttime) is fields[19].
    let state = fields.first()?.chars().next()?;
    let ticks: u64 = fields.get(19)?.parse().ok()?;
    (ticks_per_second > 0).then(|| (state, ticks * 1_000_000 / ticks_per_second))
}

impl Restarter for SelfReloading {
    fn restart(&self, unit: &str) -> Result<()> {
        if self.ours(unit) {
            tracing::info!(
                stage = "cri",
                unit,
                "k0s restarts its containerd when a drop-in changes: waiting for it, not restarting {unit}"
            );
            return Ok(());
        }
        self.inner.restart(unit)
    }
    fn status(&self, unit: &str) -> Result<UnitStatus> {
        if !self.ours(unit) {
            return self.inner.status(unit);
        }
        // The unit must run for k0s to supervise anything; its containerd is what loads ours.
        if !self.inner.status(unit)?.active {
            return Ok(UnitStatus {
                active: false,
                active_since_mono_us: None,
            });
        }
        self.process_status()
    }
    fn enable_now(&self, unit: &str, unit_file: &Path) -> Result<()> {
        self.inner.enable_now(unit, unit_file)
    }
    fn disable_now(&self, unit: &str) -> Result<()> {
        self.inner.disable_now(unit)
    }
    fn served_handlers(&self, unit: &str) -> Result<Option<Vec<String>>> {
        self.inner.served_handlers(unit)
    }
    fn sandboxes(&self) -> Result<Option<Vec<crate::cri_client::Sandbox>>> {
        self.inner.sandboxes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn start_time_is_read_after_the_last_parenthesis() {
        let stat = "4242 (contai nerd) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 12 0 123456 1000000 200";
        assert_eq!(parse_proc_start_us(stat, 100), Some(('S', 1_234_560_000)));
        assert_eq!(parse_proc_start_us("4242 (x) S 1", 100), None);
        assert_eq!(parse_proc_start_us("no parenthesis", 100), None);
        assert_eq!(parse_proc_start_us(stat, 0), None);
    }

    /// Records restarts; its unit is always active since boot.
    #[derive(Default)]
    struct Inner(Arc<Mutex<Vec<String>>>);
    impl Restarter for Inner {
        fn restart(&self, unit: &str) -> Result<()> {
            self.0.lock().unwrap().push(unit.into());
            Ok(())
        }
        fn status(&self, _unit: &str) -> Result<UnitStatus> {
            Ok(UnitStatus {
                active: true,
                active_since_mono_us: Some(1),
            })
        }
        fn enable_now(&self, _: &str, _: &Path) -> Result<()> {
            Ok(())
        }
        fn disable_now(&self, _: &str) -> Result<()> {
            Ok(())
        }
    }

    fn write_proc(root: &Path, pid: u32, state: char, start_ticks: u64) {
        let dir = root.join(format!("proc/{pid}"));
        std::fs::create_dir_all(&dir).unwrap();
        let fields = format!("{state} 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start_ticks} 0 0");
        std::fs::write(dir.join("stat"), format!("{pid} (containerd) {fields}")).unwrap();
    }

    #[test]
    fn k0s_is_never_restarted_and_its_status_follows_the_supervised_containerd() {
        let root = tempfile::tempdir().unwrap();
        let restarts = Arc::new(Mutex::new(Vec::new()));
        let r = SelfReloading::k0s(Box::new(Inner(restarts.clone())), root.path());
        let unit = "k0sworker.service";
        // No pid file: containerd is down (k0s is between two processes).
        assert!(!r.status(unit).unwrap().active);
        let pid_file = root.path().join("run/k0s/containerd.pid");
        std::fs::create_dir_all(pid_file.parent().unwrap()).unwrap();
        std::fs::write(&pid_file, "4242\n").unwrap();
        write_proc(root.path(), 4242, 'S', 500);
        let hz = rustix::param::clock_ticks_per_second();
        let first = r.status(unit).unwrap();
        assert!(first.active);
        assert_eq!(first.active_since_mono_us, Some(500 * 1_000_000 / hz));
        // "Restarting" changes nothing; k0s replaces the process: a later start time.
        r.restart(unit).unwrap();
        std::fs::write(&pid_file, "4343\n").unwrap();
        write_proc(root.path(), 4343, 'S', 900);
        assert_eq!(
            r.status(unit).unwrap().active_since_mono_us,
            Some(900 * 1_000_000 / hz)
        );
        // A zombie is not a runtime; garbage in the pid file is an error naming it.
        write_proc(root.path(), 4343, 'Z', 900);
        assert!(!r.status(unit).unwrap().active);
        std::fs::write(&pid_file, "k0s\n").unwrap();
        let e = r.status(unit).unwrap_err().to_string();
        assert!(e.contains("containerd.pid"), "{e}");
        // Other units (nydus) go to systemd as before.
        r.restart("nydus-snapshotter.service").unwrap();
        assert_eq!(
            *restarts.lock().unwrap(),
            vec!["nydus-snapshotter.service".to_string()]
        );
    }
}
