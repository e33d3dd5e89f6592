//! One module per stage kind. Add a kind here and in [`register`].

use emflow_engine::Registry;

/// Adds every kind of this crate to `registry`.
pub fn register(registry: Registry) -> Registry {
    registry
}
