//! `emflow export`, and the stable results folder `emflow run` refreshes: a manifest's cached
//! outputs copied out of the store under the names people and other tools expect.
//!
//! The store names content by digest (`objects/ab/ab12...`, `trees/7d/7d37...`), which is
//! right for caching and wrong for a person or a script. An export writes
//! `<to>/<stage id>/<output><extension>`: `.jsonl` for the line-per-record types, `.json` for a
//! summary, a folder for adapters, models and reports. Each output is copied to a temporary
//! name beside its place and renamed over the old copy, so a crash leaves the previous export
//! or the new one, never half of one; copies are writable, so the next export can replace them.
//!
//! An adapter's `adapter_config.json` records its base as the blake3 digest the stage key
//! holds (a store path would differ between stores). Exported, it names the base as a user
//! loads it — the HF id (and `revision`) of an `hf:` source, or the folder or file of a local
//! one — so `AutoPeftModelForCausalLM.from_pretrained(<export>)` works without edits; the
//! digest moves to `emflow_base_model_digest`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use emflow_cache::{OutputEntry, StageRecord, Store};
use serde_json::Value;

use crate::kind::{ArtifactType, Registry};
use crate::pipeline::{InputRef, Pipeline};
use crate::plan::{model_source, ModelSource, Planner};

/// One output written by an export.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Exported {
    pub stage: String,
    pub output: String,
    pub path: PathBuf,
    /// Something the user should know about this copy (e.g. a base model no tool can load).
    pub note: Option<String>,
}

/// Where a manifest's results go for people: `results/<manifest file stem>[-<profile>]`,
/// relative to the current folder.
pub fn results_dir(pipeline: &Pipeline) -> PathBuf {
    let stem = pipeline
        .manifest_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| pipeline.name.clone());
    let name = match &pipeline.profile {
        Some(profile) => format!("{stem}-{profile}"),
        None => stem,
    };
    Path::new("results").join(name)
}

/// The exported name of output `output` of type `ty`: its natural extension, or none for
/// a folder or a file of no declared format.
pub fn natural_name(output: &str, ty: ArtifactType) -> String {
    use ArtifactType::*;
    match ty {
        Messages | Questions | Samples | Judgments | Metrics => format!("{output}.jsonl"),
        Summary => format!("{output}.json"),
        Model | Adapter | Report | File | Dir => output.to_string(),
    }
}

/// `emflow export`: every cached output of the selected stages (all when `selectors` is
/// empty) into `to`. Stages not cached are skipped and returned by id in the second list.
pub fn export(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
    selectors: &[String],
    to: &Path,
) -> anyhow::Result<(Vec<Exported>, Vec<String>)> {
    let mut planner = Planner::new(pipeline, registry, store)?;
    let selected: BTreeSet<usize> = if selectors.is_empty() {
        (0..pipeline.stages.len()).collect()
    } else {
        planner.select(selectors)?
    };
    // Keys of the selected stages need their upstream records: plan everything.
    let statuses = planner.statuses(None, &BTreeSet::new())?;
    let mut written = Vec::new();
    let mut missing = Vec::new();
    for (i, status) in statuses.into_iter().filter(|(i, _)| selected.contains(i)) {
        match &status.record {
            Some(record) if status.state.label() == "cached" => {
                written.extend(export_record(pipeline, store, i, record, to, |_| true)?);
            }
            _ => missing.push(status.id),
        }
    }
    Ok((written, missing))
}

/// Copies the outputs of stage `i`'s `record` whose type `wanted` accepts into
/// `to/<stage id>/`.
pub fn export_record(
    pipeline: &Pipeline,
    store: &Store,
    i: usize,
    record: &StageRecord,
    to: &Path,
    wanted: impl Fn(ArtifactType) -> bool,
) -> anyhow::Result<Vec<Exported>> {
    let stage = &pipeline.stages[i];
    let mut written = Vec::new();
    for (output, entry) in &record.outputs {
        let ty = stage
            .outputs
            .get(output)
            .copied()
            .unwrap_or(ArtifactType::File);
        if !wanted(ty) {
            continue;
        }
        let dest = to.join(&stage.id).join(natural_name(output, ty));
        let note = copy_output(store, entry, &dest, |tmp| match ty {
            ArtifactType::Adapter => name_the_base(tmp, loadable_base(pipeline, i)),
            _ => Ok(None),
        })
        .with_context(|| format!("exporting {}.{output} to {}", stage.id, dest.display()))?;
        written.push(Exported {
            stage: stage.id.clone(),
            output: output.clone(),
            path: dest,
            note,
        });
    }
    Ok(written)
}

/// Copies `entry` to `dest` through a temporary sibling, lets `finish` edit the copy, then
/// renames it over whatever `dest` held.
fn copy_output(
    store: &Store,
    entry: &OutputEntry,
    dest: &Path,
    finish: impl FnOnce(&Path) -> anyhow::Result<Option<String>>,
) -> anyhow::Result<Option<String>> {
    let parent = dest
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent folder", dest.display()))?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    remove_path(&tmp)?;
    copy_writable(&store.artifact_path(entry), &tmp)?;
    let note = finish(&tmp)?;
    remove_path(dest)?;
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(note)
}

/// A file or a whole folder copied with owner-writable permissions (store content is
/// read-only, and an export is the user's to edit and to replace).
fn copy_writable(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if from.is_dir() {
        std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
        let entries =
            std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", from.display()))?;
            copy_writable(&entry.path(), &to.join(entry.file_name()))?;
        }
        return Ok(());
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("making {} writable", to.display()))
}

/// Removes a file or a folder; one that is not there is no error.
pub fn remove_path(path: &Path) -> anyhow::Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// How a user loads a stage's base model: a name or path for `from_pretrained`, and the
/// revision of an `hf:` source. Follows the `model` input through stages that pass a model
/// on; `None` when the base is no source transformers can load by name (e.g. a `pip:` GGUF).
pub fn loadable_base(pipeline: &Pipeline, i: usize) -> Option<(String, Option<String>)> {
    let mut at = i;
    // A model port fed by another stage's model output: follow it, a bounded number of hops
    // (the DAG has no cycles; the bound only guards a malformed pipeline).
    for _ in 0..pipeline.stages.len() {
        match pipeline.stages[at].inputs.get("model")?.first()? {
            InputRef::Stage { stage, .. } => {
                at = pipeline.stages.iter().position(|s| &s.id == stage)?;
            }
            InputRef::File { path } => return Some((path.display().to_string(), None)),
            InputRef::Model { name } => {
                let decl = pipeline.models.get(name)?;
                if let Some(spec) = decl.source.strip_prefix("hf:") {
                    let (repo, revision) = match spec.split_once('@') {
                        Some((repo, rev)) => (repo, Some(rev.to_string())),
                        None => (spec, None),
                    };
                    return Some((repo.to_string(), revision));
                }
                return match model_source(decl, &pipeline.manifest_dir) {
                    ModelSource::Local(path) => Some((path.display().to_string(), None)),
                    ModelSource::Fetched { .. } => None,
                };
            }
        }
    }
    None
}

/// Rewrites the copied adapter's `base_model_name_or_path` (a digest in the store) to `base`,
/// keeping the digest in `emflow_base_model_digest`. Returns a note when `base` is unknown.
fn name_the_base(
    adapter: &Path,
    base: Option<(String, Option<String>)>,
) -> anyhow::Result<Option<String>> {
    let path = adapter.join("adapter_config.json");
    if !path.is_file() {
        return Ok(None); // a full fine-tune's weights: no PEFT config to name a base in
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let object = config
        .as_object_mut()
        .ok_or_else(|| anyhow!("{} is not a JSON object", path.display()))?;
    let recorded = object
        .get("base_model_name_or_path")
        .cloned()
        .unwrap_or(Value::Null);
    let Some((name, revision)) = base else {
        return Ok(Some(format!(
            "its base model ({recorded}) has no name transformers can load; set \
             base_model_name_or_path in adapter_config.json to the HF model it was made from"
        )));
    };
    object.insert("emflow_base_model_digest".into(), recorded);
    object.insert("base_model_name_or_path".into(), Value::String(name));
    if let Some(revision) = revision {
        object.insert("revision".into(), Value::String(revision));
    }
    let text = serde_json::to_string_pretty(&config)?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_per_record_outputs_are_jsonl_summaries_json_folders_bare() {
        assert_eq!(natural_name("data", ArtifactType::Messages), "data.jsonl");
        assert_eq!(
            natural_name("metrics", ArtifactType::Metrics),
            "metrics.jsonl"
        );
        assert_eq!(
            natural_name("summary", ArtifactType::Summary),
            "summary.json"
        );
        assert_eq!(natural_name("adapter", ArtifactType::Adapter), "adapter");
        assert_eq!(natural_name("report", ArtifactType::Report), "report");
    }

    fn adapter_with_digest_base() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"peft_type": "LORA", "base_model_name_or_path": "blake3:ab12", "r": 4});
        std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        dir
    }

    fn config_of(dir: &Path) -> Value {
        let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn an_exported_adapter_names_its_base_as_transformers_loads_it() {
        let dir = adapter_with_digest_base();
        let base = Some(("Qwen/Qwen3-14B".to_string(), Some("abc123".to_string())));
        assert_eq!(name_the_base(dir.path(), base).unwrap(), None);
        let cfg = config_of(dir.path());
        assert_eq!(cfg["base_model_name_or_path"], "Qwen/Qwen3-14B");
        assert_eq!(cfg["revision"], "abc123");
        assert_eq!(cfg["emflow_base_model_digest"], "blake3:ab12");
        assert_eq!(cfg["r"], 4);
    }

    #[test]
    fn a_base_without_a_loadable_name_is_left_as_recorded_with_a_note() {
        let dir = adapter_with_digest_base();
        let note = name_the_base(dir.path(), None).unwrap().unwrap();
        assert!(note.contains("blake3:ab12"), "{note}");
        assert_eq!(
            config_of(dir.path())["base_model_name_or_path"],
            "blake3:ab12"
        );
    }
}
