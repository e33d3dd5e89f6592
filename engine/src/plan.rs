//! The planner: from an expanded [`Pipeline`] and the store, what each stage instance's key
//! is (or why it cannot be known yet) and what state it is in.
//!
//! Keys are computed in topological order from *content*: a stage's key needs the digests
//! of its inputs, which for an upstream stage are the output digests in that upstream's
//! record. So a stage downstream of something not yet produced is `pending`: its key will
//! be known once the upstream has run (and may well turn out cached, if the upstream
//! reproduces the same bytes). The scheduler uses the same [`Planner::resolve`] step by
//! step as upstreams finish; `status`, `graph` and `run --dry-run` use [`Planner::statuses`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};
use emflow_cache::{StageRecord, Store};
use serde::Serialize;

use crate::dag::Dag;
use crate::job::{output_artifact, JobArtifact};
use crate::keys::{explain_change, model_fetch_key, EnvParts, KeyChange, KeyParts};
use crate::kind::{ArtifactType, KindSpec, Registry};
use crate::pipeline::{InputRef, ModelDecl, Pipeline, StageInstance};

/// Where a named model's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A local file or folder, hashed in place.
    Local(PathBuf),
    /// Fetched once into the store by the registry's fetcher for `scheme`.
    Fetched { scheme: String },
}

/// Classifies a model source: `scheme:rest` with a known-looking scheme is fetched,
/// anything else (or `file:PATH`) is a local path, relative to the manifest folder.
pub fn model_source(decl: &ModelDecl, manifest_dir: &Path) -> ModelSource {
    let local = |p: &str| {
        let p = Path::new(p);
        ModelSource::Local(if p.is_absolute() {
            p.to_path_buf()
        } else {
            manifest_dir.join(p)
        })
    };
    match decl.source.split_once(':') {
        Some(("file", rest)) => local(rest),
        Some((scheme, _))
            if scheme.len() > 1
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) =>
        {
            ModelSource::Fetched {
                scheme: scheme.to_string(),
            }
        }
        _ => local(&decl.source),
    }
}

/// The stage id under which a fetched model's record is stored.
pub fn model_stage_id(name: &str) -> String {
    format!("models.{name}")
}

/// Result of resolving one instance's inputs.
#[allow(clippy::large_enum_variant)] // short-lived, one at a time: boxing buys nothing
pub enum Resolved {
    /// Every input is available: the key is known.
    Ready {
        inputs: BTreeMap<String, Vec<JobArtifact>>,
        parts: KeyParts,
        key: String,
    },
    /// Some inputs do not exist yet (stage ids or `models.NAME`).
    Pending { waiting_on: Vec<String> },
}

/// State of one instance as `status` reports it.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// A record for the current key exists.
    Cached,
    /// No record for the current key; an older record of this stage exists: `changes` says
    /// which key parts differ from it.
    Stale { changes: Vec<KeyChange> },
    /// Never produced (or its record was garbage-collected: `note`).
    Missing { note: Option<String> },
    /// A record for the current key exists but some of its outputs' bytes are no longer
    /// what it names (flipped, truncated, deleted, replaced): the stage runs again.
    Damaged {
        outputs: Vec<emflow_cache::DamagedOutput>,
    },
    /// The key depends on outputs that do not exist yet. `changes`: key parts already known
    /// to differ from the last record (params, kind version, env).
    Pending {
        waiting_on: Vec<String>,
        changes: Vec<KeyChange>,
    },
}

impl State {
    pub fn label(&self) -> &'static str {
        match self {
            State::Cached => "cached",
            State::Damaged { .. } => "damaged",
            State::Stale { .. } => "stale",
            State::Missing { .. } => "missing",
            State::Pending { .. } => "pending",
        }
    }
}

/// One instance's planned state.
#[derive(Clone, Debug, Serialize)]
pub struct StageStatus {
    pub id: String,
    pub kind: String,
    pub key: Option<String>,
    #[serde(flatten)]
    pub state: State,
    #[serde(skip)]
    pub record: Option<StageRecord>,
}

/// Key computation over one pipeline. Holds per-command memos (file digests).
pub struct Planner<'a> {
    pub pipeline: &'a Pipeline,
    pub registry: &'a Registry,
    pub store: &'a Store,
    pub dag: Dag,
    specs: HashMap<String, KindSpec>,
    file_digests: HashMap<PathBuf, String>,
    /// Stage ids with at least one record, read once per command on first need: the
    /// store's per-stage lookup scans every record for an id it has never seen, which
    /// would make planning many new stages on a big store quadratic.
    recorded_ids: Option<std::collections::HashSet<String>>,
    /// Keys whose outputs this command has already found intact: a run checks each reused
    /// record once, not once for the plan's header and again when it settles the stage.
    intact_keys: std::collections::HashSet<String>,
}

impl<'a> Planner<'a> {
    pub fn new(
        pipeline: &'a Pipeline,
        registry: &'a Registry,
        store: &'a Store,
    ) -> anyhow::Result<Self> {
        let dag =
            Dag::build(pipeline).map_err(|e| anyhow!(format!("{:?}", miette::Report::new(e))))?;
        let mut specs = HashMap::new();
        for stage in &pipeline.stages {
            if !specs.contains_key(&stage.kind) {
                let kind = registry.kind(&stage.kind).ok_or_else(|| {
                    anyhow!("stage {} uses kind `{}`, which this emflow binary does not have; `emflow kinds` lists the kinds it has", stage.id, stage.kind)
                })?;
                specs.insert(stage.kind.clone(), kind.spec());
            }
        }
        Ok(Planner {
            pipeline,
            registry,
            store,
            dag,
            specs,
            file_digests: HashMap::new(),
            recorded_ids: None,
            intact_keys: Default::default(),
        })
    }

    pub fn stage(&self, i: usize) -> &StageInstance {
        &self.pipeline.stages[i]
    }

    pub fn spec(&self, kind: &str) -> Option<&KindSpec> {
        self.specs.get(kind)
    }

    /// Instance indices named by `selectors` (a stage name selects all its cells; an
    /// instance id selects one). Errors name the unknown selector and list the stages.
    pub fn select(&self, selectors: &[String]) -> anyhow::Result<BTreeSet<usize>> {
        let mut out = BTreeSet::new();
        for sel in selectors {
            let before = out.len();
            for (i, s) in self.pipeline.stages.iter().enumerate() {
                if &s.stage == sel || &s.id == sel {
                    out.insert(i);
                }
            }
            if out.len() == before {
                let names: BTreeSet<&str> = self
                    .pipeline
                    .stages
                    .iter()
                    .map(|s| s.stage.as_str())
                    .collect();
                let suggestion = names
                    .iter()
                    .map(|n| (strsim::jaro_winkler(n, sel), n))
                    .filter(|(score, _)| *score > 0.8)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, n)| format!(" (did you mean `{n}`?)"))
                    .unwrap_or_default();
                return Err(anyhow!(
                    "no stage or stage instance `{sel}` in {}{suggestion}; stages are: {}",
                    self.pipeline.manifest_path.display(),
                    names.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        Ok(out)
    }

    /// Digest of a local file or folder, memoised for this command.
    pub fn file_digest(&mut self, path: &Path) -> anyhow::Result<String> {
        if let Some(d) = self.file_digests.get(path) {
            return Ok(d.clone());
        }
        let digest = self.store.digest_path(path)?;
        self.file_digests.insert(path.to_path_buf(), digest.clone());
        Ok(digest)
    }

    /// [`Planner::file_digest`] of a file the manifest names (a local model, a `file:`
    /// input): when it does not exist, the error is `missing` (what it is and how to fix the
    /// manifest); when it cannot be hashed, `hashing` is the context.
    fn named_file_digest(
        &mut self,
        path: &Path,
        missing: impl FnOnce() -> String,
        hashing: impl FnOnce() -> String,
    ) -> anyhow::Result<String> {
        if !path.exists() {
            return Err(anyhow!(missing()));
        }
        self.file_digest(path).with_context(hashing)
    }

    /// Models that are available now: local ones (hashed in place; an error if missing)
    /// and fetched ones whose fetch record is in the store.
    pub fn available_models(
        &mut self,
        needed: &BTreeSet<String>,
    ) -> anyhow::Result<HashMap<String, JobArtifact>> {
        let mut out = HashMap::new();
        for name in needed {
            let decl = self.pipeline.models.get(name).ok_or_else(|| {
                anyhow!("model `{name}` is used but not declared under `models:`")
            })?;
            match model_source(decl, &self.pipeline.manifest_dir) {
                ModelSource::Local(path) => {
                    let digest = self.named_file_digest(
                        &path,
                        || format!("model `{name}`: {} does not exist; fix `models.{name}.source` or pass `--set models.{name}.source=PATH`", path.display()),
                        || format!("hashing model `{name}` at {}", path.display()),
                    )?;
                    out.insert(
                        name.clone(),
                        JobArtifact {
                            path,
                            digest,
                            ty: ArtifactType::Model,
                            origin: format!("models.{name}"),
                        },
                    );
                }
                ModelSource::Fetched { .. } => {
                    if let Some(record) = self.store.record(&model_fetch_key(&decl.source))? {
                        if let Some(entry) = record.outputs.get("model") {
                            out.insert(
                                name.clone(),
                                output_artifact(
                                    self.store,
                                    entry,
                                    ArtifactType::Model,
                                    format!("models.{name}"),
                                ),
                            );
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Names of the models the given instances read.
    pub fn models_used(&self, instances: impl IntoIterator<Item = usize>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for i in instances {
            for r in self.pipeline.stages[i].inputs.values().flatten() {
                if let InputRef::Model { name } = r {
                    out.insert(name.clone());
                }
            }
        }
        out
    }

    /// Resolves instance `i`'s inputs given the records of finished upstream instances
    /// (`records[j]`) and the available models.
    pub fn resolve(
        &mut self,
        i: usize,
        records: &[Option<StageRecord>],
        models: &HashMap<String, JobArtifact>,
    ) -> anyhow::Result<Resolved> {
        let stage = &self.pipeline.stages[i];
        let spec = self
            .specs
            .get(&stage.kind)
            .ok_or_else(|| anyhow!("unknown kind {}", stage.kind))?;
        let mut waiting_on = Vec::new();
        let mut inputs: BTreeMap<String, Vec<JobArtifact>> = BTreeMap::new();
        let mut to_hash: Vec<(String, usize, PathBuf, ArtifactType)> = Vec::new();
        for (port, refs) in &stage.inputs {
            let port_ty = spec.input_type(port);
            let mut arts = Vec::with_capacity(refs.len());
            for r in refs {
                match r {
                    InputRef::Stage { stage: up, output } => {
                        let j = self.dag.index_of(up).ok_or_else(|| {
                            anyhow!("stage {} reads unknown stage {up}", stage.id)
                        })?;
                        match &records[j] {
                            Some(record) => {
                                let entry = record.outputs.get(output).ok_or_else(|| {
                                    anyhow!(
                                        "stage {} reads `{up}.{output}`, but the record of {up} (key {}) has no output `{output}`; rerun with `--force {up}`",
                                        stage.id,
                                        crate::keys::short(&record.key)
                                    )
                                })?;
                                let ty = self.pipeline.stages[j]
                                    .outputs
                                    .get(output)
                                    .copied()
                                    .unwrap_or(port_ty);
                                arts.push(output_artifact(
                                    self.store,
                                    entry,
                                    ty,
                                    format!("{up}.{output}"),
                                ));
                            }
                            None => {
                                if !waiting_on.contains(up) {
                                    waiting_on.push(up.clone());
                                }
                            }
                        }
                    }
                    InputRef::Model { name } => match models.get(name) {
                        Some(art) => arts.push(art.clone()),
                        None => waiting_on.push(format!("models.{name}")),
                    },
                    InputRef::File { path } => {
                        to_hash.push((port.clone(), arts.len(), path.clone(), port_ty));
                        arts.push(JobArtifact {
                            path: path.clone(),
                            digest: String::new(),
                            ty: port_ty,
                            origin: format!("file:{}", path.display()),
                        });
                    }
                }
            }
            inputs.insert(port.clone(), arts);
        }
        if !waiting_on.is_empty() {
            return Ok(Resolved::Pending { waiting_on });
        }
        let stage_id = stage.id.clone();
        for (port, idx, path, _) in to_hash {
            let digest = self.named_file_digest(
                &path,
                || format!("stage {stage_id}: input `{port}` is file:{}, which does not exist; fix the path in the manifest (relative paths are resolved against the manifest's folder)", path.display()),
                || format!("stage {stage_id}: hashing input `{port}`"),
            )?;
            if let Some(slot) = inputs.get_mut(&port).and_then(|v| v.get_mut(idx)) {
                slot.digest = digest;
            }
        }
        let stage = &self.pipeline.stages[i];
        let spec = &self.specs[&stage.kind];
        let digests = inputs
            .iter()
            .map(|(p, arts)| (p.clone(), arts.iter().map(|a| a.digest.clone()).collect()))
            .collect();
        let parts = KeyParts::new(
            spec,
            &stage.params,
            digests,
            EnvParts::for_stage(spec, stage.resources.gpus),
        );
        let key = parts.key();
        Ok(Resolved::Ready { inputs, parts, key })
    }

    /// The planned state of every instance in `selection` (all if `None`), in topological
    /// order. `forced` instances are reported missing even when cached.
    pub fn statuses(
        &mut self,
        selection: Option<&BTreeSet<usize>>,
        forced: &BTreeSet<usize>,
    ) -> anyhow::Result<Vec<(usize, StageStatus)>> {
        let n = self.pipeline.stages.len();
        let needed: BTreeSet<usize> = match selection {
            Some(sel) => sel.clone(),
            None => (0..n).collect(),
        };
        let models = {
            let names = self.models_used(needed.iter().copied());
            self.available_models(&names)?
        };
        let mut records: Vec<Option<StageRecord>> = vec![None; n];
        let mut out = Vec::with_capacity(needed.len());
        let order: Vec<usize> = self.dag.order().to_vec();
        for i in order.into_iter().filter(|i| needed.contains(i)) {
            let status = match self.resolve(i, &records, &models)? {
                Resolved::Ready { parts, key, .. } => {
                    let record = if forced.contains(&i) {
                        None
                    } else {
                        self.store.record(&key)?
                    };
                    let state = match &record {
                        Some(record) => {
                            let outputs = self.damaged_outputs(record)?;
                            if outputs.is_empty() {
                                State::Cached
                            } else {
                                State::Damaged { outputs }
                            }
                        }
                        None => self.explain_missing(i, &key, &parts, forced.contains(&i))?,
                    };
                    records[i] = record.clone();
                    StageStatus {
                        id: self.stage(i).id.clone(),
                        kind: self.stage(i).kind.clone(),
                        key: Some(key),
                        state,
                        record,
                    }
                }
                Resolved::Pending { waiting_on } => {
                    let changes = self.predicted_changes(i)?;
                    StageStatus {
                        id: self.stage(i).id.clone(),
                        kind: self.stage(i).kind.clone(),
                        key: None,
                        state: State::Pending {
                            waiting_on,
                            changes,
                        },
                        record: None,
                    }
                }
            };
            out.push((i, status));
        }
        Ok(out)
    }

    /// The outputs of `record` whose bytes are damaged (see [`Store::damaged_outputs`]),
    /// remembering intact keys for the rest of this command.
    pub fn damaged_outputs(
        &mut self,
        record: &StageRecord,
    ) -> anyhow::Result<Vec<emflow_cache::DamagedOutput>> {
        if self.intact_keys.contains(&record.key) {
            return Ok(Vec::new());
        }
        let damaged = self.store.damaged_outputs(record)?;
        if damaged.is_empty() {
            self.intact_keys.insert(record.key.clone());
        }
        Ok(damaged)
    }

    /// The last record of stage instance `i`, if it ever had one.
    fn last_record(&mut self, i: usize) -> anyhow::Result<Option<(String, StageRecord)>> {
        if self.recorded_ids.is_none() {
            let ids = self
                .store
                .records()?
                .into_iter()
                .map(|(_, r)| r.stage_id)
                .collect();
            self.recorded_ids = Some(ids);
        }
        let id = &self.pipeline.stages[i].id;
        if !self
            .recorded_ids
            .as_ref()
            .is_some_and(|ids| ids.contains(id))
        {
            return Ok(None);
        }
        Ok(self.store.last_record_for_stage(id)?)
    }

    fn explain_missing(
        &mut self,
        i: usize,
        key: &str,
        parts: &KeyParts,
        forced: bool,
    ) -> anyhow::Result<State> {
        if forced {
            return Ok(State::Missing {
                note: Some("forced to rerun (--force)".into()),
            });
        }
        Ok(match self.last_record(i)? {
            Some((last_key, last)) if last_key != key => State::Stale {
                changes: explain_change(&last.key_parts, parts),
            },
            Some(_) => State::Missing {
                note: Some("its outputs were removed from the store (gc)".into()),
            },
            None => State::Missing { note: None },
        })
    }

    /// For a pending stage: the key parts already known to differ from its last record
    /// (everything but input digests, which are not known yet).
    fn predicted_changes(&mut self, i: usize) -> anyhow::Result<Vec<KeyChange>> {
        let Some((_, last)) = self.last_record(i)? else {
            return Ok(Vec::new());
        };
        let stage = self.stage(i);
        let spec = &self.specs[&stage.kind];
        let Ok(old) = serde_json::from_value::<KeyParts>(last.key_parts.clone()) else {
            return Ok(explain_change(
                &last.key_parts,
                &KeyParts::new(
                    spec,
                    &stage.params,
                    BTreeMap::new(),
                    EnvParts::for_stage(spec, 0),
                ),
            ));
        };
        let now = KeyParts::new(
            spec,
            &stage.params,
            old.inputs.clone(),
            EnvParts::for_stage(spec, stage.resources.gpus),
        );
        Ok(explain_change(&last.key_parts, &now))
    }
}
