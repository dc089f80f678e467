//! The host files each shim's Kata configuration points the runtime at: the hypervisor binary,
//! the guest kernel, image or initrd, and firmware. containerd must never route a handler to a
//! configuration whose assets are missing on the host: the node would be labelled ready for Kata
//! and every pod of that handler would fail at sandbox start with a hypervisor error. The cri
//! stage checks them before it changes the runtime's configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;

use toml_edit::{DocumentMut, Item};

use crate::config::Install;
use crate::error::{Result, StageError};
use crate::hostfs::HostFs;

/// The `[hypervisor.<name>]` keys that name a host file the runtime opens.
pub const ASSET_KEYS: [&str; 5] = ["path", "kernel", "image", "initrd", "firmware"];

/// A named asset and the file that named it last (drop-ins override the base file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedAsset {
    /// The absolute host path.
    pub path: PathBuf,
    /// The configuration file whose value wins.
    pub named_in: PathBuf,
}

/// The assets a shim's configuration names, reading `files` (the base configuration, then its
/// drop-ins in name order: a later value wins, as the runtime merges them). Empty values (an
/// unused initrd or firmware) name nothing.
pub fn named_assets(files: &[(PathBuf, String)]) -> Result<BTreeMap<&'static str, NamedAsset>> {
    let mut out = BTreeMap::new();
    for (file, text) in files {
        let doc: DocumentMut = text.parse().map_err(|e| {
            StageError::bad_input(
                file,
                format!("not valid TOML: {e}"),
                "Fix the file (a drop-in from shims.<name>.dropIn, or the payload's base configuration) and re-run",
            )
        })?;
        let Some(hv) = doc.get("hypervisor").and_then(Item::as_table_like) else {
            continue;
        };
        for (_, table) in hv.iter() {
            let Some(table) = table.as_table_like() else {
                continue;
            };
            for key in ASSET_KEYS {
                if let Some(v) = table.get(key).and_then(Item::as_str) {
                    if v.trim().is_empty() {
                        out.remove(key);
                    } else {
                        let asset = NamedAsset {
                            path: PathBuf::from(v),
                            named_in: file.clone(),
                        };
                        out.insert(key, asset);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The configuration files of `shim` as installed: the base file, then `config.d/*.toml`.
fn installed_config_files(
    fs: &HostFs,
    install: &Install,
    shim: &str,
) -> Result<Vec<(PathBuf, String)>> {
    let base = install.shim_config_path(shim);
    let mut paths = vec![base];
    let dropins = install.shim_config_dir(shim).join("config.d");
    paths.extend(
        fs.list_dir(&dropins)
            .into_iter()
            .filter(|n| n.ends_with(".toml"))
            .map(|n| dropins.join(n)),
    );
    let mut out = Vec::new();
    for p in paths {
        if let Some(bytes) = fs.read(&p)? {
            out.push((p, String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
    Ok(out)
}

/// Fails, naming the first missing one, unless every asset each of `shims`' installed
/// configuration names resolves to a file on the host. Reads only.
pub fn check_guest_assets(
    fs: &HostFs,
    install: &Install,
    shims: &[&str],
    node: &str,
) -> Result<()> {
    for shim in shims {
        let files = installed_config_files(fs, install, shim)?;
        if files.is_empty() {
            return Err(StageError::bad_input(
                install.shim_config_path(shim),
                format!("node {node}: shim {shim} has no installed configuration"),
                "Run the artifacts stage first (the install runs host-check, artifacts, cri in that order); nothing was changed in the runtime's configuration",
            ));
        }
        for (key, asset) in named_assets(&files)? {
            if fs.resolves_to_file(&asset.path)? {
                continue;
            }
            let hint = if asset.path.starts_with(&install.prefix) {
                "The payload did not install it: check that the payload (the Kata release image) has this shim's components for this architecture, or disable the shim. Nothing was changed in the runtime's configuration"
            } else {
                "It is outside the install prefix: install that file on the node, or fix the drop-in (shims.<name>.dropIn) that names it. Nothing was changed in the runtime's configuration"
            };
            return Err(StageError::bad_input(
                &asset.named_in,
                format!(
                    "node {node}: shim {shim}: [hypervisor] {key} = {:?} is not a file on this host, so every pod of this handler would fail to start",
                    asset.path.display()
                ),
                hint,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn file(name: &str, text: &str) -> (PathBuf, String) {
        (PathBuf::from(name), text.to_owned())
    }

    #[test]
    fn a_later_drop_in_wins_and_an_empty_value_names_nothing() {
        let base = file(
            "/opt/kata/base.toml",
            "[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu\"\nkernel = \"/opt/kata/k\"\nimage = \"/opt/kata/i\"\ninitrd = \"\"\nkernel_params = \"x\"\n",
        );
        let dropin = file(
            "/opt/kata/config.d/50-user-overrides.toml",
            "[hypervisor.qemu]\nkernel = \"/srv/custom-vmlinux\"\nimage = \"\"\ninitrd = \"/opt/kata/initrd\"\n",
        );
        let got = named_assets(&[base, dropin]).unwrap();
        let keys: Vec<_> = got.keys().copied().collect();
        assert_eq!(keys, ["initrd", "kernel", "path"]);
        assert_eq!(got["kernel"].path, Path::new("/srv/custom-vmlinux"));
        assert_eq!(
            got["kernel"].named_in,
            Path::new("/opt/kata/config.d/50-user-overrides.toml")
        );
        assert_eq!(got["path"].named_in, Path::new("/opt/kata/base.toml"));
    }

    #[test]
    fn a_file_without_a_hypervisor_table_names_nothing_and_bad_toml_is_refused() {
        assert!(named_assets(&[file("a.toml", "[runtime]\ndebug = true\n")])
            .unwrap()
            .is_empty());
        let e = named_assets(&[file("b.toml", "[hypervisor.qemu\n")]).unwrap_err();
        assert!(e.to_string().contains("b.toml"), "{e}");
    }
}
