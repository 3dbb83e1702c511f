//! Esper's control plane: policies, lists, manual mitigations, the decision log and the admin API.
