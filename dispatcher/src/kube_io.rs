//! Thin API shell: every call the dispatcher makes, with bounded retries of transient errors.

use crate::supersede::{Kind, Leftover};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions,
};
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
    /// Discovery (the initial lists, or stopping the superseded dispatcher) did not finish in time.
    #[error("{what} did not finish within {limit}: {last}. Check the API server's health and this identity's rights, or raise --discovery-timeout")]
    DiscoveryTimeout {
        /// What was waited for.
        what: String,
        /// The limit.
        limit: String,
        /// The last error or state seen.
        last: String,
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
        kube::Error::Api(s) => {
            matches!(s.code, 429 | 500 | 502 | 503 | 504)
                || s.reason == "ServerTimeout"
                || s.reason == "Timeout"
        }
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
pub async fn with_retry<T, F, Fut>(
    what: &str,
    stats: &RetryStats,
    budget: Duration,
    mut op: F,
) -> Result<T, kube::Error>
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
    // The backoff crate never consults its elapsed-time limit when an error names its own delay
    // (429 with Retry-After): the budget is enforced here for those.
    let started = std::time::Instant::now();
    backoff::future::retry(policy, || {
        let fut = op();
        async move {
            fut.await.map_err(|e| {
                if !is_transient(&e) {
                    return backoff::Error::permanent(e);
                }
                match retry_after(&e) {
                    Some(after) if started.elapsed() + after > budget => {
                        tracing::warn!(call = what, error = %e, budget = ?budget, "still throttled at the end of the call's retry budget; giving up");
                        backoff::Error::permanent(e)
                    }
                    after => {
                        stats.record();
                        tracing::warn!(call = what, error = %e, "transient API error, retrying");
                        match after {
                            Some(after) => backoff::Error::retry_after(e, after),
                            None => backoff::Error::transient(e),
                        }
                    }
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
    /// CronJobs in the run's namespace (the release's reconcile CronJob, removed on uninstall).
    pub cronjobs: Api<CronJob>,
    /// Jobs as untyped objects (for creating from the template without dropping fields).
    pub raw_jobs: Api<DynamicObject>,
    /// Pods in the namespace (watched: a node is busy while a pod of ours runs there).
    pub pods: Api<Pod>,
    /// Events in `default`, where events about cluster-scoped objects (Nodes) must live.
    pub node_events: Api<CoreEvent>,
    client: Client,
    namespace: String,
    /// Retry counter.
    pub stats: RetryStats,
}

const CALL_BUDGET: Duration = Duration::from_secs(60);

/// Objects per page of a metadata-only list (a name, a UID and a few labels each).
const LIST_PAGE: u32 = 500;

/// A listed Job or pod of the superseded dispatcher, as [`crate::supersede`] reads it.
fn leftover(kind: Kind, meta: ObjectMeta) -> Leftover {
    let node = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::template::ANNOTATION_NODE_NAME))
        .cloned()
        .unwrap_or_default();
    Leftover {
        kind,
        name: meta.name.unwrap_or_default(),
        uid: meta.uid.unwrap_or_default(),
        node,
        deleting: meta.deletion_timestamp.is_some(),
    }
}

/// Events about a Node go to `default` (the API server refuses other namespaces for an object
/// without one), where `kubectl describe node` finds them.
pub const NODE_EVENTS_NAMESPACE: &str = "default";

/// One right the run needs: verb, resource (with API group), namespace (`None`: cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Right {
    /// Verb.
    pub verb: &'static str,
    /// API group ("" for core).
    pub group: &'static str,
    /// Resource.
    pub resource: &'static str,
    /// Namespace, or the cluster.
    pub namespace: Option<String>,
    /// One object by name (RBAC `resourceNames`), or every object.
    pub name: Option<String>,
}

impl ClusterApi {
    /// Handles for `namespace`.
    pub fn new(client: Client, namespace: &str) -> Self {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("batch", "v1", "Job"));
        Self {
            nodes: Api::all(client.clone()),
            jobs: Api::namespaced(client.clone(), namespace),
            cronjobs: Api::namespaced(client.clone(), namespace),
            raw_jobs: Api::namespaced_with(client.clone(), namespace, &ar),
            pods: Api::namespaced(client.clone(), namespace),
            node_events: Api::namespaced(client.clone(), NODE_EVENTS_NAMESPACE),
            client,
            namespace: namespace.to_owned(),
            stats: RetryStats::default(),
        }
    }

    /// Checks up front every right the run needs, so a denied run creates nothing.
    pub async fn preflight(&self, rights: &[Right]) -> Result<(), SetupError> {
        let ssar: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        for r in rights {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(r.verb.into()),
                        resource: Some(r.resource.into()),
                        group: Some(r.group.into()),
                        namespace: r.namespace.clone(),
                        name: r.name.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let pp = PostParams::default();
            let answer = with_retry("selfsubjectaccessreview", &self.stats, CALL_BUDGET, || {
                ssar.create(&pp, &review)
            })
            .await
            .map_err(|source| SetupError::Api {
                what: format!("access review ({} {})", r.verb, r.resource),
                source,
            })?;
            if !answer.status.is_some_and(|s| s.allowed) {
                return Err(SetupError::Forbidden {
                    verb: r.verb.into(),
                    resource: r.resource.into(),
                    scope: r
                        .namespace
                        .as_ref()
                        .map_or("the cluster".into(), |n| format!("namespace {n}")),
                });
            }
        }
        Ok(())
    }

    /// The owner Job's UID.
    pub async fn owner_uid(&self, name: &str) -> Result<String, SetupError> {
        match with_retry("get owner job", &self.stats, CALL_BUDGET, || {
            self.jobs.get(name)
        })
        .await
        {
            Ok(job) => Ok(job.metadata.uid.unwrap_or_default()),
            Err(kube::Error::Api(s)) if s.code == 404 => Err(SetupError::OwnerNotFound {
                name: name.into(),
                namespace: self.namespace.clone(),
            }),
            Err(kube::Error::Api(s)) if s.code == 403 => Err(SetupError::Forbidden {
                verb: "get".into(),
                resource: format!("jobs/{name} (the owner Job)"),
                scope: format!("namespace {}", self.namespace),
            }),
            Err(source) => Err(SetupError::Api {
                what: format!("get owner Job {name}"),
                source,
            }),
        }
    }

    /// Creates one per-node Job from its specialised JSON; returns its UID.
    pub async fn create_job(&self, job: &serde_json::Value) -> Result<String, kube::Error> {
        let obj: DynamicObject =
            serde_json::from_value(job.clone()).map_err(kube::Error::SerdeError)?;
        let pp = PostParams::default();
        with_retry("create job", &self.stats, CALL_BUDGET, || {
            self.raw_jobs.create(&pp, &obj)
        })
        .await
        .map(|o| o.metadata.uid.unwrap_or_default())
    }

    /// Deletes a Job in the foreground (it disappears only once its pods are gone), only if it
    /// still has `uid` when given; a Job already gone (or replaced under the same name) is fine.
    pub async fn delete_job_uid(&self, name: &str, uid: Option<&str>) -> Result<(), kube::Error> {
        let mut dp = DeleteParams::foreground();
        if let Some(uid) = uid {
            dp = dp.preconditions(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            });
        }
        match with_retry("delete job", &self.stats, CALL_BUDGET, || {
            self.jobs.delete(name, &dp)
        })
        .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || (s.code == 409 && uid.is_some()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes a Job and (foreground) its pods; a Job already gone is fine.
    pub async fn delete_job(&self, name: &str) -> Result<(), kube::Error> {
        self.delete_job_uid(name, None).await
    }

    /// Records an Event about a Node (shown by `kubectl describe node`).
    pub async fn node_event(
        &self,
        node: &str,
        node_uid: &str,
        warning: bool,
        reason: &str,
        message: &str,
    ) -> Result<(), kube::Error> {
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let suffix = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let event = CoreEvent {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("{node}.{suffix}")),
                namespace: Some(NODE_EVENTS_NAMESPACE.into()),
                ..Default::default()
            },
            involved_object: k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.into()),
                uid: Some(node_uid.into()).filter(|u: &String| !u.is_empty()),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(crate::status::one_line(message, 1000)),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some(crate::template::MANAGER.into()),
                host: None,
            }),
            reporting_component: Some(crate::template::MANAGER.into()),
            reporting_instance: Some(self.namespace.clone()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        };
        let pp = PostParams::default();
        with_retry("create event", &self.stats, Duration::from_secs(15), || {
            self.node_events.create(&pp, &event)
        })
        .await
        .map(|_| ())
    }

    /// Sets (or, with `None`, removes) an annotation on a Node, only if it still has `uid`.
    pub async fn annotate_node(
        &self,
        node: &str,
        uid: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), kube::Error> {
        self.patch_node_metadata("patch node", node, uid, "annotations", key, value)
            .await
    }

    /// Sets (or, with `None`, removes) a label on a Node, only if it still has `uid`.
    pub async fn label_node(
        &self,
        node: &str,
        uid: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), kube::Error> {
        self.patch_node_metadata("label node", node, uid, "labels", key, value)
            .await
    }

    /// One key of a Node's `labels` or `annotations` (a merge patch guarded by its uid); a node
    /// gone since is not an error.
    async fn patch_node_metadata(
        &self,
        what: &'static str,
        node: &str,
        uid: &str,
        map: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), kube::Error> {
        let patch = serde_json::json!({"metadata": {"uid": uid, map: {key: value}}});
        let pp = PatchParams::default();
        let patch = Patch::Merge(&patch);
        match with_retry(what, &self.stats, Duration::from_secs(15), || {
            self.nodes.patch(node, &pp, &patch)
        })
        .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The value of `key` in ConfigMap `name` of the namespace (`None`: no such key or ConfigMap).
    pub async fn read_configmap_key(
        &self,
        name: &str,
        key: &str,
    ) -> Result<Option<String>, kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let cm = with_retry(
            "read configmap",
            &self.stats,
            Duration::from_secs(15),
            || api.get_opt(name),
        )
        .await?;
        Ok(cm.and_then(|c| c.data).and_then(|mut d| d.remove(key)))
    }

    /// Writes `text` under `key` of ConfigMap `name` in the namespace (a merge patch: the other
    /// keys, written by the other dispatcher roles, are left alone).
    pub async fn write_summary(
        &self,
        name: &str,
        key: &str,
        text: &str,
    ) -> Result<(), kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = serde_json::json!({"data": {key: text}});
        let pp = PatchParams::default();
        let patch = Patch::Merge(&patch);
        with_retry(
            "write summary",
            &self.stats,
            Duration::from_secs(15),
            || api.patch(name, &pp, &patch),
        )
        .await
        .map(|_| ())
    }

    /// The Jobs and live pods carrying `selector`, in this namespace: metadata only and page by
    /// page, so stopping a large install (polled every second) costs names, not whole objects.
    pub async fn list_leftovers(&self, selector: &str) -> Result<Vec<Leftover>, kube::Error> {
        let jobs = ListParams::default().labels(selector);
        // Finished pods no longer run anything on their host: not waited for (as before).
        let live = jobs
            .clone()
            .fields("status.phase!=Succeeded,status.phase!=Failed");
        let mut out = self
            .list_meta_pages(&self.jobs, jobs, "list jobs", |m| leftover(Kind::Job, m))
            .await?;
        out.extend(
            self.list_meta_pages(&self.pods, live, "list pods", |m| leftover(Kind::Pod, m))
                .await?,
        );
        Ok(out)
    }

    /// Every object of a (label- or field-selected) list, metadata only, `LIST_PAGE` at a time,
    /// each reduced by `keep` as its page arrives: a page's metadata (managedFields included,
    /// several KB an object) is dropped before the next is read, so a listing of 5,000 Jobs
    /// costs what is kept of them, not their metadata.
    async fn list_meta_pages<K, T>(
        &self,
        api: &Api<K>,
        lp: ListParams,
        what: &str,
        keep: impl Fn(ObjectMeta) -> T,
    ) -> Result<Vec<T>, kube::Error>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let mut lp = lp.limit(LIST_PAGE);
        let mut out = Vec::new();
        loop {
            let page =
                with_retry(what, &self.stats, CALL_BUDGET, || api.list_metadata(&lp)).await?;
            out.extend(page.items.into_iter().map(|o| keep(o.metadata)));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => lp = lp.continue_token(&token),
                None => return Ok(out),
            }
        }
    }

    /// Reads one Job (after a create conflict).
    pub async fn get_job(&self, name: &str) -> Result<Option<Job>, kube::Error> {
        with_retry("get job", &self.stats, CALL_BUDGET, || {
            self.jobs.get_opt(name)
        })
        .await
    }

    /// Why a failed Job's pod failed; `None` when unknown or not permitted (pods list is optional).
    pub async fn failure_detail(&self, job_name: &str) -> Option<String> {
        let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job_name}"));
        match with_retry("list pods", &self.stats, Duration::from_secs(15), || {
            self.pods.list(&lp)
        })
        .await
        {
            Ok(list) => crate::status::pod_failure_detail(&list.items),
            Err(e) => {
                tracing::debug!(job = job_name, error = %e, "cannot read the failed Job's pods; reporting the Job condition only");
                None
            }
        }
    }
}
