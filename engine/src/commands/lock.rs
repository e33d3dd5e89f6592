//! `emflow lock` writes each stage's key and output digests into `emflow.lock`; `emflow
//! check` recomputes the keys from the manifest and lists those that moved.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use anyhow::anyhow;
use emflow_cache::{EntryKind, OutputEntry, StageRecord, Store};

use crate::artifact::ArtifactType;
use crate::job::JobArtifact;
use crate::keys::{explain_change, model_fetch_key, KeyChange};
use crate::kind::Registry;
use crate::lockfile::{self, LockFile, LockedModel, LockedStage, ManifestLock};
use crate::pipeline::Pipeline;
use crate::plan::{model_source, ModelSource, Planner, Resolved, State};

/// `emflow lock`: writes the pipeline's keys and output digests into `emflow.lock`.
/// Every stage must be cached (run it first).
pub fn lock(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
) -> anyhow::Result<(PathBuf, ManifestLock)> {
    let mut planner = Planner::new(pipeline, registry, store)?;
    let statuses = planner.statuses(None, &BTreeSet::new())?;
    let not_cached: Vec<String> = statuses
        .iter()
        .filter(|(_, s)| !matches!(s.state, State::Cached))
        .map(|(_, s)| format!("{} ({})", s.id, s.state.label()))
        .collect();
    if !not_cached.is_empty() {
        return Err(anyhow!(
            "cannot lock: {} stage(s) are not cached: {}; run `emflow run {}` first",
            not_cached.len(),
            not_cached.join(", "),
            pipeline.manifest_path.display()
        ));
    }
    let mut section = ManifestLock {
        profile: pipeline.profile.clone(),
        ..ManifestLock::default()
    };
    for (_, s) in statuses {
        let record = s.record.ok_or_else(|| {
            anyhow!(
                "stage {} is cached but its record vanished; run again",
                s.id
            )
        })?;
        section.stages.insert(
            s.id.clone(),
            LockedStage {
                kind: s.kind,
                key: record.key.clone(),
                outputs: record
                    .outputs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.digest.clone()))
                    .collect(),
                key_parts: record.key_parts.clone(),
            },
        );
    }
    let used = planner.models_used(0..pipeline.stages.len());
    let models = planner.available_models(&used)?;
    for name in used {
        let decl = &pipeline.models[&name];
        let art = models
            .get(&name)
            .ok_or_else(|| anyhow!("model `{name}` is not fetched yet; run `emflow run` first"))?;
        let fetch_key = matches!(
            model_source(decl, &pipeline.manifest_dir),
            ModelSource::Fetched { .. }
        )
        .then(|| model_fetch_key(&decl.source));
        section.models.insert(
            name,
            LockedModel {
                source: decl.source.clone(),
                digest: art.digest.clone(),
                fetch_key,
            },
        );
    }
    let path = lockfile::lock_path(&pipeline.manifest_path);
    let mut file = lockfile::read(&path)?.unwrap_or(LockFile {
        emflow_lock: lockfile::LOCK_VERSION,
        manifests: BTreeMap::new(),
    });
    file.manifests.insert(
        lockfile::section_name(&pipeline.manifest_path),
        section.clone(),
    );
    lockfile::write(&path, &file)?;
    Ok((path, section))
}

/// One stage whose key no longer matches the lock.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Mismatch {
    pub stage: String,
    pub why: Vec<String>,
}

/// `emflow check`: recomputes every key from the manifest, using the lock's output digests
/// for upstream stages (so no store content is needed), and lists the stages whose key
/// differs from the lock. Empty = the lock still holds.
pub fn check(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
) -> anyhow::Result<Vec<Mismatch>> {
    let locked = locked_section(pipeline)?;
    let mut planner = Planner::new(pipeline, registry, store)?;
    let mut mismatches = Vec::new();
    if locked.profile != pipeline.profile {
        mismatches.push(Mismatch {
            stage: "(profile)".into(),
            why: vec![format!(
                "locked with profile {:?}, checked with {:?}",
                locked.profile, pipeline.profile
            )],
        });
    }
    let models = model_digests(&mut planner, &locked, &mut mismatches)?;
    check_stages(&mut planner, &locked, &models, &mut mismatches)?;
    let present: BTreeSet<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
    for id in locked.stages.keys() {
        if !present.contains(id.as_str()) {
            mismatches.push(Mismatch {
                stage: id.clone(),
                why: vec!["in the lock but no longer in the manifest".into()],
            });
        }
    }
    Ok(mismatches)
}

/// The lock file's section for `pipeline`'s manifest.
fn locked_section(pipeline: &Pipeline) -> anyhow::Result<ManifestLock> {
    let path = lockfile::lock_path(&pipeline.manifest_path);
    let section_name = lockfile::section_name(&pipeline.manifest_path);
    let mut file = lockfile::read(&path)?.ok_or_else(|| {
        anyhow!(
            "no {} next to the manifest; run `emflow run` and `emflow lock` first",
            lockfile::LOCK_FILE
        )
    })?;
    file.manifests.remove(&section_name).ok_or_else(|| {
        anyhow!(
            "{} has no entry for {section_name}; run `emflow lock {}`",
            path.display(),
            pipeline.manifest_path.display()
        )
    })
}

/// The digest of every model the pipeline uses: local ones are hashed now; fetched ones are
/// taken from the lock (a changed or unlocked source is a mismatch).
fn model_digests(
    planner: &mut Planner,
    locked: &ManifestLock,
    mismatches: &mut Vec<Mismatch>,
) -> anyhow::Result<HashMap<String, JobArtifact>> {
    let pipeline = planner.pipeline;
    let used = planner.models_used(0..pipeline.stages.len());
    let mut models = HashMap::new();
    for name in &used {
        let decl = &pipeline.models[name];
        let digest = match model_source(decl, &pipeline.manifest_dir) {
            ModelSource::Local(p) if p.exists() => planner.file_digest(&p)?,
            ModelSource::Local(p) => {
                return Err(anyhow!("model `{name}`: {} does not exist", p.display()))
            }
            ModelSource::Fetched { .. } => {
                let why = match locked.models.get(name) {
                    Some(m) if m.source == decl.source => Ok(m.digest.clone()),
                    Some(m) => Err(format!("source: {} -> {}", m.source, decl.source)),
                    None => Err("not in the lock".into()),
                };
                match why {
                    Ok(digest) => digest,
                    Err(why) => {
                        let stage = format!("models.{name}");
                        mismatches.push(Mismatch {
                            stage,
                            why: vec![why],
                        });
                        continue;
                    }
                }
            }
        };
        models.insert(
            name.clone(),
            JobArtifact {
                path: PathBuf::new(),
                digest,
                ty: ArtifactType::Model,
                origin: format!("models.{name}"),
            },
        );
    }
    Ok(models)
}

/// Recomputes each stage's key in topological order, standing in a record made from the
/// lock's output digests for each stage whose key still matches, so its downstream can be
/// keyed too.
fn check_stages(
    planner: &mut Planner,
    locked: &ManifestLock,
    models: &HashMap<String, JobArtifact>,
    mismatches: &mut Vec<Mismatch>,
) -> anyhow::Result<()> {
    let pipeline = planner.pipeline;
    let mut records: Vec<Option<StageRecord>> = vec![None; pipeline.stages.len()];
    for i in planner.dag.order().to_vec() {
        let id = pipeline.stages[i].id.clone();
        let Some(entry) = locked.stages.get(&id) else {
            mismatches.push(Mismatch {
                stage: id,
                why: vec!["new stage, not in the lock".into()],
            });
            continue;
        };
        match planner.resolve(i, &records, models)? {
            Resolved::Pending { waiting_on } => {
                mismatches.push(Mismatch {
                    stage: id,
                    why: vec![format!(
                        "cannot be checked: upstream {} changed",
                        waiting_on.join(", ")
                    )],
                });
            }
            Resolved::Ready { parts, key, .. } if key != entry.key => {
                let why: Vec<String> = explain_change(&entry.key_parts, &parts)
                    .into_iter()
                    .map(|c: KeyChange| c.detail)
                    .collect();
                mismatches.push(Mismatch { stage: id, why });
            }
            Resolved::Ready { key, .. } => records[i] = Some(locked_record(key, entry)),
        }
    }
    Ok(())
}

/// A stand-in record for a stage whose key matches the lock: its outputs' digests as locked.
fn locked_record(key: String, entry: &LockedStage) -> StageRecord {
    let output = |digest: &String| OutputEntry {
        digest: digest.clone(),
        kind: EntryKind::File,
        size: 0,
    };
    StageRecord {
        key,
        outputs: (entry.outputs.iter())
            .map(|(k, d)| (k.clone(), output(d)))
            .collect(),
        ..StageRecord::default()
    }
}
