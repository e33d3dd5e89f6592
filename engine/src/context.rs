//! What a running stage sees: its params, its inputs as read-only paths, a staging folder
//! for its outputs, and a few services (progress, memo, checkpoints, interruption).
//!
//! The context is the *only* door between a kind and the engine. Inputs are paths into the
//! store (or to a user's local file, hashed in place), never store handles, so a kind cannot
//! corrupt the store and cannot depend on how it is laid out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use crate::artifact::Artifact;
use crate::artifact::Params;

/// Where a stage runs. Device *class* and dtype are part of the stage key; the ordinal and
/// thread count are operational and never are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    Cpu,
    /// A CUDA device by ordinal *within* the process's visible devices.
    Cuda {
        ordinal: usize,
    },
}

impl DeviceRequest {
    /// The CUDA ordinal to load models on, `None` for the CPU.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        match self {
            DeviceRequest::Cpu => None,
            DeviceRequest::Cuda { ordinal } => Some(*ordinal),
        }
    }
}

/// Progress of long work inside a stage. Shown as a bar on a terminal, as plain lines
/// otherwise, and as JSON events with `--json`. Cheap to call often.
pub trait Progress: Send + Sync {
    /// Starts (or restarts) a phase: `total` units of `unit` (e.g. 30 "steps"). `total = 0`
    /// means unknown.
    fn phase(&self, name: &str, total: u64, unit: &str);
    /// Advances the current phase by `n` units.
    fn inc(&self, n: u64);
    /// A short status shown beside the bar (e.g. `loss 1.23`); replaces the previous one.
    fn message(&self, msg: &str);
    /// A line for the log that stays (warnings, notable events).
    fn log(&self, line: &str);
}

/// A progress sink that discards everything; for tests and quiet runs.
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &str, _: u64, _: &str) {}
    fn inc(&self, _: u64) {}
    fn message(&self, _: &str) {}
    fn log(&self, _: &str) {}
}

/// A persistent key-value memo shared by all stages on a store, for results that are
/// expensive and keyed by their full input: judge calls above all. Entries survive across
/// runs and stages; a rerun never pays twice for the same call.
pub trait Memo: Send + Sync {
    /// The bytes stored under (`namespace`, `key`), if any.
    fn get(&self, namespace: &str, key: &[u8]) -> Option<Vec<u8>>;
    /// Stores `value`; last writer wins (values for one key must be interchangeable).
    fn put(&self, namespace: &str, key: &[u8], value: &[u8]) -> anyhow::Result<()>;
}

/// A memo in memory only; for tests.
#[derive(Default)]
pub struct MemoryMemo(std::sync::Mutex<BTreeMap<MemoKey, Vec<u8>>>);

/// (namespace, key) of a [`MemoryMemo`] entry.
type MemoKey = (String, Vec<u8>);

impl Memo for MemoryMemo {
    fn get(&self, namespace: &str, key: &[u8]) -> Option<Vec<u8>> {
        let map = self.0.lock().ok()?;
        map.get(&(namespace.to_string(), key.to_vec())).cloned()
    }
    fn put(&self, namespace: &str, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        let mut map = self.0.lock().map_err(|_| anyhow!("memo lock poisoned"))?;
        map.insert((namespace.to_string(), key.to_vec()), value.to_vec());
        Ok(())
    }
}

/// A memo that answers only what it stored itself: every other call is asked again and its
/// fresh answer replaces the stored one (`emflow run --refresh-judge`). Calls repeated within
/// the stage are still answered once.
pub struct RefreshingMemo {
    inner: Arc<dyn Memo>,
    written: std::sync::Mutex<std::collections::BTreeSet<MemoKey>>,
}

impl RefreshingMemo {
    pub fn new(inner: Arc<dyn Memo>) -> Self {
        RefreshingMemo {
            inner,
            written: Default::default(),
        }
    }
}

impl Memo for RefreshingMemo {
    fn get(&self, namespace: &str, key: &[u8]) -> Option<Vec<u8>> {
        let written = self.written.lock().ok()?;
        if written.contains(&(namespace.to_string(), key.to_vec())) {
            self.inner.get(namespace, key)
        } else {
            None
        }
    }
    fn put(&self, namespace: &str, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        self.inner.put(namespace, key, value)?;
        let mut written = self
            .written
            .lock()
            .map_err(|_| anyhow!("memo lock poisoned"))?;
        written.insert((namespace.to_string(), key.to_vec()));
        Ok(())
    }
}

/// `memo` as a stage sees it: wrapped in a [`RefreshingMemo`] when `refresh` is asked for.
pub fn memo_for(memo: Arc<dyn Memo>, refresh: bool) -> Arc<dyn Memo> {
    if refresh {
        Arc::new(RefreshingMemo::new(memo))
    } else {
        memo
    }
}

/// The error a stage returns to say "I saved a checkpoint and stopped; run me again".
/// The engine recognises it (by downcast) and, under Slurm, requeues the job.
#[derive(Debug, thiserror::Error)]
#[error("stage interrupted after saving a checkpoint; it resumes on the next run")]
pub struct Interrupted;

/// The running stage's view of the world. Built by the engine for each execution.
pub struct StageContext {
    /// The stage instance id, e.g. `grpo[domain=medical,seed=1]`.
    pub stage_id: String,
    /// The kind's name.
    pub kind: String,
    key: String,
    key_parts: Value,
    params: Params,
    inputs: BTreeMap<String, Vec<Artifact>>,
    staging: PathBuf,
    checkpoint: PathBuf,
    scratch: PathBuf,
    device: DeviceRequest,
    threads: usize,
    progress: Arc<dyn Progress>,
    memo: Arc<dyn Memo>,
    interrupt: Arc<AtomicBool>,
    summary: serde_json::Map<String, Value>,
}

/// Everything [`StageContext::new`] needs; a struct so call sites name each part.
pub struct ContextParts {
    pub stage_id: String,
    pub kind: String,
    /// The stage key this execution commits under ([`crate::keys`]).
    pub key: String,
    /// What `key` is the digest of: [`crate::keys::KeyParts`] as JSON.
    pub key_parts: Value,
    pub params: Params,
    pub inputs: BTreeMap<String, Vec<Artifact>>,
    /// Empty folder, created by the caller, where outputs go.
    pub staging: PathBuf,
    /// Folder that survives a crash or interruption of this stage key; created by the caller.
    pub checkpoint: PathBuf,
    /// Empty folder for temporary files, created by the caller and emptied after the stage;
    /// never committed.
    pub scratch: PathBuf,
    pub device: DeviceRequest,
    pub threads: usize,
    pub progress: Arc<dyn Progress>,
    pub memo: Arc<dyn Memo>,
    /// Set by the engine on SIGTERM/SIGUSR2 (e.g. a Slurm time limit approaching).
    pub interrupt: Arc<AtomicBool>,
}

impl StageContext {
    pub fn new(parts: ContextParts) -> Self {
        StageContext {
            stage_id: parts.stage_id,
            kind: parts.kind,
            key: parts.key,
            key_parts: parts.key_parts,
            params: parts.params,
            inputs: parts.inputs,
            staging: parts.staging,
            checkpoint: parts.checkpoint,
            scratch: parts.scratch,
            device: parts.device,
            threads: parts.threads,
            progress: parts.progress,
            memo: parts.memo,
            interrupt: parts.interrupt,
            summary: serde_json::Map::new(),
        }
    }

    /// The stage key this execution commits under, in full (hex).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What [`Self::key`] is the digest of: [`crate::keys::KeyParts`] as JSON (kind and
    /// version, canonical params without connection settings, input digests, environment).
    ///
    /// A kind may write them (or the key) into an output so that the output says how it was
    /// made (`eval`'s summary does, for the report's provenance). That keeps outputs a function
    /// of what the key covers, so a re-execution (`emflow verify`) writes the same bytes. Two
    /// costs to weigh: such an output changes whenever the key does, even where nothing else
    /// in it would (no early cutoff below it); and the key's environment holds the emflow
    /// version, so an output that names the whole key changes with every release (`eval`
    /// leaves `env.emflow` out for that reason).
    pub fn key_parts(&self) -> &Value {
        &self.key_parts
    }

    /// All params, defaults filled in.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// All params deserialised into the kind's own struct (use `#[serde(default)]` freely;
    /// the engine has already checked names and types against the spec).
    pub fn params_as<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_value(Value::Object(self.params.clone())).with_context(|| {
            format!(
                "params of stage {} do not fit kind {}",
                self.stage_id, self.kind
            )
        })
    }

    /// One param deserialised; an error names the param.
    pub fn param<T: DeserializeOwned>(&self, name: &str) -> anyhow::Result<T> {
        let v = self
            .params
            .get(name)
            .ok_or_else(|| anyhow!("stage {}: param `{name}` is not set", self.stage_id))?;
        serde_json::from_value(v.clone())
            .with_context(|| format!("stage {}: param `{name}`", self.stage_id))
    }

    /// The single artifact wired to input port `name`; an error if absent or if several.
    pub fn input(&self, name: &str) -> anyhow::Result<&Artifact> {
        match self.inputs.get(name).map(Vec::as_slice) {
            Some([one]) => Ok(one),
            Some([]) | None => Err(anyhow!(
                "stage {}: input `{name}` is not wired",
                self.stage_id
            )),
            Some(many) => Err(anyhow!(
                "stage {}: input `{name}` has {} artifacts where one was expected",
                self.stage_id,
                many.len()
            )),
        }
    }

    /// The artifact wired to `name`, or `None` when the optional port is unwired.
    pub fn optional_input(&self, name: &str) -> anyhow::Result<Option<&Artifact>> {
        match self.inputs.get(name) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(_) => self.input(name).map(Some),
        }
    }

    /// All artifacts wired to a many-port, in manifest order (matrix cells in expansion order).
    pub fn inputs(&self, name: &str) -> &[Artifact] {
        self.inputs.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every input port and its artifacts.
    pub fn all_inputs(&self) -> &BTreeMap<String, Vec<Artifact>> {
        &self.inputs
    }

    /// Where to write output `name`: `<staging>/<name>`, a file or a folder as its type says.
    /// The parent exists; the path itself does not until the kind creates it.
    pub fn output_path(&self, name: &str) -> PathBuf {
        self.staging.join(name)
    }

    /// The staging folder itself (outputs are its direct children).
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// A folder private to this stage key that survives crashes and interruptions, for
    /// resumable checkpoints. Removed by the engine after a successful commit.
    pub fn checkpoint_dir(&self) -> &Path {
        &self.checkpoint
    }

    /// An empty folder private to this execution for temporary files (a command's working
    /// directory and `TMPDIR`). Outside the staging folder, so nothing in it is committed;
    /// the engine empties it after the stage.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    pub fn device(&self) -> &DeviceRequest {
        &self.device
    }

    /// Threads this stage may use (operational: outputs must not depend on it).
    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn progress(&self) -> &dyn Progress {
        self.progress.as_ref()
    }

    /// A shareable handle to the progress sink, for worker threads.
    pub fn progress_handle(&self) -> Arc<dyn Progress> {
        self.progress.clone()
    }

    pub fn memo(&self) -> &dyn Memo {
        self.memo.as_ref()
    }

    /// A shareable handle to the memo, for worker threads.
    pub fn memo_handle(&self) -> Arc<dyn Memo> {
        self.memo.clone()
    }

    /// True once the engine asked the stage to stop (time limit near, Ctrl-C).
    pub fn interrupt_requested(&self) -> bool {
        self.interrupt.load(Ordering::Relaxed)
    }

    /// `Err(Interrupted)` once a stop was requested. Call it right after saving a checkpoint.
    pub fn check_interrupt(&self) -> anyhow::Result<()> {
        if self.interrupt_requested() {
            Err(Interrupted.into())
        } else {
            Ok(())
        }
    }

    /// Adds a headline figure to the stage's record (shown by `emflow cache show` and
    /// `status`), e.g. `samples_consumed`, `final_loss`.
    pub fn summarize(&mut self, key: &str, value: impl Into<Value>) {
        self.summary.insert(key.to_string(), value.into());
    }

    /// The figures collected with [`Self::summarize`]; read by the engine after `run`.
    pub fn summary(&self) -> &serde_json::Map<String, Value> {
        &self.summary
    }
}
