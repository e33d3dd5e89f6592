//! Helpers for running a stage kind in a test without the engine: a [`StageContext`] over
//! temporary folders, defaults filled in from the kind's spec as the engine would, and a
//! progress sink that records log lines.
//!
//! Use from a test module with `use crate::support::...`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use emflow_engine::context::{
    Artifact, ContextParts, DeviceRequest, Memo, MemoryMemo, NoProgress, Progress, StageContext,
};
use emflow_engine::{ArtifactType, Params, StageKind};
use serde_json::Value;

/// The paper's data folder, or `None` (with the reason printed) so that a test can skip:
/// `let Some(data) = paper_data() else { return };`. The same rule as every crate's tests.
pub use emflow_model::testing::paper_data;

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

/// A file wired as an input of type `ty`, with a stand-in digest (what a model input's
/// digest labels, such as an adapter's `base_model_name_or_path`, is not under test).
pub fn typed_input(path: impl AsRef<Path>, ty: ArtifactType) -> Artifact {
    Artifact {
        ty,
        digest: "test-digest".into(),
        ..file_input(path)
    }
}

/// Writes `questions` to `dir/prompts.jsonl` as a messages dataset, one user turn each;
/// returns its path.
pub fn write_prompts(dir: &Path, questions: &[&str]) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let lines: Vec<String> = questions
        .iter()
        .map(|q| serde_json::json!({"messages": [{"role": "user", "content": q}]}).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// Asserts that `text` (an error chain, a log) contains `part`, showing the whole text when
/// it does not.
pub fn assert_mentions(text: &str, part: &str) {
    assert!(text.contains(part), "`{part}` is not in:\n{text}");
}

/// SmolLM2's weights and the paper's data, or `None` when either is missing (the test
/// skips, saying why; in CI it fails).
pub fn smollm2_and_paper_data() -> Option<(PathBuf, PathBuf)> {
    Some((emflow_model::testing::smollm2_gguf()?, paper_data()?))
}

/// A stage context for `kind` in a fresh temporary folder. Hold on to the returned
/// [`TestStage`]: dropping it removes the folders.
pub struct TestStage {
    /// Held for its `Drop`, which removes the folders.
    _dir: tempfile::TempDir,
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
        let params = with_defaults(kind, params);
        let inputs = inputs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<BTreeMap<_, _>>();
        let (key, key_parts) = key_of(kind, &params, &inputs);
        let ctx = StageContext::new(ContextParts {
            stage_id: format!("test_{}", kind.spec().name),
            kind: kind.spec().name.to_string(),
            key,
            key_parts,
            params,
            inputs,
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
            _dir: dir,
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

    /// The rows of a JSON-lines output.
    pub fn output_rows(&self, name: &str) -> Vec<Value> {
        self.output_text(name)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// A context for `kind` whose folders the test chooses: `checkpoint` (kept across a killed
/// run and its rerun) and `staging`, with scratch beside it; quiet, two threads.
pub fn context_at(
    kind: &dyn StageKind,
    params: Params,
    inputs: BTreeMap<String, Vec<Artifact>>,
    dirs: (&Path, &Path),
    memo: Arc<dyn Memo>,
) -> StageContext {
    context_interrupted_at(kind, params, inputs, dirs, memo, false)
}

/// [`context_at`] in which the engine has (`interrupt`) or has not asked the stage to stop:
/// a training kind then checkpoints after its next step and ends with `Interrupted`.
pub fn context_interrupted_at(
    kind: &dyn StageKind,
    params: Params,
    inputs: BTreeMap<String, Vec<Artifact>>,
    (staging, checkpoint): (&Path, &Path),
    memo: Arc<dyn Memo>,
    interrupt: bool,
) -> StageContext {
    let (key, key_parts) = key_of(kind, &params, &inputs);
    StageContext::new(ContextParts {
        stage_id: format!("test_{}", kind.spec().name),
        kind: kind.spec().name.to_string(),
        key,
        key_parts,
        params,
        inputs,
        staging: staging.to_path_buf(),
        checkpoint: checkpoint.to_path_buf(),
        scratch: staging.with_extension("scratch"),
        device: DeviceRequest::Cpu,
        threads: 2,
        progress: Arc::new(NoProgress),
        memo,
        interrupt: Arc::new(AtomicBool::new(interrupt)),
    })
}

/// A small GRPO run's params for tests (LoRA r 4, 2 prompts x 2 generations a step, plain
/// sampling, seed 5) with `more` added or replacing.
pub fn small_grpo_params(more: Value) -> Value {
    let mut p = serde_json::json!({
        "lora": {"r": 4, "alpha": 8},
        "prompts_per_step": 2, "num_generations": 2, "temperature": 1.0, "top_p": 1.0, "seed": 5,
    });
    if let (Some(p), Value::Object(more)) = (p.as_object_mut(), more) {
        p.extend(more);
    }
    p
}

/// The key of a stage of `kind` with `params` and `inputs` on the CPU, and its parts as JSON,
/// as the engine computes them.
pub fn key_of(
    kind: &dyn StageKind,
    params: &Params,
    inputs: &BTreeMap<String, Vec<Artifact>>,
) -> (String, Value) {
    use emflow_engine::keys::{EnvParts, KeyParts};
    let spec = kind.spec();
    let digests = inputs
        .iter()
        .map(|(port, arts)| {
            (
                port.clone(),
                arts.iter().map(|a| a.digest.clone()).collect(),
            )
        })
        .collect();
    let parts = KeyParts::new(&spec, params, digests, EnvParts::for_stage(&spec, 0));
    (parts.key(), parts.to_value())
}

/// The key of a stage of the registered kind `kind` with `params` (the kind's defaults filled
/// in, as the engine fills them), no inputs and the CPU environment.
pub fn stage_key(kind: &str, params: Value) -> String {
    let registry = emflow_stages::registry();
    let k = registry.kind(kind).expect("a registered kind");
    let params = with_defaults(k.as_ref(), params);
    key_of(k.as_ref(), &params, &BTreeMap::new()).0
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

/// This test binary, set to run only the test at `path` (such as
/// `rl_resume::rl_child_process_entry`), ignored or not: the child process a test kills.
pub fn child_test(path: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        path,
        "--exact",
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}

/// blake3 of a file, hex.
pub fn digest(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}
