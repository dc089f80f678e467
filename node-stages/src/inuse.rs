//! Never remove a runtime handler under running pods: before the cri stage drops handlers (a shim
//! disabled) or revert-cri removes them all, the runtime is asked (CRI `ListPodSandbox`) which
//! pods run on them. Upstream kata-deploy's users lost every running Kata pod on an upgrade that
//! removed their handler; here the stage waits for them to go, then fails naming them, unless
//! the operator forces it.

use std::time::{Duration, Instant};

use crate::config::ValidConfig;
use crate::cri_client::Sandbox;
use crate::error::{Result, StageError};
use crate::restart::Restarter;

/// The running pods (`namespace/name`) among `sandboxes` whose handler is one of `handlers`.
pub fn pods_on(sandboxes: &[Sandbox], handlers: &[String]) -> Vec<String> {
    sandboxes
        .iter()
        .filter(|s| s.ready && handlers.contains(&s.handler))
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect()
}

/// Waits until no running pod uses `handlers` (up to the configured wait), then fails naming
/// them, unless removal is forced. A runtime that cannot be asked (no CRI socket) runs no pods
/// we can see: nothing to wait for.
pub fn ensure_unused(
    restarter: &dyn Restarter,
    cfg: &ValidConfig,
    node: &str,
    handlers: &[String],
) -> Result<()> {
    if handlers.is_empty() {
        return Ok(());
    }
    let wait = Duration::from_secs(cfg.cfg.running_pods_wait_seconds);
    let deadline = Instant::now() + wait;
    loop {
        let pods = match restarter.sandboxes()? {
            None => return Ok(()),
            Some(s) => pods_on(&s, handlers),
        };
        if pods.is_empty() {
            return Ok(());
        }
        if cfg.cfg.force_handler_removal {
            tracing::warn!(node, handlers = ?handlers, pods = ?pods, "removing runtime handlers under running pods (stage.runningKataPods.force): those pods lose their runtime");
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(StageError::HandlersInUse {
                node: node.to_string(),
                handlers: handlers.join(", "),
                count: pods.len(),
                pods: pods.join(", "),
                waited: wait.as_secs(),
            });
        }
        tracing::info!(node, handlers = ?handlers, pods = ?pods, "waiting for running pods of handlers this run removes");
        std::thread::sleep(Duration::from_secs(1).min(wait));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(name: &str, handler: &str, ready: bool) -> Sandbox {
        Sandbox {
            namespace: "team".into(),
            name: name.into(),
            handler: handler.into(),
            ready,
        }
    }

    #[test]
    fn only_running_pods_of_the_removed_handlers_count() {
        let s = [
            sb("a", "kata-qemu", true),
            sb("b", "kata-qemu", false),
            sb("c", "kata-clh", true),
            sb("d", "", true),
        ];
        assert_eq!(pods_on(&s, &["kata-qemu".into()]), ["team/a"]);
        assert_eq!(
            pods_on(&s, &["kata-qemu".into(), "kata-clh".into()]),
            ["team/a", "team/c"]
        );
        assert!(pods_on(&s, &["runc".into()]).is_empty());
    }
}
