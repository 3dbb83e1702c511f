//! The ops server: `/healthz`, `/readyz` and `/healthz/detailed` (traffic is required;
//! the brokers are not, so their loss makes the proxy degraded but still ready) and
//! `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use esper_common::health::{ComponentHealth, HealthCheck, HealthReport};
use esper_common::{Shutdown, http::standard_layers};
use esper_protocol::Endpoints;

use crate::cache::MitigationCache;
use crate::metrics::Metrics;
use crate::proxy::InFlight;
use crate::report::ReportNames;
use crate::status::{Outcome, Status};

/// Body limit of the ops server (it takes no bodies).
const BODY_LIMIT: usize = 16 * 1024;

/// Everything the health report looks at.
pub struct Health {
    pub traffic_addr: SocketAddr,
    /// The brokers in force (a reload may move them).
    pub ingestion: Endpoints,
    pub mitigation: Endpoints,
    pub cache: Arc<MitigationCache>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    pub in_flight: InFlight,
    /// The control plane followed, if any.
    pub control: Option<Endpoints>,
    /// What events carry, the names the policies read among it.
    pub report_names: Arc<ReportNames>,
}

fn ago(t: Instant) -> String {
    format!("{:.1}s ago", t.elapsed().as_secs_f64())
}

#[async_trait::async_trait]
impl HealthCheck for Health {
    async fn report(&self) -> HealthReport {
        let serving = self.status.serving();
        let traffic = ComponentHealth::new(
            "traffic",
            serving,
            true,
            if serving {
                format!(
                    "serving on {}, {} requests in flight",
                    self.traffic_addr,
                    self.in_flight.get()
                )
            } else {
                format!("not serving on {}", self.traffic_addr)
            },
        );
        let cached = self.cache.len();
        let (ingestion_url, mitigation_url) = (self.ingestion.given(), self.mitigation.given());
        let stream = if self.status.stream_connected() {
            ComponentHealth::new(
                "mitigation_stream",
                true,
                false,
                format!("following {}; {cached} mitigations cached", mitigation_url),
            )
        } else if let Outcome::Failed(at, e) = self.status.stream() {
            ComponentHealth::new(
                "mitigation_stream",
                false,
                false,
                format!(
                    "disconnected from {} ({}: {e}); enforcing {cached} cached mitigations",
                    mitigation_url,
                    ago(at)
                ),
            )
        } else {
            ComponentHealth::new(
                "mitigation_stream",
                false,
                false,
                format!("connecting to {mitigation_url}"),
            )
        };
        let dropped = self.metrics.dropped_total();
        let ingestion = match self.status.ingest() {
            Outcome::Idle => ComponentHealth::new(
                "ingestion",
                true,
                false,
                format!("no events sent to {ingestion_url} yet"),
            ),
            Outcome::Ok(at) => ComponentHealth::new(
                "ingestion",
                true,
                false,
                format!(
                    "last batch accepted by {} {}; {dropped} events dropped in total",
                    ingestion_url,
                    ago(at)
                ),
            ),
            Outcome::Failed(at, e) => ComponentHealth::new(
                "ingestion",
                false,
                false,
                format!(
                    "last batch to {} failed {}: {e}; {dropped} events dropped in total",
                    ingestion_url,
                    ago(at)
                ),
            ),
        };
        let mut components = vec![traffic, stream, ingestion];
        // Not required: without it the proxy keeps its configuration and key in force.
        if let Some(control) = &self.control {
            let url = control.given();
            components.push(match self.status.control() {
                Outcome::Idle => {
                    ComponentHealth::new("control_plane", true, false, format!("asking {url}"))
                }
                Outcome::Ok(at) => {
                    let read = self.report_names.policies_read();
                    let reporting = if read.headers.is_empty() && read.cookies.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; reporting what its policies read: headers {:?}, cookies {:?}",
                            read.headers, read.cookies
                        )
                    };
                    ComponentHealth::new(
                        "control_plane",
                        true,
                        false,
                        format!("{url} answered {}{reporting}", ago(at)),
                    )
                }
                Outcome::Failed(at, e) => ComponentHealth::new(
                    "control_plane",
                    false,
                    false,
                    format!(
                        "failed {}: {e}; the configuration and challenge key in force stay",
                        ago(at)
                    ),
                ),
            });
        }
        HealthReport::new("esper-proxy", components)
    }
}

/// The ops router.
pub fn router(health: Health, shutdown: Shutdown) -> Router {
    let registry = health.metrics.registry().clone();
    let routes = esper_common::health::routes(Arc::new(health), shutdown)
        .merge(esper_common::metrics::route(registry));
    standard_layers(routes, BODY_LIMIT)
}
