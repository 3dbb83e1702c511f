//! Helpers shared by this crate's integration tests.

pub mod derived_event;
