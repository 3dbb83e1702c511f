//! The policy follower: keeps the worker's compiled policies in step with the control
//! plane (`GET /api/v1/policies/active`, swapped in when the revision changes) or with a
//! policy file (re-read when its content changes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use esper_common::Shutdown;
use esper_protocol::RevocationMark;
use parking_lot::RwLock;

use super::control::ControlClient;
use super::status::{Metrics, Status};
use crate::eval::{Evaluator, PolicySet};
use crate::policy::{PolicyError, parse_policies};

/// The policies in force, shared by every loop.
#[derive(Default)]
pub(crate) struct PolicyHandle {
    current: RwLock<Option<Arc<PolicySet>>>,
}

impl PolicyHandle {
    /// The policies in force; `None` until the first load.
    pub fn current(&self) -> Option<Arc<PolicySet>> {
        self.current.read().clone()
    }

    fn set(&self, set: Arc<PolicySet>) {
        *self.current.write() = Some(set);
    }
}

/// Where policies come from.
pub(crate) enum Source {
    Control(ControlClient),
    File {
        path: PathBuf,
        /// The text last loaded, to notice changes.
        last: Option<String>,
        revision: i64,
    },
}

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("cannot read policies file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("policies file {path}: {error}")]
    Invalid { path: String, error: PolicyError },
}

/// Reads and parses a policy file.
pub fn read_policy_file(path: &Path) -> Result<(String, PolicySet), PolicyFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let specs =
        parse_policies(&text).map_err(|error| PolicyFileError::Invalid { path: shown, error })?;
    Ok((text, PolicySet::from_specs(0, specs)))
}

/// Revocations per `GET /api/v1/decisions/revocations`.
const REVOCATION_PAGE: usize = 1000;

pub(crate) struct Follower {
    pub source: Source,
    /// Where the revocations not yet read start (none read yet: every one that matters).
    pub revoked_after: Option<RevocationMark>,
    /// Following revocations failed last time (logged once per run of failures).
    pub revocations_failing: bool,
    pub handle: Arc<PolicyHandle>,
    pub evaluator: Evaluator,
    /// The worker's: calls to the control plane end when it begins.
    pub shutdown: Shutdown,
    pub metrics: Metrics,
    pub status: Arc<Status>,
}

impl Follower {
    /// Checks once for new policies; installs them when they changed.
    pub async fn refresh(&mut self) {
        let current = self.handle.current().map(|s| s.revision);
        let mut reachable = true;
        let next = match &mut self.source {
            // A control plane that hangs would hold the call for the client's whole
            // timeout; shutdown does not wait for it.
            Source::Control(client) => match self.shutdown.unless(client.active_policies()).await {
                None => return,
                Some(Ok(active)) => {
                    self.status.control.ok();
                    (current != Some(active.revision)).then(|| PolicySet::compile(&active))
                }
                Some(Err(e)) => {
                    reachable = false;
                    self.metrics.policy_errors.inc();
                    self.metrics.control_errors.inc();
                    self.status.control.failed(&e);
                    tracing::warn!(error = %e, "cannot fetch policies from the control plane; keeping the ones in force");
                    None
                }
            },
            Source::File {
                path,
                last,
                revision,
            } => {
                let text = match std::fs::read_to_string(&*path) {
                    Ok(text) => Some(text),
                    Err(e) => {
                        if last.take().is_some() {
                            self.metrics.policy_errors.inc();
                            tracing::error!(path = %path.display(), error = %e, "cannot read the policies file; keeping the policies in force");
                        }
                        None
                    }
                };
                if text.is_some() && text != *last {
                    match read_policy_file(path) {
                        Ok((text, set)) => {
                            *revision += 1;
                            *last = Some(text);
                            let mut set = set;
                            set.revision = *revision;
                            Some(set)
                        }
                        Err(e) => {
                            self.metrics.policy_errors.inc();
                            // Remember the bad text so the error is logged once per change.
                            *last = text;
                            tracing::error!(error = %e, "policies file not reloaded; keeping the ones in force");
                            None
                        }
                    }
                } else {
                    None
                }
            }
        };
        if let Some(set) = next {
            self.install(set).await;
        }
        if reachable {
            self.follow_revocations().await;
        }
    }

    /// Re-arms the policies whose decisions were revoked since the last look, so that
    /// an entity that goes on abusing is decided against again.
    async fn follow_revocations(&mut self) {
        let Source::Control(client) = &self.source else {
            return;
        };
        let client = client.clone();
        let Some(set) = self.handle.current() else {
            return;
        };
        loop {
            let page = match self
                .shutdown
                .unless(client.revocations(self.revoked_after.as_ref(), REVOCATION_PAGE))
                .await
            {
                None => return,
                Some(Ok(page)) => page,
                Some(Err(e)) => {
                    self.metrics.control_errors.inc();
                    self.revocations_failed(
                        "cannot read revoked decisions from the control plane",
                        &e,
                    );
                    return;
                }
            };
            let more = page.revocations.len() >= REVOCATION_PAGE;
            if !page.revocations.is_empty() {
                match self
                    .evaluator
                    .forgive(&set, &page.revocations, self.evaluator.clock().now())
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        rearmed = n,
                        "policies re-armed for entities whose decisions were revoked"
                    ),
                    Err(e) => {
                        // The mark stays: the page is read and applied again next time.
                        self.revocations_failed("cannot re-arm policies of revoked decisions", &e);
                        return;
                    }
                }
            }
            self.revoked_after = Some(page.next);
            if std::mem::take(&mut self.revocations_failing) {
                tracing::info!("revoked decisions followed again");
            }
            if !more {
                return;
            }
        }
    }

    /// Logs the first failure of a run of them (each is retried at the next refresh).
    fn revocations_failed(&mut self, what: &str, error: &dyn std::fmt::Display) {
        if !std::mem::replace(&mut self.revocations_failing, true) {
            tracing::warn!(%error, "{what}; will retry");
        }
    }

    async fn install(&mut self, set: PolicySet) {
        for w in set.warnings() {
            tracing::warn!(revision = set.revision, "{w}");
        }
        let set = Arc::new(set);
        self.handle.set(set.clone());
        // Loops that took the old set a moment ago may still add to dropped policies;
        // idle cleanup removes that state.
        if let Err(e) = self.evaluator.install(&set).await {
            tracing::warn!(error = %e, "cannot drop the state of changed policies");
        }
        self.metrics.policies_loaded.set(set.len() as i64);
        self.metrics.policies_revision.set(set.revision);
        tracing::info!(
            revision = set.revision,
            policies = set.len(),
            "policies loaded"
        );
    }

    /// Refreshes every `every` until shutdown.
    pub async fn run(mut self, every: Duration) {
        loop {
            self.refresh().await;
            if self.shutdown.sleep(every).await {
                break;
            }
        }
    }
}
