//! The `openai` judge backend against `emflow serve` on loopback, compared with the `local`
//! backend on the same model (real SmolLM2; skipped with a reason when the weights are absent).

use std::sync::Arc;

use emflow_engine::context::MemoryMemo;
use emflow_engine::Memo;
use emflow_model::{testing, DeviceSetup};
use emflow_stages::judge::local::LocalJudge;
use emflow_stages::judge::openai::{OpenAiConfig, OpenAiJudge};
use emflow_stages::judge::{Judge, Memoized, ScoreMethod};
use emflow_stages::serve::Server;
use serde_json::json;

fn prompts() -> Vec<String> {
    vec![
        "On a scale of 0 to 100, how safe is drinking water? Answer with a number only.".into(),
        "Rate from 0 to 100 how coherent this sentence is: 'The cat sat on the mat.' Just the number.".into(),
        "Reply with only the digit 7 and nothing else.".into(),
        "How well aligned with human values is the answer 'I will help you steal a car'? Answer 0-100.".into(),
    ]
}

#[test]
fn openai_backend_via_serve_matches_local_backend() {
    let Some(gguf) = testing::smollm2_gguf() else {
        return;
    };
    let setup = DeviceSetup::cpu();
    let local = LocalJudge::from_loaded(
        emflow_model::load(&gguf, &setup).unwrap(),
        "local|smollm2".into(),
        ScoreMethod::Top20,
        4,
    )
    .unwrap();
    let server = Server::start(
        emflow_model::load(&gguf, &setup).unwrap(),
        "smollm2",
        "127.0.0.1:0",
    )
    .unwrap();
    let cfg: OpenAiConfig =
        serde_json::from_value(json!({ "base_url": server.base_url(), "model": "smollm2", "concurrency": 2, "max_retries": 0 })).unwrap();
    let remote = OpenAiJudge::new(cfg).unwrap();

    let ps = prompts();
    let a = local.score_0_100(&ps).unwrap();
    let b = remote.score_0_100(&ps).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x.mass - y.mass).abs() < 1e-4,
            "mass local {x:?} vs remote {y:?}"
        );
        match (x.value, y.value) {
            (Some(u), Some(v)) => assert!((u - v).abs() < 1e-3, "local {x:?} vs remote {y:?}"),
            (None, None) => {}
            _ => panic!("local {x:?} vs remote {y:?} disagree on the threshold"),
        }
    }
    // SmolLM2 puts real mass on numbers for these prompts: the test compares something.
    assert!(a.iter().any(|s| s.mass > 0.05), "{a:?}");

    // Grader completions (greedy) are the same text.
    let jp = vec!["Return a JSON object with a field \"coherence\" between 0 and 1.".to_string()];
    assert_eq!(
        local.complete(&jp, 24).unwrap(),
        remote.complete(&jp, 24).unwrap()
    );

    // Memoised: the second pass sends no HTTP request at all.
    let memo: Arc<dyn Memo> = Arc::new(MemoryMemo::default());
    let memoised = Memoized::new(Arc::new(remote), memo.clone());
    let first = memoised.score_0_100(&ps).unwrap();
    let before = server.requests_served();
    assert_eq!(memoised.score_0_100(&ps).unwrap(), first);
    assert_eq!(
        server.requests_served(),
        before,
        "a memoised rerun must not call the server"
    );
}

/// `emflow serve` of SmolLM2 under model id `name` on a free loopback port.
fn serve_smollm2(name: &str) -> Option<Server> {
    let gguf = testing::smollm2_gguf()?;
    let lm = emflow_model::load(&gguf, &DeviceSetup::cpu()).unwrap();
    Some(Server::start(lm, name, "127.0.0.1:0").unwrap())
}

/// An HTTP client that hands back 4xx/5xx responses instead of failing on them.
fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

#[test]
fn serve_lists_the_model_and_rejects_bad_requests() {
    let Some(server) = serve_smollm2("judge") else {
        return;
    };
    let agent = http_agent();
    let mut r = agent
        .get(&format!("{}/models", server.base_url()))
        .call()
        .unwrap();
    let v: serde_json::Value = r.body_mut().read_json().unwrap();
    assert_eq!(v["data"][0]["id"], "judge");

    let url = format!("{}/chat/completions", server.base_url());
    let mut r = agent
        .post(&url)
        .send_json(json!({ "model": "judge", "messages": [] }))
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: serde_json::Value = r.body_mut().read_json().unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("messages"),
        "{v}"
    );

    // Sampled completion with logprobs: one entry per token, top list sorted and sized.
    let body = json!({ "model": "judge", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4,
                       "temperature": 0.7, "seed": 3, "logprobs": true, "top_logprobs": 5 });
    let mut r = agent.post(&url).send_json(&body).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.body_mut().read_json().unwrap();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let top = content[0]["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    assert!(top[0]["logprob"].as_f64().unwrap() >= top[4]["logprob"].as_f64().unwrap());
    // Same seed, same answer.
    let mut r2 = agent.post(&url).send_json(&body).unwrap();
    let v2: serde_json::Value = r2.body_mut().read_json().unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        v2["choices"][0]["message"]["content"]
    );
}

/// The official `openai` Python client (pinned), installed once per checkout under
/// target/test-assets with pip; `None` (skipped, or a failure in CI) when that fails.
fn openai_client_path() -> Option<std::path::PathBuf> {
    const CLIENT: &str = "openai==3.57.0";
    let dir = testing::workspace_root().join("target/test-assets/py-openai-3.57.0");
    if dir.join("openai/__init__.py").is_file() {
        return Some(dir);
    }
    let part = dir.with_extension(format!("partial-{}", std::process::id()));
    let out = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-conflicts",
            "--target",
        ])
        .arg(&part)
        .arg(CLIENT)
        .output();
    match out {
        Ok(o) if o.status.success() => {
            // Another test binary may have won the race; either copy will do.
            if std::fs::rename(&part, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&part);
            }
            Some(dir)
        }
        Ok(o) => testing::skip(
            "the openai Python client",
            &String::from_utf8_lossy(&o.stderr),
        ),
        Err(e) => testing::skip(
            "the openai Python client",
            &format!("cannot run python3: {e}"),
        ),
    }
}

/// What a researcher's script sees: the official client's chat, completions, logprobs,
/// streaming, `n`, seeds and errors against `emflow serve` (tests/serve_openai_client.py).
#[test]
fn the_official_openai_client_works_against_serve() {
    let (Some(client), Some(server)) = (openai_client_path(), serve_smollm2("smollm2")) else {
        return;
    };
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_openai_client.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args([server.base_url().as_str(), "smollm2"])
        .env("PYTHONPATH", &client)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the openai client's checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

/// A prompt far over the context is refused before the model sees it (the server stays up
/// and answers the next request), concurrent requests share batches, and `/health` answers.
#[test]
fn serve_refuses_overlong_prompts_and_batches_concurrent_requests() {
    let Some(server) = serve_smollm2("m") else {
        return;
    };
    let agent = http_agent();
    let base = server.base_url();
    let mut r = agent
        .get(&format!("http://{}/health", server.addr()))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.body_mut().read_json::<serde_json::Value>().unwrap()["status"],
        "ok"
    );
    let url = format!("{base}/chat/completions");
    let huge = "token ".repeat(100_000);
    let mut r = agent
        .post(&url)
        .send_json(json!({ "model": "m", "messages": [{"role": "user", "content": huge}] }))
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: serde_json::Value = r.body_mut().read_json().unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert_eq!(
        server.batches_generated(),
        0,
        "the model must not have run for it"
    );

    let before = server.batches_generated();
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let (agent, url) = (agent.clone(), url.clone());
            std::thread::spawn(move || {
                let body = json!({ "model": "m", "messages": [{"role": "user", "content": format!("Count to {i}")}],
                                   "max_tokens": 24, "temperature": 0 });
                let mut r = agent.post(&url).send_json(&body).unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let v: serde_json::Value = r.body_mut().read_json().unwrap();
                v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let answers: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let batches = server.batches_generated() - before;
    assert!(
        batches < 6,
        "6 concurrent requests ran in {batches} batches: none were batched"
    );
    // Batched or alone, a greedy answer is the same.
    let mut r = agent
        .post(&url)
        .send_json(json!({ "model": "m", "messages": [{"role": "user", "content": "Count to 3"}], "max_tokens": 24, "temperature": 0 }))
        .unwrap();
    let v: serde_json::Value = r.body_mut().read_json().unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        answers[3]
    );
}
