//! Rendering and editing containerd configuration (versions 1, 2 and 3) for Kata handlers.
//! Pure functions over text: the cri stage decides where the result goes.

use toml_edit::{value, Array, DocumentMut, Item, Table};

/// containerd configuration schema version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConfigVersion {
    /// No `version` key (or 1): `plugins.cri`.
    V1,
    /// `version = 2` (containerd 1.x): `plugins."io.containerd.grpc.v1.cri"`.
    V2,
    /// `version = 3` (containerd 2.x): `plugins."io.containerd.cri.v1.runtime"` / `.images`.
    V3,
    /// `version = 4` (containerd 2.3+): the CRI tables of version 3; server settings (grpc,
    /// debug, ...) moved into plugins.
    V4,
}

impl ConfigVersion {
    /// The version for a containerd major release (used when no file exists yet).
    pub fn for_containerd_major(major: u64) -> Self {
        if major >= 2 {
            ConfigVersion::V3
        } else {
            ConfigVersion::V2
        }
    }

    /// Table path of the runtimes map.
    pub fn runtimes_path(self) -> &'static [&'static str] {
        match self {
            ConfigVersion::V1 => &["plugins", "cri", "containerd", "runtimes"],
            ConfigVersion::V2 => &[
                "plugins",
                "io.containerd.grpc.v1.cri",
                "containerd",
                "runtimes",
            ],
            ConfigVersion::V3 | ConfigVersion::V4 => &[
                "plugins",
                "io.containerd.cri.v1.runtime",
                "containerd",
                "runtimes",
            ],
        }
    }

    /// Table holding disable_snapshot_annotations / discard_unpacked_layers.
    pub fn snapshot_flags_path(self) -> &'static [&'static str] {
        match self {
            ConfigVersion::V1 => &["plugins", "cri", "containerd"],
            ConfigVersion::V2 => &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
            ConfigVersion::V3 | ConfigVersion::V4 => &["plugins", "io.containerd.cri.v1.images"],
        }
    }

    /// The number written in `version = N` (None for V1).
    pub fn number(self) -> Option<i64> {
        match self {
            ConfigVersion::V1 => None,
            ConfigVersion::V2 => Some(2),
            ConfigVersion::V3 => Some(3),
            ConfigVersion::V4 => Some(4),
        }
    }

    /// Whether this schema uses containerd 2.x's split CRI plugins (`io.containerd.cri.v1.*`).
    pub fn split_cri_plugins(self) -> bool {
        self >= ConfigVersion::V3
    }
}

/// The schema of our drop-in for containerd 2.x, given the schema of the root config it is
/// imported from (None: no root config yet).
///
/// containerd 2.0-2.2 merge every imported file into the root *before* migrating, and the merged
/// document takes the version of the last file merged: a version-3 drop-in under a version-2
/// root makes containerd skip the 2→3 migration of the root's own `io.containerd.grpc.v1.cri`
/// table (runc options, sandbox image, registry are silently dropped). A drop-in in the root's
/// own schema keeps the merged version equal to the root's, so containerd migrates (or not) the
/// whole merged document exactly as it would have migrated the root alone. containerd 2.3+
/// migrates each file before merging, where the same choice is equally correct. A root without
/// a version (1) is migrated by 2.x without its CRI settings whatever we do; our handlers are
/// then written in containerd 2's native schema (version 3), which every 2.x reads.
pub fn dropin_version_for_root(root: Option<ConfigVersion>) -> ConfigVersion {
    match root {
        Some(v @ (ConfigVersion::V2 | ConfigVersion::V3 | ConfigVersion::V4)) => v,
        Some(ConfigVersion::V1) | None => ConfigVersion::V3,
    }
}

/// One Kata runtime handler as containerd sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KataHandler {
    /// Handler name (RuntimeClass handler).
    pub name: String,
    /// `io.containerd.<handler>.v2`.
    pub runtime_type: String,
    /// Shim binary.
    pub runtime_path: String,
    /// Kata configuration file (options.ConfigPath).
    pub config_path: String,
    /// Runtime-specific snapshotter (guest pull), if any.
    pub snapshotter: Option<String>,
}

/// The nydus proxy snapshotter plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySnapshotter {
    /// Plugin name (`nydus[-suffix]`).
    pub name: String,
    /// gRPC socket.
    pub address: String,
}

/// Everything Kata adds to a containerd configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KataContainerd {
    /// Handlers in configuration order.
    pub handlers: Vec<KataHandler>,
    /// The proxy snapshotter, when a handler uses guest pull.
    pub proxy: Option<ProxySnapshotter>,
    /// containerd 2.x pulls an image with the snapshotter of `runtime_platforms.<handler>` in
    /// `io.containerd.cri.v1.images` (a runtime's own `snapshotter` only mounts): the image
    /// platform (`linux/amd64`) to write there for guest-pull handlers; None on containerd 1.x,
    /// which has no such table.
    pub image_platform: Option<String>,
}

/// Prefix of the marker comment we use for Go template lines while editing templates as TOML.
const TEMPLATE_MASK: &str = "#kata-deploy-template-line:";

/// Error parsing an existing configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

/// Parses a containerd config (or k3s/rke2 template: Go template lines are masked as comments).
pub fn parse(text: &str) -> Result<DocumentMut, ParseError> {
    mask_template(text)
        .parse::<DocumentMut>()
        .map_err(|e| ParseError(e.to_string().trim().to_string()))
}

/// Serializes a document parsed by [`parse`], restoring masked Go template lines.
pub fn serialize(doc: &DocumentMut) -> String {
    unmask_template(&doc.to_string())
}

fn mask_template(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        // Whole lines only: a Go template action anywhere in a line makes it non-TOML.
        if line.contains("{{") {
            out.push_str(TEMPLATE_MASK);
        }
        out.push_str(line);
    }
    out
}

fn unmask_template(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        out.push_str(line.strip_prefix(TEMPLATE_MASK).unwrap_or(line));
    }
    out
}

/// The schema version of a parsed configuration.
pub fn detect_version(doc: &DocumentMut) -> ConfigVersion {
    match doc.get("version").and_then(Item::as_integer) {
        Some(4) => ConfigVersion::V4,
        Some(3) => ConfigVersion::V3,
        Some(2) => ConfigVersion::V2,
        _ => ConfigVersion::V1,
    }
}

/// `imports` entries of a configuration.
pub fn imports(doc: &DocumentMut) -> Vec<String> {
    doc.get("imports")
        .and_then(Item::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether an `imports` entry (a path or a glob with `*`) covers `path`.
pub fn import_covers(entry: &str, path: &str) -> bool {
    match entry.rsplit_once('/') {
        Some((dir, pat)) if pat.contains('*') => {
            let Some((pdir, pname)) = path.rsplit_once('/') else {
                return false;
            };
            if dir != pdir {
                return false;
            }
            let (pre, post) = pat.split_once('*').unwrap();
            !post.contains('*')
                && pname.len() >= pre.len() + post.len()
                && pname.starts_with(pre)
                && pname.ends_with(post)
        }
        _ => entry == path,
    }
}

/// Adds `path` to `imports` (creating the key at the top) unless an entry already covers it.
/// Returns whether the document changed.
pub fn add_import(doc: &mut DocumentMut, path: &str) -> bool {
    if imports(doc).iter().any(|e| import_covers(e, path)) {
        return false;
    }
    match doc.get_mut("imports").and_then(Item::as_array_mut) {
        Some(arr) => arr.push(path),
        None => {
            let mut arr = Array::new();
            arr.push(path);
            doc.insert("imports", value(arr));
        }
    }
    true
}

/// Removes exactly `path` from `imports`. An emptied list stays as `imports = []` (what
/// containerd's own default config has); byte-exact restores use the backup instead.
pub fn remove_import(doc: &mut DocumentMut, path: &str) -> bool {
    let Some(arr) = doc.get_mut("imports").and_then(Item::as_array_mut) else {
        return false;
    };
    let before = arr.len();
    arr.retain(|v| v.as_str() != Some(path));
    arr.fmt();
    arr.len() != before
}

/// Walks (creating implicit tables as needed) to the table at `path`.
fn table_at<'a>(doc: &'a mut DocumentMut, path: &[&str]) -> &'a mut Table {
    let mut t = doc.as_table_mut();
    for key in path {
        let entry = t.entry(key).or_insert_with(|| {
            let mut nt = Table::new();
            nt.set_implicit(true);
            Item::Table(nt)
        });
        if !entry.is_table() {
            // A dotted inline form (e.g. `cri = {}`) cannot hold sub-tables; normalize it.
            let converted = entry.clone().into_table().unwrap_or_default();
            *entry = Item::Table(converted);
        }
        t = entry.as_table_mut().expect("table");
    }
    t
}

/// Sets a boolean, keeping an existing key's position and formatting (indentation, comments).
fn set_keeping_decor(t: &mut Table, key: &str, v: bool) {
    match t.get_mut(key).and_then(Item::as_value_mut) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = v.into();
            *old.decor_mut() = decor;
        }
        None => {
            t.insert(key, value(v));
        }
    }
}

fn handler_table(h: &KataHandler) -> Table {
    let mut t = Table::new();
    t.insert("runtime_type", value(&h.runtime_type));
    t.insert("runtime_path", value(&h.runtime_path));
    t.insert("privileged_without_host_devices", value(true));
    let mut ann = Array::new();
    ann.push("io.katacontainers.*");
    t.insert("pod_annotations", value(ann));
    if let Some(s) = &h.snapshotter {
        t.insert("snapshotter", value(s));
    }
    let mut opts = Table::new();
    opts.insert("ConfigPath", value(&h.config_path));
    t.insert("options", Item::Table(opts));
    t
}

/// Adds our handlers, proxy snapshotter and guest-pull flags to a parsed configuration.
/// `set_global_flags` is false when a base template already defines those tables.
pub fn apply_kata(
    doc: &mut DocumentMut,
    version: ConfigVersion,
    kata: &KataContainerd,
    set_global_flags: bool,
) {
    let runtimes = table_at(doc, version.runtimes_path());
    for h in &kata.handlers {
        runtimes.insert(&h.name, Item::Table(handler_table(h)));
    }
    if let Some(platform) = &kata.image_platform {
        for h in kata.handlers.iter().filter(|h| h.snapshotter.is_some()) {
            let platforms = table_at(doc, &["plugins", IMAGES_PLUGIN, "runtime_platforms"]);
            let mut p = Table::new();
            p.insert("platform", value(platform));
            p.insert(
                "snapshotter",
                value(h.snapshotter.as_deref().unwrap_or_default()),
            );
            platforms.insert(&h.name, Item::Table(p));
        }
    }
    if let Some(proxy) = &kata.proxy {
        if set_global_flags {
            let flags = table_at(doc, version.snapshot_flags_path());
            for key in ["disable_snapshot_annotations", "discard_unpacked_layers"] {
                set_keeping_decor(flags, key, false);
            }
        }
        let plugins = table_at(doc, &["proxy_plugins"]);
        let mut p = Table::new();
        p.insert("type", value("snapshot"));
        p.insert("address", value(&proxy.address));
        plugins.insert(&proxy.name, Item::Table(p));
    }
}

/// containerd replaces its default `runtimes` map (runc) with whatever map a config defines: a
/// config that had no runtimes of its own (a missing file, a minimal one) would lose runc when we
/// add ours, and the CRI plugin then refuses to load ("no corresponding runtime configured in
/// `containerd.runtimes` for `containerd` `default_runtime_name`", proven on containerd 1.6).
/// Adds containerd's default runc entry in that case. Returns whether it did.
pub fn keep_default_runtime(doc: &mut DocumentMut, version: ConfigVersion) -> bool {
    let containerd_path = &version.runtimes_path()[..version.runtimes_path().len() - 1];
    let mut t: Option<&Table> = Some(doc.as_table());
    for key in containerd_path {
        t = t.and_then(|t| t.get(key)).and_then(Item::as_table);
    }
    let default_name = t
        .and_then(|t| t.get("default_runtime_name"))
        .and_then(Item::as_str)
        .unwrap_or("runc")
        .to_string();
    let has_runtimes = t
        .and_then(|t| t.get("runtimes"))
        .and_then(Item::as_table)
        .is_some_and(|r| !r.is_empty());
    if has_runtimes || default_name != "runc" {
        return false;
    }
    let runtimes = table_at(doc, version.runtimes_path());
    let mut runc = Table::new();
    runc.insert("runtime_type", value("io.containerd.runc.v2"));
    // 1.7's default (1.6 has no such key and ignores it).
    runc.insert("sandbox_mode", value("podsandbox"));
    // containerd 1.x's own default runc options (zero values), so the effective configuration
    // is exactly the default one (compared key by key against `config dump` in the matrix).
    let mut opts = Table::new();
    for k in [
        "BinaryName",
        "CriuImagePath",
        "CriuPath",
        "CriuWorkPath",
        "Root",
        "ShimCgroup",
    ] {
        opts.insert(k, value(""));
    }
    for k in ["IoGid", "IoUid"] {
        opts.insert(k, value(0));
    }
    for k in ["NoNewKeyring", "NoPivotRoot", "SystemdCgroup"] {
        opts.insert(k, value(false));
    }
    opts.sort_values();
    runc.insert("options", Item::Table(opts));
    runtimes.insert("runc", Item::Table(runc));
    true
}

/// containerd 2.x's CRI image plugin (also read from a version-2 document: its 2→3 migration
/// keeps an existing `io.containerd.cri.v1.images` table and adds to it).
pub const IMAGES_PLUGIN: &str = "io.containerd.cri.v1.images";

/// Removes the named handlers and proxy plugin (surgical revert of a shared file that changed
/// since we wrote it). Guest-pull flags are left: other users of the file may rely on them.
pub fn strip_kata(doc: &mut DocumentMut, handlers: &[String], proxy: Option<&str>) -> bool {
    let mut changed = false;
    for version in [ConfigVersion::V1, ConfigVersion::V2, ConfigVersion::V3] {
        // (V4 shares V3's table paths.)
        let mut t: Option<&mut Table> = Some(doc.as_table_mut());
        for key in version.runtimes_path() {
            t = t.and_then(|t| t.get_mut(key)).and_then(Item::as_table_mut);
        }
        if let Some(runtimes) = t {
            for h in handlers {
                changed |= runtimes.remove(h).is_some();
            }
        }
    }
    // (Item::get_mut would insert missing keys: walk table-likes.)
    let rp = doc
        .as_table_mut()
        .get_mut("plugins")
        .and_then(Item::as_table_like_mut)
        .and_then(|p| p.get_mut(IMAGES_PLUGIN))
        .and_then(Item::as_table_like_mut)
        .and_then(|i| i.get_mut("runtime_platforms"))
        .and_then(Item::as_table_like_mut);
    if let Some(rp) = rp {
        for h in handlers {
            changed |= rp.remove(h).is_some();
        }
    }
    if let Some(name) = proxy {
        if let Some(pp) = doc.get_mut("proxy_plugins").and_then(Item::as_table_mut) {
            changed |= pp.remove(name).is_some();
            if pp.is_empty() {
                doc.remove("proxy_plugins");
            }
        }
    }
    changed
}

/// Renders a whole containerd drop-in (its own file, imported or merged by the distribution).
pub fn render_containerd_dropin(
    version: ConfigVersion,
    kata: &KataContainerd,
    with_version_line: bool,
) -> String {
    let mut doc = DocumentMut::new();
    doc.decor_mut().set_prefix(
        "# Generated by kata-deploy-stage; rewritten whole on every install, do not edit.\n",
    );
    if with_version_line {
        if let Some(n) = version.number() {
            doc.insert("version", value(n));
        }
    }
    apply_kata(&mut doc, version, kata, true);
    doc.to_string()
}

/// Parses a containerd version string (`containerd://1.7.27-k3s1`, `2.0.5`) into (major, minor).
/// Whether this containerd starts a handler's shim from its `runtime_path`. containerd 1.6 (and
/// 1.7.0) parse the key but drop it when creating the task (containerd#8207, fixed in 1.7.1 and
/// never in 1.6): the shim is then looked up by the name `runtime_type` implies
/// (`containerd-shim-kata-qemu-v2` in PATH), which nothing installs. 1.6 does run an absolute
/// path given as `runtime_type` (its shim manager's "custom path to runtime binary"), so that is
/// what such a containerd gets. Unknown versions count by their config's schema (a version-3
/// config is containerd 2).
pub fn honours_runtime_path(runtime_version: Option<&str>, major_from_config: u64) -> bool {
    let Some(v) = runtime_version.filter(|v| v.starts_with("containerd://")) else {
        return major_from_config >= 2;
    };
    let v = v
        .trim_start_matches("containerd://")
        .trim_start_matches('v');
    let mut it = v
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let parts = (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    );
    parts >= (1, 7, 1)
}

pub fn parse_runtime_version(s: &str) -> Option<(u64, u64)> {
    let v = s.rsplit("://").next().unwrap_or(s).trim_start_matches('v');
    let mut it = v.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn kata(nydus: bool) -> KataContainerd {
        KataContainerd {
            handlers: vec![KataHandler {
                name: "kata-qemu".into(),
                runtime_type: "io.containerd.kata-qemu.v2".into(),
                runtime_path: "/opt/kata/bin/containerd-shim-kata-v2".into(),
                config_path:
                    "/opt/kata/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml"
                        .into(),
                snapshotter: nydus.then(|| "nydus".to_string()),
            }],
            proxy: nydus.then(|| ProxySnapshotter {
                name: "nydus".into(),
                address: "/run/containerd-nydus/containerd-nydus-grpc.sock".into(),
            }),
            image_platform: None,
        }
    }

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn get<'a>(doc: &'a DocumentMut, path: &[&str]) -> Option<&'a Item> {
        let mut it = doc.as_item();
        for k in path {
            it = it.get(k)?;
        }
        Some(it)
    }

    fn check_handler(doc: &DocumentMut, version: ConfigVersion) {
        let mut p: Vec<&str> = version.runtimes_path().to_vec();
        p.push("kata-qemu");
        let h = get(doc, &p).unwrap_or_else(|| panic!("no handler at {p:?}:\n{doc}"));
        assert_eq!(
            h["runtime_type"].as_str(),
            Some("io.containerd.kata-qemu.v2")
        );
        assert_eq!(h["privileged_without_host_devices"].as_bool(), Some(true));
        assert_eq!(
            h["pod_annotations"]
                .as_array()
                .unwrap()
                .get(0)
                .unwrap()
                .as_str(),
            Some("io.katacontainers.*")
        );
        assert!(h["options"]["ConfigPath"]
            .as_str()
            .unwrap()
            .ends_with("configuration-qemu.toml"));
    }

    #[test]
    fn versions_are_detected_from_real_defaults() {
        for (f, v) in [
            ("containerd-1.6-default.toml", ConfigVersion::V2),
            ("containerd-1.7-default.toml", ConfigVersion::V2),
            ("containerd-2.0-default.toml", ConfigVersion::V3),
            ("containerd-noversion.toml", ConfigVersion::V1),
            ("microk8s-containerd-template.toml", ConfigVersion::V2),
        ] {
            assert_eq!(detect_version(&parse(&fixture(f)).unwrap()), v, "{f}");
        }
    }

    #[test]
    fn in_place_edit_keeps_every_original_byte_and_adds_handlers() {
        for f in [
            "containerd-1.6-default.toml",
            "containerd-1.7-default.toml",
            "containerd-2.0-default.toml",
            "containerd-noversion.toml",
            "microk8s-containerd-template.toml",
            "k3s-config.toml.tmpl",
        ] {
            let text = fixture(f);
            let mut doc = parse(&text).unwrap();
            let version = detect_version(&doc);
            apply_kata(&mut doc, version, &kata(true), true);
            let out = serialize(&doc);
            let reparsed = parse(&out).unwrap();
            check_handler(&reparsed, version);
            // Unchanged lines stay byte-identical: every original line is still present in order.
            let mut rest = out.as_str();
            for line in text.lines().filter(|l| {
                !l.contains("disable_snapshot_annotations")
                    && !l.contains("discard_unpacked_layers")
            }) {
                let pos = rest
                    .find(line)
                    .unwrap_or_else(|| panic!("{f}: lost line {line:?}\n{out}"));
                rest = &rest[pos + line.len()..];
            }
            let flags = get(&reparsed, version.snapshot_flags_path()).unwrap();
            assert_eq!(
                flags["disable_snapshot_annotations"].as_bool(),
                Some(false),
                "{f}"
            );
            assert_eq!(
                flags["discard_unpacked_layers"].as_bool(),
                Some(false),
                "{f}"
            );
            assert_eq!(
                get(&reparsed, &["proxy_plugins", "nydus", "address"])
                    .unwrap()
                    .as_str(),
                Some("/run/containerd-nydus/containerd-nydus-grpc.sock")
            );
        }
    }

    #[test]
    fn edit_is_idempotent_and_strip_removes_ours() {
        let text = fixture("containerd-1.6-default.toml");
        let mut doc = parse(&text).unwrap();
        apply_kata(&mut doc, ConfigVersion::V2, &kata(false), true);
        let once = serialize(&doc);
        let mut doc2 = parse(&once).unwrap();
        apply_kata(&mut doc2, ConfigVersion::V2, &kata(false), true);
        assert_eq!(serialize(&doc2), once);
        assert!(strip_kata(&mut doc2, &["kata-qemu".into()], None));
        assert_eq!(serialize(&doc2).trim_end(), text.trim_end());
    }

    #[test]
    fn v3_dropin_uses_v3_plugin_ids() {
        let out = render_containerd_dropin(ConfigVersion::V3, &kata(true), true);
        assert!(out.contains("version = 3"));
        assert!(
            out.contains(
                "[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.kata-qemu]"
            ),
            "{out}"
        );
        assert!(
            out.contains("[plugins.\"io.containerd.cri.v1.images\"]"),
            "{out}"
        );
        assert!(!out.contains("io.containerd.grpc.v1.cri"));
        let doc = parse(&out).unwrap();
        check_handler(&doc, ConfigVersion::V3);
    }

    #[test]
    fn template_lines_survive_in_place_edit() {
        let text = fixture("k3s-config.toml.tmpl");
        let mut doc = parse(&text).unwrap();
        apply_kata(&mut doc, ConfigVersion::V2, &kata(false), false);
        let out = serialize(&doc);
        assert!(out.starts_with("{{ template \"base\" . }}"), "{out}");
        assert!(!out.contains(TEMPLATE_MASK));
    }

    #[test]
    fn imports_are_added_once_and_removed_exactly() {
        let text = "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n";
        let mut doc = parse(text).unwrap();
        assert!(!add_import(
            &mut doc,
            "/etc/containerd/conf.d/kata-deploy.toml"
        ));
        let mut doc = parse("version = 3\n").unwrap();
        assert!(add_import(
            &mut doc,
            "/etc/containerd/conf.d/kata-deploy-a.toml"
        ));
        assert!(!add_import(
            &mut doc,
            "/etc/containerd/conf.d/kata-deploy-a.toml"
        ));
        assert!(remove_import(
            &mut doc,
            "/etc/containerd/conf.d/kata-deploy-a.toml"
        ));
        assert_eq!(doc.to_string(), "version = 3\nimports = []\n");
        assert!(
            import_covers("/a/*.toml", "/a/x.toml") && !import_covers("/a/*.toml", "/b/x.toml")
        );
    }

    #[test]
    fn version_4_is_read_as_version_4_with_v3_tables() {
        let doc = parse("version = 4\n").unwrap();
        assert_eq!(detect_version(&doc), ConfigVersion::V4);
        assert_eq!(
            ConfigVersion::V4.runtimes_path(),
            ConfigVersion::V3.runtimes_path()
        );
        let out = render_containerd_dropin(ConfigVersion::V4, &kata(true), true);
        assert!(out.contains("version = 4"), "{out}");
        check_handler(&parse(&out).unwrap(), ConfigVersion::V4);
    }

    #[test]
    fn dropin_takes_the_roots_schema() {
        assert_eq!(
            dropin_version_for_root(Some(ConfigVersion::V2)),
            ConfigVersion::V2
        );
        assert_eq!(
            dropin_version_for_root(Some(ConfigVersion::V3)),
            ConfigVersion::V3
        );
        assert_eq!(
            dropin_version_for_root(Some(ConfigVersion::V4)),
            ConfigVersion::V4
        );
        assert_eq!(
            dropin_version_for_root(Some(ConfigVersion::V1)),
            ConfigVersion::V3
        );
        assert_eq!(dropin_version_for_root(None), ConfigVersion::V3);
        // A v2 drop-in for containerd 2.x uses the grpc.v1.cri tables containerd migrates.
        let out = render_containerd_dropin(ConfigVersion::V2, &kata(false), true);
        assert!(
            out.contains("version = 2") && out.contains("io.containerd.grpc.v1.cri"),
            "{out}"
        );
    }

    #[test]
    fn a_config_without_runtimes_keeps_runc() {
        let mut doc = parse("version = 2\n").unwrap();
        assert!(keep_default_runtime(&mut doc, ConfigVersion::V2));
        let out = doc.to_string();
        assert!(
            out.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]"),
            "{out}"
        );
        // Existing runtimes, or another default runtime: nothing added.
        let mut doc = parse(&fixture("containerd-1.6-default.toml")).unwrap();
        assert!(!keep_default_runtime(&mut doc, ConfigVersion::V2));
        let mut doc = parse("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndefault_runtime_name = \"crun\"\n").unwrap();
        assert!(!keep_default_runtime(&mut doc, ConfigVersion::V2));
    }

    #[test]
    fn guest_pull_handlers_get_an_image_platform_on_containerd_2() {
        for version in [ConfigVersion::V2, ConfigVersion::V3, ConfigVersion::V4] {
            let mut k = kata(true);
            k.handlers.push(KataHandler {
                name: "kata-clh".into(),
                runtime_type: "io.containerd.kata-clh.v2".into(),
                runtime_path: "/x".into(),
                config_path: "/y".into(),
                snapshotter: None,
            });
            k.image_platform = Some("linux/amd64".into());
            let out = render_containerd_dropin(version, &k, true);
            let doc = parse(&out).unwrap();
            let rp = get(&doc, &["plugins", IMAGES_PLUGIN, "runtime_platforms"])
                .unwrap_or_else(|| panic!("{out}"));
            assert_eq!(rp["kata-qemu"]["snapshotter"].as_str(), Some("nydus"));
            assert_eq!(rp["kata-qemu"]["platform"].as_str(), Some("linux/amd64"));
            assert!(
                rp.get("kata-clh").is_none(),
                "only guest-pull handlers are routed: {out}"
            );
            let mut doc = parse(&out).unwrap();
            strip_kata(
                &mut doc,
                &["kata-qemu".into(), "kata-clh".into()],
                Some("nydus"),
            );
            assert!(get(
                &doc,
                &["plugins", IMAGES_PLUGIN, "runtime_platforms", "kata-qemu"]
            )
            .is_none());
        }
        // containerd 1.x: no such table.
        let out = render_containerd_dropin(ConfigVersion::V2, &kata(true), true);
        assert!(!out.contains("runtime_platforms"), "{out}");
    }

    #[test]
    fn malformed_config_is_an_error() {
        assert!(parse("[plugins\nversion = 2").is_err());
    }

    #[test]
    fn runtime_versions_parse() {
        assert_eq!(
            parse_runtime_version("containerd://1.7.27-k3s1"),
            Some((1, 7))
        );
        assert_eq!(parse_runtime_version("containerd://2.0.5"), Some((2, 0)));
        assert_eq!(parse_runtime_version("cri-o://1.31.2"), Some((1, 31)));
        assert_eq!(parse_runtime_version("v1.6.20"), Some((1, 6)));
        assert_eq!(parse_runtime_version("garbage"), None);
    }

    #[test]
    fn runtime_path_is_honoured_from_containerd_1_7_1() {
        for (v, want) in [
            ("containerd://1.6.20", false),
            ("containerd://1.6.20~ds1", false),
            ("containerd://1.7.0", false),
            ("containerd://1.7.1", true),
            ("containerd://1.7.27-k3s1", true),
            ("containerd://2.0.5", true),
            ("containerd://v2.4.2", true),
        ] {
            assert_eq!(honours_runtime_path(Some(v), 0), want, "{v}");
        }
        // Unknown version: the config's schema decides (v3 = containerd 2; v2 may be 1.6).
        assert!(honours_runtime_path(None, 2));
        assert!(!honours_runtime_path(None, 1));
        assert!(!honours_runtime_path(Some("cri-o://1.31.2"), 1));
    }
}
