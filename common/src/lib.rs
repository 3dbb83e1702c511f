//! Runtime pieces every Esper service shares: configuration layering, telemetry,
//! shutdown, and the HTTP plumbing (JSON errors, bearer auth, health, metrics, serving).

pub mod config;
pub mod health;
pub mod http;
pub mod metrics;
pub mod plain;
pub mod service;
pub mod shutdown;
pub mod stdout;
pub mod telemetry;
pub mod throttle;
pub mod tls;

pub use config::{ConfigError, EnvSource};
pub use health::{ComponentHealth, HealthReport};
pub use http::{ApiError, Json};
pub use shutdown::{Shutdown, ShutdownTrigger};
