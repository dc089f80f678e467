//! The pure plan of the cri stage: from what detection read, which files should look how
//! (drop-in, in-place edit, import) and which unit loads them.

use std::path::{Path, PathBuf};

use super::detect::{
    containerd_major, host_view, k3s_dir, HostView, CONTAINERD_CONFIG, CONTAINERD_CONF_D,
    CRIO_CONFIG, CRIO_CONF_D, K0S_CONTAINERD_D, K3S_TEMPLATE_V2, K3S_TEMPLATE_V3,
    MICROK8S_TEMPLATE,
};
use crate::config::{CriKind, Install, NodeFacts, ValidConfig};
use crate::containerd::{self, ConfigVersion, KataContainerd, KataHandler, ProxySnapshotter};
use crate::crio::{render_crio_dropin, CrioHandler};
use crate::error::{Result, StageError};
use crate::hostfs::HostFs;

/// Kata handlers for containerd from the configuration.
pub fn kata_containerd(
    cfg: &ValidConfig,
    install: &Install,
    containerd_major: u64,
    arch: Option<&str>,
    runtime_path_honoured: bool,
) -> KataContainerd {
    let snapshotter = install.nydus_snapshotter();
    let arch = arch
        .map(str::to_string)
        .unwrap_or_else(|| crate::shims::kube_arch(std::env::consts::ARCH).to_string());
    KataContainerd {
        image_platform: (containerd_major >= 2).then(|| format!("linux/{arch}")),
        handlers: cfg
            .cfg
            .shims
            .iter()
            .map(|s| KataHandler {
                name: install.handler_of(s),
                // A containerd that ignores runtime_path runs the shim named by an absolute
                // runtime_type (containerd::honours_runtime_path).
                runtime_type: if runtime_path_honoured {
                    install.runtime_type(s)
                } else {
                    install.shim_binary(s).display().to_string()
                },
                runtime_path: install.shim_binary(s).display().to_string(),
                config_path: install.shim_config_path(&s.name).display().to_string(),
                snapshotter: (s.containerd_snapshotter == "nydus").then(|| snapshotter.clone()),
            })
            .collect(),
        proxy: cfg.uses_nydus().then(|| ProxySnapshotter {
            name: snapshotter.clone(),
            address: install.nydus_socket(),
        }),
    }
}

/// How one CRI file should look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// A file we own entirely.
    Whole(Vec<u8>),
    /// Add our handlers to an existing (or new) containerd config or template.
    EditKata {
        /// Whether to set the guest-pull flags (false when a base template owns those tables).
        set_flags: bool,
        /// Schema for a file that does not exist yet.
        new_version: ConfigVersion,
        /// A k3s/rke2 config template: a new one extends the distribution's base template, and
        /// one left with nothing but that is removed on revert (several installs share it).
        template: bool,
    },
    /// Make a containerd config import our drop-in.
    AddImport {
        /// The drop-in path to import.
        import: String,
        /// Schema for a file that does not exist yet.
        new_version: ConfigVersion,
    },
}

/// What the cri stage will configure on this host.
#[derive(Debug, Clone)]
pub struct CriTarget {
    /// The runtime flavour.
    pub kind: CriKind,
    /// Unit restarted to load the configuration.
    pub unit: String,
    /// Files and how they should look.
    pub files: Vec<(PathBuf, Desired)>,
    /// Our handlers.
    pub handlers: Vec<String>,
    /// Containerd handlers and proxy plugin (for edits).
    pub kata: KataContainerd,
    /// Remarks for the operator.
    pub notes: Vec<String>,
}

/// Decides which files to write for this host (pure apart from reading existing files).
pub fn plan_cri_target(
    fs: &HostFs,
    cfg: &ValidConfig,
    facts: &NodeFacts,
    kind: CriKind,
) -> Result<CriTarget> {
    plan(cfg, facts, kind, &host_view(fs, kind)?)
}

/// What to write and which unit to restart, from what detection read (pure: unit-tested on
/// every fixture below).
pub fn plan(
    cfg: &ValidConfig,
    facts: &NodeFacts,
    kind: CriKind,
    view: &HostView,
) -> Result<CriTarget> {
    let install = cfg.install();
    let existing = view.runtime_config.as_deref();
    let major = containerd_major(facts, existing);
    let kata = kata_containerd(
        cfg,
        &install,
        if kind.is_containerd() { major } else { 0 },
        facts.arch.as_deref(),
        containerd::honours_runtime_path(facts.container_runtime_version.as_deref(), major),
    );
    let handlers: Vec<String> = kata.handlers.iter().map(|h| h.name.clone()).collect();
    let dropin = install.dropin_file_name();
    let mut notes = Vec::new();
    let files = match kind {
        CriKind::Containerd => {
            containerd_files(&install, major, existing, &kata, &dropin, &mut notes)
        }
        CriKind::K3s | CriKind::K3sAgent | CriKind::Rke2 => {
            k3s_files(cfg, kind, major, view, &mut notes)
        }
        CriKind::K0s => {
            let version = ConfigVersion::for_containerd_major(major);
            vec![(
                Path::new(K0S_CONTAINERD_D).join(&dropin),
                Desired::Whole(
                    containerd::render_containerd_dropin(version, &kata, true).into_bytes(),
                ),
            )]
        }
        CriKind::Microk8s => vec![(
            PathBuf::from(MICROK8S_TEMPLATE),
            Desired::EditKata {
                set_flags: true,
                new_version: ConfigVersion::V2,
                template: false,
            },
        )],
        CriKind::Crio => crio_files(cfg, &install, view, &dropin)?,
    };
    Ok(CriTarget {
        kind,
        unit: view.unit_guess.clone(),
        files,
        handlers,
        kata,
        notes,
    })
}

/// Plain containerd: a drop-in imported by config.toml on 2.x; config.toml edited on 1.x.
fn containerd_files(
    install: &Install,
    major: u64,
    existing: Option<&str>,
    kata: &KataContainerd,
    dropin: &str,
    notes: &mut Vec<String>,
) -> Vec<(PathBuf, Desired)> {
    let main = PathBuf::from(CONTAINERD_CONFIG);
    if major < 2 {
        if !install.suffix.is_empty() {
            notes.push("containerd 1.x has no usable drop-ins: the shared config.toml is edited in place (multi-install is only fully isolated on containerd >= 2.0)".into());
        }
        let edit = Desired::EditKata {
            set_flags: true,
            new_version: ConfigVersion::V2,
            template: false,
        };
        return vec![(main, edit)];
    }
    let path = Path::new(CONTAINERD_CONF_D).join(dropin);
    let root_version = existing
        .and_then(|t| containerd::parse(t).ok())
        .map(|d| containerd::detect_version(&d));
    let version = containerd::dropin_version_for_root(root_version);
    let whole = containerd::render_containerd_dropin(version, kata, true).into_bytes();
    let import = Desired::AddImport {
        import: path.display().to_string(),
        new_version: ConfigVersion::V3,
    };
    vec![(path, Desired::Whole(whole)), (main, import)]
}

/// k3s / rke2: their containerd template, always edited (another install may share it). On
/// containerd 2, k3s renders config.toml.tmpl when there is no config-v3.toml.tmpl: a node's own
/// config.toml.tmpl is edited, never shadowed by a new v3 template.
fn k3s_files(
    cfg: &ValidConfig,
    kind: CriKind,
    major: u64,
    view: &HostView,
    notes: &mut Vec<String>,
) -> Vec<(PathBuf, Desired)> {
    let dist = if kind == CriKind::Rke2 { "rke2" } else { "k3s" };
    let has = |t: &str| view.templates.iter().any(|x| x == t);
    let tmpl = k3s_dir(dist).join(if major < 2 {
        K3S_TEMPLATE_V2
    } else if !has(K3S_TEMPLATE_V3) && has(K3S_TEMPLATE_V2) {
        notes.push(format!("{dist}: the node's own {K3S_TEMPLATE_V2} is edited ({dist} renders it while there is no {K3S_TEMPLATE_V3}; creating one would silently replace it)"));
        K3S_TEMPLATE_V2
    } else {
        K3S_TEMPLATE_V3
    });
    if cfg.uses_nydus() {
        notes.push(format!("{dist}: the base template owns the CRI image settings; disable_snapshot_annotations/discard_unpacked_layers are left to {dist}"));
    }
    let edit = Desired::EditKata {
        set_flags: false,
        new_version: ConfigVersion::for_containerd_major(major),
        template: true,
    };
    vec![(tmpl, edit)]
}

/// CRI-O: our drop-in in crio.conf.d; a malformed main config is refused before anything is
/// touched (CRI-O cannot start with it either).
fn crio_files(
    cfg: &ValidConfig,
    install: &Install,
    view: &HostView,
    dropin: &str,
) -> Result<Vec<(PathBuf, Desired)>> {
    if let Some(b) = &view.crio_config {
        if let Err(e) = b.parse::<toml_edit::DocumentMut>() {
            return Err(StageError::bad_input(CRIO_CONFIG, format!("is not valid TOML: {}", e.to_string().trim()), "Fix the CRI-O configuration (CRI-O cannot start with it either) and re-run; nothing was changed"));
        }
    }
    let crio: Vec<CrioHandler> = cfg
        .cfg
        .shims
        .iter()
        .map(|s| CrioHandler {
            name: install.handler_of(s),
            runtime_path: install.shim_binary(s).display().to_string(),
            config_path: install.shim_config_path(&s.name).display().to_string(),
            guest_pull: s.crio_pull_type == "guest-pull",
        })
        .collect();
    Ok(vec![(
        Path::new(CRIO_CONF_D).join(format!("50-{dropin}")),
        Desired::Whole(render_crio_dropin(&crio).into_bytes()),
    )])
}

pub(super) fn parse_existing(path: &Path, bytes: &[u8]) -> Result<toml_edit::DocumentMut> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        StageError::bad_input(
            path,
            "is not UTF-8 text",
            "Fix or restore the file and re-run; nothing was changed",
        )
    })?;
    containerd::parse(text).map_err(|e| {
        StageError::bad_input(
            path,
            format!("is not valid TOML: {}", e.0),
            "Fix the syntax (the runtime cannot load it either) and re-run; nothing was changed",
        )
    })
}

/// A k3s/rke2 config template that only extends the distribution's base template (what k3s
/// renders without any template).
pub const K3S_BASE_TEMPLATE: &str = "{{ template \"base\" . }}\n";

/// Whether a k3s/rke2 template is nothing but the base template (comments and blank lines aside).
pub fn is_bare_k3s_template(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    lines.next() == Some(K3S_BASE_TEMPLATE.trim()) && lines.next().is_none()
}

/// Splits a k3s/rke2 template at its base include: (the text up to and including that line,
/// the rest). None when the template does not extend the base.
pub(super) fn split_base_include(text: &str) -> Option<(String, String)> {
    let include = K3S_BASE_TEMPLATE.trim();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        at += line.len();
        if line.trim() == include {
            let head = if line.ends_with('\n') {
                text[..at].to_string()
            } else {
                format!("{}\n", &text[..at])
            };
            return Some((head, text[at..].to_string()));
        }
    }
    None
}

/// Renders the desired content of one file from its base (pristine) content.
pub fn render_desired(
    path: &Path,
    desired: &Desired,
    base: Option<&[u8]>,
    kata: &KataContainerd,
) -> Result<Vec<u8>> {
    match desired {
        Desired::Whole(b) => Ok(b.clone()),
        Desired::EditKata {
            set_flags,
            new_version,
            template,
        } => {
            // A template's text up to its base include is kept out of the TOML edit, verbatim.
            let split = if *template {
                match base {
                    None => Some((K3S_BASE_TEMPLATE.to_string(), String::new())),
                    Some(b) => split_base_include(&String::from_utf8_lossy(b)),
                }
            } else {
                None
            };
            let base = match &split {
                Some((_, rest)) => Some(rest.as_bytes()),
                None => base,
            };
            let mut doc = match base {
                Some(b) => parse_existing(path, b)?,
                None => {
                    let mut d = toml_edit::DocumentMut::new();
                    if let Some(n) = new_version.number() {
                        d.insert("version", toml_edit::value(n));
                    }
                    d
                }
            };
            // A template has no version key of its own (k3s's base carries it): its schema is the
            // distribution's for the containerd it runs.
            // (A template that states its own schema, a node's hand-written one, keeps it.)
            let version = if base.is_some() && (!*template || doc.contains_key("version")) {
                containerd::detect_version(&doc)
            } else {
                *new_version
            };
            // A template extending a distribution's base already has the base's runtimes.
            let is_template = *template || base.is_some_and(|b| b.windows(2).any(|w| w == b"{{"));
            if !version.split_cri_plugins() && !is_template {
                containerd::keep_default_runtime(&mut doc, version);
            }
            containerd::apply_kata(&mut doc, version, kata, *set_flags);
            let out = containerd::serialize(&doc);
            Ok(match split {
                Some((head, _)) => head + &out,
                None => out,
            }
            .into_bytes())
        }
        Desired::AddImport {
            import,
            new_version,
        } => {
            let mut doc = match base {
                Some(b) => parse_existing(path, b)?,
                None => {
                    let mut d = toml_edit::DocumentMut::new();
                    d.insert(
                        "version",
                        toml_edit::value(new_version.number().unwrap_or(3)),
                    );
                    d
                }
            };
            containerd::add_import(&mut doc, import);
            Ok(containerd::serialize(&doc).into_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn bare_k3s_templates_are_recognised() {
        assert!(is_bare_k3s_template(K3S_BASE_TEMPLATE.as_bytes()));
        assert!(is_bare_k3s_template(
            b"{{ template \"base\" . }}\n\n# comment\n"
        ));
        assert!(!is_bare_k3s_template(
            b"{{ template \"base\" . }}\n[plugins.x]\n"
        ));
        assert!(!is_bare_k3s_template(b""));
    }

    #[test]
    fn a_new_k3s_template_starts_with_the_base_include() {
        let cfg = parse_config("shims:\n  - name: qemu\n", Path::new("c")).unwrap();
        let t = plan(
            &cfg,
            &NodeFacts {
                container_runtime_version: Some("containerd://1.7.27-k3s1".into()),
                ..Default::default()
            },
            CriKind::K3s,
            &HostView::default(),
        )
        .unwrap();
        let (p, d) = &t.files[0];
        let first = String::from_utf8(render_desired(p, d, None, &t.kata).unwrap()).unwrap();
        assert!(first.starts_with(K3S_BASE_TEMPLATE), "{first}");
        // A second install edits the first one's template: still first, one include only.
        let second =
            String::from_utf8(render_desired(p, d, Some(first.as_bytes()), &t.kata).unwrap())
                .unwrap();
        assert!(
            second.starts_with(K3S_BASE_TEMPLATE) && second.matches("{{").count() == 1,
            "{second}"
        );
        assert!(
            second
                .contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu]"),
            "{second}"
        );
    }

    /// On containerd 2, k3s renders a node's own config.toml.tmpl while there is no
    /// config-v3.toml.tmpl: that template is edited (a new v3 one would silently replace it, the
    /// node's customisations gone); an existing v3 template, or none at all, gets the v3 one.
    #[test]
    fn k3s_on_containerd_2_edits_the_nodes_own_template_instead_of_shadowing_it() {
        let cfg = parse_config("shims:\n  - name: qemu\n", Path::new("c")).unwrap();
        let facts = NodeFacts {
            container_runtime_version: Some("containerd://2.0.5-k3s1".into()),
            ..Default::default()
        };
        let target = |templates: &[&str]| {
            let view = HostView {
                templates: templates.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            };
            let t = plan(&cfg, &facts, CriKind::K3s, &view).unwrap();
            let name = t.files[0]
                .0
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, t.notes)
        };
        let (own, notes) = target(&[K3S_TEMPLATE_V2]);
        assert_eq!(own, K3S_TEMPLATE_V2);
        assert!(
            notes.iter().any(|n| n.contains("silently replace")),
            "{notes:?}"
        );
        assert_eq!(
            target(&[K3S_TEMPLATE_V2, K3S_TEMPLATE_V3]).0,
            K3S_TEMPLATE_V3
        );
        assert_eq!(target(&[]).0, K3S_TEMPLATE_V3);
        // A hand-written template stating version 2 keeps its schema; the base-include one gets
        // the schema of the base k3s renders for containerd 2.
        let t = plan(
            &cfg,
            &facts,
            CriKind::K3s,
            &HostView {
                templates: vec![K3S_TEMPLATE_V2.into()],
                ..Default::default()
            },
        )
        .unwrap();
        let (p, d) = &t.files[0];
        let own = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n";
        let out = String::from_utf8(render_desired(p, d, Some(own.as_bytes()), &t.kata).unwrap())
            .unwrap();
        assert!(
            out.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu]"),
            "{out}"
        );
        let based = K3S_BASE_TEMPLATE.to_string();
        let out = String::from_utf8(render_desired(p, d, Some(based.as_bytes()), &t.kata).unwrap())
            .unwrap();
        assert!(
            out.contains(
                "[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.kata-qemu]"
            ),
            "{out}"
        );
    }

    /// containerd 1.6 drops runtime_path when it starts a shim (containerd#8207): there the
    /// handler's runtime_type is the shim's absolute path (which 1.6 runs); from 1.7.1 the usual
    /// `io.containerd.<handler>.v2` with runtime_path.
    #[test]
    fn containerd_1_6_gets_the_shim_path_as_runtime_type() {
        let cfg = parse_config("shims:\n  - name: qemu\n", Path::new("c")).unwrap();
        let types = |v: &str| {
            let facts = NodeFacts {
                container_runtime_version: Some(v.into()),
                ..Default::default()
            };
            let t = plan(&cfg, &facts, CriKind::Containerd, &HostView::default()).unwrap();
            (
                t.kata.handlers[0].runtime_type.clone(),
                t.kata.handlers[0].runtime_path.clone(),
            )
        };
        let shim = "/opt/kata/bin/containerd-shim-kata-v2".to_string();
        assert_eq!(types("containerd://1.6.20"), (shim.clone(), shim.clone()));
        assert_eq!(
            types("containerd://1.7.35"),
            ("io.containerd.kata-qemu.v2".to_string(), shim.clone())
        );
        assert_eq!(
            types("containerd://2.4.2"),
            ("io.containerd.kata-qemu.v2".to_string(), shim)
        );
    }

    /// Every fixture: the files planned, how, the unit, and that each renders from the fixture.
    #[test]
    fn plan_on_every_fixture() {
        let cfg = parse_config("shims:\n  - name: qemu\n  - name: qemu-coco-dev\n    containerdSnapshotter: nydus\n    crioPullType: guest-pull\n", Path::new("c")).unwrap();
        let facts = |v: &str| NodeFacts {
            container_runtime_version: Some(v.into()),
            arch: Some("amd64".into()),
            ..Default::default()
        };
        let view = |cfg: Option<&str>, unit: &str| HostView {
            runtime_config: cfg.map(fixture),
            crio_config: None,
            unit_guess: unit.into(),
            templates: Vec::new(),
        };
        struct Case {
            fixture: Option<&'static str>,
            kind: CriKind,
            version: &'static str,
            want: &'static [&'static str],
            dropin_version: Option<ConfigVersion>,
        }
        let cases = [
            Case {
                fixture: Some("containerd-1.6-default.toml"),
                kind: CriKind::Containerd,
                version: "containerd://1.6.20",
                want: &["/etc/containerd/config.toml"],
                dropin_version: None,
            },
            Case {
                fixture: Some("containerd-1.7-default.toml"),
                kind: CriKind::Containerd,
                version: "containerd://1.7.27",
                want: &["/etc/containerd/config.toml"],
                dropin_version: None,
            },
            Case {
                fixture: Some("containerd-noversion.toml"),
                kind: CriKind::Containerd,
                version: "containerd://1.7.27",
                want: &["/etc/containerd/config.toml"],
                dropin_version: None,
            },
            Case {
                fixture: Some("containerd-2.0-default.toml"),
                kind: CriKind::Containerd,
                version: "containerd://2.0.5",
                want: &[
                    "/etc/containerd/conf.d/kata-deploy.toml",
                    "/etc/containerd/config.toml",
                ],
                dropin_version: Some(ConfigVersion::V3),
            },
            // The reported bug: a version-2 root kept on containerd 2.x gets a version-2 drop-in.
            Case {
                fixture: Some("containerd-1.7-default.toml"),
                kind: CriKind::Containerd,
                version: "containerd://2.0.5",
                want: &[
                    "/etc/containerd/conf.d/kata-deploy.toml",
                    "/etc/containerd/config.toml",
                ],
                dropin_version: Some(ConfigVersion::V2),
            },
            Case {
                fixture: Some("containerd-noversion.toml"),
                kind: CriKind::Containerd,
                version: "containerd://2.2.9",
                want: &[
                    "/etc/containerd/conf.d/kata-deploy.toml",
                    "/etc/containerd/config.toml",
                ],
                dropin_version: Some(ConfigVersion::V3),
            },
            Case {
                fixture: None,
                kind: CriKind::Containerd,
                version: "containerd://2.4.2",
                want: &[
                    "/etc/containerd/conf.d/kata-deploy.toml",
                    "/etc/containerd/config.toml",
                ],
                dropin_version: Some(ConfigVersion::V3),
            },
            Case {
                fixture: Some("k3s-generated-config.toml"),
                kind: CriKind::K3s,
                version: "containerd://1.7.27-k3s1",
                want: &["/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl"],
                dropin_version: None,
            },
            Case {
                fixture: None,
                kind: CriKind::Rke2,
                version: "containerd://2.0.5-k3s1",
                want: &["/var/lib/rancher/rke2/agent/etc/containerd/config-v3.toml.tmpl"],
                dropin_version: None,
            },
            Case {
                fixture: None,
                kind: CriKind::K0s,
                version: "containerd://1.7.24",
                want: &["/etc/k0s/containerd.d/kata-deploy.toml"],
                dropin_version: None,
            },
            Case {
                fixture: None,
                kind: CriKind::Microk8s,
                version: "containerd://1.6.28",
                want: &["/var/snap/microk8s/current/args/containerd-template.toml"],
                dropin_version: None,
            },
            Case {
                fixture: None,
                kind: CriKind::Crio,
                version: "cri-o://1.31.2",
                want: &["/etc/crio/crio.conf.d/50-kata-deploy.toml"],
                dropin_version: None,
            },
        ];
        for c in &cases {
            let t = plan(
                &cfg,
                &facts(c.version),
                c.kind,
                &view(c.fixture, "u.service"),
            )
            .unwrap();
            let paths: Vec<String> = t
                .files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            assert_eq!(paths, c.want, "{:?} {} {:?}", c.kind, c.version, c.fixture);
            assert_eq!(t.unit, "u.service");
            assert_eq!(t.handlers, ["kata-qemu", "kata-qemu-coco-dev"]);
            for (p, d) in &t.files {
                let base = if p.ends_with("config.toml") || p.ends_with("containerd-template.toml")
                {
                    c.fixture.map(fixture)
                } else {
                    None
                };
                let out =
                    render_desired(p, d, base.as_deref().map(str::as_bytes), &t.kata).unwrap();
                let text = String::from_utf8(out).unwrap();
                assert!(
                    text.contains("kata-qemu-coco-dev") || text.contains("kata-deploy.toml"),
                    "{p:?}: {text}"
                );
                if let (Some(v), Desired::Whole(_)) = (c.dropin_version, d) {
                    assert_eq!(
                        containerd::detect_version(&containerd::parse(&text).unwrap()),
                        v,
                        "{:?} {}",
                        c.fixture,
                        c.version
                    );
                    assert!(
                        text.contains("runtime_platforms"),
                        "containerd 2.x guest pull: {text}"
                    );
                }
            }
        }
        // A malformed CRI-O main config is refused before anything is planned.
        let bad = HostView {
            runtime_config: None,
            crio_config: Some("[crio\n".into()),
            unit_guess: "crio.service".into(),
            templates: Vec::new(),
        };
        assert!(plan(&cfg, &facts("cri-o://1.31.2"), CriKind::Crio, &bad).is_err());
    }
}
