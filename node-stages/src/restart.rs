//! Restarting and querying host services (the container runtime, the nydus snapshotter).
//! systemd over D-Bus (its sockets under the host root), an `exec:` script for unusual hosts and
//! tests, or any [`Restarter`] trait object.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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
    /// Links the unit file we installed (a host path) into systemd's configuration, reloads,
    /// enables and starts the unit.
    fn enable_now(&self, unit: &str, unit_file: &Path) -> Result<()>;
    /// Stops and disables a unit we installed (missing units are fine).
    fn disable_now(&self, unit: &str) -> Result<()>;
    /// The runtime handlers the runtime behind `unit` serves, if this restarter can ask it
    /// (None: unknown; then an active unit restarted after our request is taken as loaded).
    fn served_handlers(&self, _unit: &str) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
    /// The pod sandboxes the runtime runs, if this restarter can ask it (None: unknown).
    fn sandboxes(&self) -> Result<Option<Vec<crate::cri_client::Sandbox>>> {
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
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// systemd's manager, reached over the host's D-Bus system bus (its socket under the host root,
/// `/run/dbus/system_bus_socket`). Needs only that socket mounted: no `hostPID`, no `privileged`,
/// no systemctl in the image. (systemd's private socket is not used: zbus 5 panics on the
/// well-known sender name systemd puts in its replies there.)
#[derive(Debug, Clone)]
pub struct SystemdRestarter {
    host_root: PathBuf,
    cri_socket: Option<PathBuf>,
    /// Bound on every D-Bus call and on waiting for a restart job to finish.
    deadline: Duration,
}

/// How long a single systemd call (or a restart job) may take before the stage gives up.
pub const SYSTEMD_CALL_DEADLINE: Duration = Duration::from_secs(90);

const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";

impl SystemdRestarter {
    /// systemd of the host whose root is mounted at `host_root`.
    pub fn new(host_root: &Path) -> Self {
        SystemdRestarter {
            host_root: host_root.to_path_buf(),
            cri_socket: None,
            deadline: SYSTEMD_CALL_DEADLINE,
        }
    }

    /// Also ask the runtime itself (CRI Status on this socket, a path in the stage container)
    /// which handlers it serves.
    pub fn with_cri_socket(mut self, socket: Option<PathBuf>) -> Self {
        self.cri_socket = socket;
        self
    }

    /// Bounds every call and restart job by `deadline` instead of [`SYSTEMD_CALL_DEADLINE`].
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Runs `f` against systemd on a connection of its own (a few calls per stage: no pooling).
    fn with_systemd<T>(
        &self,
        what: &str,
        f: impl AsyncFnOnce(&Systemd) -> std::result::Result<T, SdError>,
    ) -> Result<T> {
        let fail = |e: SdError| match e {
            SdError::Bus(m) => StageError::Restarter {
                message: format!("{what}: {m}"),
            },
            SdError::Job(m) => StageError::UnitFailed {
                message: format!("{what}: {m}"),
            },
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(SdError::Bus(e.to_string())))?;
        rt.block_on(async {
            let systemd = tokio::time::timeout(
                self.deadline,
                Systemd::connect(&self.host_root, self.deadline),
            )
            .await
            .map_err(|_| format!("no answer from systemd within {:?}", self.deadline))??;
            tokio::time::timeout(self.deadline, f(&systemd))
                .await
                .map_err(|_| format!("systemd did not finish within {:?}", self.deadline))?
        })
        .map_err(fail)
    }
}

/// Why a systemd call failed: reaching systemd (the bus, a call), or the job systemd ran.
enum SdError {
    /// The bus or a call failed: systemd was not reached or refused the call.
    Bus(String),
    /// systemd ran the job and it did not succeed (the unit failed to start or stop).
    Job(String),
}

impl From<String> for SdError {
    fn from(m: String) -> Self {
        SdError::Bus(m)
    }
}

/// One D-Bus connection to systemd's manager.
struct Systemd {
    conn: zbus::Connection,
}

/// systemd's bus name on the system bus.
const SYSTEMD_BUS_NAME: &str = "org.freedesktop.systemd1";

impl Systemd {
    async fn connect(host_root: &Path, timeout: Duration) -> std::result::Result<Self, String> {
        let bus = host_root.join("run/dbus/system_bus_socket");
        if !bus.exists() {
            return Err(format!(
                "{} does not exist: mount the host's /run/dbus into the stage (a host without a D-Bus system bus: set restart: none and restart the runtime yourself)",
                bus.display()
            ));
        }
        let address = format!("unix:path={}", bus.display());
        let conn = zbus::connection::Builder::address(address.as_str())
            .map_err(|e| format!("{address}: {e}"))?
            .method_timeout(timeout)
            .build()
            .await
            .map_err(|e| format!("connecting to the system bus at {}: {e}", bus.display()))?;
        Ok(Systemd { conn })
    }

    async fn call<B>(
        &self,
        path: &str,
        iface: &str,
        method: &str,
        body: &B,
    ) -> std::result::Result<zbus::Message, zbus::Error>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        self.conn
            .call_method(Some(SYSTEMD_BUS_NAME), path, Some(iface), method, body)
            .await
    }

    async fn manager<B>(&self, method: &str, body: &B) -> std::result::Result<zbus::Message, String>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        self.call(SYSTEMD_PATH, MANAGER, method, body)
            .await
            .map_err(|e| format!("{method}: {e}"))
    }

    async fn property(
        &self,
        path: &str,
        iface: &str,
        name: &str,
    ) -> std::result::Result<zbus::zvariant::OwnedValue, String> {
        let reply = self
            .call(
                path,
                "org.freedesktop.DBus.Properties",
                "Get",
                &(iface, name),
            )
            .await
            .map_err(|e| format!("reading {name}: {e}"))?;
        reply
            .body()
            .deserialize::<zbus::zvariant::OwnedValue>()
            .map_err(|e| format!("reading {name}: {e}"))
    }

    async fn unit_status(&self, unit: &str) -> std::result::Result<UnitStatus, String> {
        // LoadUnit (not GetUnit): a unit that is not loaded yet is reported inactive, not missing.
        let reply = self.manager("LoadUnit", &(unit,)).await?;
        let path: zbus::zvariant::OwnedObjectPath =
            reply.body().deserialize().map_err(|e| e.to_string())?;
        let iface = "org.freedesktop.systemd1.Unit";
        let state = String::try_from(self.property(&path, iface, "ActiveState").await?)
            .map_err(|e| e.to_string())?;
        let since = u64::try_from(
            self.property(&path, iface, "ActiveEnterTimestampMonotonic")
                .await?,
        )
        .map_err(|e| e.to_string())?;
        Ok(parse_unit_state(&state, since))
    }

    /// Queues `method` (RestartUnit, StartUnit, StopUnit) for `unit` and waits for its job's
    /// result from systemd's `JobRemoved` signal, as `systemctl` does: a unit that fails to start
    /// (e.g. a runtime refusing its new configuration) is known at once, not at a deadline.
    async fn run_job(&self, method: &str, unit: &str) -> std::result::Result<(), SdError> {
        use futures::StreamExt;
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface(MANAGER)
            .and_then(|b| b.member("JobRemoved"))
            .and_then(|b| b.path(SYSTEMD_PATH))
            .map_err(|e| e.to_string())?
            .build();
        // Subscribed before the job exists, so its signal cannot be missed.
        let mut removed = zbus::MessageStream::for_match_rule(rule, &self.conn, Some(64))
            .await
            .map_err(|e| format!("subscribing to systemd's job signals: {e}"))?;
        self.manager("Subscribe", &()).await?;
        let reply = self.manager(method, &(unit, "replace")).await?;
        let job: zbus::zvariant::OwnedObjectPath =
            reply.body().deserialize().map_err(|e| e.to_string())?;
        while let Some(msg) = removed.next().await {
            let msg = msg.map_err(|e| e.to_string())?;
            let Ok((_, path, _, result)) =
                msg.body()
                    .deserialize::<(u32, zbus::zvariant::OwnedObjectPath, String, String)>()
            else {
                continue;
            };
            if path == job {
                return job_result(method, unit, &result).map_err(SdError::Job);
            }
        }
        Err(
            format!("{method} {unit}: the connection to systemd closed before the job ended")
                .into(),
        )
    }
}

/// What a finished systemd job's result (`JobRemoved`) means: only `done` is success.
pub fn job_result(method: &str, unit: &str, result: &str) -> std::result::Result<(), String> {
    match result {
        "done" | "skipped" => Ok(()),
        other => Err(format!(
            "{method} {unit}: systemd's job ended {other:?} (see journalctl -u {unit} on the node)"
        )),
    }
}

/// A unit's status from its `ActiveState` and `ActiveEnterTimestampMonotonic` properties.
pub fn parse_unit_state(active_state: &str, active_enter_mono_us: u64) -> UnitStatus {
    UnitStatus {
        active: active_state == "active",
        active_since_mono_us: Some(active_enter_mono_us).filter(|v| *v > 0),
    }
}

impl Restarter for SystemdRestarter {
    fn restart(&self, unit: &str) -> Result<()> {
        self.with_systemd(&format!("restarting {unit}"), async |s| {
            s.run_job("RestartUnit", unit).await
        })
    }
    fn status(&self, unit: &str) -> Result<UnitStatus> {
        self.with_systemd(&format!("reading the status of {unit}"), async |s| {
            Ok(s.unit_status(unit).await?)
        })
    }
    fn enable_now(&self, unit: &str, unit_file: &Path) -> Result<()> {
        let file = unit_file.display().to_string();
        self.with_systemd(&format!("enabling {unit} ({file})"), async |s| {
            // systemd writes the links itself: the stage needs no write to /etc/systemd/system.
            s.manager("LinkUnitFiles", &(vec![file.as_str()], false, true))
                .await?;
            s.manager("Reload", &()).await?;
            s.manager("EnableUnitFiles", &(vec![unit], false, true))
                .await?;
            s.run_job("StartUnit", unit).await
        })
    }
    fn served_handlers(&self, _unit: &str) -> Result<Option<Vec<String>>> {
        cri_served_handlers(self.cri_socket.as_deref())
    }
    fn sandboxes(&self) -> Result<Option<Vec<crate::cri_client::Sandbox>>> {
        let Some(socket) = self.cri_socket.as_deref().filter(|s| s.exists()) else {
            return Ok(None);
        };
        crate::cri_client::list_sandboxes(socket, Duration::from_secs(10))
            .map(Some)
            .map_err(|message| StageError::Restarter { message })
    }
    fn disable_now(&self, unit: &str) -> Result<()> {
        self.with_systemd(&format!("disabling {unit}"), async |s| {
            // A unit that is already gone is fine (removal must be a no-op on a clean node).
            // DisableUnitFiles also removes the link LinkUnitFiles made.
            let _ = s.run_job("StopUnit", unit).await;
            let _ = s.manager("DisableUnitFiles", &(vec![unit], false)).await;
            Ok(s.manager("Reload", &()).await.map(drop)?)
        })
    }
}

/// Handlers served by the runtime at `socket`: None when there is no socket to ask (unknown),
/// an error while the runtime does not answer (still starting, CRI plugin not loaded).
pub fn cri_served_handlers(socket: Option<&Path>) -> Result<Option<Vec<String>>> {
    let Some(socket) = socket.filter(|s| s.exists()) else {
        return Ok(None);
    };
    crate::cri_client::query_status(socket, std::time::Duration::from_secs(5))
        // A runtime that reports handlers in neither form (older CRI-O) cannot tell us: unknown.
        .map(|r| Some(r.handlers()).filter(|h| !h.is_empty()))
        .map_err(|message| StageError::Restarter { message })
}

/// `exec:<script>`: `<script> restart|status|disable <unit>`, `<script> enable <unit> <unit file>`;
/// `status` prints `active <monotonic µs>` or `inactive`; `handlers <unit>` may print the served
/// handlers.
#[derive(Debug, Clone)]
pub struct ExecRestarter {
    /// The script.
    pub script: PathBuf,
}

impl ExecRestarter {
    fn run(&self, verb: &str, unit: &str) -> Result<String> {
        self.run_with(verb, unit, &[])
    }

    fn run_with(&self, verb: &str, unit: &str, extra: &[&str]) -> Result<String> {
        let out = Command::new(&self.script)
            .args([verb, unit])
            .args(extra)
            .output()
            .map_err(|e| StageError::Restarter {
                message: format!("cannot run {} {verb} {unit}: {e}", self.script.display()),
            })?;
        if !out.status.success() {
            return Err(StageError::Restarter {
                message: format!(
                    "{} {verb} {unit} failed: {}",
                    self.script.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
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
        Ok(UnitStatus {
            active,
            active_since_mono_us: it.next().and_then(|v| v.parse().ok()),
        })
    }
    fn enable_now(&self, unit: &str, unit_file: &Path) -> Result<()> {
        let file = unit_file.display().to_string();
        self.run_with("enable", unit, &[&file]).map(drop)
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
        Ok(UnitStatus {
            active: true,
            active_since_mono_us: None,
        })
    }
    fn enable_now(&self, unit: &str, _unit_file: &Path) -> Result<()> {
        tracing::warn!(
            unit,
            "restart: none: not starting the unit; start it yourself"
        );
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
    fn parses_unit_state() {
        assert_eq!(
            parse_unit_state("active", 123456),
            UnitStatus {
                active: true,
                active_since_mono_us: Some(123456)
            }
        );
        assert_eq!(
            parse_unit_state("failed", 0),
            UnitStatus {
                active: false,
                active_since_mono_us: None
            }
        );
        assert_eq!(
            parse_unit_state("activating", 5),
            UnitStatus {
                active: false,
                active_since_mono_us: Some(5)
            }
        );
    }

    #[test]
    fn only_a_done_job_is_success() {
        assert!(job_result("RestartUnit", "containerd.service", "done").is_ok());
        let e = job_result("RestartUnit", "containerd.service", "failed").unwrap_err();
        assert!(
            e.contains("failed") && e.contains("journalctl -u containerd.service"),
            "{e}"
        );
        for r in ["timeout", "canceled", "dependency"] {
            assert!(job_result("StartUnit", "x.service", r).is_err(), "{r}");
        }
    }

    #[test]
    fn missing_systemd_sockets_name_what_to_mount() {
        let root = tempfile::tempdir().unwrap();
        let r = SystemdRestarter::new(root.path()).with_deadline(Duration::from_secs(2));
        let err = r.restart("containerd").unwrap_err().to_string();
        assert!(
            err.contains("run/dbus/system_bus_socket") && err.contains("restart: none"),
            "{err}"
        );
    }

    #[test]
    fn an_unresponsive_systemd_hits_the_deadline() {
        // A socket that accepts and never answers (a hung systemd): the call must not hang.
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("run/dbus")).unwrap();
        let listener =
            std::os::unix::net::UnixListener::bind(root.path().join("run/dbus/system_bus_socket"))
                .unwrap();
        let r = SystemdRestarter::new(root.path()).with_deadline(Duration::from_millis(500));
        let t0 = std::time::Instant::now();
        let err = r.status("containerd").unwrap_err().to_string();
        drop(listener);
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t0.elapsed()
        );
        assert!(err.contains("within"), "{err}");
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_now_us();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_now_us() > a);
    }
}
