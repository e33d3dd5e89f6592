//! One execution of one stage key: the job file `emflow exec-stage` reads, and
//! [`execute_job`], which every executor ends up calling (in-process, in a child process,
//! or inside a Slurm job).
//!
//! The job carries everything needed to run with no manifest and no planner: the kind's
//! name, resolved params, input artifacts as store paths with their digests, the key and
//! its parts, the device and the store. So an executor only has to get the job to a
//! process that can see the store, and the outcome back.
//!
//! The per-key protocol lives here, not in the driver, so that it holds whichever process
//! runs it: take the key lock, re-check the record (another run may have produced it
//! meanwhile: reuse it), run the kind into a private staging folder, commit. A crash at any
//! point leaves either no record (the next run starts over, the staging folder is swept by
//! the store) or a complete one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{anyhow, Context as _};
use emflow_cache::{OutputEntry, StageRecord, Store};
use serde::{Deserialize, Serialize};

use crate::context::{
    Artifact, ContextParts, DeviceRequest, Interrupted, Memo, Progress, StageContext,
};
use crate::kind::{ArtifactType, Params, Registry};
use crate::pipeline::Resources;

/// Exit code of `emflow exec-stage` when the stage saved a checkpoint and asks to be
/// run again (EX_TEMPFAIL): a Slurm executor requeues it.
pub const EXIT_INTERRUPTED: i32 = 75;

/// An input artifact in a job file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobArtifact {
    pub path: PathBuf,
    pub digest: String,
    pub ty: ArtifactType,
    pub origin: String,
}

/// The device a job runs on. Inside a child process, `Cuda { ordinal }` counts within the
/// `CUDA_VISIBLE_DEVICES` the executor set for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobDevice {
    Cpu,
    Cuda { ordinal: usize },
}

/// What the job is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobMode {
    /// Produce and commit the key. With `force`, run even if a record exists (and replace it).
    Commit { force: bool },
    /// Re-execute without the cache into scratch space and report the output digests;
    /// nothing is committed and the stage's checkpoint folder is not used.
    Verify,
}

/// Everything needed to execute one stage key anywhere the store is visible.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub run_id: String,
    pub stage_id: String,
    pub kind: String,
    pub key: String,
    pub key_parts: serde_json::Value,
    pub params: Params,
    pub inputs: BTreeMap<String, Vec<JobArtifact>>,
    pub outputs: BTreeMap<String, ArtifactType>,
    pub resources: Resources,
    pub device: JobDevice,
    /// `CUDA_VISIBLE_DEVICES` entries assigned to this job (empty for CPU stages).
    pub gpu_ids: Vec<String>,
    pub threads: usize,
    pub store: PathBuf,
    pub mode: JobMode,
    /// Memoised calls (judge verdicts) are asked again, not read; the fresh answers replace
    /// them (`emflow run --refresh-judge`).
    #[serde(default)]
    pub refresh_memo: bool,
}

/// How a job ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum JobOutcome {
    /// The key is committed. `reused`: another process committed it while this one waited
    /// for the key lock, so nothing ran here.
    Committed {
        record: Box<StageRecord>,
        reused: bool,
    },
    /// Verify mode: the digests of the outputs the re-execution produced.
    Verified {
        outputs: BTreeMap<String, String>,
        duration_s: f64,
    },
    /// The stage failed; `error` is the whole cause chain, one cause a line.
    Failed { error: String },
    /// The stage saved a checkpoint and stopped on request; run it again to resume.
    Interrupted,
}

impl JobOutcome {
    pub fn failed(err: &anyhow::Error) -> Self {
        JobOutcome::Failed {
            error: error_chain(err),
        }
    }
}

/// `err` and its causes, one a line.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut lines = vec![err.to_string()];
    lines.extend(err.chain().skip(1).map(|c| format!("caused by: {c}")));
    lines.join("\n")
}

/// The context's memo, backed by the store's memo area.
pub struct StoreMemo(pub Arc<Store>);

impl Memo for StoreMemo {
    fn get(&self, namespace: &str, key: &[u8]) -> Option<Vec<u8>> {
        self.0.memo_get(namespace, key).ok().flatten()
    }
    fn put(&self, namespace: &str, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        Ok(self.0.memo_put(namespace, key, value)?)
    }
}

/// Runs `job` to completion under the per-key protocol. `measure_rss`: record this
/// process's peak memory (true when the process runs nothing but this job).
pub fn execute_job(
    job: &Job,
    registry: &Registry,
    store: &Arc<Store>,
    progress: Arc<dyn Progress>,
    interrupt: Arc<AtomicBool>,
    measure_rss: bool,
) -> JobOutcome {
    let result = match registry.kind(&job.kind) {
        None => Err(anyhow!(
            "this emflow binary has no stage kind `{}`; run `emflow kinds` to list the kinds it has",
            job.kind
        )),
        Some(kind) => match job.mode {
            JobMode::Commit { force } => {
                commit(job, kind.as_ref(), force, store, progress, interrupt, measure_rss)
            }
            JobMode::Verify => verify(job, kind.as_ref(), store, progress, interrupt),
        },
    };
    match result {
        Ok(outcome) => outcome,
        Err(err) if err.downcast_ref::<Interrupted>().is_some() => JobOutcome::Interrupted,
        Err(err) => JobOutcome::failed(&err),
    }
}

/// Runs the stage under its key's lock and commits its outputs; or, unless `force`, reuses
/// the intact record another process committed while this one waited for the lock.
fn commit(
    job: &Job,
    kind: &dyn crate::kind::StageKind,
    force: bool,
    store: &Arc<Store>,
    progress: Arc<dyn Progress>,
    interrupt: Arc<AtomicBool>,
    measure_rss: bool,
) -> anyhow::Result<JobOutcome> {
    let _lock = match store.try_lock(&job.key)? {
        Some(lock) => lock,
        None => {
            progress.message("waiting for another emflow process running the same stage key");
            store.lock(&job.key)?
        }
    };
    if !force {
        // Another process may have committed this key while we waited for its lock; its
        // record is reused only if its outputs are intact (a damaged one is rebuilt here).
        if let Some(record) = store.record(&job.key)? {
            if store.damaged_outputs(&record)?.is_empty() {
                return Ok(JobOutcome::Committed {
                    record: Box::new(record),
                    reused: true,
                });
            }
        }
    }
    let staging = store.staging(&job.key)?;
    let checkpoint = store.checkpoint_dir(&job.key)?;
    let scratch = store.scratch()?;
    let started_at = SystemTime::now();
    let clock = Instant::now();
    let mut ctx = context(
        job,
        staging.path(),
        &checkpoint,
        scratch.path(),
        store,
        progress.clone(),
        interrupt,
    );
    kind.run(&mut ctx)
        .with_context(|| format!("stage {} (kind {}) failed", job.stage_id, job.kind))?;
    check_outputs(job, staging.path(), progress.as_ref())?;
    let record = StageRecord {
        schema: emflow_cache::RECORD_SCHEMA,
        key: job.key.clone(),
        stage_id: job.stage_id.clone(),
        kind: job.kind.clone(),
        key_parts: job.key_parts.clone(),
        outputs: BTreeMap::new(),
        summary: ctx.summary().clone(),
        started_at: crate::host::rfc3339(started_at),
        finished_at: crate::host::now_rfc3339(),
        duration_s: clock.elapsed().as_secs_f64(),
        peak_rss_bytes: if measure_rss {
            crate::host::peak_rss_bytes()
        } else {
            0
        },
        host: crate::host::hostname(),
        engine_version: crate::keys::EMFLOW_VERSION.to_string(),
    };
    drop(ctx);
    let record = store
        .commit(staging, &job.key, record)
        .with_context(|| format!("committing the outputs of stage {}", job.stage_id))?;
    store.remove_checkpoint(&job.key)?;
    Ok(JobOutcome::Committed {
        record: Box::new(record),
        reused: false,
    })
}

fn verify(
    job: &Job,
    kind: &dyn crate::kind::StageKind,
    store: &Arc<Store>,
    progress: Arc<dyn Progress>,
    interrupt: Arc<AtomicBool>,
) -> anyhow::Result<JobOutcome> {
    let staging = store.staging(&job.key)?;
    // A scratch checkpoint folder: resuming from the real one would not re-execute.
    let scratch_checkpoint = store.staging(&job.key)?;
    let scratch = store.scratch()?;
    let clock = Instant::now();
    let mut ctx = context(
        job,
        staging.path(),
        scratch_checkpoint.path(),
        scratch.path(),
        store,
        progress.clone(),
        interrupt,
    );
    kind.run(&mut ctx).with_context(|| {
        format!(
            "stage {} (kind {}) failed while being verified",
            job.stage_id, job.kind
        )
    })?;
    drop(ctx);
    check_outputs(job, staging.path(), progress.as_ref())?;
    let mut outputs = BTreeMap::new();
    for name in job.outputs.keys() {
        let digest = store.digest_path(&staging.path().join(name))?;
        outputs.insert(name.clone(), digest);
    }
    Ok(JobOutcome::Verified {
        outputs,
        duration_s: clock.elapsed().as_secs_f64(),
    })
}

fn context(
    job: &Job,
    staging: &Path,
    checkpoint: &Path,
    scratch: &Path,
    store: &Arc<Store>,
    progress: Arc<dyn Progress>,
    interrupt: Arc<AtomicBool>,
) -> StageContext {
    let inputs = job
        .inputs
        .iter()
        .map(|(port, arts)| {
            let arts = arts
                .iter()
                .map(|a| Artifact {
                    path: a.path.clone(),
                    digest: a.digest.clone(),
                    ty: a.ty,
                    origin: a.origin.clone(),
                })
                .collect();
            (port.clone(), arts)
        })
        .collect();
    StageContext::new(ContextParts {
        stage_id: job.stage_id.clone(),
        kind: job.kind.clone(),
        key: job.key.clone(),
        key_parts: job.key_parts.clone(),
        params: job.params.clone(),
        inputs,
        staging: staging.to_path_buf(),
        checkpoint: checkpoint.to_path_buf(),
        scratch: scratch.to_path_buf(),
        device: match job.device {
            JobDevice::Cpu => DeviceRequest::Cpu,
            JobDevice::Cuda { ordinal } => DeviceRequest::Cuda { ordinal },
        },
        threads: job.threads.max(1),
        progress,
        memo: crate::context::memo_for(Arc::new(StoreMemo(store.clone())), job.refresh_memo),
        interrupt,
    })
}

/// Every declared output must exist with the right shape; anything else the kind left in
/// the staging folder is scratch and is removed before the commit hashes the folder.
fn check_outputs(job: &Job, staging: &Path, progress: &dyn Progress) -> anyhow::Result<()> {
    for (name, ty) in &job.outputs {
        let path = staging.join(name);
        let meta = std::fs::symlink_metadata(&path).map_err(|_| {
            anyhow!(
                "stage {} (kind {}) finished without writing its declared output `{name}`",
                job.stage_id,
                job.kind
            )
        })?;
        let wants_dir = matches!(
            ty,
            ArtifactType::Dir | ArtifactType::Adapter | ArtifactType::Report
        );
        if wants_dir && !meta.is_dir() {
            return Err(anyhow!(
                "stage {}: output `{name}` has type {} and must be a folder, but is a file",
                job.stage_id,
                ty.name()
            ));
        }
        if !wants_dir && !matches!(ty, ArtifactType::Model) && !meta.is_file() {
            return Err(anyhow!(
                "stage {}: output `{name}` has type {} and must be a file",
                job.stage_id,
                ty.name()
            ));
        }
    }
    let entries = std::fs::read_dir(staging)
        .with_context(|| format!("listing staging folder {}", staging.display()))?;
    for entry in entries {
        let entry =
            entry.with_context(|| format!("listing staging folder {}", staging.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !job.outputs.contains_key(&name) {
            // Hidden entries are a kind's own scratch space by convention; anything else
            // left behind is worth a note.
            if !name.starts_with('.') {
                progress.log(&format!(
                    "removing `{name}` from the staging folder: it is not a declared output of kind {}",
                    job.kind
                ));
            }
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("removing scratch entry {}", path.display()))?;
        }
    }
    Ok(())
}

/// Output entries of a committed record as the input artifacts downstream stages read.
pub fn output_artifact(
    store: &Store,
    entry: &OutputEntry,
    ty: ArtifactType,
    origin: String,
) -> JobArtifact {
    JobArtifact {
        path: store.artifact_path(entry),
        digest: entry.digest.clone(),
        ty,
        origin,
    }
}

/// Reads a job file.
pub fn read_job(path: &Path) -> anyhow::Result<Job> {
    let text =
        std::fs::read(path).with_context(|| format!("reading job file {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| {
        format!(
            "job file {} is not a valid emflow job (written by another emflow version?)",
            path.display()
        )
    })
}

/// Writes `value` as JSON to `path` atomically (tmp file + fsync + rename), so a reader
/// never sees half a file even if this process is killed.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(value)?;
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(&bytes)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("moving {} into place", path.display()))?;
    Ok(())
}
