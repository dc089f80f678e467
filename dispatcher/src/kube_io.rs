//! Thin API shell: every call the dispatcher makes, with bounded retries of transient errors.

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Errors that stop the run before anything was created (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The identity lacks a permission.
    #[error("RBAC denied: this identity may not {verb} {resource} in {scope}. Grant it (the chart's dispatcher Role/ClusterRole does) and re-run")]
    Forbidden {
        /// Verb.
        verb: String,
        /// Resource.
        resource: String,
        /// Namespace or "the cluster".
        scope: String,
    },
    /// The owner Job does not exist.
    #[error("owner Job {name:?} not found in namespace {namespace:?}: pass --owner-job with the name of the Job running this dispatcher, or omit it when running standalone")]
    OwnerNotFound {
        /// Owner Job name.
        name: String,
        /// Namespace.
        namespace: String,
    },
    /// The API server could not be reached or answered with an error.
    #[error("API call {what} failed: {source}. Check the API server address and credentials (KUBECONFIG or the in-cluster ServiceAccount)")]
    Api {
        /// Which call.
        what: String,
        /// Cause.
        source: kube::Error,
    },
}

/// Shared counter of retried calls and resumed watches, reported at the end of a run.
#[derive(Debug, Clone, Default)]
pub struct RetryStats(Arc<AtomicUsize>);

impl RetryStats {
    /// Retries so far.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one retried call or one resumed watch.
    pub fn record(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether an error is worth retrying: throttling, server errors, timeouts, broken connections.
pub fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 429 | 500 | 502 | 503 | 504) || s.reason == "ServerTimeout" || s.reason == "Timeout",
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

fn retry_after(e: &kube::Error) -> Option<Duration> {
    match e {
        kube::Error::Api(s) if s.code == 429 => s
            .details
            .as_ref()
            .map(|d| d.retry_after_seconds)
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(u64::from(s).min(30))),
        _ => None,
    }
}

/// Runs `op` with exponential backoff on transient errors, for at most `budget`.
pub async fn with_retry<T, F, Fut>(what: &str, stats: &RetryStats, budget: Duration, mut op: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let policy = backoff::ExponentialBackoff {
        initial_interval: Duration::from_millis(200),
        max_interval: Duration::from_secs(5),
        max_elapsed_time: Some(budget),
        ..Default::default()
    };
    backoff::future::retry(policy, || {
        let fut = op();
        async {
            fut.await.map_err(|e| {
                if is_transient(&e) {
                    stats.record();
                    tracing::warn!(call = what, error = %e, "transient API error, retrying");
                    match retry_after(&e) {
                        Some(after) => backoff::Error::retry_after(e, after),
                        None => backoff::Error::transient(e),
                    }
                } else {
                    backoff::Error::permanent(e)
                }
            })
        }
    })
    .await
}

/// The API handles of one run.
#[derive(Clone)]
pub struct ClusterApi {
    /// Nodes (cluster scope).
    pub nodes: Api<Node>,
    /// Jobs in the run's namespace (typed, for reading).
    pub jobs: Api<Job>,
    /// Jobs as untyped objects (for creating from the template without dropping fields).
    pub raw_jobs: Api<DynamicObject>,
    /// Pods in the namespace (only read for failure details).
    pub pods: Api<Pod>,
    client: Client,
    namespace: String,
    /// Retry counter.
    pub stats: RetryStats,
}

const CALL_BUDGET: Duration = Duration::from_secs(60);

impl ClusterApi {
    /// Handles for `namespace`.
    pub fn new(client: Client, namespace: &str) -> Self {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("batch", "v1", "Job"));
        Self {
            nodes: Api::all(client.clone()),
            jobs: Api::namespaced(client.clone(), namespace),
            raw_jobs: Api::namespaced_with(client.clone(), namespace, &ar),
            pods: Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.to_owned(),
            stats: RetryStats::default(),
        }
    }

    /// Checks up front every right the run needs, so a denied run creates nothing.
    pub async fn preflight(&self) -> Result<(), SetupError> {
        let checks = [
            ("list", "nodes", None),
            ("watch", "nodes", None),
            ("create", "jobs", Some(self.namespace.as_str())),
            ("delete", "jobs", Some(self.namespace.as_str())),
            ("watch", "jobs", Some(self.namespace.as_str())),
        ];
        let ssar: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        for (verb, resource, ns) in checks {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(verb.into()),
                        resource: Some(resource.into()),
                        group: Some(if resource == "jobs" { "batch".into() } else { String::new() }),
                        namespace: ns.map(str::to_owned),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let pp = PostParams::default();
            let answer = with_retry("selfsubjectaccessreview", &self.stats, CALL_BUDGET, || ssar.create(&pp, &review))
                .await
                .map_err(|source| SetupError::Api { what: format!("access review ({verb} {resource})"), source })?;
            if !answer.status.is_some_and(|s| s.allowed) {
                return Err(SetupError::Forbidden {
                    verb: verb.into(),
                    resource: resource.into(),
                    scope: ns.map_or("the cluster".into(), |n| format!("namespace {n}")),
                });
            }
        }
        Ok(())
    }

    /// The owner Job's UID.
    pub async fn owner_uid(&self, name: &str) -> Result<String, SetupError> {
        match with_retry("get owner job", &self.stats, CALL_BUDGET, || self.jobs.get(name)).await {
            Ok(job) => Ok(job.metadata.uid.unwrap_or_default()),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                Err(SetupError::OwnerNotFound { name: name.into(), namespace: self.namespace.clone() })
            }
            Err(kube::Error::Api(s)) if s.code == 403 => Err(SetupError::Forbidden {
                verb: "get".into(),
                resource: format!("jobs/{name} (the owner Job)"),
                scope: format!("namespace {}", self.namespace),
            }),
            Err(source) => Err(SetupError::Api { what: format!("get owner Job {name}"), source }),
        }
    }

    /// Creates one per-node Job from its specialised JSON.
    pub async fn create_job(&self, job: &serde_json::Value) -> Result<(), kube::Error> {
        let obj: DynamicObject = serde_json::from_value(job.clone()).map_err(kube::Error::SerdeError)?;
        let pp = PostParams::default();
        with_retry("create job", &self.stats, CALL_BUDGET, || self.raw_jobs.create(&pp, &obj))
            .await
            .map(|_| ())
    }

    /// Deletes a Job and (foreground) its pods; a Job already gone is fine.
    pub async fn delete_job(&self, name: &str) -> Result<(), kube::Error> {
        let dp = DeleteParams::foreground();
        match with_retry("delete job", &self.stats, CALL_BUDGET, || self.jobs.delete(name, &dp)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads one Job (after a create conflict).
    pub async fn get_job(&self, name: &str) -> Result<Option<Job>, kube::Error> {
        with_retry("get job", &self.stats, CALL_BUDGET, || self.jobs.get_opt(name)).await
    }

    /// Why a failed Job's pod failed; `None` when unknown or not permitted (pods list is optional).
    pub async fn failure_detail(&self, job_name: &str) -> Option<String> {
        let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job_name}"));
        match with_retry("list pods", &self.stats, Duration::from_secs(15), || self.pods.list(&lp)).await {
            Ok(list) => crate::status::pod_failure_detail(&list.items),
            Err(e) => {
                tracing::debug!(job = job_name, error = %e, "cannot read the failed Job's pods; reporting the Job condition only");
                None
            }
        }
    }
}
