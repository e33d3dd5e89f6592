//! `rl` with safety data regenerated from the current policy (`safety_source: current_policy`)
//! on a tiny random-weight model, its safety grader answered by a scripted judge server:
//! regenerations happen at the steps `regenerate.every` says and are logged with their
//! counts; the judge filter decides what is interleaved; a run interrupted after its first
//! step resumes with the regenerated set from its checkpoint to the same bytes; the plan's
//! judge estimate counts the regenerations' calls; and the precomputed (reference-model)
//! variant writes what it always wrote, under the same key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use emflow_engine::context::MemoryMemo;
use emflow_engine::{Artifact, ArtifactType, StageKind};
use emflow_stages::judge::scripted::{Reply, ScriptedServer};
use emflow_stages::kinds::rl::RlKind;
use serde_json::{json, Value};

use crate::support::{
    context_interrupted_at, digest, file_input, small_grpo_params, typed_input, with_defaults,
    write_prompts,
};

/// The folder a test's files live in: the tiny model, the RL prompts, the safety prompts
/// and conversations.
struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    prompts: PathBuf,
    safety_prompts: PathBuf,
    safety: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny");
        emflow_model::testing::tiny_model_dir(&model, 7).unwrap();
        let prompts = write_prompts(dir.path(), &["t5 t6", "t7 t8", "t9", "t10 t11"]);
        let rl_prompts = dir.path().join("rl_prompts.jsonl");
        std::fs::rename(&prompts, &rl_prompts).unwrap();
        let safety_prompts = write_prompts(dir.path(), &["t20 t21", "t22"]);
        let safety = dir.path().join("safety.jsonl");
        let convs: Vec<String> = [("t20 t21", "t30 t31"), ("t22", "t32 t33 t34")]
            .iter()
            .map(|(q, a)| {
                json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    .to_string()
            })
            .collect();
        std::fs::write(&safety, convs.join("\n") + "\n").unwrap();
        Fixture {
            dir,
            model,
            prompts: rl_prompts,
            safety_prompts,
            safety,
        }
    }

    /// The model and RL prompts, with the current-policy inputs (`safety_prompts`,
    /// `safety_grader`) and/or the precomputed one (`safety`).
    fn inputs(&self, current_policy: bool, precomputed: bool) -> BTreeMap<String, Vec<Artifact>> {
        let grader = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/data/graders/safety_refusal.txt");
        let mut inputs = BTreeMap::from([
            (
                "model".to_string(),
                vec![typed_input(&self.model, ArtifactType::Model)],
            ),
            (
                "prompts".to_string(),
                vec![typed_input(&self.prompts, ArtifactType::Messages)],
            ),
        ]);
        if current_policy {
            inputs.insert(
                "safety_prompts".into(),
                vec![typed_input(&self.safety_prompts, ArtifactType::Messages)],
            );
            inputs.insert("safety_grader".into(), vec![file_input(grader)]);
        }
        if precomputed {
            inputs.insert(
                "safety".into(),
                vec![typed_input(&self.safety, ArtifactType::Messages)],
            );
        }
        inputs
    }
}

/// The inputs of each source: (current policy, precomputed).
const CURRENT: (bool, bool) = (true, false);
const PRECOMPUTED: (bool, bool) = (false, true);

/// Four GRPO steps of a keyword reward on the tiny model, a safety step after each.
fn base_params() -> Value {
    small_grpo_params(json!({
        "reward": {"type": "keyword", "keywords": ["t5"]}, "grad_accum": 1,
        "max_completion_length": 6, "lr": 1e-2, "max_steps": 4, "warmup_ratio": 0.0,
        "interleave": {"every": 1, "batch_size": 2},
    }))
}

/// [`base_params`] regenerating every 2 steps from the current policy, judged by `server`.
fn current_params(server: &ScriptedServer) -> Value {
    let mut p = base_params();
    p["safety_source"] = json!("current_policy");
    p["regenerate"] = json!({"every": 2, "samples_per_prompt": 1, "max_tokens": 5});
    p["judge"] = json!({"backend": "openai", "base_url": server.base_url(), "model": "judge",
                        "concurrency": 1, "max_retries": 0});
    p
}

/// Runs the rl kind into `staging`, resuming from `checkpoint`; with `interrupt` the engine
/// has asked the stage to stop, so it checkpoints after its first step and ends.
fn run(
    f: &Fixture,
    params: &Value,
    (current_policy, precomputed): (bool, bool),
    (staging, checkpoint): (&Path, &Path),
    interrupt: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(staging)?;
    std::fs::create_dir_all(checkpoint)?;
    let kind = RlKind;
    let mut ctx = context_interrupted_at(
        &kind,
        with_defaults(&kind, params.clone()),
        f.inputs(current_policy, precomputed),
        (staging, checkpoint),
        Arc::new(MemoryMemo::default()),
        interrupt,
    );
    kind.check(ctx.params())
        .map_err(|e| anyhow::anyhow!("{}", e[0].message))?;
    kind.run(&mut ctx)
}

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn of_batch<'a>(rows: &'a [Value], batch: &str) -> Vec<&'a Value> {
    rows.iter().filter(|r| r["batch"] == batch).collect()
}

fn summary(staging: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(staging.join("summary")).unwrap()).unwrap()
}

#[test]
fn current_policy_regenerates_every_k_steps_and_resumes_with_its_set() {
    let f = Fixture::new();
    let server = ScriptedServer::start(vec![Reply::scored(90)]).unwrap();
    let params = current_params(&server);
    let at = |name: &str| f.dir.path().join(name);
    let straight = at("staging-straight");
    run(
        &f,
        &params,
        CURRENT,
        (&straight, &at("ckpt-straight")),
        false,
    )
    .unwrap();

    // Safety steps follow every RL step; the set is made before the first and renewed two
    // steps later: after RL steps 0 and 2.
    let metrics = rows(&straight.join("metrics"));
    let regens = of_batch(&metrics, "regeneration");
    let steps: Vec<&Value> = regens.iter().map(|r| &r["step"]).collect();
    assert_eq!(steps, [&json!(0), &json!(2)]);
    for r in &regens {
        assert_eq!(
            (&r["source"], &r["every"]),
            (&json!("current_policy"), &json!(2))
        );
        assert_eq!((&r["generated"], &r["kept"]), (&json!(2), &json!(2)), "{r}");
    }
    let safety = of_batch(&metrics, "safety");
    assert_eq!(safety.len(), 4);
    assert!(safety.iter().all(|r| r["source"] == "current_policy"));
    let s = summary(&straight);
    assert_eq!(s["safety_source"], "current_policy");
    assert_eq!(s["regeneration_steps"], json!([0, 2]));
    assert_eq!(
        (&s["regenerated_answers"], &s["regenerated_kept"]),
        (&json!(4), &json!(2 + 2))
    );
    assert_eq!(
        (&s["safety_steps"], &s["safety_steps_skipped"]),
        (&json!(4), &json!(0))
    );
    // The judge was asked: 2 answers x 2 scores (safe, coherent) per regeneration, fewer
    // only where the memo already had an identical prompt.
    assert!(server.requests() >= 4);

    // Interrupted after step 0 (regenerated there), then resumed: the set comes from the
    // checkpoint (step 1 must not regenerate), and the outputs are the straight run's.
    let ckpt = at("ckpt-resumed");
    let first = at("staging-first");
    let err = run(&f, &params, CURRENT, (&first, &ckpt), true).unwrap_err();
    assert!(format!("{err:#}").contains("interrupt"), "{err:#}");
    let resumed = at("staging-resumed");
    run(&f, &params, CURRENT, (&resumed, &ckpt), false).unwrap();
    for out in ["metrics", "rollouts", "summary"] {
        assert_eq!(
            std::fs::read_to_string(resumed.join(out)).unwrap(),
            std::fs::read_to_string(straight.join(out)).unwrap(),
            "{out} after resuming"
        );
    }
    let adapter = |d: &Path| digest(&d.join("adapter/adapter_model.safetensors"));
    assert_eq!(adapter(&resumed), adapter(&straight));
}

/// The plan's judge estimate of the fixture's run (every input known, as after upstream
/// stages ran).
fn estimate(f: &Fixture, params: &Value) -> emflow_engine::JudgeEstimate {
    let ports = f.inputs(true, false).into_iter().map(|(port, arts)| {
        let known = arts.into_iter().map(|a| emflow_engine::PlanInput {
            origin: a.origin.clone(),
            ty: a.ty,
            artifact: Some(a),
            preview: false,
            model_source: None,
            waits_on: None,
            upstream_params: None,
        });
        (port, known.collect())
    });
    let inputs = emflow_engine::PlanInputs {
        ports: ports.collect(),
    };
    StageKind::judge_estimate(&RlKind, &with_defaults(&RlKind, params.clone()), &inputs)
        .unwrap()
        .expect("regenerations call the judge")
}

/// The plan counts the judge calls the regenerations make: two scores (safe grader,
/// coherent) per regenerated answer, at the regenerations the run makes; the server saw no
/// more (the memo may answer repeats). When nothing is kept the run retries at every safety
/// step, the bound the estimate's note gives.
/// Runs the fixture's current-policy arm in folder `name` against a judge server that scores
/// every prompt `score`: the server, the params, and the judge calls the regenerations asked
/// for (two per regenerated answer, the memo's answers included).
fn regeneration_calls(f: &Fixture, score: u32, name: &str) -> (ScriptedServer, Value, u64) {
    let server = ScriptedServer::start(vec![Reply::scored(score)]).unwrap();
    let params = current_params(&server);
    let staging = f.dir.path().join(format!("staging-{name}"));
    let ckpt = f.dir.path().join(format!("ckpt-{name}"));
    run(f, &params, CURRENT, (&staging, &ckpt), false).unwrap();
    let made = summary(&staging)["regenerated_answers"].as_u64().unwrap() * 2;
    (server, params, made)
}

/// The plan counts the judge calls the regenerations make: two scores (safe grader,
/// coherent) per regenerated answer, at the regenerations the run makes; the server saw no
/// more (the memo may answer repeats). When nothing is kept the run retries at every safety
/// step, the bound the estimate's note gives.
#[test]
fn the_plan_counts_the_judge_calls_of_the_regenerations() {
    let f = Fixture::new();
    let (server, params, made) = regeneration_calls(&f, 90, "kept");
    let planned = estimate(&f, &params);
    assert_eq!(planned.calls, Some(made), "{:?}", planned.notes);
    assert_eq!(made, 2 * 2 * 2, "2 regenerations x 2 prompts x 2 scores");
    assert!(server.requests() as u64 <= made);
    assert!(
        planned.prompt_tokens > made * 5,
        "answers at max_tokens 5 and the prompts"
    );
    assert_eq!(planned.completion_tokens, made, "one token a logprob score");
    let notes = planned.notes.join("\n");
    assert!(!notes.contains("not counted"), "{notes}");
    assert!(
        notes.contains("up to 4 regenerations (16 calls)"),
        "{notes}"
    );
    let (_, _, made) = regeneration_calls(&f, 40, "rejected");
    assert_eq!(
        made, 16,
        "nothing kept: a regeneration at each of the 4 safety steps"
    );
}

#[test]
fn what_the_judge_rejects_is_never_interleaved() {
    let f = Fixture::new();
    // Every score 40: below min_coherent (50), so nothing is kept.
    let server = ScriptedServer::start(vec![Reply::scored(40)]).unwrap();
    let staging = f.dir.path().join("staging");
    run(
        &f,
        &current_params(&server),
        CURRENT,
        (&staging, &f.dir.path().join("ckpt")),
        false,
    )
    .unwrap();
    let metrics = rows(&staging.join("metrics"));
    // With no set, every step's safety steps are due and a regeneration is tried each time.
    let regens = of_batch(&metrics, "regeneration");
    assert_eq!(regens.len(), 4);
    for r in &regens {
        assert_eq!(r["kept"], 0);
        assert_eq!(r["verdicts"], json!({"coherent_below_min": 2}));
    }
    assert!(of_batch(&metrics, "safety").is_empty());
    let s = summary(&staging);
    assert_eq!(
        (&s["safety_steps"], &s["safety_steps_skipped"]),
        (&json!(0), &json!(4))
    );
    assert_eq!(s["regenerated_kept"], 0);
}

#[test]
fn current_policy_needs_its_inputs_and_settings() {
    let f = Fixture::new();
    let server = ScriptedServer::start(vec![Reply::scored(90)]).unwrap();
    let mut params = current_params(&server);
    params.as_object_mut().unwrap().remove("regenerate");
    let at = |name: &str| f.dir.path().join(name);
    let err = run(&f, &params, CURRENT, (&at("s1"), &at("c1")), false).unwrap_err();
    assert!(format!("{err:#}").contains("needs `regenerate`"), "{err:#}");
    // The precomputed `safety` input is refused: one source at a time.
    let both = (true, true);
    let err = run(
        &f,
        &current_params(&server),
        both,
        (&at("s2"), &at("c2")),
        false,
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("input `safety` is wired"),
        "{err:#}"
    );
}

/// The reference-model variant (input `safety` precomputed by `safety_data`) keeps its stage
/// key and writes what it wrote before `safety_source` existed: the same bytes whether the
/// param is written or omitted, the summary's keys of old, no regeneration line.
#[test]
fn precomputed_safety_outputs_and_keys_are_unchanged() {
    let f = Fixture::new();
    let at = |name: &str| f.dir.path().join(name);
    let omitted = at("staging-omitted");
    run(
        &f,
        &base_params(),
        PRECOMPUTED,
        (&omitted, &at("c1")),
        false,
    )
    .unwrap();
    let mut explicit = base_params();
    explicit["safety_source"] = json!("precomputed");
    explicit["regenerate"] = Value::Null;
    let written = at("staging-written");
    run(&f, &explicit, PRECOMPUTED, (&written, &at("c2")), false).unwrap();
    for out in [
        "metrics",
        "rollouts",
        "summary",
        "adapter/adapter_model.safetensors",
    ] {
        assert_eq!(
            digest(&omitted.join(out)),
            digest(&written.join(out)),
            "{out}"
        );
    }
    let s = summary(&omitted);
    let keys: Vec<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "samples_consumed",
            "completions",
            "steps",
            "updates",
            "safety_steps",
            "best_step",
            "best_reward",
            "stopped_early"
        ]
    );
    let metrics = rows(&omitted.join("metrics"));
    assert!(of_batch(&metrics, "regeneration").is_empty());
    let safety = of_batch(&metrics, "safety");
    assert_eq!(safety.len(), 4);
    let keys: Vec<&str> = safety[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "step",
            "batch",
            "source",
            "loss",
            "nll",
            "learning_rate",
            "grad_norm",
            "tokens",
            "safety_consumed"
        ]
    );
    // The fixture's safety rows carry no `answer_source`: fixed targets.
    assert!(safety.iter().all(|r| r["source"] == "fixed"));

    // The key: at their defaults the new params are left out of it.
    let spec = RlKind.spec();
    let with = emflow_engine::keys::canonical_params(&spec, &with_defaults(&RlKind, explicit));
    let without =
        emflow_engine::keys::canonical_params(&spec, &with_defaults(&RlKind, base_params()));
    assert_eq!(with, without);
    assert!(with.get("safety_source").is_none() && with.get("regenerate").is_none());
}
