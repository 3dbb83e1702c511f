//! Esper's control plane: policies, lists, manual mitigations, the decision log and the
//! admin API (`/api/v1/*`), plus `esperctl`, the API's command-line client ([`ctl`]).
//!
//! [`start`] (or [`run`]) serves three listeners: the API (8080), health (8081) and
//! metrics (9090). The store is SQLite through sqlx, behind [`store::ControlStore`].

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod config;
pub mod ctl;
pub mod health;
pub mod heartbeats;
pub mod metrics;
pub mod mirror;
mod server;
pub mod state;
pub mod store;
pub mod types;

pub use api::check_proxy_documents_with;
pub use config::{Args, Config};
pub use esper_common::config::Reloaded;
pub use server::{Listeners, Reloader, Started, migrate, run, start, start_staged};
pub use store::{ControlStore, StoreError};
pub use types::*;

/// Why the control plane could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] esper_common::ConfigError),
    #[error(transparent)]
    Bind(#[from] esper_common::http::BindError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the control store has pending migrations ({0}); run `esper server migrate` or start without --no-migrations"
    )]
    PendingMigrations(String),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the {what} listener failed: {source}")]
    Serve {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the control-plane task failed: {0}")]
    Task(String),
}
