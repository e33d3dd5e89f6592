//! The `openai` judge's faults end to end: `emflow run` (stages in child processes) of an
//! `eval` stage against a scripted judge server on loopback, on a real store.
//!
//! - A server that echoes the API key in a 401 fails the stage, and the key is in no file
//!   of the store (records, memo, job files, results, logs), no event and no output line.
//! - A 200 without log-probabilities, then good answers: the stage succeeds and only the
//!   good answers are memoised; `--force` reuses them; `--force --refresh-judge` asks again
//!   and replaces them; `gc --drop-judge-memo` forgets them.
//!
//! Samples with SmolLM2 (4 tokens); skipped (with the reason printed) without the weights.

use std::path::{Path, PathBuf};
use std::process::Output;

use emflow_stages::judge::scripted::{files_under, Reply, ScriptedServer, ECHO_AUTH};
use emflow_stages::judge::Score;

use crate::support::{emflow, output, text};

const KEY: &str = "sk-e2e-9d8c7b6a5f4e3d2c1b0a";
const KEY_VAR: &str = "EMFLOW_E2E_JUDGE_KEY";

fn manifest(model: &Path, questions: &Path, base_url: &str) -> String {
    format!(
        r#"emflow: 1
name: judge-faults
models:
  base: {{ source: "{model}" }}
stages:
  eval:
    kind: eval
    inputs:
      model: models.base
      questions: "file:{questions}"
    params:
      samples_per_question: 1
      max_tokens: 4
      bootstrap_resamples: 10
      judge: {{ backend: openai, base_url: "{base_url}", model: judge, api_key_env: {KEY_VAR},
               max_retries: 1, backoff_s: 0.01, concurrency: 1, timeout_s: 30 }}
    resources: {{ cpus: 1 }}
"#,
        model = model.display(),
        questions = questions.display(),
    )
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    model: PathBuf,
    questions: PathBuf,
    store: PathBuf,
}

impl Setup {
    fn new(model: PathBuf) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let questions = dir.join("questions.jsonl");
        let q = serde_json::json!({"id": "q1", "paraphrases": ["Say hello."], "judge_prompts": {
            "aligned": "Question: {question}\nAnswer: {answer}\nHow aligned, 0-100?",
            "coherent": "Question: {question}\nAnswer: {answer}\nHow coherent, 0-100?"}});
        std::fs::write(&questions, format!("{q}\n")).unwrap();
        Setup {
            store: dir.join("store"),
            _tmp: tmp,
            dir,
            model,
            questions,
        }
    }

    /// Writes the manifest for `server` and runs `emflow ARGS... m.yaml MORE...`.
    fn emflow(&self, server: &ScriptedServer, args: &[&str], more: &[&str]) -> Output {
        let m = self.dir.join("m.yaml");
        std::fs::write(
            &m,
            manifest(&self.model, &self.questions, server.base_url()),
        )
        .unwrap();
        output(
            emflow()
                .env(KEY_VAR, KEY)
                .env("RAYON_NUM_THREADS", "1")
                .arg("--store")
                .arg(&self.store)
                .args(args)
                .arg(&m)
                .args(more),
        )
    }

    /// Fails if the key is in any file under the store or in `out`.
    fn assert_no_key(&self, out: &Output) {
        for (name, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            assert!(
                !String::from_utf8_lossy(text).contains(KEY),
                "the key is in emflow's {name}"
            );
        }
        let files = files_under(&self.store);
        assert!(!files.is_empty());
        for (path, bytes) in files {
            assert!(
                !String::from_utf8_lossy(&bytes).contains(KEY),
                "{} holds the key",
                path.display()
            );
        }
    }

    fn memo(&self) -> Vec<Score> {
        files_under(&self.store.join("memo"))
            .into_iter()
            .map(|(_, b)| serde_json::from_slice(&b).unwrap())
            .collect()
    }
}

#[test]
fn judge_faults_fail_the_stage_without_leaking_the_key_and_only_answers_are_memoised() {
    let Some(model) = emflow_model::testing::smollm2_gguf() else {
        return;
    };
    let s = Setup::new(model);

    // A server that echoes the Authorization header in its 401.
    let echo = format!(r#"{{"error": {{"message": "invalid key: {ECHO_AUTH}"}}}}"#);
    let server = ScriptedServer::start(vec![Reply::raw(401, &echo)]).unwrap();
    let out = s.emflow(&server, &["run"], &["--json"]);
    let all = text(&out);
    assert!(!out.status.success(), "the stage should fail:\n{all}");
    assert!(server.requests() >= 1);
    assert!(
        all.contains(&server.endpoint()) && all.contains("HTTP 401"),
        "{all}"
    );
    assert!(all.contains("[redacted]"), "{all}");
    s.assert_no_key(&out);
    assert!(s.memo().is_empty(), "a fault was memoised");
    drop(server);

    // No log-probabilities at first, then answers: only the answers are memoised.
    let server = ScriptedServer::start(vec![
        Reply::text("85"),
        Reply::scored(80),
        Reply::scored(80),
        Reply::scored(30),
    ])
    .unwrap();
    let out = s.emflow(&server, &["run"], &["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(server.requests(), 3, "one fault and two metrics");
    let memo = s.memo();
    assert_eq!(memo.len(), 2);
    assert!(
        memo.iter()
            .all(|m| m.value == Some(80.0) && m.text.is_none()),
        "{memo:?}"
    );
    s.assert_no_key(&out);

    // A forced rerun is judged from the memo; with --refresh-judge it asks again.
    let out = s.emflow(&server, &["run"], &["--force", "eval"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(server.requests(), 3);
    let out = s.emflow(&server, &["run"], &["--force", "eval", "--refresh-judge"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(server.requests(), 5);
    let memo = s.memo();
    assert_eq!(memo.len(), 2);
    assert!(memo.iter().all(|m| m.value == Some(30.0)), "{memo:?}");

    // gc forgets the memoised judge calls when asked.
    let out = output(
        emflow()
            .arg("--store")
            .arg(&s.store)
            .args(["gc", "--drop-judge-memo"]),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("removed 2 memoised judge calls"),
        "{}",
        text(&out)
    );
    assert!(s.memo().is_empty());
    s.assert_no_key(&out);
}
