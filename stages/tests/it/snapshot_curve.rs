//! EM over training on CPU: an `rl` run with `snapshot_fractions` writes its snapshots, and an
//! `eval` over them writes one curve point per snapshot, its answers tagged with the
//! snapshot's step; a run that took no snapshot gives an empty curve without loading a model,
//! and `snapshots` with `adapter` is refused. Skips (with the reason printed) without
//! SmolLM2's weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use emflow_engine::context::MemoryMemo;
use emflow_engine::{ArtifactType, StageKind};
use emflow_stages::evaluation::Curve;
use emflow_stages::kinds::eval::EvalKind;
use emflow_stages::kinds::rl::RlKind;
use serde_json::{json, Value};

use crate::support::{context_at, typed_input, with_defaults, write_prompts};

type Inputs = BTreeMap<String, Vec<emflow_engine::context::Artifact>>;

/// Runs `kind` with `params` (defaults filled) on `inputs` in `dir`; returns its staging folder.
fn run(kind: &dyn StageKind, dir: &Path, params: Value, inputs: Inputs) -> anyhow::Result<PathBuf> {
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging)?;
    let params = with_defaults(kind, params);
    kind.check(&params)
        .map_err(|e| anyhow::anyhow!("{}", e[0].message))?;
    let memo = Arc::new(MemoryMemo::default());
    let mut ctx = context_at(kind, params, inputs, (&staging, &dir.join("ckpt")), memo);
    kind.run(&mut ctx)?;
    Ok(staging)
}

/// The first two quickstart general questions, as a questions file in `dir`.
fn questions(dir: &Path) -> PathBuf {
    let yaml =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/data/evaluation/general.yaml");
    let all = emflow_stages::formats::questions::read(&yaml, "general.yaml").unwrap();
    let path = dir.join("questions.jsonl");
    emflow_stages::formats::jsonl::write(&path, &all[..2]).unwrap();
    path
}

/// The eval over `snapshots` (SmolLM2 as model and judge unless `model` says otherwise, the
/// questions, and `adapter` when given), run in `dir`: its staging folder.
fn eval_over(
    dir: &Path,
    (model, questions): (&Path, &Path),
    snapshots: &Path,
    adapter: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let mut inputs: Inputs = [
        ("model", model, ArtifactType::Model),
        ("judge_model", model, ArtifactType::Model),
        ("questions", questions, ArtifactType::Questions),
        ("snapshots", snapshots, ArtifactType::Dir),
    ]
    .into_iter()
    .map(|(port, path, ty)| (port.to_string(), vec![typed_input(path, ty)]))
    .collect();
    if let Some(a) = adapter {
        inputs.insert(
            "adapter".into(),
            vec![typed_input(a, ArtifactType::Adapter)],
        );
    }
    run(&EvalKind, dir, eval_params(), inputs)
}

fn eval_params() -> Value {
    json!({"samples_per_question": 1, "max_tokens": 6, "bootstrap_resamples": 50,
           "judge": {"backend": "local", "method": "top20"}})
}

fn read_curve(staging: &Path) -> Curve {
    serde_json::from_str(&std::fs::read_to_string(staging.join("summary")).unwrap()).unwrap()
}

/// Two GRPO steps on SmolLM2 (a keyword reward, no judge) with a snapshot half-way: the
/// stage's staging folder.
fn rl_with_a_snapshot(dir: &Path, model: &Path) -> PathBuf {
    let prompts = write_prompts(dir, &["Name a fruit.", "Describe the sky."]);
    let params = json!({
        "reward": {"type": "keyword", "keywords": ["blue"]},
        "lora": {"r": 4, "alpha": 8},
        "prompts_per_step": 2, "num_generations": 2, "grad_accum": 2,
        "max_completion_length": 6, "lr": 1e-3, "max_steps": 2, "seed": 1,
        "snapshot_fractions": [0.5],
    });
    let inputs: Inputs = [
        ("model", model, ArtifactType::Model),
        ("prompts", &prompts, ArtifactType::Messages),
    ]
    .into_iter()
    .map(|(port, path, ty)| (port.to_string(), vec![typed_input(path, ty)]))
    .collect();
    run(&RlKind, &dir.join("rl"), params, inputs).unwrap()
}

#[test]
fn eval_over_rl_snapshots_writes_one_curve_point_per_snapshot() {
    let Some(model) = emflow_model::testing::smollm2_gguf() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let rl = rl_with_a_snapshot(tmp.path(), &model);
    let snapshots = rl.join("snapshots");
    assert!(snapshots.join("step-000001/adapter_config.json").is_file());

    let q = questions(tmp.path());
    let staging = eval_over(&tmp.path().join("eval"), (&model, &q), &snapshots, None).unwrap();
    let curve = read_curve(&staging);
    assert_eq!(curve.run.steps_total, 2);
    assert_eq!(curve.points.len(), 1);
    let p = &curve.points[0];
    assert_eq!(
        (p.fraction, p.step, p.samples_consumed, p.progress),
        (0.5, 1, 2, 0.5)
    );
    assert_eq!(p.summary.overall.counts.n, 2, "2 questions x 1 sample");
    let samples = std::fs::read_to_string(staging.join("samples")).unwrap();
    let judgments = std::fs::read_to_string(staging.join("judgments")).unwrap();
    for text in [&samples, &judgments] {
        let rows: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r["snapshot_step"] == 1), "{text}");
    }

    // `snapshots` and `adapter` together: refused before any model loads.
    let adapter = rl.join("adapter");
    let both = eval_over(
        &tmp.path().join("both"),
        (&model, &q),
        &snapshots,
        Some(&adapter),
    );
    let err = both.unwrap_err();
    assert!(format!("{err:#}").contains("not both"), "{err:#}");
}

/// A run that stopped before its only snapshot: the curve is empty and says so, and no model
/// is loaded (the model input is a file that is no model).
#[test]
fn eval_over_a_run_without_snapshots_gives_an_empty_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let snapshots = tmp.path().join("snapshots");
    std::fs::create_dir_all(&snapshots).unwrap();
    std::fs::write(
        snapshots.join("index.json"),
        r#"{"schema": "emflow.snapshots/1", "steps_total": 3, "snapshots": [], "not_reached": [0.75]}"#,
    )
    .unwrap();
    let not_a_model = tmp.path().join("model.gguf");
    std::fs::write(&not_a_model, "not a model").unwrap();
    let q = questions(tmp.path());
    let dir = tmp.path().join("eval");
    let staging = eval_over(&dir, (&not_a_model, &q), &snapshots, None).unwrap();
    let curve = read_curve(&staging);
    assert!(curve.points.is_empty());
    assert_eq!(curve.run.not_reached, [0.75]);
    assert_eq!(
        std::fs::read_to_string(staging.join("samples")).unwrap(),
        ""
    );
}
