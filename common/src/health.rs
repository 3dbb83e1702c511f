//! Health reporting: `/healthz` (alive), `/readyz` (ready to serve, dependencies
//! included) and `/healthz/detailed` (every component with its status). 200 when healthy,
//! 503 when not.

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::shutdown::Shutdown;

/// One component of a service (a store, a broker it depends on, a background loop).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentHealth {
    pub name: String,
    pub healthy: bool,
    /// When false, the service stays ready while this component is down (degraded).
    pub required: bool,
    pub detail: String,
}

impl ComponentHealth {
    pub fn new(name: &str, healthy: bool, required: bool, detail: impl Into<String>) -> Self {
        ComponentHealth {
            name: name.to_string(),
            healthy,
            required,
            detail: detail.into(),
        }
    }
}

/// A service's health: `ok`, `degraded` (an optional component is down) or `unavailable`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub service: String,
    pub status: String,
    pub components: Vec<ComponentHealth>,
}

impl HealthReport {
    /// Summarises `components` into a status.
    pub fn new(service: &str, components: Vec<ComponentHealth>) -> HealthReport {
        let status = if components.iter().any(|c| c.required && !c.healthy) {
            "unavailable"
        } else if components.iter().any(|c| !c.healthy) {
            "degraded"
        } else {
            "ok"
        };
        HealthReport {
            service: service.to_string(),
            status: status.to_string(),
            components,
        }
    }

    /// Ready means no required component is down.
    pub fn is_ready(&self) -> bool {
        self.status != "unavailable"
    }
}

/// Something that can report a service's health.
#[async_trait::async_trait]
pub trait HealthCheck: Send + Sync {
    async fn report(&self) -> HealthReport;
}

fn answer(report: HealthReport, ok: bool) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

/// `/healthz`, `/readyz` and `/healthz/detailed`. Liveness turns 503 once shutdown
/// begins, so a load balancer stops sending new work while in-flight work drains.
pub fn routes(check: Arc<dyn HealthCheck>, shutdown: Shutdown) -> Router {
    let live = shutdown.clone();
    let ready_check = check.clone();
    let ready_shutdown = shutdown;
    Router::new()
        .route(
            "/healthz",
            get(move || {
                let live = live.clone();
                async move {
                    if live.is_triggered() {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(serde_json::json!({"status": "shutting_down"})),
                        )
                            .into_response()
                    } else {
                        (
                            StatusCode::OK,
                            axum::Json(serde_json::json!({"status": "ok"})),
                        )
                            .into_response()
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let check = ready_check.clone();
                let shutdown = ready_shutdown.clone();
                async move {
                    let report = check.report().await;
                    let ok = report.is_ready() && !shutdown.is_triggered();
                    answer(report, ok)
                }
            }),
        )
        .route(
            "/healthz/detailed",
            get(move || {
                let check = check.clone();
                async move {
                    let report = check.report().await;
                    let ok = report.is_ready();
                    answer(report, ok)
                }
            }),
        )
}
