//! Typed errors of the local kubelet, each carrying the pod / container / file it is about.

use std::path::PathBuf;

/// Everything that can go wrong while serving a local node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be read or does not name a usable API server.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },

    /// A call to the API server failed.
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },

    /// A local file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The pod spec asks for something this stand-in cannot provide (bad reference, unsupported
    /// field, missing ConfigMap key...). The pod is failed with this message.
    #[error("pod {pod}, container {container}: {reason}")]
    Spec {
        pod: String,
        container: String,
        reason: String,
    },

    /// No built binary is mapped to a container image and the container has no command to run.
    #[error("pod {pod}, container {container}: no binary mapped for image {image:?} (use --image NAME=PATH)")]
    UnmappedImage {
        pod: String,
        container: String,
        image: String,
    },
}

impl Error {
    /// Wraps an API error with a description of the call.
    pub fn kube(what: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            what: what.into(),
            source,
        }
    }

    /// Wraps an I/O error with the operation and the path.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// A spec error about one container of one pod.
    pub fn spec(pod: &str, container: &str, reason: impl Into<String>) -> Self {
        Error::Spec {
            pod: pod.to_string(),
            container: container.to_string(),
            reason: reason.into(),
        }
    }
}

/// Result alias of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;
