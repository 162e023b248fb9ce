//! Incremental engine (stub while being written).
