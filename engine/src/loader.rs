//! The bridge from the CLI to the manifest front end.

use std::path::Path;

use crate::kind::Registry;
use crate::pipeline::Pipeline;

/// Loads, validates and expands a manifest.
pub fn load(
    path: &Path,
    profile: Option<String>,
    sets: Vec<String>,
    registry: &Registry,
) -> anyhow::Result<Pipeline> {
    let _ = (profile, sets, registry);
    Err(anyhow::anyhow!(
        "cannot load {}: the manifest front end is not built into this emflow yet",
        path.display()
    ))
}
