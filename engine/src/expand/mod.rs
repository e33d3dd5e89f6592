//! Manifest expansion: from a manifest file to a fully resolved [`Pipeline`].
//!
//! The steps, in order: parse the YAML with locations; merge the `--profile` and apply
//! `--set` (manifest params < profile < `--set`); check the manifest's shape; resolve
//! top-level params (references between params, cycles reported); resolve models; then
//! expand every stage (matrix cells, references, validation against its kind, wiring with
//! matrix joins, merging identical cells). Every step keeps going after a problem so that one
//! run reports every mistake, each with its file, line, column and a hint.

pub mod inputs;
pub mod matrix;
pub mod overrides;
pub mod params;
pub mod refs;
pub mod resources;
pub mod sources;
pub mod stages;
pub mod validate;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::diagnostics::{list_names, ManifestErrors, Problem};
use crate::kind::Registry;
use crate::manifest::raw::{self, RawModel};
use crate::manifest::source::{self, SourceMap};
use crate::manifest::yaml::{self, Value};
use crate::pipeline::{ModelDecl, Pipeline, SourceSpan};

pub use sources::{diagnostic_at, span_of, LoadedSources};

/// How to load a manifest: the CLI's `--profile` and `--set` flags.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub profile: Option<String>,
    /// `a.b=value` overrides; the value is parsed as YAML. A path not starting with a
    /// top-level key (`params`, `stages`, `models`, ...) is short for `params.<path>`.
    pub sets: Vec<String>,
}

/// A loaded pipeline together with the texts its spans point into.
pub struct LoadedManifest {
    pub pipeline: Pipeline,
    pub sources: Arc<LoadedSources>,
}

/// Parses, expands and validates a manifest; every problem found is returned (not just the first).
pub fn load_pipeline(
    path: &Path,
    opts: &LoadOptions,
    registry: &Registry,
) -> Result<Pipeline, ManifestErrors> {
    let src = read_manifest(path)?;
    load_pipeline_str(&src, path, opts, registry)
}

/// A manifest file's text. Reads at most one byte past [`yaml::MAX_TEXT_BYTES`], so a huge
/// file is refused without reading it, and locates the first byte that is not UTF-8.
pub fn read_manifest(path: &Path) -> Result<String, ManifestErrors> {
    let name = path.display().to_string();
    let fail = |problem: Problem, text: String| {
        ManifestErrors::new(path, vec![problem], Arc::new(SourceMap::new(&name, text)))
    };
    let cannot = |e: std::io::Error| {
        fail(
            Problem::new(format!("cannot read manifest {}: {e}", path.display()))
                .help("check the path; `emflow run` takes the manifest file as its argument"),
            String::new(),
        )
    };
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, yaml::MAX_TEXT_BYTES as u64 + 1),
        &mut bytes,
    )
    .map_err(cannot)?;
    if bytes.len() > yaml::MAX_TEXT_BYTES {
        let total = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        bytes.truncate(yaml::MAX_TEXT_BYTES);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        return Err(fail(yaml::too_large(&text, 0, total), text));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bad = e.as_bytes()[at..]
            .iter()
            .take(e.utf8_error().error_len().unwrap_or(1).max(1))
            .map(|b| format!("0x{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        // The lossy text equals the file up to the bad byte, so offsets before it hold; the
        // bad byte becomes U+FFFD (3 bytes), which the label covers.
        let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
        let (line, col) = SourceMap::new("", text.as_str()).manifest().line_col(at);
        let problem = Problem::new(format!(
            "the manifest is not UTF-8 text: byte {bad} at line {line}, column {col} (byte offset {at})"
        ))
        .at(
            source::span_between(at, at + char::REPLACEMENT_CHARACTER.len_utf8()),
            "not UTF-8",
        )
        .help(
            "manifests are UTF-8; re-save the file as UTF-8 (it may be Latin-1, Windows-1252 \
             or UTF-16), e.g. `iconv -f latin1 -t utf-8`",
        );
        fail(problem, text)
    })
}

/// Same from a string (tests, generated manifests); `path` is used for messages and relative paths.
pub fn load_pipeline_str(
    src: &str,
    path: &Path,
    opts: &LoadOptions,
    registry: &Registry,
) -> Result<Pipeline, ManifestErrors> {
    let loaded = load_manifest_str(src, path, opts, registry)?;
    sources::register(&loaded.pipeline.manifest_path, loaded.sources.clone());
    Ok(loaded.pipeline)
}

/// Like [`load_pipeline_str`], returning the sources instead of registering them, for
/// callers that keep several manifests of the same path apart (tests do).
pub fn load_manifest_str(
    src: &str,
    path: &Path,
    opts: &LoadOptions,
    registry: &Registry,
) -> Result<LoadedManifest, ManifestErrors> {
    let manifest_path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let manifest_dir = manifest_path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut sources = SourceMap::new(path.display().to_string(), src);
    let fail = |problems: Vec<Problem>, sources: SourceMap| {
        ManifestErrors::new(path, problems, Arc::new(sources))
    };

    let mut root = match yaml::parse(src, 0) {
        Ok(r) => r,
        Err(problems) => return Err(fail(problems, sources)),
    };
    let mut problems = Vec::new();
    overrides::apply_sets(&mut root, &opts.sets, &mut sources, true, &mut problems);
    overrides::apply_profile(&mut root, opts.profile.as_deref(), &mut problems);
    overrides::apply_sets(&mut root, &opts.sets, &mut sources, false, &mut problems);

    let raw = raw::read(root, &mut problems);
    let params = params::ParamResolver::resolve_all(&raw.params, &mut problems);
    let models = resolve_models(&raw.models, &params, registry, &manifest_dir, &mut problems);
    let stage_names: Vec<&str> = raw.stages.iter().map(|s| s.name.as_str()).collect();
    let stage_set: std::collections::HashSet<&str> = stage_names.iter().copied().collect();
    let ctx = stages::Context {
        registry,
        params: &params,
        models: &models,
        manifest_dir: &manifest_dir,
        stage_names: &stage_names,
        stage_set: &stage_set,
    };
    let instances = stages::expand_stages(&ctx, &raw.stages, &mut problems);
    if !problems.is_empty() {
        return Err(fail(problems, sources));
    }

    let name = raw.name.map(|n| n.value).unwrap_or_else(|| {
        path.file_stem().map_or_else(
            || "manifest".to_string(),
            |s| s.to_string_lossy().into_owned(),
        )
    });
    let stage_nodes: HashMap<String, (SourceSpan, yaml::Node)> = raw
        .stages
        .into_iter()
        .map(|s| (s.name, (s.name_span, s.entry)))
        .collect();
    let pipeline = Pipeline {
        name,
        manifest_path,
        manifest_dir,
        profile: opts.profile.clone(),
        models,
        stages: instances,
    };
    Ok(LoadedManifest {
        pipeline,
        sources: Arc::new(LoadedSources::new(Arc::new(sources), stage_nodes)),
    })
}

/// Where a kind's [`crate::kind::ParamError::param`] (a path below `params:`) is written.
pub fn param_span(pipeline: &Pipeline, stage_id: &str, param: &str) -> Option<SourceSpan> {
    let path = if param.is_empty() {
        "params".to_string()
    } else {
        format!("params.{param}")
    };
    span_of(pipeline, stage_id, &path)
}

/// The schemes the engine handles itself; others need a [`crate::kind::ModelFetcher`].
const LOCAL_SCHEMES: &[&str] = &["file"];

fn resolve_models(
    raw: &[RawModel],
    params: &params::ResolvedParams,
    registry: &Registry,
    manifest_dir: &Path,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, ModelDecl> {
    let mut models = BTreeMap::new();
    for m in raw {
        let stage = format!("models.{}", m.name);
        let mut scope = params::StageScope {
            params,
            matrix: None,
            stage: &stage,
        };
        let Some(source) = refs::substitute(&m.source, &mut scope, problems) else {
            continue;
        };
        let Value::Str(s) = &source.value else {
            problems.push(Problem::must_be(
                format!("model `{}`: `source`", m.name),
                "a string",
                &source,
            ));
            continue;
        };
        let resolved = match scheme_of(s) {
            Some(scheme) if LOCAL_SCHEMES.contains(&scheme) => {
                local_path(&s[scheme.len() + 1..], manifest_dir)
            }
            Some(scheme) => {
                if registry.fetcher(scheme).is_none() {
                    problems.push(
                        Problem::new(format!(
                            "model `{}`: no fetcher for `{scheme}:` sources in this emflow",
                            m.name
                        ))
                        .at(source.span, "unsupported source")
                        .help(format!(
                            "supported: a local path (file, GGUF or HF-format folder){}",
                            if registry_schemes(registry).is_empty() {
                                String::new()
                            } else {
                                format!(
                                    ", or {}",
                                    list_names(
                                        registry_schemes(registry).iter().map(String::as_str)
                                    )
                                )
                            }
                        )),
                    );
                    continue;
                }
                s.clone()
            }
            None => {
                if s.trim().is_empty() {
                    problems.push(
                        Problem::new(format!("model `{}`: `source` is empty", m.name))
                            .at(source.span, "empty"),
                    );
                    continue;
                }
                local_path(s, manifest_dir)
            }
        };
        let shape = model_shape(m, &mut scope, problems);
        models.insert(
            m.name.clone(),
            ModelDecl {
                name: m.name.clone(),
                source: resolved,
                span: source.span,
                shape,
            },
        );
    }
    models
}

/// A model's substituted `shape:` (`None` when absent or null), checked against the built-in
/// shapes and config.json's field names at its manifest line.
fn model_shape(
    m: &RawModel,
    scope: &mut params::StageScope,
    problems: &mut Vec<Problem>,
) -> Option<serde_json::Value> {
    let node = refs::substitute(m.shape.as_ref()?, scope, problems)?;
    let value = match node.to_json() {
        Ok(serde_json::Value::Null) => return None,
        Ok(v) => v,
        Err(p) => {
            problems.push(p);
            return None;
        }
    };
    if let Err(e) = crate::memory::ModelShape::from_decl(&value) {
        problems.push(Problem::new(format!("model `{}`: {e}", m.name)).at(node.span, "this shape"));
        return None;
    }
    Some(value)
}

fn registry_schemes(registry: &Registry) -> Vec<String> {
    ["pip", "hf", "http", "https", "s3"]
        .iter()
        .filter(|s| registry.fetcher(s).is_some())
        .map(|s| format!("`{s}:`"))
        .collect()
}

/// `pip` in `pip:pkg==1#x`; `None` for paths (which may still contain a `:` after a `/`).
fn scheme_of(s: &str) -> Option<&str> {
    let (scheme, _) = s.split_once(':')?;
    let mut chars = scheme.chars();
    (scheme.len() > 1
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '+' || c == '-' || c == '.'
        }))
    .then_some(scheme)
}

fn local_path(p: &str, manifest_dir: &Path) -> String {
    let path = Path::new(p);
    if path.is_absolute() {
        p.to_string()
    } else {
        manifest_dir.join(path).display().to_string()
    }
}
