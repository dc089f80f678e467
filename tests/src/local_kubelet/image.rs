//! Container image → host binary mapping, and the argv a container runs.
//!
//! Our images hold one binary each, so "running the image" means running that binary. An image
//! is matched by its repository name (last path component, without registry, tag or digest), so
//! `quay.io/kata-containers/kata-deploy-stage:3.2` and `localhost/kata-deploy-stage@sha256:..`
//! both map to the `kata-deploy-stage` entry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Repository name of an image reference: `reg:5000/a/b:tag@sha256:x` → `b`.
pub fn repository_name(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    // A ':' in the last component can only be a tag (a registry port lives before a '/').
    last.split(':').next().unwrap_or(last)
}

/// The `--image NAME=PATH` table.
#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    entries: BTreeMap<String, PathBuf>,
}

impl ImageMap {
    /// Builds the table from `(name, path)` pairs; `name` may be a repository name or a full
    /// image reference (only its repository name counts).
    pub fn new<I, S, P>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (S, P)>,
        S: AsRef<str>,
        P: Into<PathBuf>,
    {
        let entries = pairs
            .into_iter()
            .map(|(n, p)| (repository_name(n.as_ref()).to_string(), p.into()))
            .collect();
        ImageMap { entries }
    }

    /// Parses one `NAME=PATH` flag value.
    pub fn parse_flag(s: &str) -> Result<(String, PathBuf), String> {
        match s.split_once('=') {
            Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
            _ => Err(format!("expected NAME=PATH, got {s:?}")),
        }
    }

    /// The binary mapped to an image, if any.
    pub fn lookup(&self, image: &str) -> Option<&Path> {
        self.entries
            .get(repository_name(image))
            .map(PathBuf::as_path)
    }
}

/// What a container executes: program and arguments (already `$(VAR)`-expanded by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Argv {
    /// Program to execute on the host.
    pub program: PathBuf,
    /// Arguments after the program.
    pub args: Vec<String>,
}

/// Resolves the argv of a container, the way a runtime combines image entrypoint and pod spec.
///
/// * no `command`: the mapped binary is the entrypoint, followed by `args`;
/// * `command[0]` names the image's binary (its basename is the repository name or the mapped
///   binary's file name): replaced by the mapped binary, since the in-image path (e.g.
///   `/usr/local/bin/kata-deploy-stage`) does not exist on this host;
/// * any other `command[0]` (e.g. `/bin/sh`): run as is on the host, which is how tests run tiny
///   scripts and how an unmapped helper image with an explicit command still works.
///
/// `None` when there is nothing to run (unmapped image and no command).
pub fn resolve_argv(
    image: &str,
    mapped: Option<&Path>,
    command: &[String],
    args: &[String],
) -> Option<Argv> {
    match (command.split_first(), mapped) {
        (None, Some(bin)) => Some(Argv {
            program: bin.to_path_buf(),
            args: args.to_vec(),
        }),
        (None, None) => None,
        (Some((first, rest)), _) => {
            let base = Path::new(first)
                .file_name()
                .and_then(|b| b.to_str())
                .unwrap_or(first);
            let names_image = base == repository_name(image)
                || mapped
                    .and_then(|m| m.file_name())
                    .and_then(|b| b.to_str())
                    .is_some_and(|b| b == base);
            let program = match mapped {
                Some(bin) if names_image => bin.to_path_buf(),
                _ => PathBuf::from(first),
            };
            let mut all = rest.to_vec();
            all.extend(args.iter().cloned());
            Some(Argv { program, args: all })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn repository_names() {
        assert_eq!(repository_name("kata-deploy-stage"), "kata-deploy-stage");
        assert_eq!(
            repository_name("quay.io/kata-containers/kata-deploy-stage:3.2.0"),
            "kata-deploy-stage"
        );
        assert_eq!(repository_name("localhost:5000/x/dispatcher"), "dispatcher");
        assert_eq!(repository_name("r/a/b:t@sha256:abcd"), "b");
        assert_eq!(repository_name("b@sha256:abcd"), "b");
    }

    #[test]
    fn map_lookup_ignores_registry_and_tag() {
        let m = ImageMap::new([("quay.io/x/kata-deploy-stage:1", "/bin/stage")]);
        assert_eq!(
            m.lookup("example.org/kata-deploy-stage:latest"),
            Some(Path::new("/bin/stage"))
        );
        assert_eq!(m.lookup("kata-deploy-job-dispatcher"), None);
        assert!(ImageMap::parse_flag("a=/b").is_ok());
        assert!(ImageMap::parse_flag("a").is_err());
        assert!(ImageMap::parse_flag("=x").is_err());
    }

    #[test]
    fn argv_entrypoint_and_args() {
        let bin = Path::new("/build/kata-deploy-stage");
        let a = resolve_argv("q/kata-deploy-stage:1", Some(bin), &[], &s(&["cri"])).unwrap();
        assert_eq!(a.program, bin);
        assert_eq!(a.args, s(&["cri"]));
    }

    #[test]
    fn argv_command_naming_image_is_replaced() {
        let bin = Path::new("/build/stage-bin");
        let a = resolve_argv(
            "q/kata-deploy-stage:1",
            Some(bin),
            &s(&["/usr/local/bin/kata-deploy-stage", "--dry-run"]),
            &s(&["label"]),
        )
        .unwrap();
        assert_eq!(a.program, bin);
        assert_eq!(a.args, s(&["--dry-run", "label"]));
        // Matching on the mapped binary's own file name works too.
        let a = resolve_argv("q/img", Some(bin), &s(&["stage-bin"]), &[]).unwrap();
        assert_eq!(a.program, bin);
    }

    #[test]
    fn argv_other_command_runs_on_host() {
        let a = resolve_argv(
            "q/kata-deploy-stage",
            Some(Path::new("/b")),
            &s(&["/bin/sh", "-c"]),
            &s(&["exit 3"]),
        )
        .unwrap();
        assert_eq!(a.program, Path::new("/bin/sh"));
        assert_eq!(a.args, s(&["-c", "exit 3"]));
        let a = resolve_argv("busybox", None, &s(&["sh"]), &[]).unwrap();
        assert_eq!(a.program, Path::new("sh"));
        assert!(resolve_argv("busybox", None, &[], &s(&["x"])).is_none());
    }
}
