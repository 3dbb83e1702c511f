//! The ingestion broker: a bounded, leased work queue of request events behind HTTP.
