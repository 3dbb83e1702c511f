//! The operator binaries: `esper` (every service, and `esper dev`) and `esperctl`.
