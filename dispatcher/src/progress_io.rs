//! What a person sees of a run in `kubectl` besides the log: the per-node state label
//! (`pending` before a node's Job is created, `failed` when it failed; the stages write the rest)
//! and the rollout summary in a ConfigMap ([`crate::summary`]). A thin I/O shell: failures to
//! write are logged and never change the run.

use crate::kube_io::ClusterApi;
use crate::lifecycle::{Outcome, Progress, Results};
use crate::summary::{self, CanaryView, MeanDuration, Phase, Snapshot};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{debug, warn};

/// Values of the state label the dispatcher writes.
pub const STATE_PENDING: &str = "pending";
/// The node's Job failed (or it could not get one); the summary says why.
pub const STATE_FAILED: &str = "failed";

/// The state label and the summary of one run.
#[derive(Clone)]
pub struct Visibility {
    api: ClusterApi,
    state_label: Option<String>,
    summary: Option<(String, String)>,
    prefix: String,
    run: String,
    started: SystemTime,
    parallelism: usize,
    failed: BTreeMap<String, String>,
    mean: MeanDuration,
    /// The last text written, without its `updated` line (unchanged: not written again).
    last: Option<String>,
    writing: Arc<AtomicBool>,
    warned: Arc<AtomicBool>,
}

/// What one run writes, from its flags.
pub struct VisibilityConfig {
    /// `--state-label`.
    pub state_label: Option<String>,
    /// `--summary-configmap` and `--summary-key`.
    pub summary: Option<(String, String)>,
    /// Name prefix and run id.
    pub prefix: String,
    /// The run id.
    pub run: String,
    /// `--parallelism` (for the ETA).
    pub parallelism: usize,
}

impl Visibility {
    /// For one run of `api`.
    pub fn new(api: ClusterApi, cfg: VisibilityConfig) -> Self {
        Self {
            api,
            state_label: cfg.state_label,
            summary: cfg.summary,
            prefix: cfg.prefix,
            run: cfg.run,
            started: SystemTime::now(),
            parallelism: cfg.parallelism,
            failed: BTreeMap::new(),
            mean: MeanDuration::default(),
            last: None,
            writing: Arc::new(AtomicBool::new(false)),
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sets the node's state label to `pending` (before its Job is created), when configured.
    pub async fn mark_pending(api: &ClusterApi, key: Option<&str>, node: &str, uid: &str) {
        if let Some(key) = key {
            if let Err(e) = api.label_node(node, uid, key, Some(STATE_PENDING)).await {
                warn!(node = %node, error = %e, "could not set the node's state label to pending");
            }
        }
    }

    /// The state label key, when configured.
    pub fn state_key(&self) -> Option<String> {
        self.state_label.clone()
    }

    /// Takes a node's result into the summary; the state label to write, when it failed.
    pub fn on_result(&mut self, node: &str, outcome: &Outcome, took: Option<Duration>) -> bool {
        if let Some(d) = took {
            self.mean.add(d);
        }
        match outcome {
            Outcome::Failed(r) => {
                self.failed.insert(node.to_owned(), r.clone());
                true
            }
            _ => {
                self.failed.remove(node);
                false
            }
        }
    }

    /// Sets the node's state label to `failed`, when configured.
    pub async fn mark_failed(api: &ClusterApi, key: Option<&str>, node: &str, uid: &str) {
        if let Some(key) = key {
            if let Err(e) = api.label_node(node, uid, key, Some(STATE_FAILED)).await {
                warn!(node = %node, error = %e, "could not set the node's state label to failed");
            }
        }
    }

    /// The summary while the run goes on; `None` when there is nothing new to write (or a write
    /// is still in flight, or no summary is configured).
    pub fn running_text(&mut self, p: &Progress, canary: Option<CanaryView>) -> Option<String> {
        let snap = Snapshot {
            prefix: self.prefix.clone(),
            run: self.run.clone(),
            phase: Phase::Running,
            started: summary::rfc3339(self.started),
            updated: String::new(),
            counts: summary::running_counts(p),
            total: p.total,
            eta: summary::eta(p, self.parallelism, self.mean.mean()),
            failed: self.failed.clone(),
            canary,
            stopped: None,
        };
        self.changed(snap)
    }

    /// The final summary.
    pub fn final_text(
        &mut self,
        results: &Results,
        stopped: Option<&str>,
        canary: Option<CanaryView>,
    ) -> Option<String> {
        let failed = summary::final_failures(results);
        let ok = stopped.is_none() && results.values().all(|(o, _)| o.is_ok());
        let snap = Snapshot {
            prefix: self.prefix.clone(),
            run: self.run.clone(),
            phase: if ok { Phase::Succeeded } else { Phase::Failed },
            started: summary::rfc3339(self.started),
            updated: String::new(),
            counts: summary::final_counts(results),
            total: results.len(),
            eta: None,
            failed,
            canary,
            stopped: stopped.map(str::to_owned),
        };
        self.last = None; // the final state is always written
        self.writing.store(false, Ordering::SeqCst);
        self.changed(snap)
    }

    fn changed(&mut self, mut snap: Snapshot) -> Option<String> {
        self.summary.as_ref()?;
        if self.writing.load(Ordering::SeqCst) {
            return None;
        }
        let key = summary::render(&snap);
        if self.last.as_deref() == Some(key.as_str()) {
            return None;
        }
        self.last = Some(key);
        snap.updated = summary::rfc3339(SystemTime::now());
        Some(summary::render(&snap))
    }

    /// A future writing `text` (one at a time: the next change waits for this one).
    pub fn write(&self, text: String) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (api, target) = (self.api.clone(), self.summary.clone());
        let (writing, warned) = (self.writing.clone(), self.warned.clone());
        writing.store(true, Ordering::SeqCst);
        async move {
            if let Some((cm, key)) = target {
                match api.write_summary(&cm, &key, &text).await {
                    Ok(()) => debug!(configmap = %cm, key = %key, "summary written"),
                    Err(e) if !warned.swap(true, Ordering::SeqCst) => {
                        warn!(configmap = %cm, key = %key, error = %e, "could not write the rollout summary (the log has everything)")
                    }
                    Err(_) => {}
                }
            }
            writing.store(false, Ordering::SeqCst);
        }
    }
}
