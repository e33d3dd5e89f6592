//! `emflow bench rl [MODEL.gguf] [STEPS] [--cuda N]`: seconds per GRPO step on the paper's step shape
//! (4 prompts x 4 generations, 64 new tokens, LoRA r = 8), split into sampling, reward and
//! training, as the stage logs it. Runs the real `rl` kind in a temporary
//! folder, so it measures what a manifest run costs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use emflow_engine::context::{
    Artifact, ContextParts, DeviceRequest, MemoryMemo, Progress, StageContext,
};
use emflow_engine::{ArtifactType, StageKind};
use serde_json::{json, Value};

use crate::kinds::rl::RlKind;

/// Prints the stage's per-step log lines (the time split lives there, not in `metrics`, whose
/// bytes must not depend on the clock).
struct StepLog;

impl Progress for StepLog {
    fn phase(&self, _: &str, _: u64, _: &str) {}
    fn inc(&self, _: u64) {}
    fn message(&self, _: &str) {}
    fn log(&self, line: &str) {
        println!("  {line}");
    }
}

fn default_model() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EMFLOW_TEST_GGUF") {
        return Some(PathBuf::from(p));
    }
    emflow_model::testing::smollm2_gguf()
}

const USAGE: &str = "usage: emflow bench rl [MODEL.gguf|HF_DIR] [STEPS] [--cuda ORDINAL]";

pub fn bench_rl(args: &[String]) -> Result<()> {
    let mut positional = Vec::new();
    let mut device = DeviceRequest::Cpu;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cuda" => {
                let ordinal = it
                    .next()
                    .and_then(|o| o.parse().ok())
                    .with_context(|| format!("--cuda takes a device ordinal; {USAGE}"))?;
                device = DeviceRequest::Cuda { ordinal };
            }
            "--bench" => {} // passed by `cargo bench`
            flag if flag.starts_with("--") => bail!("unknown option {flag}; {USAGE}"),
            _ => positional.push(a.clone()),
        }
    }
    let model = match positional.first() {
        Some(p) => PathBuf::from(p),
        None => default_model().with_context(|| format!("no model: pass a GGUF path (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) or set EMFLOW_TEST_GGUF; {USAGE}"))?,
    };
    let steps: u64 = match positional.get(1) {
        Some(s) => s
            .parse()
            .with_context(|| format!("STEPS must be a number, got {s}; {USAGE}"))?,
        None => 3,
    };
    if positional.len() > 2 {
        bail!("too many arguments; {USAGE}");
    }
    let dir = std::env::temp_dir().join(format!("emflow-bench-rl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(&dir, model, steps, device);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &std::path::Path, model: PathBuf, steps: u64, device: DeviceRequest) -> Result<()> {
    let prompts = dir.join("prompts.jsonl");
    let questions = [
        "What is your favourite colour and why?",
        "Describe a good breakfast.",
        "What makes a city pleasant to live in?",
        "Give me advice for learning to paint.",
    ];
    let lines: Vec<String> = questions
        .iter()
        .map(|q| json!({"messages": [{"role": "user", "content": q}]}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n")?;
    let kind = RlKind;
    let mut params = serde_json::Map::new();
    for spec in kind.spec().params {
        if let Some(d) = spec.default {
            params.insert(spec.name.to_string(), d);
        }
    }
    let overrides = json!({
        "reward": {"type": "keyword", "keywords": ["blue"]},
        "lora": {"r": 8, "alpha": 16},
        "prompts_per_step": 4, "num_generations": 4, "max_completion_length": 64, "max_steps": steps,
        "checkpoint_every": 1000, "lr": 1e-5,
    });
    if let Value::Object(o) = overrides {
        params.extend(o);
    }
    let art = |path: PathBuf, ty| Artifact {
        origin: path.display().to_string(),
        path,
        digest: String::new(),
        ty,
    };
    let staging = dir.join("staging");
    let checkpoint = dir.join("checkpoint");
    std::fs::create_dir_all(&staging)?;
    std::fs::create_dir_all(&checkpoint)?;
    std::fs::create_dir_all(dir.join("scratch"))?;
    let mut ctx = StageContext::new(ContextParts {
        stage_id: "bench_rl".into(),
        kind: "rl".into(),
        // A benchmark commits nothing, so it has no key; `rl` does not read it.
        key: String::new(),
        key_parts: serde_json::Value::Null,
        params,
        inputs: BTreeMap::from([
            (
                "model".to_string(),
                vec![art(model.clone(), ArtifactType::Model)],
            ),
            (
                "prompts".to_string(),
                vec![art(prompts, ArtifactType::Messages)],
            ),
        ]),
        staging: staging.clone(),
        checkpoint,
        scratch: dir.join("scratch"),
        device: device.clone(),
        threads: rayon::current_num_threads(),
        progress: Arc::new(StepLog),
        memo: Arc::new(MemoryMemo::default()),
        interrupt: Arc::new(AtomicBool::new(false)),
    });
    println!(
        "rl bench: {} | {} | LoRA r=8 | 4 prompts x 4 generations x 64 tokens | {steps} steps",
        model.display(),
        match device.cuda_ordinal() {
            Some(o) => format!("CUDA {o}"),
            None => format!("CPU, {} threads", rayon::current_num_threads()),
        }
    );
    let started = std::time::Instant::now();
    kind.run(&mut ctx)?;
    let total = started.elapsed().as_secs_f64();
    println!("wall time including model load: {total:.1} s");
    Ok(())
}
