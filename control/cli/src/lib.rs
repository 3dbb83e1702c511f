//! The operator binaries' shared code: the `esper` command tree, the `esper dev`
//! composition of every service in one process, the seed's operator verbs, and the demo
//! app `esper dev` protects.

pub mod autoscale;
pub mod cli;
pub mod demo;
pub mod dev;
pub mod memprofile;
pub mod ops;
pub mod profile;
