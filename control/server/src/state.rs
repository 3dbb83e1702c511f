//! What every handler shares: the store, the broker clients, heartbeats, the mitigation
//! mirror, metrics, and the switch through which the API can stop its own server.

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use esper_common::ShutdownTrigger;
use esper_engine::policy::ActivePolicies;
use esper_protocol::{IngestionClient, MitigationClient};
use parking_lot::Mutex;

use crate::heartbeats::Heartbeats;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::store::ControlStore;

/// Begins this server's shutdown, and holds how long in-flight requests may then run.
#[derive(Debug)]
pub struct Stopper {
    trigger: ShutdownTrigger,
    drain: Mutex<Duration>,
    /// The process this server runs in, when it stops its parts in an order of its own
    /// (`esper dev`): a shutdown asked through the API is handed to it.
    host: Option<ShutdownTrigger>,
}

impl Stopper {
    pub fn new(
        trigger: ShutdownTrigger,
        drain: Duration,
        host: Option<ShutdownTrigger>,
    ) -> Stopper {
        Stopper {
            trigger,
            drain: Mutex::new(drain),
            host,
        }
    }

    /// Begins shutdown with `drain` as the limit for in-flight requests; in a host that
    /// orders its parts' stop, asks the host, which stops this server in its turn.
    pub fn stop(&self, drain: Duration) {
        *self.drain.lock() = drain;
        match &self.host {
            Some(host) => host.trigger(),
            None => self.trigger.trigger(),
        }
    }

    /// Begins shutdown with the configured drain.
    pub fn stop_default(&self) {
        self.trigger.trigger();
    }

    pub fn drain(&self) -> Duration {
        *self.drain.lock()
    }
}

/// The shared state itself.
pub struct Inner {
    pub store: Arc<dyn ControlStore>,
    pub ingestion: IngestionClient,
    pub mitigation: MitigationClient,
    pub heartbeats: Heartbeats,
    pub mirror: Arc<Mirror>,
    pub metrics: Metrics,
    /// The configured `admin_token`; a reload (SIGHUP) may replace it.
    pub admin_token: arc_swap::ArcSwapOption<String>,
    /// Held by a token's revocation and by a reload's change of `admin_token`, each of
    /// which checks the other's side: together they could remove the last way in.
    pub admin_change: tokio::sync::Mutex<()>,
    pub started: Instant,
    pub shutdown_timeout: Duration,
    pub stopper: Arc<Stopper>,
    /// The last `ActivePolicies` built, reused while the revision stays the same.
    pub active_cache: Mutex<Option<Arc<ActivePolicies>>>,
    /// The headers and cookies the active policies of a revision read, kept while the
    /// revision stays the same.
    pub reported_cache: Mutex<Option<esper_protocol::ReportedFields>>,
    /// Wakes proxies' long-polls when a policy is written or deleted through this
    /// instance.
    pub policies_changed: tokio::sync::Notify,
    /// Wakes proxies' long-polls when the proxy configuration is replaced.
    pub proxy_config_changed: tokio::sync::Notify,
    /// Wakes proxies' long-polls when the challenge key is rotated.
    pub challenge_key_changed: tokio::sync::Notify,
    /// Fires when the server begins to stop: long-polls answer at once, so a graceful
    /// stop does not wait out their waits.
    pub stopping: esper_common::Shutdown,
    /// When each stored token's use was last recorded (see `auth::note_use`).
    pub token_uses: Mutex<std::collections::HashMap<String, Instant>>,
}

/// Cheap to clone; handlers take it as `State<AppState>`.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
