//! Esper's Pingora data plane: enforcement from an in-memory mitigation cache, sampling and forwarding.
