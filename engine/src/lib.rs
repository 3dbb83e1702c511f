//! Esper's policy engine: policy language, evaluator, entity state and the worker loop.

pub mod eval;
pub mod expr;
pub mod policy;
pub mod replay;
pub mod worker;

pub use worker::{Args, Config, Connections, WorkerError, run, run_with};

pub use policy::{
    ActivePolicies, ListKind, NamedList, PolicyError, PolicySpec, parse_policies, policies_to_toml,
};
