//! The bridge from the CLI to the manifest front end ([`crate::expand`]).

use std::path::Path;

use crate::expand::{load_pipeline, LoadOptions};
use crate::kind::Registry;
use crate::pipeline::Pipeline;

/// Loads, validates and expands a manifest; manifest mistakes come back rendered as
/// located diagnostics (file, line, column, snippet, hint).
pub fn load(
    path: &Path,
    profile: Option<String>,
    sets: Vec<String>,
    registry: &Registry,
) -> anyhow::Result<Pipeline> {
    let options = LoadOptions { profile, sets };
    load_pipeline(path, &options, registry)
        .map_err(|errors| anyhow::anyhow!("{:?}", miette::Report::new(errors)))
}
