//! GRPO on SmolLM2 (CPU): a short run writes every output, and a run killed with SIGKILL
//! mid-way and rerun from its checkpoint ends with the same adapter bytes as an
//! uninterrupted run. Skips (with the reason printed) when the weights are unavailable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use emflow_engine::context::MemoryMemo;
use emflow_engine::{ArtifactType, StageKind};
use emflow_stages::kinds::rl::RlKind;
use serde_json::{json, Value};

use crate::support::{
    child_test, context_at, digest, small_grpo_params, typed_input, with_defaults, write_prompts,
};

const CHILD_ENV: &str = "EMFLOW_TEST_RL_CHILD_DIR";

fn prompts_file(dir: &Path) -> PathBuf {
    write_prompts(
        dir,
        &[
            "Name a colour.",
            "Say something about the sea.",
            "What do cats like?",
            "Describe a tree.",
        ],
    )
}

fn params() -> Value {
    small_grpo_params(json!({
        "reward": {"type": "keyword", "keywords": ["blue"]}, "grad_accum": 2,
        "max_completion_length": 8, "lr": 1e-3, "max_steps": 3, "checkpoint_every": 1, "beta": 0.04,
        // Snapshots after steps 1 and 2: one before the kill's checkpoint, one after.
        "snapshot_fractions": [0.34, 0.67],
    }))
}

/// SmolLM2, a temporary folder and the prompts file in it; None (the test skips) without the
/// weights.
fn model_and_prompts() -> Option<(PathBuf, tempfile::TempDir, PathBuf)> {
    let model = emflow_model::testing::smollm2_gguf()?;
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts_file(dir.path());
    Some((model, dir, prompts))
}

/// Runs the rl kind with explicit staging and checkpoint folders, and `overrides` of
/// [`params`].
fn run_stage(
    model: &Path,
    prompts: &Path,
    (staging, checkpoint): (&Path, &Path),
    overrides: &[(&str, Value)],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(staging)?;
    std::fs::create_dir_all(checkpoint)?;
    let kind = RlKind;
    let inputs = BTreeMap::from([
        (
            "model".to_string(),
            vec![typed_input(model, ArtifactType::Model)],
        ),
        (
            "prompts".to_string(),
            vec![typed_input(prompts, ArtifactType::Messages)],
        ),
    ]);
    let mut params = params();
    for (name, value) in overrides {
        params[*name] = value.clone();
    }
    let params = with_defaults(&kind, params);
    let memo = Arc::new(MemoryMemo::default());
    let mut ctx = context_at(&kind, params, inputs, (staging, checkpoint), memo);
    kind.check(ctx.params())
        .map_err(|e| anyhow::anyhow!("{}", e[0].message))?;
    kind.run(&mut ctx)
}

fn adapter_digest(staging: &Path) -> String {
    digest(&staging.join("adapter/adapter_model.safetensors"))
}

/// Not a test of its own: the body of the child process the kill test starts.
#[test]
fn rl_child_process_entry() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let model = PathBuf::from(std::env::var("EMFLOW_TEST_GGUF").unwrap());
    run_stage(
        &model,
        &dir.join("prompts.jsonl"),
        (&dir.join("staging-killed"), &dir.join("checkpoint")),
        &[],
    )
    .unwrap();
}

fn checkpointed_steps(checkpoint: &Path) -> u64 {
    let state = checkpoint.join("rl/current/state.json");
    std::fs::read(&state)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["steps"].as_u64())
        .unwrap_or(0)
}

#[test]
fn killed_grpo_run_resumes_to_the_same_adapter() {
    let Some((model, dir, prompts)) = model_and_prompts() else {
        return;
    };

    // Uninterrupted reference run.
    let straight = dir.path().join("staging-straight");
    run_stage(
        &model,
        &prompts,
        (&straight, &dir.path().join("checkpoint-straight")),
        &[],
    )
    .unwrap();
    for out in [
        "adapter",
        "best_adapter",
        "rollouts",
        "metrics",
        "summary",
        "snapshots",
    ] {
        assert!(straight.join(out).exists(), "missing output {out}");
    }
    let metrics = std::fs::read_to_string(straight.join("metrics")).unwrap();
    let rows: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert!(rows
        .iter()
        .all(|r| r["kl"].is_number() && r["reward"].is_number() && r["entropy"].is_number()));
    assert_eq!(
        std::fs::read_to_string(straight.join("rollouts"))
            .unwrap()
            .lines()
            .count(),
        12
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("summary")).unwrap()).unwrap();
    assert_eq!(summary["samples_consumed"], 6);

    assert_snapshots_after_steps_1_and_2(&straight);

    // A child process runs the same stage and is killed with SIGKILL after its first checkpoint.
    let checkpoint = dir.path().join("checkpoint");
    let mut child = child_test("rl_resume::rl_child_process_entry")
        .env(CHILD_ENV, dir.path())
        .env("EMFLOW_TEST_GGUF", &model)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while checkpointed_steps(&checkpoint) < 1 {
        assert!(
            Instant::now() < deadline,
            "the child never reached its first checkpoint"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the child ended ({status}) before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = checkpointed_steps(&checkpoint);
    assert!(killed_at < 3, "the child finished before the kill");

    // The rerun resumes from the checkpoint and ends where the straight run ended.
    let resumed = dir.path().join("staging-resumed");
    run_stage(&model, &prompts, (&resumed, &checkpoint), &[]).unwrap();
    assert_eq!(
        adapter_digest(&resumed),
        adapter_digest(&straight),
        "resumed after step {killed_at}"
    );
    assert_eq!(
        std::fs::read_to_string(resumed.join("metrics"))
            .unwrap()
            .lines()
            .count(),
        3,
        "every step is logged exactly once"
    );
    assert_eq!(
        std::fs::read_to_string(resumed.join("rollouts")).unwrap(),
        std::fs::read_to_string(straight.join("rollouts")).unwrap()
    );
    // The snapshot taken before the kill survived in the checkpoint folder; the resumed run
    // took the later one: both are the straight run's bytes.
    for file in [
        "index.json",
        "step-000001/adapter_model.safetensors",
        "step-000002/adapter_model.safetensors",
    ] {
        let path = |root: &Path| root.join("snapshots").join(file);
        let same = digest(&path(&resumed)) == digest(&path(&straight));
        assert!(same, "{file} differs, resumed after step {killed_at}");
    }
}

/// The run's `snapshots` index lists the snapshots after steps 1 and 2 of its 3 (fractions
/// 0.34 and 0.67), 2 prompts a step.
fn assert_snapshots_after_steps_1_and_2(staging: &Path) {
    let text = std::fs::read_to_string(staging.join("snapshots/index.json")).unwrap();
    let index: Value = serde_json::from_str(&text).unwrap();
    let steps: Vec<(u64, u64)> = index["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["step"].as_u64().unwrap(),
                e["samples_consumed"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(steps, [(1, 2), (2, 4)], "{index}");
    assert_eq!(index["steps_total"], 3);
}

/// `gradient_checkpointing: true` in `rl` runs (GRPO with the k3 KL term, two micro-batches a
/// step) and, over its first step (whose rollouts are sampled before any update, so they are
/// the same; two updates on them), trains the same adapter as `false` within f32 rounding
/// amplified by AdamW (measured: identical bytes, the differences being below the weights'
/// rounding).
#[test]
fn grpo_with_gradient_checkpointing_trains_the_same_first_step() {
    let Some((model, dir, prompts)) = model_and_prompts() else {
        return;
    };
    let mut adapters = Vec::new();
    for on in [false, true] {
        let staging = dir.path().join(format!("staging-{on}"));
        let checkpoint = dir.path().join(format!("checkpoint-{on}"));
        let overrides = [
            ("gradient_checkpointing", json!(on)),
            ("max_steps", json!(1)),
            // A second update: the first, from B = 0, is AdamW's sign step, which rounding
            // cannot move.
            ("num_iterations", json!(2)),
        ];
        run_stage(&model, &prompts, (&staging, &checkpoint), &overrides).unwrap();
        let path = staging.join("adapter/adapter_model.safetensors");
        adapters.push(candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap());
    }
    let (mut diff, mut scale) = (0f32, 0f32);
    for (name, a) in &adapters[0] {
        let max = |t: candle_core::Tensor| {
            let t = t.abs().unwrap().flatten_all().unwrap();
            t.max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        diff = diff.max(max((a - &adapters[1][name]).unwrap()));
        scale = scale.max(max(a.clone()));
    }
    eprintln!("GRPO adapter with vs without checkpointing: max |diff| {diff:.3e}, max |weight| {scale:.3e}");
    assert!(
        diff <= 1e-4 * scale,
        "adapters differ by {diff} (max {scale})"
    );
}
