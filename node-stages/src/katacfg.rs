//! Per-shim Kata configuration: a copy of the base configuration (paths moved to the install
//! prefix) plus config.d drop-ins: ours (timeouts, annotations, debug) and the user's.

use std::path::{Path, PathBuf};

use toml_edit::{value, Array, DocumentMut, Item, Table};

use crate::config::{Install, ShimConfig, StageConfig};
use crate::error::{Result, StageError};

/// The prefix the payload's configurations are written for.
pub const PAYLOAD_PREFIX: &str = "/opt/kata";

/// A file generated from configuration (not copied from the payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedFile {
    /// Host path.
    pub path: PathBuf,
    /// Content.
    pub content: Vec<u8>,
    /// Mode bits.
    pub mode: u32,
}

/// Payload-relative path of a built-in shim's base configuration: a Kata release keeps the
/// runtime-rs ones in their own directory.
pub fn base_config_rel(base: &str) -> PathBuf {
    let runtime_rs = crate::shims::lookup(base).is_some_and(|s| s.runtime_rs);
    let dir = if runtime_rs {
        "share/defaults/kata-containers/runtime-rs"
    } else {
        "share/defaults/kata-containers"
    };
    PathBuf::from(format!("{dir}/configuration-{base}.toml"))
}

/// Rewrites payload paths (/opt/kata/...) to the install prefix (multi-install, custom prefix).
pub fn relocate_config(base_text: &str, prefix: &Path) -> String {
    let prefix = prefix.to_string_lossy();
    if prefix == PAYLOAD_PREFIX {
        return base_text.to_string();
    }
    base_text.replace(&format!("{PAYLOAD_PREFIX}/"), &format!("{prefix}/"))
}

/// The `[hypervisor.<name>]` table name used by a base configuration.
pub fn hypervisor_table(base_text: &str, file: &Path) -> Result<String> {
    let doc = parse_base(base_text, file)?;
    doc.get("hypervisor")
        .and_then(Item::as_table_like)
        .and_then(|t| t.iter().next().map(|(k, _)| k.to_string()))
        .ok_or_else(|| {
            StageError::bad_input(
                file,
                "base configuration has no [hypervisor.<name>] table",
                "Rebuild the stage image",
            )
        })
}

/// Why `v` cannot be the value of a kernel command-line parameter, or None when it can: the
/// kernel splits its command line at whitespace and gives quotes a meaning of their own, and the
/// agent reads `agent.<key>=<value>` from it verbatim.
pub fn kernel_param_value_problem(v: &str) -> Option<&'static str> {
    if v.chars().any(char::is_whitespace) {
        Some("whitespace")
    } else if v.contains(['"', '\'']) {
        Some("a quote")
    } else if v.chars().any(char::is_control) {
        Some("a control character")
    } else {
        None
    }
}

/// The agent parameters a shim's configuration puts on the guest kernel command line, in
/// upstream's order (kata-deploy's generate_kernel_params_drop_in): the HTTPS proxy, then the
/// no-proxy list; unset ones are left out.
pub fn agent_params(shim: &ShimConfig) -> Vec<(&'static str, &str)> {
    [
        ("agent.https_proxy", shim.agent_https_proxy.as_str()),
        ("agent.no_proxy", shim.agent_no_proxy.as_str()),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .collect()
}

/// Sets `agent.image_pull_timeout` (and debug logging) in a kernel_params string, keeping the rest
/// in its order. The timeout, each `agent` parameter (key, value) and, with `debug`,
/// `agent.log=debug` replace the base's parameter of that key where it stands, else are appended
/// in that order: a base that already says all of it comes back byte for byte (a measured guest's
/// command line does not move when nothing changed).
pub fn kernel_params_with_timeout(
    base: &str,
    timeout_secs: u64,
    debug: bool,
    agent: &[(&str, &str)],
) -> String {
    let timeout = timeout_secs.to_string();
    let mut ours: Vec<(&str, &str)> = vec![("agent.image_pull_timeout", timeout.as_str())];
    ours.extend_from_slice(agent);
    if debug {
        ours.push(("agent.log", "debug"));
    }
    let mut pending = ours.clone();
    let mut params: Vec<String> = Vec::new();
    for p in base.split_whitespace() {
        let key = p.split_once('=').map_or(p, |(k, _)| k);
        if let Some(i) = pending.iter().position(|(k, _)| *k == key) {
            let (k, v) = pending.remove(i);
            params.push(format!("{k}={v}"));
        } else if !ours.iter().any(|(k, _)| *k == key) {
            // (a repeated key we already replaced is dropped: the agent would read one of them)
            params.push(p.to_string());
        }
    }
    params.extend(pending.iter().map(|(k, v)| format!("{k}={v}")));
    if base
        .split_whitespace()
        .eq(params.iter().map(String::as_str))
    {
        return base.to_string();
    }
    params.join(" ")
}

fn parse_base(base_text: &str, base_file: &Path) -> Result<DocumentMut> {
    base_text.parse().map_err(|e: toml_edit::TomlError| {
        StageError::bad_input(
            base_file,
            format!(
                "base configuration is not valid TOML: {}",
                e.to_string().trim()
            ),
            "Rebuild the stage image",
        )
    })
}

/// The strings of a base array value (empty when absent).
fn base_strings(item: Option<&Item>) -> Vec<String> {
    item.and_then(Item::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the shim's guest is measured (AMD SEV-SNP, Intel TDX, IBM Secure Execution, and their
/// GPU variants): its kernel command line is part of what attestation checks, so `debug` leaves
/// the guest alone there (no debug kernel parameters, no agent or hypervisor debug, as upstream's
/// normal RuntimeClasses stay measurement-stable); the host-side runtime still logs at debug.
pub fn measured_guest(shim: &ShimConfig) -> bool {
    let b = shim.base();
    b.contains("-snp") || b.contains("-tdx") || b == "qemu-se" || b.starts_with("qemu-se-")
}

/// `debug` for what runs in or shapes the guest (see [`measured_guest`]).
fn guest_debug(shim: &ShimConfig, cfg: &StageConfig) -> bool {
    cfg.debug && !measured_guest(shim)
}

/// Our `[hypervisor.<name>]` settings: kernel_params, allowed annotations, debug.
fn hypervisor_dropin(hv_base: Option<&Item>, shim: &ShimConfig, cfg: &StageConfig) -> Table {
    let base_params = hv_base
        .and_then(|t| t.get("kernel_params"))
        .and_then(Item::as_str)
        .unwrap_or("");
    let mut hv_table = Table::new();
    hv_table.insert(
        "kernel_params",
        value(kernel_params_with_timeout(
            base_params,
            cfg.image_pull_timeout_seconds,
            guest_debug(shim, cfg),
            &agent_params(shim),
        )),
    );
    if !shim.allowed_hypervisor_annotations.is_empty() {
        // Keep the base list and add the allowed ones (dropping a base entry would be surprising).
        let mut names = base_strings(hv_base.and_then(|t| t.get("enable_annotations")));
        for a in &shim.allowed_hypervisor_annotations {
            if !names.contains(a) {
                names.push(a.clone());
            }
        }
        hv_table.insert(
            "enable_annotations",
            value(names.into_iter().collect::<Array>()),
        );
    }
    if guest_debug(shim, cfg) {
        hv_table.insert("enable_debug", value(true));
    }
    hv_table
}

/// Our `[runtime]` settings: the Go runtime's timeout, debug, forced guest pull.
fn runtime_dropin(base: &DocumentMut, shim: &ShimConfig, cfg: &StageConfig) -> Table {
    let runtime_rs = shim.info().runtime_rs;
    let mut runtime = Table::new();
    if !runtime_rs {
        runtime.insert(
            "create_container_timeout",
            value(cfg.image_pull_timeout_seconds as i64),
        );
    }
    if cfg.debug {
        runtime.insert("enable_debug", value(true));
    }
    if shim.force_guest_pull {
        // Upstream's key (configure_experimental_force_guest_pull), read by the Go runtime.
        runtime.insert("experimental_force_guest_pull", value(true));
        if runtime_rs {
            // runtime-rs reads it from its experimental features instead; a drop-in replaces
            // the whole list, so the base's entries are kept.
            let mut features =
                base_strings(base.get("runtime").and_then(|r| r.get("experimental")));
            if !features.iter().any(|f| f == "force_guest_pull") {
                features.push("force_guest_pull".into());
            }
            runtime.insert(
                "experimental",
                value(features.into_iter().collect::<Array>()),
            );
        }
    }
    runtime
}

/// Renders config.d/10-kata-deploy.toml: the image-pull timeout set consistently in the shim
/// (create_container_timeout) and the agent (kernel parameter), the agent's proxy parameters,
/// allowed annotations, debug, forced guest pull.
pub fn render_kata_dropin(
    base_text: &str,
    base_file: &Path,
    shim: &ShimConfig,
    cfg: &StageConfig,
) -> Result<String> {
    let doc = parse_base(base_text, base_file)?;
    let hv = hypervisor_table(base_text, base_file)?;
    let hv_base = doc.get("hypervisor").and_then(|h| h.get(&hv));

    let mut out = DocumentMut::new();
    out.decor_mut().set_prefix(format!(
        "# Generated by kata-deploy-stage for shim {:?}; rewritten on every install, do not edit.\n# Put your own settings in 50-user-overrides.toml (chart: shims.<shim>.dropIn).\n",
        shim.name
    ));
    let mut hypervisor = Table::new();
    hypervisor.set_implicit(true);
    hypervisor.insert(&hv, Item::Table(hypervisor_dropin(hv_base, shim, cfg)));
    out.insert("hypervisor", Item::Table(hypervisor));
    // The Go runtime reads create_container_timeout from [runtime], runtime-rs from [agent.kata].
    let mut kata = Table::new();
    if guest_debug(shim, cfg) {
        kata.insert("enable_debug", value(true));
    }
    if shim.info().runtime_rs {
        kata.insert(
            "create_container_timeout",
            value(cfg.image_pull_timeout_seconds as i64),
        );
    }
    if !kata.is_empty() {
        let mut agent = Table::new();
        agent.set_implicit(true);
        agent.insert("kata", Item::Table(kata));
        out.insert("agent", Item::Table(agent));
    }
    let runtime = runtime_dropin(&doc, shim, cfg);
    if !runtime.is_empty() {
        out.insert("runtime", Item::Table(runtime));
    }
    Ok(out.to_string())
}

/// Every generated Kata configuration file of every enabled shim.
pub fn plan_shim_files(
    cfg: &StageConfig,
    install: &Install,
    read_base: &dyn Fn(&Path) -> Result<String>,
) -> Result<Vec<GeneratedFile>> {
    let mut out = Vec::new();
    for shim in &cfg.shims {
        let rel = base_config_rel(shim.base());
        let base_text = read_base(&rel)?;
        let dir = install.shim_config_dir(&shim.name);
        let mut relocated = relocate_config(&base_text, &install.prefix);
        // A custom prefix: QEMU through upstream's wrapper adding its firmware directory (-L).
        if let Some((w, cfg_text)) = crate::qemuprefix::wrap_qemu(&relocated, &install.prefix) {
            relocated = cfg_text;
            if !out.iter().any(|f: &GeneratedFile| f.path == w.path) {
                out.push(GeneratedFile {
                    path: w.path,
                    content: w.content.into_bytes(),
                    mode: 0o755,
                });
            }
        }
        out.push(GeneratedFile {
            path: install.shim_config_path(&shim.name),
            content: relocated.into_bytes(),
            mode: 0o644,
        });
        out.push(GeneratedFile {
            path: dir.join("config.d/10-kata-deploy.toml"),
            content: render_kata_dropin(&base_text, &rel, shim, cfg)?.into_bytes(),
            mode: 0o644,
        });
        if !shim.drop_in.trim().is_empty() {
            let mut text = shim.drop_in.clone();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            out.push(GeneratedFile {
                path: dir.join("config.d/50-user-overrides.toml"),
                content: text.into_bytes(),
                mode: 0o644,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    const BASE: &str = r#"
[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
kernel_params = "nvrc.smi.srs=1 agent.image_pull_timeout=5"
enable_annotations = ["enable_iommu"]

[agent.kata]
dial_timeout = 45

[runtime]
create_container_timeout = 60
"#;

    fn cfg(yaml: &str) -> StageConfig {
        parse_config(yaml, Path::new("c")).unwrap().cfg
    }

    #[test]
    fn runtime_rs_reads_the_timeout_from_agent_kata() {
        let c =
            cfg("imagePullTimeoutSeconds: 1800\nshims: [{name: qemu-runtime-rs}, {name: qemu}]\n");
        let rs: DocumentMut = render_kata_dropin(BASE, Path::new("b"), &c.shims[0], &c)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            rs["agent"]["kata"]["create_container_timeout"].as_integer(),
            Some(1800),
            "{rs}"
        );
        assert!(rs.get("runtime").is_none(), "{rs}");
        let go: DocumentMut = render_kata_dropin(BASE, Path::new("b"), &c.shims[1], &c)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            go["runtime"]["create_container_timeout"].as_integer(),
            Some(1800),
            "{go}"
        );
        assert!(go.get("agent").is_none(), "{go}");
        assert_eq!(
            base_config_rel("qemu-runtime-rs"),
            Path::new(
                "share/defaults/kata-containers/runtime-rs/configuration-qemu-runtime-rs.toml"
            )
        );
        assert_eq!(
            base_config_rel("qemu"),
            Path::new("share/defaults/kata-containers/configuration-qemu.toml")
        );
    }

    #[test]
    fn timeout_knob_sets_shim_and_agent_consistently() {
        let c = cfg("imagePullTimeoutSeconds: 1800\nshims: [{name: qemu-nvidia-gpu, allowedHypervisorAnnotations: [default_memory]}]\n");
        let out = render_kata_dropin(BASE, Path::new("b"), &c.shims[0], &c).unwrap();
        let doc: DocumentMut = out.parse().unwrap();
        assert_eq!(
            doc["runtime"]["create_container_timeout"].as_integer(),
            Some(1800)
        );
        assert_eq!(
            doc["hypervisor"]["qemu"]["kernel_params"].as_str(),
            Some("nvrc.smi.srs=1 agent.image_pull_timeout=1800")
        );
        let ann: Vec<_> = doc["hypervisor"]["qemu"]["enable_annotations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(ann, ["enable_iommu", "default_memory"]);
        assert!(doc.get("agent").is_none());
    }

    #[test]
    fn debug_enables_all_components() {
        let c = cfg("debug: true\nshims: [{name: qemu}]\n");
        let out = render_kata_dropin(BASE, Path::new("b"), &c.shims[0], &c).unwrap();
        assert!(out.contains("agent.log=debug"));
        let doc: DocumentMut = out.parse().unwrap();
        assert_eq!(doc["agent"]["kata"]["enable_debug"].as_bool(), Some(true));
        assert_eq!(doc["runtime"]["enable_debug"].as_bool(), Some(true));
    }

    #[test]
    fn debug_leaves_the_measured_guest_of_tee_shims_alone() {
        let c = cfg("debug: true\nshims: [{name: qemu-snp}, {name: qemu-tdx-runtime-rs}, {name: qemu-nvidia-gpu-snp}, {name: qemu-se}, {name: qemu-coco-dev}]\n");
        for shim in &c.shims {
            let out = render_kata_dropin(BASE, Path::new("b"), shim, &c).unwrap();
            let doc: DocumentMut = out.parse().unwrap();
            let hv = &doc["hypervisor"]["qemu"];
            if shim.name == "qemu-coco-dev" {
                // Not a TEE (nothing is measured): debug as everywhere else.
                assert!(out.contains("agent.log=debug"), "{out}");
                assert_eq!(hv["enable_debug"].as_bool(), Some(true));
                continue;
            }
            assert_eq!(
                hv["kernel_params"].as_str(),
                Some("nvrc.smi.srs=1 agent.image_pull_timeout=1200"),
                "{}: the measured command line gets no debug parameter: {out}",
                shim.name
            );
            assert!(hv.get("enable_debug").is_none(), "{}: {out}", shim.name);
            assert!(
                doc.get("agent")
                    .and_then(|a| a.get("kata"))
                    .and_then(|k| k.get("enable_debug"))
                    .is_none(),
                "{}: {out}",
                shim.name
            );
            // The host side still logs at debug: the Go runtime's [runtime] enable_debug.
            if !shim.info().runtime_rs {
                assert_eq!(
                    doc["runtime"]["enable_debug"].as_bool(),
                    Some(true),
                    "{out}"
                );
            }
        }
    }

    #[test]
    fn relocation_moves_paths_for_multi_install() {
        assert!(relocate_config(BASE, Path::new("/opt/kata-cicd"))
            .contains("\"/opt/kata-cicd/bin/qemu-system-x86_64\""));
        assert_eq!(relocate_config(BASE, Path::new("/opt/kata")), BASE);
    }

    #[test]
    fn user_dropin_and_files_per_shim() {
        let c = cfg("shims: [{name: qemu, dropIn: \"[agent.kata]\\ndial_timeout = 999\"}, {name: my-rt, baseConfig: qemu}]\n");
        let install = Install::new("", "/opt/kata");
        let files = plan_shim_files(&c, &install, &|_| Ok(BASE.to_string())).unwrap();
        let paths: Vec<_> = files.iter().map(|f| f.path.display().to_string()).collect();
        assert_eq!(
            paths,
            [
                "/opt/kata/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml",
                "/opt/kata/share/defaults/kata-containers/runtimes/qemu/config.d/10-kata-deploy.toml",
                "/opt/kata/share/defaults/kata-containers/runtimes/qemu/config.d/50-user-overrides.toml",
                "/opt/kata/share/defaults/kata-containers/runtimes/my-rt/configuration-my-rt.toml",
                "/opt/kata/share/defaults/kata-containers/runtimes/my-rt/config.d/10-kata-deploy.toml",
            ]
        );
        assert_eq!(files[2].content, b"[agent.kata]\ndial_timeout = 999\n");
    }

    /// The drop-in the stage writes for shim `i` of `c` (through plan_shim_files, as installed).
    fn written_dropin(c: &StageConfig, i: usize, base: &str) -> DocumentMut {
        let install = Install::new("", "/opt/kata");
        let files = plan_shim_files(c, &install, &|_| Ok(base.to_string())).unwrap();
        let path = install
            .shim_config_dir(&c.shims[i].name)
            .join("config.d/10-kata-deploy.toml");
        let f = files.iter().find(|f| f.path == path).unwrap();
        String::from_utf8(f.content.clone())
            .unwrap()
            .parse()
            .unwrap()
    }

    fn kernel_params(doc: &DocumentMut) -> &str {
        doc["hypervisor"]["qemu"]["kernel_params"].as_str().unwrap()
    }

    #[test]
    fn agent_proxies_reach_that_shims_kernel_params_as_upstream_passes_them() {
        let c = cfg(concat!(
            "imagePullTimeoutSeconds: 1800\nshims:\n",
            "- {name: qemu-tdx, agentHttpsProxy: 'http://user:p=w@proxy.example:3128', agentNoProxy: '10.0.0.0/8,.svc,.cluster.local'}\n",
            "- {name: qemu-snp, agentNoProxy: localhost}\n",
            "- {name: qemu}\n",
        ));
        assert_eq!(
            kernel_params(&written_dropin(&c, 0, BASE)),
            "nvrc.smi.srs=1 agent.image_pull_timeout=1800 agent.https_proxy=http://user:p=w@proxy.example:3128 agent.no_proxy=10.0.0.0/8,.svc,.cluster.local"
        );
        assert_eq!(
            kernel_params(&written_dropin(&c, 1, BASE)),
            "nvrc.smi.srs=1 agent.image_pull_timeout=1800 agent.no_proxy=localhost"
        );
        // Another shim is left alone: exactly what it got before these keys existed.
        assert_eq!(
            kernel_params(&written_dropin(&c, 2, BASE)),
            "nvrc.smi.srs=1 agent.image_pull_timeout=1800"
        );
        // With debug, upstream's order: proxies, then agent.log=debug.
        let d = cfg("debug: true\nshims: [{name: qemu, agentHttpsProxy: 'http://p:1'}]\n");
        assert_eq!(
            kernel_params(&written_dropin(&d, 0, BASE)),
            "nvrc.smi.srs=1 agent.image_pull_timeout=1200 agent.https_proxy=http://p:1 agent.log=debug"
        );
    }

    #[test]
    fn kernel_params_keep_their_order_and_a_base_proxy_is_replaced_where_it_stands() {
        let base = "a=1 agent.https_proxy=http://old:1 b agent.image_pull_timeout=5 c=3";
        // Nothing else set: the base parameters stay in order, the timeout replaced where it is.
        assert_eq!(
            kernel_params_with_timeout(base, 60, false, &[]),
            "a=1 agent.https_proxy=http://old:1 b agent.image_pull_timeout=60 c=3"
        );
        // A base that already says it all comes back unchanged, spacing included.
        let same = "a=1  agent.image_pull_timeout=60 agent.log=debug";
        assert_eq!(kernel_params_with_timeout(same, 60, true, &[]), same);
        assert_eq!(
            kernel_params_with_timeout(
                base,
                60,
                false,
                &[
                    ("agent.https_proxy", "http://new:2"),
                    ("agent.no_proxy", "x")
                ]
            ),
            "a=1 agent.https_proxy=http://new:2 b agent.image_pull_timeout=60 c=3 agent.no_proxy=x"
        );
        // Rendering twice gives the same bytes (nothing rewritten on a re-run).
        let c = cfg("shims: [{name: qemu, agentNoProxy: '.svc'}]\n");
        let once = render_kata_dropin(BASE, Path::new("b"), &c.shims[0], &c).unwrap();
        assert_eq!(
            once,
            render_kata_dropin(BASE, Path::new("b"), &c.shims[0], &c).unwrap()
        );
    }

    #[test]
    fn kernel_param_values_that_cannot_go_on_a_command_line_are_named() {
        for (v, why) in [
            ("http://a b", "whitespace"),
            ("x\ty", "whitespace"),
            ("\"http://p\"", "a quote"),
            ("it's", "a quote"),
            ("a\u{7}b", "a control character"),
        ] {
            assert_eq!(kernel_param_value_problem(v), Some(why), "{v:?}");
        }
        assert_eq!(
            kernel_param_value_problem("http://u:p@h:3128/?a=b,.svc"),
            None
        );
    }

    const BASE_RS: &str = r#"
[hypervisor.qemu]
kernel_params = ""

[runtime]
experimental = ["some_feature"]
"#;

    #[test]
    fn force_guest_pull_sets_the_runtimes_forced_guest_pull_for_that_shim_only() {
        let c = cfg("shims: [{name: qemu-coco-dev, forceGuestPull: true}, {name: qemu-coco-dev-runtime-rs, forceGuestPull: true}, {name: qemu}]\n");
        let go = written_dropin(&c, 0, BASE);
        assert_eq!(
            go["runtime"]["experimental_force_guest_pull"].as_bool(),
            Some(true),
            "{go}"
        );
        assert!(go["runtime"].get("experimental").is_none(), "{go}");
        // runtime-rs reads its experimental list: the base's features kept, force_guest_pull added.
        let rs = written_dropin(&c, 1, BASE_RS);
        assert_eq!(
            rs["runtime"]["experimental_force_guest_pull"].as_bool(),
            Some(true),
            "{rs}"
        );
        let features: Vec<_> = rs["runtime"]["experimental"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(features, ["some_feature", "force_guest_pull"]);
        let plain = written_dropin(&c, 2, BASE);
        assert!(
            plain["runtime"]
                .get("experimental_force_guest_pull")
                .is_none(),
            "{plain}"
        );
    }

    #[test]
    fn hypervisor_table_is_found() {
        assert_eq!(
            hypervisor_table("[hypervisor.firecracker]\npath = \"x\"\n", Path::new("b")).unwrap(),
            "firecracker"
        );
        assert!(hypervisor_table("[runtime]\n", Path::new("b")).is_err());
    }
}
