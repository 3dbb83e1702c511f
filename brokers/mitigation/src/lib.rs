//! The mitigation broker: active mitigations, per-entity lookup and a cursor-based delta stream.
