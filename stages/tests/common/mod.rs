//! Helpers for running a stage kind in a test without the engine: a [`StageContext`] over
//! temporary folders, defaults filled in from the kind's spec as the engine would, and a
//! progress sink that records log lines.
//!
//! Use from a test file with `mod common;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use emflow_engine::context::{
    Artifact, ContextParts, DeviceRequest, MemoryMemo, Progress, StageContext,
};
use emflow_engine::{ArtifactType, Params, StageKind};
use serde_json::Value;

/// The paper's data folder: `EMFLOW_PAPER_DATA`, else `../shared/paper-data` from the
/// workspace root. `None` (with the reason printed) when it is not there, so that a test
/// can skip: `let Some(data) = common::paper_data() else { return };`.
pub fn paper_data() -> Option<PathBuf> {
    let path = match std::env::var_os("EMFLOW_PAPER_DATA") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/paper-data"),
    };
    if path.join("sft").is_dir() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: paper data not found at {} (set EMFLOW_PAPER_DATA to the paper-data folder)",
            path.display()
        );
        None
    }
}

/// A progress sink that keeps every log line.
#[derive(Default)]
pub struct RecordingProgress {
    pub lines: Mutex<Vec<String>>,
}

impl RecordingProgress {
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Progress for RecordingProgress {
    fn phase(&self, _: &str, _: u64, _: &str) {}
    fn inc(&self, _: u64) {}
    fn message(&self, _: &str) {}
    fn log(&self, line: &str) {
        self.lines.lock().unwrap().push(line.to_string());
    }
}

/// A local file wired as an input, as the engine wires a `file:` reference.
pub fn file_input(path: impl AsRef<Path>) -> Artifact {
    let path = path.as_ref().to_path_buf();
    let ty = if path.is_dir() {
        ArtifactType::Dir
    } else {
        ArtifactType::File
    };
    Artifact {
        digest: String::new(),
        ty,
        origin: format!("file:{}", path.display()),
        path,
    }
}

/// A stage context for `kind` in a fresh temporary folder. Hold on to the returned
/// [`TestStage`]: dropping it removes the folders.
pub struct TestStage {
    pub dir: tempfile::TempDir,
    pub ctx: StageContext,
    pub progress: Arc<RecordingProgress>,
    pub interrupt: Arc<AtomicBool>,
}

impl TestStage {
    /// `params` is a JSON object; the kind's declared defaults fill in what it omits.
    pub fn new(
        kind: &dyn StageKind,
        params: Value,
        inputs: Vec<(&str, Vec<Artifact>)>,
    ) -> TestStage {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        let checkpoint = dir.path().join("checkpoint");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(&checkpoint).unwrap();
        std::fs::create_dir_all(dir.path().join("scratch")).unwrap();
        let progress = Arc::new(RecordingProgress::default());
        let interrupt = Arc::new(AtomicBool::new(false));
        let ctx = StageContext::new(ContextParts {
            stage_id: format!("test_{}", kind.spec().name),
            kind: kind.spec().name.to_string(),
            params: with_defaults(kind, params),
            inputs: inputs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
            staging,
            checkpoint,
            scratch: dir.path().join("scratch"),
            device: DeviceRequest::Cpu,
            threads: 1,
            progress: progress.clone(),
            memo: Arc::new(MemoryMemo::default()),
            interrupt: interrupt.clone(),
        });
        TestStage {
            dir,
            ctx,
            progress,
            interrupt,
        }
    }

    /// Runs the kind after its `check`, as the engine does.
    pub fn run(&mut self, kind: &dyn StageKind) -> anyhow::Result<()> {
        if let Err(errors) = kind.check(self.ctx.params()) {
            let lines: Vec<String> = errors
                .iter()
                .map(|e| format!("{}: {}", e.param, e.message))
                .collect();
            anyhow::bail!("check failed: {}", lines.join("; "));
        }
        kind.run(&mut self.ctx)
    }

    pub fn output(&self, name: &str) -> PathBuf {
        self.ctx.output_path(name)
    }

    pub fn output_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.output(name)).unwrap()
    }
}

/// `params` with the kind's declared defaults added for absent names.
pub fn with_defaults(kind: &dyn StageKind, params: Value) -> Params {
    let Value::Object(mut params) = params else {
        panic!("params must be a JSON object")
    };
    for spec in kind.spec().params {
        if let Some(default) = spec.default {
            params.entry(spec.name).or_insert(default);
        }
    }
    params
}

/// blake3 of a file, hex.
pub fn digest(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}
