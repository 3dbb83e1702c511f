//! The operator binaries' shared code: the `esper dev` composition of every service in
//! one process, and the demo app it protects.

pub mod demo;
