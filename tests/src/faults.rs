//! The fault-injecting API proxy (`hack/testenv/faultproxy`) as a test fixture: started between
//! a client under test and the test bed's API server, stopped on drop.

use crate::cluster::{testenv_bin, TestCluster};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Fractions of requests that get each fault (0.0 to 1.0).
#[derive(Debug, Clone, Default)]
pub struct FaultRates {
    /// 429 with Retry-After.
    pub throttle: f64,
    /// 500 or 503.
    pub server_error: f64,
    /// Connection reset before the request is forwarded.
    pub reset: f64,
    /// Forwarded (it takes effect), then the connection is reset: the answer is lost.
    pub lost_response: f64,
    /// Delayed by `slow`.
    pub slow: f64,
    /// Watch streams cut after 0.5 to 3 s.
    pub cut_watch: f64,
    /// Delay of a slow response.
    pub slow_by: Duration,
    /// Only requests of this HTTP method get faults (e.g. `PATCH`); `None`: every request.
    pub only_method: Option<&'static str>,
    /// Only requests whose path contains this get faults (e.g. `/jobs`); `None`: every path.
    pub only_path: Option<&'static str>,
    /// The Retry-After seconds of injected 429s (`None`: the proxy's default, 1).
    pub retry_after_secs: Option<u32>,
}

/// A running proxy.
pub struct FaultProxy {
    child: std::process::Child,
    port: u16,
    stats: PathBuf,
    dir: tempfile::TempDir,
}

impl FaultProxy {
    /// Starts a proxy in front of `cluster`'s API server with `rates` and a fixed `seed`.
    pub fn start(cluster: &TestCluster, rates: &FaultRates, seed: u64) -> Result<Self> {
        let bin = testenv_bin("kata-faultproxy");
        if !bin.is_file() {
            bail!("{} is missing: run hack/testenv/build.sh", bin.display());
        }
        let dir = tempfile::tempdir()?;
        let pki = cluster.state().join("pki");
        let (port_file, stats) = (dir.path().join("port"), dir.path().join("stats.json"));
        let slow = format!("{}ms", rates.slow_by.as_millis().max(1));
        let child = std::process::Command::new(&bin)
            .args([
                "-upstream",
                &cluster.server,
                "-seed",
                &seed.to_string(),
                "-slow",
                &slow,
            ])
            .arg("-ca")
            .arg(pki.join("ca.crt"))
            .arg("-cert")
            .arg(pki.join("apiserver.crt"))
            .arg("-key")
            .arg(pki.join("apiserver.key"))
            .arg("-port-file")
            .arg(&port_file)
            .arg("-stats-file")
            .arg(&stats)
            .args([
                "-rate-429",
                &rates.throttle.to_string(),
                "-rate-5xx",
                &rates.server_error.to_string(),
            ])
            .args([
                "-rate-reset",
                &rates.reset.to_string(),
                "-rate-lost",
                &rates.lost_response.to_string(),
            ])
            .args([
                "-rate-slow",
                &rates.slow.to_string(),
                "-rate-cut-watch",
                &rates.cut_watch.to_string(),
            ])
            .args(["-only-method", rates.only_method.unwrap_or("")])
            .args(["-only-path", rates.only_path.unwrap_or("")])
            .args([
                "-retry-after",
                &rates.retry_after_secs.unwrap_or(1).to_string(),
            ])
            .stderr(std::fs::File::create(dir.path().join("proxy.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut me = Self {
            child,
            port: 0,
            stats,
            dir,
        };
        let start = Instant::now();
        while !port_file.is_file() {
            if let Some(st) = me.child.try_wait()? {
                bail!("kata-faultproxy exited ({st}): {}", me.log());
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("kata-faultproxy did not start within 10 s: {}", me.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        me.port = std::fs::read_to_string(&port_file)?
            .trim()
            .parse()
            .context("port file")?;
        Ok(me)
    }

    /// The proxy's URL (same CA as the API server).
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A copy of `kubeconfig` whose server is this proxy.
    pub fn kubeconfig_via(&self, kubeconfig: &Path, server: &str) -> Result<PathBuf> {
        let text = std::fs::read_to_string(kubeconfig)?;
        if !text.contains(server) {
            bail!("{} does not point at {server}", kubeconfig.display());
        }
        let path = self.dir.path().join("via-proxy.kubeconfig");
        std::fs::write(&path, text.replace(server, &self.url()))?;
        Ok(path)
    }

    /// What the proxy injected so far, by kind (`requests` counts every request).
    pub fn stats(&self) -> BTreeMap<String, usize> {
        std::fs::read(&self.stats)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Faults injected so far (all kinds).
    pub fn injected(&self) -> usize {
        self.stats()
            .iter()
            .filter(|(k, _)| *k != "requests")
            .map(|(_, v)| v)
            .sum()
    }

    /// The proxy's log (one line per injected fault).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
