//! Esper's policy engine: policy language, evaluator, entity state and the worker loop.
