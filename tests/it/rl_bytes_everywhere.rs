//! A GRPO stage commits the same output bytes wherever it runs: here once in a child process
//! (`--executor local`) with one candle thread, once on a thread of the driver
//! (`--executor in-process`) with two, each against its own store at a different path, as a
//! local run and a Slurm run do, and each with its own copy of the base model. Both must give
//! the same keys and output digests, the adapters included: they once recorded the path of
//! the base model (inside the store for a fetched one), so every store or copy made other
//! bytes under the same key. Runs SmolLM2 for one step; skipped (with the reason printed)
//! when the weights are unavailable.

use crate::support::{emflow, succeed};
use std::path::Path;

fn manifest(model: &Path, prompts: &Path) -> String {
    format!(
        r#"emflow: 1
name: rl-bytes
models:
  base: {{ source: "{model}" }}
stages:
  grpo:
    kind: rl
    inputs:
      model: models.base
      prompts: "file:{prompts}"
    params:
      reward: {{ type: keyword, keywords: [blue] }}
      lora: {{ r: 4, alpha: 8 }}
      prompts_per_step: 2
      num_generations: 2
      grad_accum: 2
      max_completion_length: 8
      lr: 1.0e-3
      max_steps: 1
      seed: 5
    resources: {{ cpus: 1 }}
"#,
        model = model.display(),
        prompts = prompts.display()
    )
}

/// Runs the manifest in `dir` with its own store and its own copy of the model there, then
/// returns its lock file.
fn run_and_lock(dir: &Path, model: &Path, prompts: &Path, executor: &str, threads: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let copy = dir.join("base.gguf");
    if std::fs::hard_link(model, &copy).is_err() {
        std::fs::copy(model, &copy).unwrap();
    }
    let m = dir.join("m.yaml");
    std::fs::write(&m, manifest(&copy, prompts)).unwrap();
    let store = dir.join("store");
    for args in [vec!["run", "--executor", executor], vec!["lock"]] {
        succeed(
            emflow()
                .env("RAYON_NUM_THREADS", threads)
                .arg("--store")
                .arg(&store)
                .args(&args[..1])
                .arg(&m)
                .args(&args[1..]),
        );
    }
    std::fs::read_to_string(dir.join("emflow.lock")).unwrap()
}

#[test]
fn grpo_outputs_are_the_same_bytes_in_any_store_executor_and_thread_count() {
    let Some(model) = emflow_model::testing::smollm2_gguf() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    let lines: String = ["Name a colour.", "Say something about the sea."]
        .iter()
        .map(|q| format!("{{\"messages\":[{{\"role\":\"user\",\"content\":\"{q}\"}}]}}\n"))
        .collect();
    std::fs::write(&prompts, lines).unwrap();

    let local = run_and_lock(&tmp.path().join("local"), &model, &prompts, "local", "1");
    let other = run_and_lock(
        &tmp.path().join("elsewhere/in-process"),
        &model,
        &prompts,
        "in-process",
        "2",
    );
    // The lock also names each copy's path as the model source: compare the stages.
    let stages = |lock: &str| {
        let lock: serde_json::Value = serde_json::from_str(lock).unwrap();
        lock["manifests"]["m.yaml"]["stages"].clone()
    };
    let (local, other) = (stages(&local), stages(&other));
    let outputs = &local["grpo"]["outputs"];
    assert!(
        outputs["adapter"].is_string() && outputs["best_adapter"].is_string(),
        "the lock should list the adapters' digests: {outputs}"
    );
    assert_eq!(
        local, other,
        "same manifest, different store path, model copy, executor and thread count: \
         different keys or bytes"
    );
}
