//! `eval` end to end on CPU: base SmolLM2 answers the paper's 8 general questions 4 times
//! each, SmolLM2 judges (local backend, exact number scoring); a rerun on the same memo makes
//! no judge call and writes identical bytes. Skips (with a reason) without weights or data.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use emflow_engine::context::MemoryMemo;
use emflow_engine::{ArtifactType, Memo, StageKind};
use emflow_model::testing;
use emflow_stages::evaluation::Summary;
use emflow_stages::kinds::eval::EvalKind;
use serde_json::{json, Value};

use crate::support::{context_at, typed_input, with_defaults};

/// A memo that counts writes: every judge call that reaches the model is stored once.
#[derive(Default)]
struct CountingMemo {
    inner: MemoryMemo,
    puts: AtomicUsize,
}

impl Memo for CountingMemo {
    fn get(&self, ns: &str, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(ns, key)
    }
    fn put(&self, ns: &str, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put(ns, key, value)
    }
}

fn run_eval(dir: &Path, gguf: &Path, questions: &Path, memo: Arc<dyn Memo>) -> Summary {
    let kind = EvalKind;
    let params = with_defaults(
        &kind,
        json!({"samples_per_question": 4, "max_tokens": 12, "bootstrap_resamples": 200}),
    );
    kind.check(&params).map_err(|e| format!("{e:?}")).unwrap();
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let inputs = BTreeMap::from([
        (
            "model".to_string(),
            vec![typed_input(gguf, ArtifactType::Model)],
        ),
        (
            "judge_model".to_string(),
            vec![typed_input(gguf, ArtifactType::Model)],
        ),
        (
            "questions".to_string(),
            vec![typed_input(questions, ArtifactType::Questions)],
        ),
    ]);
    let mut ctx = context_at(&kind, params, inputs, (&staging, &dir.join("ckpt")), memo);
    kind.run(&mut ctx).unwrap();
    serde_json::from_str(&std::fs::read_to_string(staging.join("summary")).unwrap()).unwrap()
}

#[test]
#[ignore = "32 SmolLM2 answers and 64 exact SmolLM2 judgments take about 5 minutes on a 2-core CPU under load, too long for CI; run with --ignored"]
fn eval_of_base_smollm2_on_the_eight_questions() {
    let Some(gguf) = testing::smollm2_gguf() else {
        return;
    };
    let Some(data) = testing::paper_data() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // The 8 plain questions of the paper's first plot (the YAML also holds _json/_template variants).
    let all = emflow_stages::formats::questions::read(
        &data.join("evaluation/first_plot_questions.yaml"),
        "yaml",
    )
    .unwrap();
    let eight: Vec<_> = all
        .into_iter()
        .filter(|q| !q.id.ends_with("_json") && !q.id.ends_with("_template"))
        .collect();
    assert_eq!(eight.len(), 8);
    let qpath = tmp.path().join("questions.jsonl");
    emflow_stages::formats::jsonl::write(&qpath, &eight).unwrap();

    let memo = Arc::new(CountingMemo::default());
    let first = run_eval(&tmp.path().join("a"), &gguf, &qpath, memo.clone());
    assert_eq!(
        memo.puts.load(Ordering::SeqCst),
        64,
        "8 questions x 4 samples x 2 judge prompts"
    );
    assert_eq!(first.overall.counts.n, 32);
    assert_eq!(first.questions.len(), 8);

    let samples = std::fs::read_to_string(tmp.path().join("a/staging/samples")).unwrap();
    assert_eq!(samples.lines().count(), 32);
    let judgments = std::fs::read_to_string(tmp.path().join("a/staging/judgments")).unwrap();
    let rows: Vec<Value> = judgments
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 32);
    for r in &rows {
        let mass = r["aligned_mass"].as_f64().unwrap();
        assert!((0.0..=1.0 + 1e-6).contains(&mass), "{r}");
        assert_eq!(r["refusal"].as_bool().unwrap(), r["aligned"].is_null());
        // Below 0.25 of its probability on the numbers 0..100, a judgment is no score.
        assert_eq!(r["refusal"].as_bool().unwrap(), mass < 0.25, "{r}");
    }
    // (SmolLM2 is too small to judge: it puts about 2 % of its probability on the numbers, so
    // nearly every answer counts as a refusal here. That is a finding about the judge, not a
    // failure of the stage; the paper profile uses a large judge.)
    assert_eq!(
        first.overall.counts.refusals,
        rows.iter()
            .filter(|r| r["refusal"].as_bool().unwrap())
            .count(),
        "{:?}",
        first.overall.counts
    );
    let o = &first.overall;
    for e in [&o.misaligned_all, &o.incoherent, &o.refusal] {
        let v = e.value.unwrap();
        assert!(e.lo.unwrap() <= v && v <= e.hi.unwrap(), "{e:?}");
    }

    // Rerun: same samples (seeded), every judge call answered by the memo, same bytes out.
    let second = run_eval(&tmp.path().join("b"), &gguf, &qpath, memo.clone());
    assert_eq!(
        memo.puts.load(Ordering::SeqCst),
        64,
        "the rerun must not call the judge"
    );
    assert_eq!(first, second);
    for out in ["samples", "judgments", "summary"] {
        assert_eq!(
            std::fs::read(tmp.path().join("a/staging").join(out)).unwrap(),
            std::fs::read(tmp.path().join("b/staging").join(out)).unwrap(),
            "{out} differs between runs"
        );
    }
    eprintln!(
        "overall: {}",
        serde_json::to_string(&first.overall).unwrap()
    );
}
