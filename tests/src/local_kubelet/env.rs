//! Container environment: `env`, `envFrom`, downward-API `fieldRef` / `resourceFieldRef`,
//! ConfigMap / Secret key references and `$(VAR)` expansion, resolved like the kubelet does.
//!
//! Pure: the referenced ConfigMaps and Secrets are fetched beforehand into [`PodObjects`].

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, EnvVarSource, Pod, ResourceFieldSelector};

/// Key → bytes of one ConfigMap (`data` + `binaryData`) or Secret (`data`).
pub type Data = BTreeMap<String, Vec<u8>>;

/// The ConfigMaps and Secrets a pod references, fetched from its namespace (absent = not found).
#[derive(Debug, Clone, Default)]
pub struct PodObjects {
    /// ConfigMaps by name.
    pub config_maps: BTreeMap<String, Data>,
    /// Secrets by name.
    pub secrets: BTreeMap<String, Data>,
}

/// Facts about where the pod runs that the spec can refer to.
#[derive(Debug, Clone)]
pub struct PodContext {
    /// The node the pod is bound to.
    pub node_name: String,
    /// `status.podIP` (a dummy: every local pod shares the host network).
    pub pod_ip: String,
    /// `status.hostIP`.
    pub host_ip: String,
    /// Address of the API server, as seen by the process.
    pub api_host: String,
    /// Secure port of the API server.
    pub api_port: u16,
}

#[cfg(test)]
impl PodContext {
    /// Node `n1` on loopback, API on port 6443 (unit tests of this module and `volumes`).
    pub(crate) fn for_tests() -> Self {
        Self {
            node_name: "n1".into(),
            pod_ip: "127.0.0.1".into(),
            host_ip: "127.0.0.1".into(),
            api_host: "127.0.0.1".into(),
            api_port: 6443,
        }
    }
}

/// Names of the ConfigMaps and Secrets a pod refers to (env, envFrom, volumes, projections).
pub fn referenced_objects(pod: &Pod) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut cms = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    let Some(spec) = &pod.spec else {
        return (cms, secrets);
    };
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in containers {
        for e in c.env.iter().flatten() {
            if let Some(src) = &e.value_from {
                if let Some(r) = &src.config_map_key_ref {
                    cms.insert(r.name.clone());
                }
                if let Some(r) = &src.secret_key_ref {
                    secrets.insert(r.name.clone());
                }
            }
        }
        for f in c.env_from.iter().flatten() {
            if let Some(r) = &f.config_map_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &f.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            cms.insert(cm.name.clone());
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(s);
        }
        for p in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &p.config_map {
                cms.insert(cm.name.clone());
            }
            if let Some(s) = &p.secret {
                secrets.insert(s.name.clone());
            }
        }
    }
    (cms, secrets)
}

/// Expands `$(VAR)` references like Kubernetes does: unknown references stay verbatim, `$$`
/// is an escaped `$`, any other `$` is literal.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    // Unterminated reference: kept as written.
                    out.push('$');
                    out.push_str(after);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Value of a downward-API `fieldRef` path for env vars and downwardAPI volume files.
pub fn field_ref(pod: &Pod, path: &str, ctx: &PodContext) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let map_lookup = |m: &Option<BTreeMap<String, String>>, key: &str| -> String {
        m.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or_default()
    };
    // `metadata.labels['k']` / `metadata.annotations['k']`
    let subscript = |prefix: &str| -> Option<String> {
        let inner = path.strip_prefix(prefix)?.strip_prefix("['")?;
        inner.strip_suffix("']").map(str::to_string)
    };
    if let Some(k) = subscript("metadata.labels") {
        return Ok(map_lookup(&meta.labels, &k));
    }
    if let Some(k) = subscript("metadata.annotations") {
        return Ok(map_lookup(&meta.annotations, &k));
    }
    let all = |m: &Option<BTreeMap<String, String>>| -> String {
        m.iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v:?}\n"))
            .collect()
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => all(&meta.labels),
        "metadata.annotations" => all(&meta.annotations),
        "spec.nodeName" => spec
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| ctx.node_name.clone()),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => ctx.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => ctx.host_ip.clone(),
        other => return Err(format!("unsupported fieldRef {other:?}")),
    })
}

/// Node allocatable we advertise; a `resourceFieldRef` on an unset limit falls back to it.
pub const NODE_CPU: &str = "8";
/// Memory the local nodes advertise.
pub const NODE_MEMORY: &str = "32Gi";
/// Ephemeral storage the local nodes advertise.
pub const NODE_EPHEMERAL_STORAGE: &str = "100Gi";

/// Parses a Kubernetes quantity (`500m`, `2`, `64Mi`, `1G`, `1e3`) into a number.
pub fn parse_quantity(q: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
    ];
    let q = q.trim();
    for (suffix, mult) in SUFFIXES {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| v * mult);
        }
    }
    q.parse::<f64>().ok()
}

/// Value of a `resourceFieldRef` (limits/requests of a container, in units of the divisor,
/// rounded up like the kubelet does).
pub fn resource_field(
    pod: &Pod,
    default_container: &str,
    sel: &ResourceFieldSelector,
) -> Result<String, String> {
    let cname = sel.container_name.as_deref().unwrap_or(default_container);
    let spec = pod.spec.as_ref().ok_or("pod has no spec")?;
    let c = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == cname)
        .ok_or_else(|| format!("resourceFieldRef: no container {cname:?}"))?;
    let (kind, res) = sel
        .resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resource {:?}", sel.resource))?;
    let res_map = c.resources.as_ref().and_then(|r| match kind {
        "limits" => r.limits.as_ref(),
        "requests" => r.requests.as_ref(),
        _ => None,
    });
    let set = res_map.and_then(|m| m.get(res)).map(|q| q.0.clone());
    let raw = match (set, kind, res) {
        (Some(v), _, _) => v,
        // Unset limits default to node allocatable; unset requests to zero.
        (None, "limits", "cpu") => NODE_CPU.into(),
        (None, "limits", "memory") => NODE_MEMORY.into(),
        (None, "limits", "ephemeral-storage") => NODE_EPHEMERAL_STORAGE.into(),
        (None, "requests", _) => "0".into(),
        _ => return Err(format!("unsupported resource {:?}", sel.resource)),
    };
    let value = parse_quantity(&raw).ok_or_else(|| format!("bad quantity {raw:?}"))?;
    let divisor = match &sel.divisor {
        Some(d) => parse_quantity(&d.0).ok_or_else(|| format!("bad divisor {:?}", d.0))?,
        None => 1.0,
    };
    if divisor <= 0.0 {
        return Err("divisor must be positive".into());
    }
    Ok(format!("{}", (value / divisor).ceil() as i64))
}

/// Ordered environment where a later `set` of the same name replaces the earlier value in place.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EnvList(pub Vec<(String, String)>);

impl EnvList {
    /// Sets (or replaces) a variable.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// Current value of a variable.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
}

fn value_from(
    pod: &Pod,
    container: &Container,
    src: &EnvVarSource,
    objects: &PodObjects,
    ctx: &PodContext,
) -> Result<Option<String>, String> {
    if let Some(f) = &src.field_ref {
        return field_ref(pod, &f.field_path, ctx).map(Some);
    }
    if let Some(r) = &src.resource_field_ref {
        return resource_field(pod, &container.name, r).map(Some);
    }
    if let Some(r) = &src.config_map_key_ref {
        let optional = r.optional.unwrap_or(false);
        return match objects.config_maps.get(&r.name).map(|d| d.get(&r.key)) {
            Some(Some(v)) => utf8(v, &format!("configmap {}/{}", r.name, r.key)).map(Some),
            _ if optional => Ok(None),
            Some(None) => Err(format!("configmap {:?} has no key {:?}", r.name, r.key)),
            None => Err(format!("configmap {:?} not found", r.name)),
        };
    }
    if let Some(r) = &src.secret_key_ref {
        let optional = r.optional.unwrap_or(false);
        return match objects.secrets.get(&r.name).map(|d| d.get(&r.key)) {
            Some(Some(v)) => utf8(v, &format!("secret {}/{}", r.name, r.key)).map(Some),
            _ if optional => Ok(None),
            Some(None) => Err(format!("secret {:?} has no key {:?}", r.name, r.key)),
            None => Err(format!("secret {:?} not found", r.name)),
        };
    }
    Err("env valueFrom without a supported source (fileKeyRef is not supported)".into())
}

/// The variables Kubernetes injects for the `kubernetes` Service (here: the real API server).
pub fn service_env(ctx: &PodContext) -> EnvList {
    let mut e = EnvList::default();
    let (h, p) = (&ctx.api_host, ctx.api_port);
    e.set("KUBERNETES_SERVICE_HOST", h.as_str());
    e.set("KUBERNETES_SERVICE_PORT", p.to_string());
    e.set("KUBERNETES_SERVICE_PORT_HTTPS", p.to_string());
    e.set("KUBERNETES_PORT", format!("tcp://{h}:{p}"));
    e
}

/// Full environment of one container: service variables, then `envFrom`, then `env` (later
/// wins), with `$(VAR)` expansion over what is defined so far, like the kubelet.
pub fn container_env(
    pod: &Pod,
    container: &Container,
    objects: &PodObjects,
    ctx: &PodContext,
) -> Result<EnvList, String> {
    let service = service_env(ctx);
    let mut env = EnvList::default();
    for f in container.env_from.iter().flatten() {
        let prefix = f.prefix.clone().unwrap_or_default();
        let (data, name, optional, kind) = if let Some(r) = &f.config_map_ref {
            (
                objects.config_maps.get(&r.name),
                &r.name,
                r.optional.unwrap_or(false),
                "configmap",
            )
        } else if let Some(r) = &f.secret_ref {
            (
                objects.secrets.get(&r.name),
                &r.name,
                r.optional.unwrap_or(false),
                "secret",
            )
        } else {
            continue;
        };
        match data {
            Some(d) => {
                for (k, v) in d {
                    // The kubelet skips keys that cannot be variable names.
                    if k.contains('=') || k.is_empty() {
                        continue;
                    }
                    env.set(
                        format!("{prefix}{k}"),
                        utf8(v, &format!("{kind} {name}/{k}"))?,
                    );
                }
            }
            None if optional => {}
            None => return Err(format!("{kind} {name:?} not found")),
        }
    }
    for e in container.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (_, Some(src)) => match value_from(pod, container, src, objects, ctx)? {
                Some(v) => v,
                None => continue,
            },
            (Some(v), None) => {
                let lookup = |n: &str| env.get(n).or_else(|| service.get(n)).map(str::to_string);
                expand(v, lookup)
            }
            (None, None) => String::new(),
        };
        env.set(e.name.clone(), value);
    }
    let mut all = service;
    for (k, v) in env.0 {
        all.set(k, v);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, ObjectFieldSelector,
        PodSpec, ResourceRequirements, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn ctx() -> PodContext {
        PodContext::for_tests()
    }

    fn pod(c: Container) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("p".into());
        p.metadata.namespace = Some("ns".into());
        p.metadata.uid = Some("u-1".into());
        p.metadata.labels = Some([("app".to_string(), "x".to_string())].into());
        p.spec = Some(PodSpec {
            node_name: Some("n1".into()),
            containers: vec![c],
            ..Default::default()
        });
        p
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..Default::default()
        }
    }

    fn field(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn expansion_rules() {
        let l = |n: &str| (n == "A").then(|| "1".to_string());
        assert_eq!(expand("x$(A)y", l), "x1y");
        assert_eq!(expand("$(B)", l), "$(B)");
        assert_eq!(expand("$$(A)", l), "$(A)");
        assert_eq!(expand("a$b$", l), "a$b$");
        assert_eq!(expand("$(A", l), "$(A");
        assert_eq!(expand("", l), "");
    }

    #[test]
    fn downward_fields() {
        let p = pod(Container::default());
        let c = ctx();
        assert_eq!(field_ref(&p, "spec.nodeName", &c).unwrap(), "n1");
        assert_eq!(field_ref(&p, "metadata.namespace", &c).unwrap(), "ns");
        assert_eq!(field_ref(&p, "metadata.uid", &c).unwrap(), "u-1");
        assert_eq!(field_ref(&p, "status.podIP", &c).unwrap(), "127.0.0.1");
        assert_eq!(field_ref(&p, "metadata.labels['app']", &c).unwrap(), "x");
        assert_eq!(field_ref(&p, "metadata.labels", &c).unwrap(), "app=\"x\"\n");
        assert_eq!(
            field_ref(&p, "spec.serviceAccountName", &c).unwrap(),
            "default"
        );
        assert!(field_ref(&p, "spec.bogus", &c).is_err());
    }

    #[test]
    fn env_order_refs_and_expansion() {
        let c = Container {
            name: "c".into(),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cm".into(),
                    optional: None,
                }),
                prefix: Some("P_".into()),
                ..Default::default()
            }]),
            env: Some(vec![
                field("NODE", "spec.nodeName"),
                var(
                    "GREETING",
                    "hi $(NODE) $(P_k) $(KUBERNETES_SERVICE_PORT) $(NOPE)",
                ),
                EnvVar {
                    name: "S".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "sec".into(),
                            key: "token".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "OPT".into(),
                    value_from: Some(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "missing".into(),
                            key: "k".into(),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                var("KUBERNETES_SERVICE_HOST", "override"),
            ]),
            ..Default::default()
        };
        let p = pod(c.clone());
        let mut objs = PodObjects::default();
        objs.config_maps
            .insert("cm".into(), [("k".to_string(), b"v".to_vec())].into());
        objs.secrets
            .insert("sec".into(), [("token".to_string(), b"s3".to_vec())].into());
        let env = container_env(&p, &c, &objs, &ctx()).unwrap();
        assert_eq!(env.get("NODE"), Some("n1"));
        assert_eq!(env.get("P_k"), Some("v"));
        assert_eq!(env.get("GREETING"), Some("hi n1 v 6443 $(NOPE)"));
        assert_eq!(env.get("S"), Some("s3"));
        assert_eq!(env.get("OPT"), None);
        assert_eq!(env.get("KUBERNETES_SERVICE_HOST"), Some("override"));
        assert_eq!(env.get("KUBERNETES_PORT"), Some("tcp://127.0.0.1:6443"));

        // A missing, non-optional reference is an error naming the object.
        let err = container_env(&p, &c, &PodObjects::default(), &ctx()).unwrap_err();
        assert!(err.contains("cm"), "{err}");
    }

    #[test]
    fn referenced_names() {
        let c = Container {
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cm".into(),
                    optional: None,
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let (cms, secrets) = referenced_objects(&pod(c));
        assert!(cms.contains("cm"));
        assert!(secrets.is_empty());
    }

    #[test]
    fn resource_fields() {
        let c = Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                limits: Some([("memory".to_string(), Quantity("64Mi".into()))].into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = pod(c);
        let sel = |r: &str, d: Option<&str>| ResourceFieldSelector {
            resource: r.into(),
            divisor: d.map(|d| Quantity(d.into())),
            container_name: None,
        };
        assert_eq!(
            resource_field(&p, "c", &sel("limits.memory", Some("1Mi"))).unwrap(),
            "64"
        );
        assert_eq!(
            resource_field(&p, "c", &sel("limits.cpu", None)).unwrap(),
            "8"
        );
        assert_eq!(
            resource_field(&p, "c", &sel("limits.cpu", Some("1m"))).unwrap(),
            "8000"
        );
        assert_eq!(
            resource_field(&p, "c", &sel("requests.cpu", None)).unwrap(),
            "0"
        );
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert!(resource_field(&p, "zz", &sel("limits.cpu", None)).is_err());
    }
}
