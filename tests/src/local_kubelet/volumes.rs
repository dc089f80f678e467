//! Volumes → a mount plan.
//!
//! Each pod volume becomes a host directory: hostPath volumes map into the node's fake host root
//! (`<hosts-dir>/<node>/<hostPath>`), everything else (emptyDir, configMap, secret, downwardAPI,
//! projected) is materialised under the pod's scratch directory. Each container then gets a list
//! of bind mounts (host directory → mountPath) that `process` applies inside a private mount
//! namespace. Planning is pure; the few file helpers at the bottom are the I/O.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume};

use super::env::{field_ref, resource_field, Data, EnvList, PodContext, PodObjects};

/// Where the ServiceAccount credentials appear inside every container.
pub const SA_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Default lifetime the kubelet asks for projected tokens.
pub const DEFAULT_TOKEN_SECONDS: i64 = 3607;

/// What a generated file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileContent {
    /// Fixed bytes (ConfigMap / Secret key, downward-API value, CA bundle...).
    Bytes(Vec<u8>),
    /// A ServiceAccount token bound to the pod, requested when the volume is materialised.
    Token {
        /// Audience, or the API server's default when `None`.
        audience: Option<String>,
        /// Requested lifetime.
        expiration_seconds: i64,
    },
}

/// One file of a generated volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFile {
    /// Relative path inside the volume.
    pub path: String,
    /// Content.
    pub content: FileContent,
    /// Permission bits.
    pub mode: u32,
}

/// How one pod volume is backed on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeKind {
    /// A path in the node's fake host root, with the hostPath `type` check to apply.
    HostPath {
        /// `<hosts-dir>/<node>/<hostPath>`.
        dir: PathBuf,
        /// hostPath `type` ("" when unset).
        type_: String,
    },
    /// An empty scratch directory.
    EmptyDir,
    /// A read-only directory of generated files.
    Files(Vec<VolumeFile>),
}

/// One pod volume, planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedVolume {
    /// Volume name.
    pub name: String,
    /// Backing.
    pub kind: VolumeKind,
}

impl PlannedVolume {
    /// Whether containers always see it read-only (as with the real kubelet).
    pub fn always_read_only(&self) -> bool {
        matches!(self.kind, VolumeKind::Files(_))
    }
}

/// One bind mount inside a container's mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Host path.
    pub source: PathBuf,
    /// Path the process sees.
    pub target: PathBuf,
    /// Remounted read-only after binding.
    pub read_only: bool,
}

/// Joins an absolute in-"host" path under a fake host root, refusing `..` escapes.
pub fn under_root(root: &Path, path: &str) -> Result<PathBuf, String> {
    let mut out = root.to_path_buf();
    for comp in Path::new(path).components() {
        match comp {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(c) => out.push(c),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("path {path:?} escapes its root"))
            }
        }
    }
    Ok(out)
}

fn relative_ok(path: &str) -> Result<(), String> {
    if path.is_empty() || Path::new(path).is_absolute() {
        return Err(format!("file path {path:?} must be relative and non-empty"));
    }
    if Path::new(path)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        return Err(format!("file path {path:?} must not contain '..'"));
    }
    Ok(())
}

/// Files of a ConfigMap/Secret volume or projection: all keys, or just `items`.
fn key_files(
    kind: &str,
    name: &str,
    data: Option<&Data>,
    items: Option<&Vec<KeyToPath>>,
    optional: bool,
    mode: u32,
) -> Result<Vec<VolumeFile>, String> {
    let Some(data) = data else {
        return if optional {
            Ok(vec![])
        } else {
            Err(format!("{kind} {name:?} not found"))
        };
    };
    match items {
        None => Ok(data
            .iter()
            .map(|(k, v)| VolumeFile {
                path: k.clone(),
                content: FileContent::Bytes(v.clone()),
                mode,
            })
            .collect()),
        Some(items) => items
            .iter()
            .filter_map(|it| match data.get(&it.key) {
                Some(v) => Some(relative_ok(&it.path).map(|_| VolumeFile {
                    path: it.path.clone(),
                    content: FileContent::Bytes(v.clone()),
                    mode: it.mode.map(|m| m as u32).unwrap_or(mode),
                })),
                None if optional => None,
                None => Some(Err(format!("{kind} {name:?} has no key {:?}", it.key))),
            })
            .collect(),
    }
}

fn downward_files(
    pod: &Pod,
    items: Option<&Vec<k8s_openapi::api::core::v1::DownwardAPIVolumeFile>>,
    ctx: &PodContext,
    mode: u32,
) -> Result<Vec<VolumeFile>, String> {
    let mut out = vec![];
    for it in items.into_iter().flatten() {
        relative_ok(&it.path)?;
        let value = if let Some(f) = &it.field_ref {
            field_ref(pod, &f.field_path, ctx)?
        } else if let Some(r) = &it.resource_field_ref {
            let default = r.container_name.clone().unwrap_or_default();
            resource_field(pod, &default, r)?
        } else {
            return Err(format!("downwardAPI item {:?} has no source", it.path));
        };
        out.push(VolumeFile {
            path: it.path.clone(),
            content: FileContent::Bytes(value.into_bytes()),
            mode: it.mode.map(|m| m as u32).unwrap_or(mode),
        });
    }
    Ok(out)
}

/// Plans one pod volume.
pub fn plan_volume(
    pod: &Pod,
    v: &Volume,
    objects: &PodObjects,
    ctx: &PodContext,
    node_root: &Path,
) -> Result<PlannedVolume, String> {
    let kind = if let Some(h) = &v.host_path {
        VolumeKind::HostPath {
            dir: under_root(node_root, &h.path)?,
            type_: h.type_.clone().unwrap_or_default(),
        }
    } else if v.empty_dir.is_some() {
        VolumeKind::EmptyDir
    } else if let Some(cm) = &v.config_map {
        let mode = cm.default_mode.unwrap_or(0o644) as u32;
        VolumeKind::Files(key_files(
            "configmap",
            &cm.name,
            objects.config_maps.get(&cm.name),
            cm.items.as_ref(),
            cm.optional.unwrap_or(false),
            mode,
        )?)
    } else if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let mode = s.default_mode.unwrap_or(0o644) as u32;
        VolumeKind::Files(key_files(
            "secret",
            &name,
            objects.secrets.get(&name),
            s.items.as_ref(),
            s.optional.unwrap_or(false),
            mode,
        )?)
    } else if let Some(d) = &v.downward_api {
        let mode = d.default_mode.unwrap_or(0o644) as u32;
        VolumeKind::Files(downward_files(pod, d.items.as_ref(), ctx, mode)?)
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(0o644) as u32;
        let mut files = vec![];
        for src in p.sources.iter().flatten() {
            if let Some(cm) = &src.config_map {
                files.extend(key_files(
                    "configmap",
                    &cm.name,
                    objects.config_maps.get(&cm.name),
                    cm.items.as_ref(),
                    cm.optional.unwrap_or(false),
                    mode,
                )?);
            } else if let Some(s) = &src.secret {
                files.extend(key_files(
                    "secret",
                    &s.name,
                    objects.secrets.get(&s.name),
                    s.items.as_ref(),
                    s.optional.unwrap_or(false),
                    mode,
                )?);
            } else if let Some(d) = &src.downward_api {
                files.extend(downward_files(pod, d.items.as_ref(), ctx, mode)?);
            } else if let Some(t) = &src.service_account_token {
                relative_ok(&t.path)?;
                files.push(VolumeFile {
                    path: t.path.clone(),
                    content: FileContent::Token {
                        audience: t.audience.clone().filter(|a| !a.is_empty()),
                        expiration_seconds: t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS),
                    },
                    // The kubelet writes tokens 0600 unless the pod sets a mode.
                    mode: p.default_mode.map(|m| m as u32).unwrap_or(0o600),
                });
            } else {
                return Err(format!(
                    "volume {:?}: unsupported projection (clusterTrustBundle/podCertificate)",
                    v.name
                ));
            }
        }
        VolumeKind::Files(files)
    } else {
        return Err(format!(
            "volume {:?}: unsupported volume type (supported: hostPath, emptyDir, configMap, \
             secret, downwardAPI, projected)",
            v.name
        ));
    };
    Ok(PlannedVolume {
        name: v.name.clone(),
        kind,
    })
}

/// The synthetic ServiceAccount volume: token bound to the pod, the cluster CA and namespace.
pub fn service_account_files(ca_pem: &[u8], namespace: &str) -> Vec<VolumeFile> {
    vec![
        VolumeFile {
            path: "token".into(),
            content: FileContent::Token {
                audience: None,
                expiration_seconds: DEFAULT_TOKEN_SECONDS,
            },
            mode: 0o644,
        },
        VolumeFile {
            path: "ca.crt".into(),
            content: FileContent::Bytes(ca_pem.to_vec()),
            mode: 0o644,
        },
        VolumeFile {
            path: "namespace".into(),
            content: FileContent::Bytes(namespace.as_bytes().to_vec()),
            mode: 0o644,
        },
    ]
}

/// Whether the pod gets the synthetic ServiceAccount mount: automount not disabled (pod wins
/// over ServiceAccount) and no container already mounts something there (the ServiceAccount
/// admission plugin normally adds a projected `kube-api-access-*` volume, used as is).
pub fn wants_sa_mount(pod: &Pod, sa_automount: Option<bool>) -> bool {
    let Some(spec) = &pod.spec else { return false };
    let enabled = spec
        .automount_service_account_token
        .or(sa_automount)
        .unwrap_or(true);
    let already = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| Path::new(&m.mount_path) == Path::new(SA_MOUNT_PATH));
    enabled && !already
}

/// Everything a container's mount list is built from.
#[derive(Debug, Clone, Default)]
pub struct MountInputs<'a> {
    /// Pod volumes: name → (host directory, always read-only).
    pub volumes: BTreeMap<String, (PathBuf, bool)>,
    /// `--bind SRC=DST[:ro]` mounts for every container.
    pub extra: &'a [Mount],
    /// Directory of the synthetic ServiceAccount volume, when the pod gets one.
    pub service_account: Option<PathBuf>,
    /// Per-container termination-message file → `terminationMessagePath`.
    pub termination: Option<(PathBuf, PathBuf)>,
}

/// Bind mounts of one container, parents before children (so a mount under another mount's
/// target lands on top of it, as with a real runtime).
pub fn container_mounts(
    container: &Container,
    env: &EnvList,
    inputs: &MountInputs<'_>,
) -> Result<Vec<Mount>, String> {
    let mut mounts: Vec<Mount> = inputs.extra.to_vec();
    for vm in container.volume_mounts.iter().flatten() {
        let (dir, ro_volume) = inputs
            .volumes
            .get(&vm.name)
            .ok_or_else(|| format!("volumeMount {:?}: no such volume", vm.name))?;
        let sub = match (&vm.sub_path, &vm.sub_path_expr) {
            (Some(s), _) if !s.is_empty() => Some(s.clone()),
            (_, Some(e)) if !e.is_empty() => {
                Some(super::env::expand(e, |n| env.get(n).map(str::to_string)))
            }
            _ => None,
        };
        let source = match sub {
            Some(s) => {
                relative_ok(&s)?;
                dir.join(s)
            }
            None => dir.clone(),
        };
        if !Path::new(&vm.mount_path).is_absolute() {
            return Err(format!("mountPath {:?} must be absolute", vm.mount_path));
        }
        mounts.push(Mount {
            source,
            target: PathBuf::from(&vm.mount_path),
            read_only: *ro_volume || vm.read_only.unwrap_or(false),
        });
    }
    if let Some(sa) = &inputs.service_account {
        mounts.push(Mount {
            source: sa.clone(),
            target: PathBuf::from(SA_MOUNT_PATH),
            read_only: true,
        });
    }
    if let Some((src, dst)) = &inputs.termination {
        mounts.push(Mount {
            source: src.clone(),
            target: dst.clone(),
            read_only: false,
        });
    }
    // Stable sort: equal depth keeps declaration order.
    mounts.sort_by_key(|m| m.target.components().count());
    Ok(mounts)
}

/// Parses `--bind SRC=DST[:ro]`.
pub fn parse_bind(s: &str) -> Result<Mount, String> {
    let (src, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("expected SRC=DST[:ro], got {s:?}"))?;
    let (dst, ro) = match rest.strip_suffix(":ro") {
        Some(d) => (d, true),
        None => (rest, false),
    };
    if src.is_empty() || !Path::new(dst).is_absolute() {
        return Err(format!("expected SRC=/ABS/DST[:ro], got {s:?}"));
    }
    Ok(Mount {
        source: PathBuf::from(src),
        target: PathBuf::from(dst),
        read_only: ro,
    })
}

// ---- I/O helpers ----------------------------------------------------------------------------

/// Applies a hostPath `type` to its fake-host-root directory: the `*OrCreate` types (and an
/// unset type, since container runtimes create missing bind sources as directories) create it;
/// the others require it to exist with the right kind.
pub fn prepare_host_path(dir: &Path, type_: &str) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(dir).ok();
    let fail = |what: &str| Err(format!("hostPath {} is not {what}", dir.display()));
    match (type_, meta) {
        ("" | "DirectoryOrCreate", None) => std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating hostPath {}: {e}", dir.display())),
        ("FileOrCreate", None) => {
            if let Some(p) = dir.parent() {
                std::fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display()))?;
            }
            std::fs::File::create(dir)
                .map(|_| ())
                .map_err(|e| format!("creating hostPath file {}: {e}", dir.display()))
        }
        ("", Some(_)) => Ok(()),
        ("Directory" | "DirectoryOrCreate", Some(m)) if m.is_dir() => Ok(()),
        ("File" | "FileOrCreate", Some(m)) if m.is_file() => Ok(()),
        ("Socket", Some(m)) if m.file_type().is_socket() => Ok(()),
        ("CharDevice", Some(m)) if m.file_type().is_char_device() => Ok(()),
        ("BlockDevice", Some(m)) if m.file_type().is_block_device() => Ok(()),
        (t, _) => fail(if t.is_empty() { "usable" } else { t }),
    }
}

/// Writes a file atomically (temp file + rename), so a refreshed token is never seen half
/// written through the bind mount.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Live local kubelets of this process, and the mount targets they created on the real
/// filesystem (the binds themselves live in the containers' private mount namespaces, so the
/// targets stay empty): removed when the last kubelet stops.
static CREATED_TARGETS: std::sync::Mutex<CreatedTargets> = std::sync::Mutex::new(CreatedTargets {
    live: 0,
    paths: Vec::new(),
});

/// Mount targets created on the real filesystem, and how many kubelets may still use them.
#[derive(Debug, Default)]
pub struct CreatedTargets {
    live: usize,
    paths: Vec<PathBuf>,
}

impl CreatedTargets {
    /// Creates `target` if missing (see [`ensure_target`]), recording the topmost path created.
    fn ensure(&mut self, source: &Path, target: &Path) -> std::io::Result<()> {
        if target.symlink_metadata().is_ok() {
            return Ok(());
        }
        let mut topmost = target.to_path_buf();
        while let Some(parent) = topmost.parent() {
            if parent.symlink_metadata().is_ok() {
                break;
            }
            topmost = parent.to_path_buf();
        }
        self.paths.push(topmost);
        create_target(source, target)
    }

    /// One user fewer; the last removes what was created (only empty files and directories:
    /// anything else there is not ours).
    fn release(&mut self) {
        self.live = self.live.saturating_sub(1);
        if self.live == 0 {
            for p in std::mem::take(&mut self.paths).iter().rev() {
                remove_empty_tree(p);
            }
        }
    }
}

/// A local kubelet of this process started.
pub fn kubelet_started() {
    CREATED_TARGETS.lock().expect("targets lock").live += 1;
}

/// A local kubelet of this process stopped: the last one removes the mount targets created.
pub fn kubelet_stopped() {
    CREATED_TARGETS.lock().expect("targets lock").release();
}

fn remove_empty_tree(p: &Path) {
    let Ok(md) = p.symlink_metadata() else { return };
    if md.is_dir() {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            remove_empty_tree(&e.path());
        }
        let _ = std::fs::remove_dir(p);
    } else if md.is_file() && md.len() == 0 {
        let _ = std::fs::remove_file(p);
    }
}

/// Creates a mount target on the real filesystem if missing: a file when the source is a file,
/// a directory otherwise; recorded so the last local kubelet removes it.
pub fn ensure_target(source: &Path, target: &Path) -> std::io::Result<()> {
    CREATED_TARGETS
        .lock()
        .expect("targets lock")
        .ensure(source, target)
}

fn create_target(source: &Path, target: &Path) -> std::io::Result<()> {
    if std::fs::metadata(source)?.is_dir() {
        std::fs::create_dir_all(target)
    } else {
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(target)
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_targets_created_are_removed_by_the_last_kubelet_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let (dir_src, file_src) = (d.path().join("srcdir"), d.path().join("srcfile"));
        std::fs::create_dir(&dir_src).unwrap();
        std::fs::write(&file_src, "x").unwrap();
        let mut reg = CreatedTargets {
            live: 2,
            ..CreatedTargets::default()
        };
        let nested = d.path().join("a/b/c");
        reg.ensure(&dir_src, &nested).unwrap();
        reg.ensure(&file_src, &d.path().join("f/token")).unwrap();
        std::fs::create_dir(d.path().join("kept")).unwrap();
        reg.ensure(&dir_src, &d.path().join("kept/x")).unwrap();
        std::fs::write(d.path().join("kept/not-ours"), "data").unwrap();
        assert!(nested.is_dir() && d.path().join("f/token").is_file());
        reg.release();
        assert!(nested.is_dir(), "another kubelet still runs");
        reg.release();
        assert!(!d.path().join("a").exists() && !d.path().join("f").exists());
        assert!(!d.path().join("kept/x").exists());
        assert!(d.path().join("kept/not-ours").is_file(), "not ours: kept");
    }
    use k8s_openapi::api::core::v1::{
        ConfigMapVolumeSource, HostPathVolumeSource, PodSpec, ProjectedVolumeSource,
        ServiceAccountTokenProjection, VolumeMount, VolumeProjection,
    };

    fn ctx() -> PodContext {
        PodContext::for_tests()
    }

    fn pod() -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("p".into());
        p.metadata.namespace = Some("ns".into());
        p.spec = Some(PodSpec::default());
        p
    }

    #[test]
    fn host_paths_map_under_node_root() {
        let root = Path::new("/hosts/n1");
        assert_eq!(under_root(root, "/").unwrap(), root);
        assert_eq!(
            under_root(root, "/etc/containerd/").unwrap(),
            root.join("etc/containerd")
        );
        assert!(under_root(root, "/etc/../../x").is_err());
        let v = Volume {
            name: "host".into(),
            host_path: Some(HostPathVolumeSource {
                path: "/opt/kata".into(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Default::default()
        };
        let p = plan_volume(&pod(), &v, &PodObjects::default(), &ctx(), root).unwrap();
        assert_eq!(
            p.kind,
            VolumeKind::HostPath {
                dir: root.join("opt/kata"),
                type_: "DirectoryOrCreate".into()
            }
        );
        assert!(!p.always_read_only());
    }

    #[test]
    fn config_map_items_and_optional() {
        let mut objs = PodObjects::default();
        objs.config_maps.insert(
            "cfg".into(),
            [
                ("config.yaml".to_string(), b"a: 1".to_vec()),
                ("other".to_string(), b"x".to_vec()),
            ]
            .into(),
        );
        let mk = |name: &str, items: Option<Vec<KeyToPath>>, optional| Volume {
            name: "v".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: name.into(),
                items,
                optional,
                default_mode: None,
            }),
            ..Default::default()
        };
        let all = plan_volume(
            &pod(),
            &mk("cfg", None, None),
            &objs,
            &ctx(),
            Path::new("/"),
        )
        .unwrap();
        let VolumeKind::Files(f) = &all.kind else {
            panic!()
        };
        assert_eq!(f.len(), 2);
        assert!(all.always_read_only());
        let items = vec![KeyToPath {
            key: "config.yaml".into(),
            path: "sub/c.yaml".into(),
            mode: Some(0o600),
        }];
        let one = plan_volume(
            &pod(),
            &mk("cfg", Some(items), None),
            &objs,
            &ctx(),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(
            one.kind,
            VolumeKind::Files(vec![VolumeFile {
                path: "sub/c.yaml".into(),
                content: FileContent::Bytes(b"a: 1".to_vec()),
                mode: 0o600
            }])
        );
        assert!(plan_volume(
            &pod(),
            &mk("nope", None, None),
            &objs,
            &ctx(),
            Path::new("/")
        )
        .is_err());
        let opt = plan_volume(
            &pod(),
            &mk("nope", None, Some(true)),
            &objs,
            &ctx(),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(opt.kind, VolumeKind::Files(vec![]));
        let bad = vec![KeyToPath {
            key: "missing".into(),
            path: "m".into(),
            mode: None,
        }];
        assert!(plan_volume(
            &pod(),
            &mk("cfg", Some(bad), None),
            &objs,
            &ctx(),
            Path::new("/")
        )
        .is_err());
    }

    #[test]
    fn projected_token() {
        let v = Volume {
            name: "kube-api-access-x".into(),
            projected: Some(ProjectedVolumeSource {
                default_mode: None,
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        expiration_seconds: None,
                        audience: None,
                    }),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        };
        let p = plan_volume(&pod(), &v, &PodObjects::default(), &ctx(), Path::new("/")).unwrap();
        let VolumeKind::Files(f) = p.kind else {
            panic!()
        };
        assert_eq!(
            f[0].content,
            FileContent::Token {
                audience: None,
                expiration_seconds: DEFAULT_TOKEN_SECONDS
            }
        );
        let pvc = Volume {
            name: "data".into(),
            persistent_volume_claim: Some(Default::default()),
            ..Default::default()
        };
        assert!(plan_volume(&pod(), &pvc, &PodObjects::default(), &ctx(), Path::new("/")).is_err());
    }

    #[test]
    fn mounts_sorted_with_sub_paths_and_read_only() {
        let c = Container {
            name: "c".into(),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "cfg".into(),
                    mount_path: "/etc/kata-deploy/config.yaml".into(),
                    sub_path: Some("config.yaml".into()),
                    ..Default::default()
                },
                VolumeMount {
                    name: "host".into(),
                    mount_path: "/host".into(),
                    ..Default::default()
                },
                VolumeMount {
                    name: "scratch".into(),
                    mount_path: "/tmp/$(X)".into(),
                    sub_path_expr: Some("d-$(NODE)".into()),
                    read_only: Some(true),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let extra = vec![parse_bind("/payload=/opt/kata-payload:ro").unwrap()];
        let mut env = EnvList::default();
        env.set("NODE", "n1");
        let inputs = MountInputs {
            volumes: [
                ("cfg".to_string(), (PathBuf::from("/w/v/cfg"), true)),
                ("host".to_string(), (PathBuf::from("/hosts/n1"), false)),
                (
                    "scratch".to_string(),
                    (PathBuf::from("/w/v/scratch"), false),
                ),
            ]
            .into(),
            extra: &extra,
            service_account: Some(PathBuf::from("/w/sa")),
            termination: Some(("/w/c.term".into(), "/dev/termination-log".into())),
        };
        let m = container_mounts(&c, &env, &inputs).unwrap();
        let targets: Vec<_> = m.iter().map(|m| m.target.to_str().unwrap()).collect();
        assert_eq!(
            targets,
            [
                "/host",
                "/opt/kata-payload",
                "/tmp/$(X)",
                "/dev/termination-log",
                "/etc/kata-deploy/config.yaml",
                SA_MOUNT_PATH
            ]
        );
        let cfg = &m[4];
        assert_eq!(cfg.source, Path::new("/w/v/cfg/config.yaml"));
        assert!(cfg.read_only);
        assert_eq!(m[2].source, Path::new("/w/v/scratch/d-n1"));
        assert!(m[2].read_only);
        assert!(!m[0].read_only);
        assert!(m[1].read_only);

        let bad = Container {
            volume_mounts: Some(vec![VolumeMount {
                name: "nope".into(),
                mount_path: "/x".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(container_mounts(&bad, &env, &inputs).is_err());
    }

    #[test]
    fn sa_mount_rules() {
        let mut p = pod();
        assert!(wants_sa_mount(&p, None));
        assert!(!wants_sa_mount(&p, Some(false)));
        p.spec.as_mut().unwrap().automount_service_account_token = Some(true);
        assert!(wants_sa_mount(&p, Some(false)));
        p.spec.as_mut().unwrap().automount_service_account_token = Some(false);
        assert!(!wants_sa_mount(&p, None));
    }

    #[test]
    fn host_path_types() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a/b");
        assert!(prepare_host_path(&dir, "Directory").is_err());
        prepare_host_path(&dir, "DirectoryOrCreate").unwrap();
        assert!(dir.is_dir());
        prepare_host_path(&dir, "Directory").unwrap();
        assert!(prepare_host_path(&dir, "File").is_err());
        let f = d.path().join("x/f");
        prepare_host_path(&f, "FileOrCreate").unwrap();
        assert!(f.is_file());
        prepare_host_path(&d.path().join("unset"), "").unwrap();
        assert!(prepare_host_path(&d.path().join("s"), "Socket").is_err());
        write_atomic(&d.path().join("t/token"), b"abc", 0o600).unwrap();
        assert_eq!(std::fs::read(d.path().join("t/token")).unwrap(), b"abc");
    }
}
