//! The runtime matrix: the cri stage against every real containerd of the test bed (Debian's
//! 1.6 and the pinned builds of hack/testenv/versions.env), for every shape a node's root config
//! can have. Each case: install (artifacts + cri) → that containerd restarts with it → through
//! `containerd config dump` (the daemon's own loader and migration) and the CRI API of the
//! running process: every kata handler is served with its options AND every setting the root
//! config had is still in effect; re-run is a no-op; revert → bytes, mode, owner and link of
//! the root config restored, and the effective configuration equal to before.
//!
//! A missing containerd is a failure in CI (never a skip). Run alone:
//! `cargo test -p kata-deploy-stage --test runtime_matrix -- --nocapture` (prints the table).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use common::ctd::*;
use common::*;
use kata_deploy_stage::config::NodeFacts;
use kata_deploy_stage::containerd::{detect_version, parse, ConfigVersion};
use kata_deploy_stage::hostfs::HostFs;
use serde_json::Value;

/// Root-config shapes a node can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `containerd config default` of the running binary, untouched.
    Default,
    /// containerd 2.x still running the `version = 2` config written for 1.x (with the usual
    /// kubeadm settings: systemd cgroups, a private sandbox image, a registry dir).
    V2Kept,
    /// No `version` key (schema 1), with settings.
    NoVersion,
    /// The binary's default plus settings, mode 0600 and owned by another user.
    Mode0600,
    /// The binary's default plus settings, reached through an absolute symlink.
    Symlink,
    /// No config.toml at all (/etc/containerd exists).
    Missing,
}

const SHAPES: [Shape; 6] = [
    Shape::Default,
    Shape::V2Kept,
    Shape::NoVersion,
    Shape::Mode0600,
    Shape::Symlink,
    Shape::Missing,
];

const SHIMS: &str = "runtimeReadyTimeoutSeconds: 90\nshims:\n  - name: qemu\n  - name: qemu-runtime-rs\n  - name: qemu-coco-dev\n    containerdSnapshotter: nydus\n";
const HANDLERS: [(&str, &str, &str); 3] = [
    ("kata-qemu", "/opt/kata/bin/containerd-shim-kata-v2", "qemu"),
    (
        "kata-qemu-runtime-rs",
        "/opt/kata/runtime-rs/bin/containerd-shim-kata-v2",
        "qemu-runtime-rs",
    ),
    (
        "kata-qemu-coco-dev",
        "/opt/kata/bin/containerd-shim-kata-v2",
        "qemu-coco-dev",
    ),
];
const NYDUS: &str = "nydus-for-kata-tee";
const SANDBOX: &str = "registry.example.com/pause:3.10-kata-matrix";
const CERTS_D: &str = "/etc/containerd/certs.d";
const LINK_TARGET: &str = "/etc/containerd-managed/config.toml";
const OWNER: u32 = 4242;

fn set(doc: &mut toml_edit::DocumentMut, path: &[&str], v: impl Into<toml_edit::Value>) {
    let mut t = doc.as_table_mut();
    for k in &path[..path.len() - 1] {
        let e = t.entry(k).or_insert_with(|| {
            let mut nt = toml_edit::Table::new();
            nt.set_implicit(true);
            toml_edit::Item::Table(nt)
        });
        t = e
            .as_table_mut()
            .unwrap_or_else(|| panic!("{k} is not a table"));
    }
    t.insert(path[path.len() - 1], toml_edit::value(v));
}

/// The settings real nodes put in their root config (kubeadm's systemd cgroups, a mirrored
/// sandbox image, a registry hosts dir, the native snapshotter, a GC tuning), in its schema.
fn customize(text: &str) -> String {
    let mut doc: toml_edit::DocumentMut = text.parse().unwrap();
    match detect_version(&doc) {
        v @ (ConfigVersion::V1 | ConfigVersion::V2) => {
            let cri = if v == ConfigVersion::V1 {
                "cri"
            } else {
                "io.containerd.grpc.v1.cri"
            };
            set(
                &mut doc,
                &[
                    "plugins",
                    cri,
                    "containerd",
                    "runtimes",
                    "runc",
                    "runtime_type",
                ],
                "io.containerd.runc.v2",
            );
            set(
                &mut doc,
                &[
                    "plugins",
                    cri,
                    "containerd",
                    "runtimes",
                    "runc",
                    "options",
                    "SystemdCgroup",
                ],
                true,
            );
            set(&mut doc, &["plugins", cri, "sandbox_image"], SANDBOX);
            set(
                &mut doc,
                &["plugins", cri, "registry", "config_path"],
                CERTS_D,
            );
            set(
                &mut doc,
                &["plugins", cri, "containerd", "snapshotter"],
                "native",
            );
            if v == ConfigVersion::V2 {
                set(
                    &mut doc,
                    &[
                        "plugins",
                        "io.containerd.gc.v1.scheduler",
                        "deletion_threshold",
                    ],
                    7,
                );
            }
        }
        ConfigVersion::V3 | ConfigVersion::V4 => {
            let rt = "io.containerd.cri.v1.runtime";
            let im = "io.containerd.cri.v1.images";
            set(
                &mut doc,
                &[
                    "plugins",
                    rt,
                    "containerd",
                    "runtimes",
                    "runc",
                    "runtime_type",
                ],
                "io.containerd.runc.v2",
            );
            set(
                &mut doc,
                &[
                    "plugins",
                    rt,
                    "containerd",
                    "runtimes",
                    "runc",
                    "options",
                    "SystemdCgroup",
                ],
                true,
            );
            set(
                &mut doc,
                &["plugins", im, "pinned_images", "sandbox"],
                SANDBOX,
            );
            set(
                &mut doc,
                &["plugins", im, "registry", "config_path"],
                CERTS_D,
            );
            set(&mut doc, &["plugins", im, "snapshotter"], "native");
            set(
                &mut doc,
                &[
                    "plugins",
                    "io.containerd.gc.v1.scheduler",
                    "deletion_threshold",
                ],
                7,
            );
        }
    }
    doc.to_string()
}

/// A `version = 2` root as containerd 1.7 writes it (the real 1.7 binary when the matrix has
/// one, else the committed 1.7 default), with the usual settings.
fn v2_root(bins: &[CtdBin]) -> String {
    let text = bins
        .iter()
        .find(|b| b.major_minor() == (1, 7))
        .map(CtdBin::config_default)
        .unwrap_or_else(|| String::from_utf8(fixture("containerd-1.7-default.toml")).unwrap());
    customize(&text)
}

fn root_text(bin: &CtdBin, shape: Shape, v2: &str) -> Option<String> {
    match shape {
        Shape::Default => Some(bin.config_default()),
        Shape::V2Kept => Some(v2.to_string()),
        Shape::NoVersion => Some(customize(
            &String::from_utf8(fixture("containerd-noversion.toml")).unwrap(),
        )),
        Shape::Mode0600 | Shape::Symlink => Some(customize(&bin.config_default())),
        Shape::Missing => None,
    }
}

/// Removes what the install adds (our handlers, their image platforms, our proxy plugin and the
/// guest-pull flags, compared separately) from a dump or a CRI config report.
fn strip_ours(v: &mut Value) {
    if let Value::Object(m) = v {
        for (k, child) in m.iter_mut() {
            if matches!(
                k.as_str(),
                "runtimes" | "runtime_platforms" | "runtimePlatforms"
            ) {
                if let Value::Object(r) = child {
                    for (h, _, _) in HANDLERS {
                        r.remove(h);
                    }
                }
            }
            if k == "proxy_plugins" {
                if let Value::Object(p) = child {
                    p.remove(NYDUS);
                }
            }
        }
        for k in [
            "disable_snapshot_annotations",
            "discard_unpacked_layers",
            "disableSnapshotAnnotations",
            "discardUnpackedLayers",
        ] {
            m.remove(k);
        }
        if let Some(Value::Array(imports)) = m.get_mut("imports") {
            imports.retain(|i| {
                !i.as_str()
                    .is_some_and(|i| i.ends_with("/etc/containerd/conf.d/kata-deploy.toml"))
            });
        }
        // An emptied table is what containerd prints for an absent one.
        for k in ["proxy_plugins", "runtime_platforms"] {
            if m.get(k)
                .is_some_and(|p| p.as_object().is_some_and(|o| o.is_empty()))
            {
                m.remove(k);
            }
        }
        for child in m.values_mut() {
            strip_ours(child);
        }
    }
}

fn find_key<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    if let Value::Object(m) = v {
        for (k, c) in m {
            if k == key {
                out.push(c);
            }
            find_key(c, key, out);
        }
    }
}

/// The CRI runtimes table in an effective configuration.
fn dump_runtimes(dump: &Value, major: u64) -> Value {
    let plugin = if major >= 2 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    };
    dump["plugins"][plugin]["containerd"]["runtimes"].clone()
}

/// What we remember of the root config to check it is restored exactly.
#[derive(Debug, PartialEq, Eq)]
struct RootFile {
    link: Option<PathBuf>,
    bytes: Option<Vec<u8>>,
    mode_uid_gid: Option<(u32, u32, u32)>,
}

fn root_file(host: &Path) -> RootFile {
    let p = host.join("etc/containerd/config.toml");
    let link = std::fs::read_link(&p).ok();
    let real = match &link {
        Some(t) => host.join(t.strip_prefix("/").unwrap()),
        None => p,
    };
    let bytes = std::fs::read(&real).ok();
    let mode_uid_gid = std::fs::metadata(&real)
        .ok()
        .map(|m| (m.permissions().mode() & 0o7777, m.uid(), m.gid()));
    RootFile {
        link,
        bytes,
        mode_uid_gid,
    }
}

struct Outcome {
    failures: Vec<String>,
    notes: Vec<String>,
    secs: f64,
}

fn node(bin: &CtdBin) -> NodeFacts {
    NodeFacts {
        name: Some("n".into()),
        uid: Some("u".into()),
        machine_id: Some("0123456789abcdef".into()),
        container_runtime_version: Some(bin.runtime_version.clone()),
        ..Default::default()
    }
}

fn run_case(bin: &CtdBin, shape: Shape, v2: &str) -> Outcome {
    let t0 = Instant::now();
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    let (major, _) = bin.major_minor();
    let work = tempfile::Builder::new()
        .prefix("kata-matrix")
        .tempdir()
        .unwrap();
    let host = bare_host(work.path());
    if let Some(text) = root_text(bin, shape, v2) {
        let main = host.join("etc/containerd/config.toml");
        match shape {
            Shape::Symlink => {
                let target = host.join(LINK_TARGET.trim_start_matches('/'));
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::write(&target, text).unwrap();
                std::os::unix::fs::symlink(LINK_TARGET, &main).unwrap();
            }
            Shape::Mode0600 => {
                std::fs::write(&main, text).unwrap();
                std::fs::set_permissions(&main, std::fs::Permissions::from_mode(0o600)).unwrap();
                std::os::unix::fs::chown(&main, Some(OWNER), Some(OWNER)).unwrap();
            }
            _ => std::fs::write(&main, text).unwrap(),
        }
    }
    let original = root_file(&host);
    let rt = RealContainerd::new(bin.clone(), &host, work.path());
    macro_rules! check {
        ($cond:expr, $($msg:tt)*) => { if !$cond { failures.push(format!($($msg)*)); } };
    }
    macro_rules! bail {
        () => {
            return Outcome {
                failures,
                notes,
                secs: t0.elapsed().as_secs_f64(),
            }
        };
    }

    // Before: what containerd loads from the root config, and what its CRI plugin reports.
    let before_dump = match rt.dump() {
        Ok(d) => toml_to_json(&d),
        Err(e) => {
            failures.push(format!("the root config itself does not load: {e}"));
            bail!();
        }
    };
    rt.start();
    rt.wait_ready();
    let before_cri: Value =
        serde_json::from_str(&rt.cri().unwrap().config_json.unwrap_or_default())
            .unwrap_or_default();
    let mut systemd = Vec::new();
    find_key(&before_dump, "SystemdCgroup", &mut systemd);
    if shape != Shape::Default
        && shape != Shape::Missing
        && !systemd.iter().any(|v| v.as_bool() == Some(true))
    {
        notes
            .push("containerd itself ignores this root's CRI settings (before any install)".into());
    }

    // Install.
    let cfg = config(SHIMS);
    let facts = node(bin);
    if let Err(e) = install(&HostFs::new(&host, false), &cfg, &facts, &rt) {
        let log = std::fs::read_to_string(&rt.log).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("level=error") || l.contains("level=fatal") || l.contains("level=warn")
            })
            .collect();
        failures.push(format!(
            "install failed: {e}\n    containerd log (warnings/errors):\n    {}",
            tail.join("\n    ")
        ));
        bail!();
    }
    let after_dump = match rt.dump() {
        Ok(d) => toml_to_json(&d),
        Err(e) => {
            failures.push(format!("config dump after install: {e}"));
            bail!();
        }
    };
    // Our handlers and their options, as the running process reports them (authoritative) and
    // as `config dump` shows them (containerd 2.0-2.2 print a version-2 document unmigrated:
    // there the dump shows the grpc.v1.cri table the daemon migrates at start).
    let report = rt.cri();
    let cri_cfg: Value = report
        .as_ref()
        .ok()
        .and_then(|r| r.config_json.as_deref())
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    let dump_rts = dump_runtimes(&after_dump, major);
    let runc_only_16 = bin.major_minor() < (1, 7);
    for (src, runtimes) in [
        ("CRI", &cri_cfg["containerd"]["runtimes"]),
        ("dump", &dump_rts),
    ] {
        for (h, path, shim) in HANDLERS {
            let r = &runtimes[h];
            let f = |keys: &[&str]| {
                keys.iter()
                    .map(|k| &r[*k])
                    .find(|v| !v.is_null())
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            let cp = format!("/opt/kata/share/defaults/kata-containers/runtimes/{shim}/configuration-{shim}.toml");
            // containerd 1.6 drops runtime_path when it starts a shim (containerd#8207): there
            // the runtime type is the shim's path, which 1.6 runs.
            let want_type = if kata_deploy_stage::containerd::honours_runtime_path(
                Some(&bin.runtime_version),
                0,
            ) {
                format!("io.containerd.{h}.v2")
            } else {
                path.to_string()
            };
            check!(
                f(&["runtime_type", "runtimeType"]) == want_type.as_str(),
                "{src}: {h}.runtime_type = {}",
                f(&["runtime_type", "runtimeType"])
            );
            check!(
                f(&["runtime_path", "runtimePath"]) == path,
                "{src}: {h}.runtime_path = {}",
                f(&["runtime_path", "runtimePath"])
            );
            check!(
                f(&[
                    "privileged_without_host_devices",
                    "privilegedWithoutHostDevices"
                ]) == true,
                "{src}: {h}.privileged_without_host_devices = {}",
                r
            );
            check!(
                f(&["pod_annotations", "PodAnnotations", "podAnnotations"])
                    == serde_json::json!(["io.katacontainers.*"]),
                "{src}: {h}.pod_annotations = {r}"
            );
            check!(
                r["options"]["ConfigPath"] == cp.as_str(),
                "{src}: {h}.options.ConfigPath = {}",
                r["options"]["ConfigPath"]
            );
        }
        let snap = &runtimes["kata-qemu-coco-dev"]["snapshotter"];
        if runc_only_16 {
            // containerd 1.6 has no per-runtime snapshotter: its loader drops the key.
            check!(
                snap.is_null() || snap == "",
                "{src}: 1.6 now keeps a per-runtime snapshotter ({snap})"
            );
        } else {
            check!(
                snap == NYDUS,
                "{src}: kata-qemu-coco-dev.snapshotter = {snap}"
            );
        }
    }
    if runc_only_16 {
        notes.push("no per-runtime snapshotter in 1.6 (guest pull impossible)".into());
    }
    if major >= 2 {
        // containerd 2.x pulls with the snapshotter of runtime_platforms.<handler>.
        let rp = &after_dump["plugins"]["io.containerd.cri.v1.images"]["runtime_platforms"];
        check!(
            rp["kata-qemu-coco-dev"]["snapshotter"] == NYDUS,
            "dump: runtime_platforms.kata-qemu-coco-dev = {}",
            rp["kata-qemu-coco-dev"]
        );
        check!(
            rp["kata-qemu-coco-dev"]["platform"]
                .as_str()
                .is_some_and(|p| p.starts_with("linux/")),
            "dump: runtime_platforms.kata-qemu-coco-dev = {}",
            rp["kata-qemu-coco-dev"]
        );
        check!(
            rp["kata-qemu"].is_null(),
            "dump: a handler without guest pull got an image platform: {}",
            rp["kata-qemu"]
        );
    }
    check!(
        after_dump["proxy_plugins"][NYDUS]["address"]
            .as_str()
            .is_some_and(|a| a.ends_with(".sock")),
        "dump: proxy_plugins.nydus = {}",
        after_dump["proxy_plugins"][NYDUS]
    );
    // The two global flags guest pull needs are left out of the comparison below, so they are
    // checked here: each is present in the effective configuration and false (the image layers
    // must stay for the guest; the snapshotter must see the pull annotations).
    for flag in ["disable_snapshot_annotations", "discard_unpacked_layers"] {
        let mut found = Vec::new();
        find_key(&after_dump, flag, &mut found);
        check!(
            !found.is_empty() && found.iter().all(|v| v.as_bool() == Some(false)),
            "dump: global {flag} after an install with a guest-pull handler = {found:?} (want false)"
        );
    }
    let mut a = after_dump.clone();
    let mut b = before_dump.clone();
    strip_ours(&mut a);
    strip_ours(&mut b);
    let diff = json_diff(&b, &a);
    check!(
        diff.is_empty(),
        "root settings changed by the install (config dump, before -> after):\n    {}",
        diff.join("\n    ")
    );

    // The running process, over the CRI API (what the kubelet sees).
    match report {
        Ok(report) => {
            let served = report.handlers();
            for (h, _, _) in HANDLERS {
                check!(
                    served.iter().any(|s| s == h),
                    "CRI: {h} not served ({served:?})"
                );
            }
            check!(
                served.iter().any(|s| s == "runc"),
                "CRI: runc not served ({served:?})"
            );
            let mut a: Value = serde_json::from_str(report.config_json.as_deref().unwrap_or("{}"))
                .unwrap_or_default();
            let mut b = before_cri.clone();
            strip_ours(&mut a);
            strip_ours(&mut b);
            let diff = json_diff(&b, &a);
            check!(diff.is_empty(), "root settings changed by the install (CRI status config, before -> after):\n    {}", diff.join("\n    "));
        }
        Err(e) => failures.push(format!("CRI after install: {e}")),
    }
    let now = root_file(&host);
    check!(
        now.link == original.link,
        "link of config.toml changed: {:?} -> {:?}",
        original.link,
        now.link
    );
    if original.mode_uid_gid.is_some() {
        check!(
            now.mode_uid_gid == original.mode_uid_gid,
            "mode/owner of config.toml changed: {:?} -> {:?}",
            original.mode_uid_gid,
            now.mode_uid_gid
        );
    }

    // Re-run: nothing to do, no restart.
    let restarts = rt.restarts.load(Ordering::SeqCst);
    let fs = HostFs::new(&host, false);
    match install(&fs, &cfg, &facts, &rt) {
        Ok(_) => check!(
            rt.restarts.load(Ordering::SeqCst) == restarts,
            "re-run restarted containerd"
        ),
        Err(e) => failures.push(format!("re-run failed: {e}")),
    }

    // Revert.
    if let Err(e) = uninstall(&HostFs::new(&host, false), &cfg, &facts, &rt) {
        let log = std::fs::read_to_string(&rt.log).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("level=error") || l.contains("level=fatal") || l.contains("level=warn")
            })
            .collect();
        failures.push(format!(
            "uninstall failed: {e}\n    containerd log (warnings/errors):\n    {}",
            tail.join("\n    ")
        ));
        bail!();
    }
    let restored = root_file(&host);
    check!(
        restored == original,
        "root config not restored: link {:?} -> {:?}, mode/owner {:?} -> {:?}, bytes equal: {}",
        original.link,
        restored.link,
        original.mode_uid_gid,
        restored.mode_uid_gid,
        original.bytes == restored.bytes
    );
    check!(
        !host.join("etc/containerd/conf.d").exists(),
        "conf.d left behind"
    );
    match rt.dump() {
        Ok(d) => {
            let diff = json_diff(&before_dump, &toml_to_json(&d));
            check!(
                diff.is_empty(),
                "effective config after revert differs from before:\n    {}",
                diff.join("\n    ")
            );
        }
        Err(e) => failures.push(format!("config dump after revert: {e}")),
    }
    match rt.cri() {
        Ok(report) => {
            check!(
                !report.handlers().iter().any(|h| h.starts_with("kata-")),
                "CRI after revert still serves {:?}",
                report.handlers()
            );
            let after: Value = serde_json::from_str(report.config_json.as_deref().unwrap_or("{}"))
                .unwrap_or_default();
            let diff = json_diff(&before_cri, &after);
            check!(
                diff.is_empty(),
                "CRI config after revert differs from before:\n    {}",
                diff.join("\n    ")
            );
        }
        Err(e) => failures.push(format!("CRI after revert: {e}")),
    }
    Outcome {
        failures,
        notes,
        secs: t0.elapsed().as_secs_f64(),
    }
}

#[test]
fn cri_stage_on_every_containerd_and_root_config_shape() {
    let bins = matrix_bins();
    if bins.is_empty() {
        return;
    }
    let v2 = v2_root(&bins);
    assert_eq!(detect_version(&parse(&v2).unwrap()), ConfigVersion::V2);
    let t0 = Instant::now();
    // Two workers (CI has 2 cores; more only makes containerd starts slower), each case with its
    // own root, state and socket.
    let cases: Vec<(&CtdBin, Shape)> = bins
        .iter()
        .flat_map(|b| {
            SHAPES
                .iter()
                .filter(move |s| **s != Shape::V2Kept || b.major_minor().0 >= 2)
                .map(move |s| (b, *s))
        })
        .collect();
    let host_nri = Path::new("/run/nri/nri.sock");
    let host_nri_before = host_nri.exists();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<(usize, String, Shape, Outcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some((bin, shape)) = cases.get(i) else {
                            break;
                        };
                        out.push((i, bin.label.clone(), *shape, run_case(bin, *shape, &v2)));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    results.sort_by_key(|r| r.0);
    let results: Vec<(String, Shape, Outcome)> =
        results.into_iter().map(|(_, l, s, o)| (l, s, o)).collect();
    let mut table = String::from("\ncontainerd | root config | result | seconds | notes\n");
    let mut failed = Vec::new();
    for (label, shape, o) in &results {
        let res = if o.failures.is_empty() { "ok" } else { "FAIL" };
        table.push_str(&format!(
            "{label} | {shape:?} | {res} | {:.1} | {}\n",
            o.secs,
            o.notes.join("; ")
        ));
        for f in &o.failures {
            failed.push(format!("containerd {label}, {shape:?}: {f}"));
        }
    }
    table.push_str(&format!(
        "wall time: {:.1}s for {} cases\n",
        t0.elapsed().as_secs_f64(),
        results.len()
    ));
    eprintln!("{table}");
    assert!(failed.is_empty(), "{table}\n{}", failed.join("\n"));
    assert!(
        host_nri_before || !host_nri.exists(),
        "a matrix containerd put its NRI socket on the host's /run/nri (cases at once would share it)"
    );
}

/// containerd's own merge semantics, which the drop-in schema choice relies on: under a
/// `version = 2` root, a version-3 drop-in makes containerd 2.0-2.2 drop the root's CRI settings
/// (2.3+ migrates each file before merging and keeps them); a version-2 drop-in keeps them on
/// every 2.x. If a containerd release changes this, this test says so.
#[test]
fn containerd_2_merge_semantics_of_v2_root_with_v2_or_v3_dropin() {
    let bins: Vec<CtdBin> = matrix_bins()
        .into_iter()
        .filter(|b| b.major_minor().0 >= 2)
        .collect();
    let v2 = v2_root(&matrix_bins());
    for bin in &bins {
        for (dropin_version, expect_kept) in [
            (ConfigVersion::V3, bin.major_minor() >= (2, 3)),
            (ConfigVersion::V2, true),
        ] {
            let work = tempfile::Builder::new()
                .prefix("kata-merge")
                .tempdir()
                .unwrap();
            let kata = kata_deploy_stage::containerd::KataContainerd {
                handlers: vec![kata_deploy_stage::containerd::KataHandler {
                    name: "kata-qemu".into(),
                    runtime_type: "io.containerd.kata-qemu.v2".into(),
                    runtime_path: "/opt/kata/bin/containerd-shim-kata-v2".into(),
                    config_path: "/opt/kata/x.toml".into(),
                    snapshotter: None,
                }],
                proxy: None,
                image_platform: None,
            };
            let dropin = work.path().join("kata.toml");
            std::fs::write(
                &dropin,
                kata_deploy_stage::containerd::render_containerd_dropin(
                    dropin_version,
                    &kata,
                    true,
                ),
            )
            .unwrap();
            let mut doc = parse(&v2).unwrap();
            kata_deploy_stage::containerd::add_import(&mut doc, &dropin.display().to_string());
            let root = work.path().join("config.toml");
            std::fs::write(&root, doc.to_string()).unwrap();
            let eff = toml_to_json(&bin.config_dump(&root).unwrap());
            let rt = &eff["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"];
            assert_eq!(
                rt["kata-qemu"]["runtime_type"], "io.containerd.kata-qemu.v2",
                "{} {dropin_version:?}: handler not loaded",
                bin.label
            );
            let kept = rt["runc"]["options"]["SystemdCgroup"] == true
                && eff["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"]
                    == SANDBOX;
            assert_eq!(kept, expect_kept, "containerd {} with a v2 root and a {dropin_version:?} drop-in: root settings kept = {kept}", bin.label);
        }
    }
}

/// k3s/rke2 render `config.toml.tmpl` with Go's text/template: `{{ template "base" . }}` becomes
/// the config k3s generates for the node, the rest of our template is literal text. k3s's own
/// template code cannot be built here (the Go module proxy answers 403 for github.com/k3s-io/k3s),
/// so the base is k3s's generated config (fixture) and the rest is taken as is. Two installs
/// (multi-install) share the template; the result loads in containerd 1.7 (what k3s 1.30-1.32
/// ship) with both installs' handlers served and k3s's own settings (systemd cgroups, sandbox
/// image) kept.
#[test]
fn k3s_template_of_two_installs_renders_and_loads_in_containerd_1_7() {
    let Some(bin) = matrix_bins()
        .into_iter()
        .find(|b| b.major_minor() == (1, 7))
    else {
        skip_or_fail("containerd 1.7 build missing");
        return;
    };
    let f = flavour("k3s");
    let host = make_host(&f);
    let rt = FakeRuntime::default();
    let facts = facts(&f);
    for suffix in ["a", "b"] {
        install(
            &HostFs::new(host.path(), false),
            &config(&format!(
                "multiInstallSuffix: {suffix}\nshims:\n  - name: qemu\n"
            )),
            &facts,
            &rt,
        )
        .unwrap();
    }
    let tmpl = std::fs::read_to_string(
        host.path()
            .join("var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl"),
    )
    .unwrap();
    let base = String::from_utf8(fixture("k3s-generated-config.toml")).unwrap();
    let work = tempfile::Builder::new()
        .prefix("kata-k3s")
        .tempdir()
        .unwrap();
    let rendered = tmpl.replacen("{{ template \"base\" . }}", &base, 1);
    assert!(
        !rendered.contains("{{"),
        "only the base include is a template action: {tmpl}"
    );
    // Keep the daemon's side effects in the work dir (k3s's opt path, a fixed stream port).
    let rendered = rendered
        .replace(
            "/var/lib/rancher/k3s/agent/containerd",
            &work.path().join("opt").display().to_string(),
        )
        .replace("\"10010\"", "\"0\"");
    let node = bare_host(work.path());
    std::fs::write(node.join("etc/containerd/config.toml"), &rendered).unwrap();
    let ctd = RealContainerd::new(bin.clone(), &node, work.path());
    ctd.start();
    ctd.wait_ready();
    let report = ctd.cri().unwrap();
    for h in ["kata-qemu-a", "kata-qemu-b", "runc"] {
        assert!(
            report.handlers().contains(&h.to_string()),
            "{h} not served by containerd {}: {report:?}\n{rendered}",
            bin.label
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(report.config_json.as_deref().unwrap()).unwrap();
    assert_eq!(
        cfg["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"], true,
        "{cfg}"
    );
    assert_eq!(cfg["sandboxImage"], "rancher/mirrored-pause:3.6", "{cfg}");
    assert_eq!(
        cfg["containerd"]["runtimes"]["kata-qemu-a"]["options"]["ConfigPath"],
        "/opt/kata-a/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml"
    );
}

/// Every socket a matrix containerd listens on stays in its work dir. containerd 2.4's
/// `config default` names its ttrpc socket (`/run/containerd/containerd.sock.ttrpc`) instead of
/// deriving it from `--address`: two cases of the matrix running at once then shared one host
/// path, and a start could lose the unlink/bind race (CI run 12: "containerd 2.4.2 did not
/// become ready").
#[test]
fn a_matrix_containerd_on_its_default_config_listens_only_in_its_work_dir() {
    for bin in matrix_bins() {
        let work = tempfile::Builder::new()
            .prefix("kata-matrix-sock")
            .tempdir()
            .unwrap();
        let host = bare_host(work.path());
        std::fs::write(
            host.join("etc/containerd/config.toml"),
            bin.config_default(),
        )
        .unwrap();
        let ctd = RealContainerd::new(bin.clone(), &host, work.path());
        ctd.start();
        ctd.wait_ready();
        let ttrpc = ctd.sock.with_extension("sock.ttrpc");
        let exists = ttrpc.exists();
        // NRI is on by default since 2.0 (1.7 ships it disabled, 1.6 has none).
        let nri_enabled = bin.major_minor().0 >= 2;
        let nri = ctd.sock.with_extension("sock.nri");
        let nri_exists = nri.exists();
        ctd.stop();
        assert!(
            exists,
            "containerd {} did not listen on {} (its config's own ttrpc address won)",
            bin.label,
            ttrpc.display()
        );
        assert!(
            !nri_enabled || nri_exists,
            "containerd {} did not put its NRI socket at {} (its config's own path won)",
            bin.label,
            nri.display()
        );
    }
}
