//! Fault injection for the `openai` judge backend: a real HTTP server on loopback that
//! misbehaves on cue, a real store, and the judge wrapped in the memo as stages use it.
//!
//! What must hold: only well-formed answers are memoised (a 200 without log-probabilities,
//! a body that is not JSON and every HTTP error are faults, retried and then reported with
//! the endpoint and the fault); `Retry-After` is honoured; `--refresh-judge`'s memo replaces
//! what a judge said before; and the API key appears in no error and no stored file, even
//! when the server echoes it back.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use emflow_cache::Store;
use emflow_engine::context::RefreshingMemo;
use emflow_engine::job::StoreMemo;
use emflow_engine::Memo;
use emflow_stages::judge::openai::{OpenAiConfig, OpenAiJudge};
use emflow_stages::judge::scripted::{files_under, Reply, ScriptedServer, ECHO_AUTH};
use emflow_stages::judge::{Judge, Memoized, Score};
use serde_json::{json, Value};

fn start(script: Vec<Reply>) -> ScriptedServer {
    ScriptedServer::start(script).unwrap()
}

/// Judge settings for tests: quick retries, one request at a time.
fn config(server: &ScriptedServer, extra: Value) -> OpenAiConfig {
    let mut v = json!({
        "base_url": server.base_url(), "model": "judge-model", "concurrency": 1,
        "max_retries": 2, "backoff_s": 0.01, "max_wait_s": 5.0, "timeout_s": 10.0,
    });
    if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    serde_json::from_value(v).unwrap()
}

/// A store in `dir` and the openai judge on `server` behind the memo, as stages build it.
fn judge_on_store(dir: &Path, cfg: OpenAiConfig) -> (Arc<Store>, Memoized) {
    let store = Arc::new(Store::open(&dir.join("store")).unwrap());
    let memo: Arc<dyn Memo> = Arc::new(StoreMemo(store.clone()));
    let judge = Memoized::new(Arc::new(OpenAiJudge::new(cfg).unwrap()), memo);
    (store, judge)
}

/// The memoised judge answers in the store.
fn memo_entries(store: &Store) -> Vec<Vec<u8>> {
    files_under(&store.root().join("memo"))
        .into_iter()
        .map(|(_, b)| b)
        .collect()
}

fn prompts() -> Vec<String> {
    vec!["How aligned is this answer? 0-100.".to_string()]
}

#[test]
fn a_200_without_logprobs_is_retried_and_only_the_good_answer_is_memoised() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(vec![Reply::text("85"), Reply::scored(40)]);
    let (store, judge) = judge_on_store(dir.path(), config(&server, json!({})));
    let got = judge.score_0_100(&prompts()).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value, Some(40.0), "{got:?}");
    assert_eq!(got[0].text, None, "a text answer is not a logprob score");
    assert_eq!(server.requests(), 2);
    let entries = memo_entries(&store);
    assert_eq!(entries.len(), 1);
    let stored: Score = serde_json::from_slice(&entries[0]).unwrap();
    assert_eq!(stored, got[0]);
    // A rerun (a fresh judge on the same store) is answered from the memo without asking.
    let (_, again) = judge_on_store(dir.path(), config(&server, json!({})));
    assert_eq!(again.score_0_100(&prompts()).unwrap(), got);
    assert_eq!(server.requests(), 2);
}

#[test]
fn bodies_that_are_not_answers_are_retried() {
    for fault in [
        Reply::raw(200, "{not json"),
        Reply::raw(200, &json!({"choices": []}).to_string()),
        Reply::raw(
            200,
            &json!({"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "9"}]}]}}]})
                .to_string(),
        ),
        Reply::raw(502, "bad gateway"),
        Reply::raw(503, "busy"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(vec![fault.clone(), Reply::scored(90)]);
        let (store, judge) = judge_on_store(dir.path(), config(&server, json!({})));
        let got = judge.score_0_100(&prompts()).unwrap();
        assert_eq!(got[0].value, Some(90.0), "after {}: {got:?}", fault.body);
        assert_eq!(server.requests(), 2, "after {}", fault.body);
        assert_eq!(memo_entries(&store).len(), 1);
    }
}

#[test]
fn a_judge_that_always_fails_fails_the_call_naming_endpoint_and_fault_and_memoises_nothing() {
    for (fault, says) in [
        (Reply::text("85"), "without the logprobs asked for"),
        (Reply::raw(200, "<html>oops</html>"), "not JSON"),
        (Reply::raw(503, "overloaded"), "HTTP 503: overloaded"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(vec![fault]);
        let (store, judge) = judge_on_store(dir.path(), config(&server, json!({})));
        let err = format!("{:#}", judge.score_0_100(&prompts()).unwrap_err());
        assert!(err.contains(&server.endpoint()), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(err.contains("after 3 attempts"), "{err}");
        assert_eq!(server.requests(), 3);
        assert!(memo_entries(&store).is_empty(), "a fault was memoised");
    }
}

#[test]
fn a_refused_request_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(vec![Reply::raw(400, "unknown model"), Reply::scored(1)]);
    let (store, judge) = judge_on_store(dir.path(), config(&server, json!({})));
    let err = format!("{:#}", judge.complete(&prompts(), 16).unwrap_err());
    assert!(
        err.contains("HTTP 400: unknown model") && err.contains("not retried"),
        "{err}"
    );
    assert!(err.contains(&server.endpoint()), "{err}");
    assert_eq!(server.requests(), 1);
    assert!(memo_entries(&store).is_empty());
}

#[test]
fn retry_after_is_honoured_on_429_and_503() {
    for status in [429, 503] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(vec![
            Reply::raw(status, "slow down").retry_after("1"),
            Reply::scored(70),
        ]);
        // The backoff alone would wait 10 ms.
        let (_, judge) = judge_on_store(dir.path(), config(&server, json!({})));
        let started = Instant::now();
        assert_eq!(judge.score_0_100(&prompts()).unwrap()[0].value, Some(70.0));
        let arrivals = server.arrivals();
        assert_eq!(arrivals.len(), 2);
        let gap = arrivals[1] - arrivals[0];
        assert!(
            gap >= Duration::from_millis(900),
            "HTTP {status}: retried after {gap:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn retry_after_is_capped_by_max_wait_s() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(vec![
        Reply::raw(429, "later").retry_after("3600"),
        Reply::scored(5),
    ]);
    let (_, judge) = judge_on_store(dir.path(), config(&server, json!({"max_wait_s": 0.2})));
    let started = Instant::now();
    assert_eq!(judge.score_0_100(&prompts()).unwrap()[0].value, Some(5.0));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn text_mode_is_explicit_and_reads_numbers_from_text() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(vec![Reply::text("85"), Reply::text("REFUSAL")]);
    let (store, judge) = judge_on_store(dir.path(), config(&server, json!({"score_mode": "text"})));
    let two = vec!["a".to_string(), "b".to_string()];
    let got = judge.score_0_100(&two).unwrap();
    assert_eq!(got[0].value, Some(85.0));
    assert_eq!(
        (got[1].value, got[1].mass),
        (None, 0.0),
        "a refusal is an answer"
    );
    assert_eq!(memo_entries(&store).len(), 2);
    // Null content is no answer, in text mode too.
    let dir = tempfile::tempdir().unwrap();
    let server = start(vec![Reply::raw(
        200,
        r#"{"choices": [{"message": {"content": null}}]}"#,
    )]);
    let (store, judge) = judge_on_store(dir.path(), config(&server, json!({"score_mode": "text"})));
    let err = format!("{:#}", judge.score_0_100(&prompts()).unwrap_err());
    assert!(err.contains("without choices[0].message.content"), "{err}");
    assert!(memo_entries(&store).is_empty());
}

#[test]
fn a_refreshing_memo_asks_again_and_its_answer_replaces_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(vec![Reply::scored(10), Reply::scored(60)]);
    let (store, judge) = judge_on_store(dir.path(), config(&server, json!({})));
    assert_eq!(judge.score_0_100(&prompts()).unwrap()[0].value, Some(10.0));
    assert_eq!(judge.score_0_100(&prompts()).unwrap()[0].value, Some(10.0));
    assert_eq!(server.requests(), 1, "memoised");

    let memo: Arc<dyn Memo> = Arc::new(StoreMemo(store.clone()));
    let inner: Arc<dyn Judge> = Arc::new(OpenAiJudge::new(config(&server, json!({}))).unwrap());
    let refreshing = Memoized::new(inner, Arc::new(RefreshingMemo::new(memo)));
    assert_eq!(
        refreshing.score_0_100(&prompts()).unwrap()[0].value,
        Some(60.0)
    );
    assert_eq!(server.requests(), 2, "a refresh asks again");
    refreshing.score_0_100(&prompts()).unwrap();
    assert_eq!(server.requests(), 2, "once per stage run");

    let (_, after) = judge_on_store(dir.path(), config(&server, json!({})));
    assert_eq!(after.score_0_100(&prompts()).unwrap()[0].value, Some(60.0));
    assert_eq!(
        server.requests(),
        2,
        "the fresh answer replaced the memoised one"
    );
    assert_eq!(memo_entries(&store).len(), 1);
}

const KEY: &str = "sk-test-5e1f0c9a7b3d42e8a6c4";

#[test]
fn an_api_key_echoed_by_the_server_appears_in_no_error_and_no_stored_file() {
    // Other tests of this binary read the environment only through std, which locks it.
    std::env::set_var("EMFLOW_FAULTS_JUDGE_KEY", KEY);
    let with_key = json!({"api_key_env": "EMFLOW_FAULTS_JUDGE_KEY"});
    // A 401 that echoes the header, a 500 and a malformed 200 that do, then (for the
    // completion) an answer whose content does.
    let echo = |status| {
        Reply::raw(
            status,
            &format!(r#"{{"error": {{"message": "bad credentials: {ECHO_AUTH}"}}}}"#),
        )
    };
    for (script, complete) in [
        (vec![echo(401)], false),
        (vec![echo(500)], false),
        (vec![echo(200)], false),
        (
            vec![Reply::raw(
                200,
                &format!(
                    r#"{{"choices": [{{"message": {{"content": "{{\"score\": 1, \"note\": \"{ECHO_AUTH}\"}}"}}}}]}}"#
                ),
            )],
            true,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = ScriptedServer::start(script).unwrap();
        let (store, judge) = judge_on_store(dir.path(), config(&server, with_key.clone()));
        let outcome = if complete {
            judge.complete(&prompts(), 32).map(|v| v.join("\n"))
        } else {
            judge.score_0_100(&prompts()).map(|v| format!("{v:?}"))
        };
        let text = match outcome {
            Ok(answer) => answer,
            Err(e) => format!("{e:?}"),
        };
        assert!(server.requests() >= 1);
        assert!(!text.contains(KEY), "the key leaked: {text}");
        assert!(
            text.contains("[redacted]"),
            "the echo should be visible, redacted: {text}"
        );
        if text.contains("HTTP 401") {
            assert!(text.contains("EMFLOW_FAULTS_JUDGE_KEY"), "{text}");
        }
        for (path, bytes) in files_under(store.root()) {
            let content = String::from_utf8_lossy(&bytes);
            assert!(!content.contains(KEY), "{} holds the key", path.display());
        }
    }
}
