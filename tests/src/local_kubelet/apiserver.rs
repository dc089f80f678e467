//! The API server as the container processes see it: address, secure port and CA bundle, all
//! taken from the kubelet's kubeconfig.

use std::path::Path;

use base64::Engine;
use kube::config::Kubeconfig;

use super::error::{Error, Result};

/// Where containers reach the API server and how they verify it.
#[derive(Debug, Clone)]
pub struct ApiEndpoint {
    /// `KUBERNETES_SERVICE_HOST` (the API server listens on loopback).
    pub host: String,
    /// `KUBERNETES_SERVICE_PORT`: the port of the kubeconfig's server URL.
    pub port: u16,
    /// PEM CA bundle written as `ca.crt` into the ServiceAccount directory.
    pub ca_pem: Vec<u8>,
}

/// Port of a server URL (`https://127.0.0.1:6443/` → 6443; no port → the scheme's default).
pub fn server_port(server: &str) -> Result<u16, String> {
    let (scheme, rest) = server
        .split_once("://")
        .ok_or_else(|| format!("server {server:?} has no scheme"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    // `[::1]:6443` keeps its colons inside the brackets.
    let host_end = authority.rfind(']').map(|i| i + 1).unwrap_or(0);
    match authority[host_end..].rsplit_once(':') {
        Some((_, p)) => p
            .parse()
            .map_err(|_| format!("server {server:?} has a bad port")),
        None => match scheme {
            "https" => Ok(443),
            "http" => Ok(80),
            s => Err(format!("server {server:?}: unknown scheme {s:?}")),
        },
    }
}

/// Reads the endpoint from the kubeconfig's current context.
pub fn from_kubeconfig(path: &Path) -> Result<ApiEndpoint> {
    let bad = |reason: String| Error::Kubeconfig {
        path: path.to_path_buf(),
        reason,
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let ctx_name = kc
        .current_context
        .clone()
        .ok_or_else(|| bad("no current-context".into()))?;
    let ctx = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .and_then(|c| c.context.as_ref())
        .ok_or_else(|| bad(format!("context {ctx_name:?} not found")))?;
    let cluster = kc
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| bad(format!("cluster {:?} not found", ctx.cluster)))?;
    let server = cluster
        .server
        .as_deref()
        .ok_or_else(|| bad("cluster has no server".into()))?;
    let port = server_port(server).map_err(bad)?;
    let ca_pem = if let Some(data) = &cluster.certificate_authority_data {
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| bad(format!("certificate-authority-data: {e}")))?
    } else if let Some(file) = &cluster.certificate_authority {
        // Relative paths are relative to the kubeconfig's directory.
        let p = path.parent().unwrap_or(Path::new(".")).join(file);
        std::fs::read(&p).map_err(|e| Error::io("reading CA", p, e))?
    } else {
        return Err(bad("cluster has no certificate authority".into()));
    };
    Ok(ApiEndpoint {
        host: "127.0.0.1".into(),
        port,
        ca_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(server_port("https://127.0.0.1:6443"), Ok(6443));
        assert_eq!(server_port("https://127.0.0.1:36443/"), Ok(36443));
        assert_eq!(server_port("https://[::1]:8443/x"), Ok(8443));
        assert_eq!(server_port("https://[::1]"), Ok(443));
        assert_eq!(server_port("https://example.org"), Ok(443));
        assert!(server_port("127.0.0.1:6443").is_err());
        assert!(server_port("https://h:x").is_err());
    }

    #[test]
    fn reads_kubeconfig() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("ca.crt"), "PEM").unwrap();
        let kc = d.path().join("kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:7443\n    certificate-authority: ca.crt\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\nusers:\n- name: u\n  user: {}\n",
        )
        .unwrap();
        let e = from_kubeconfig(&kc).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 7443));
        assert_eq!(e.ca_pem, b"PEM");
    }
}
