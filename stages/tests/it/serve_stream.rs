//! `stream: true` on `emflow serve` with a tiny random-weight model: one chunk per generated
//! token whose deltas join to exactly the non-streamed text for the same seed, stop strings
//! that never reach the client (not even their first characters), `n` choices streamed side
//! by side, and a client that leaves mid-stream without harming the server. That chunks go
//! out while generation is still running is shown in `serve::stream`'s unit test, which can
//! hold the decode loop.

use std::io::{Read, Write};

use emflow_stages::serve::Server;
use serde_json::{json, Value};

fn tiny_server(dir: &std::path::Path, name: &str) -> Server {
    emflow_model::testing::tiny_model_dir(dir, 11).unwrap();
    let lm = emflow_model::load(dir, &emflow_model::DeviceSetup::cpu()).unwrap();
    Server::start(lm, name, "127.0.0.1:0").unwrap()
}

fn post(server: &Server, path: &str, body: &Value) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .post(&format!("{}{path}", server.base_url()))
        .send_json(body)
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.body_mut().read_to_string().unwrap()
}

/// A streamed answer's events, checked to end with `[DONE]`.
fn events(server: &Server, path: &str, body: &Value) -> Vec<Value> {
    let raw = post(server, path, body);
    let mut events: Vec<&str> = raw
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("{e:?}")))
        .collect();
    assert_eq!(events.pop(), Some("[DONE]"), "{raw}");
    events
        .into_iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// One streamed choice, read back from its chunks.
#[derive(Debug, Default)]
struct Streamed {
    /// The text delta of each token chunk.
    deltas: Vec<String>,
    /// The text of the finish chunk (what was held back to the end).
    rest: String,
    finish: Option<String>,
}

impl Streamed {
    fn text(&self) -> String {
        self.deltas.concat() + &self.rest
    }
}

/// The chunks of each choice (chat or completions shapes), and the usage chunk if any.
fn choices(events: &[Value], n: usize) -> (Vec<Streamed>, Option<Value>) {
    let mut out: Vec<Streamed> = (0..n).map(|_| Streamed::default()).collect();
    let mut usage = None;
    for e in events {
        let Some(choice) = e["choices"].as_array().and_then(|c| c.first()) else {
            usage = Some(e["usage"].clone());
            continue;
        };
        let s = &mut out[choice["index"].as_u64().unwrap() as usize];
        assert!(s.finish.is_none(), "a chunk after the finish chunk: {e}");
        if choice["delta"]["role"] == "assistant" {
            assert!(s.deltas.is_empty(), "the role chunk comes first: {e}");
            continue;
        }
        let text = choice["delta"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .unwrap_or_default()
            .to_string();
        match choice["finish_reason"].as_str() {
            Some(reason) => (s.rest, s.finish) = (text, Some(reason.to_string())),
            None => s.deltas.push(text),
        }
    }
    (out, usage)
}

#[test]
fn streamed_chat_is_one_chunk_per_token_joining_to_the_whole_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = tiny_server(dir.path(), "tiny");
    for seed in [1, 2, 3] {
        let body = json!({ "model": "tiny", "messages": [{"role": "user", "content": "t5 t6 t7"}],
                           "max_tokens": 30, "temperature": 1.0, "seed": seed });
        let whole: Value =
            serde_json::from_str(&post(&server, "/chat/completions", &body)).unwrap();
        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        streaming["stream_options"] = json!({ "include_usage": true });
        let events = events(&server, "/chat/completions", &streaming);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        let (streamed, usage) = choices(&events, 1);
        let s = &streamed[0];
        let tokens = whole["usage"]["completion_tokens"].as_u64().unwrap() as usize;
        assert_eq!(s.deltas.len(), tokens, "one chunk per token: {events:?}");
        assert!(tokens > 3, "test premise: a longer answer, got {tokens}");
        // A word-level vocabulary without a decoder joins words with spaces: each delta is
        // one word (the first) or a space and one word, as the whole text has them.
        assert!(s.deltas[1].starts_with(" t"), "{:?}", s.deltas);
        assert_eq!(s.text(), whole["choices"][0]["message"]["content"]);
        assert_eq!(
            s.finish.as_deref(),
            whole["choices"][0]["finish_reason"].as_str()
        );
        assert_eq!(usage.unwrap(), whole["usage"]);
    }
}

/// A stop string spanning two tokens: the first token that could begin it is held back,
/// nothing of it is ever sent, and the text ends where the whole answer's does.
#[test]
fn stop_strings_never_reach_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = tiny_server(dir.path(), "tiny");
    let mut body = json!({ "model": "tiny", "prompt": "t9 t10", "max_tokens": 30,
                           "temperature": 1.0, "seed": 4, "n": 2 });
    let free: Value = serde_json::from_str(&post(&server, "/completions", &body)).unwrap();
    let words: Vec<&str> = free["choices"][0]["text"]
        .as_str()
        .unwrap()
        .split(' ')
        .collect();
    assert!(
        words.len() > 6,
        "test premise: a longer answer, got {words:?}"
    );
    // "tA tB" cut after tB's first digit: it spans a token boundary and ends inside a word.
    let stop = format!("{} {}", words[4], &words[5][..2]);
    body["stop"] = json!([stop]);
    let whole: Value = serde_json::from_str(&post(&server, "/completions", &body)).unwrap();
    body["stream"] = json!(true);
    let (streamed, _) = choices(&events(&server, "/completions", &body), 2);
    for (s, w) in streamed.iter().zip(whole["choices"].as_array().unwrap()) {
        let text = s.text();
        assert_eq!(text, w["text"], "{s:?}");
        assert!(
            !text.contains(&stop),
            "{text:?} has the stop string {stop:?}"
        );
        assert_eq!(s.finish.as_deref(), w["finish_reason"].as_str());
    }
    // The token chunks carried the whole text and no more: the word the stop string begins
    // with, sampled a step before the stop string was complete, was never sent.
    let first = &streamed[0];
    assert_eq!(first.finish.as_deref(), Some("stop"));
    assert_eq!(first.deltas.concat(), words[..4].join(" ") + " ");
    assert_eq!(first.rest, "");
}

/// A client that reads a little of its stream and hangs up ends only its own answer.
#[test]
fn a_client_leaving_mid_stream_leaves_the_server_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = tiny_server(dir.path(), "tiny");
    let body = json!({ "model": "tiny", "messages": [{"role": "user", "content": "t5"}],
                       "max_tokens": 200, "temperature": 1.0, "seed": 9, "stream": true })
    .to_string();
    for _ in 0..3 {
        let mut conn = std::net::TcpStream::connect(server.addr()).unwrap();
        write!(
            conn,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut start = [0u8; 64];
        conn.read_exact(&mut start).unwrap();
        assert!(start.starts_with(b"HTTP/1.1 200"));
    }
    let answer: Value = serde_json::from_str(&post(
        &server,
        "/chat/completions",
        &json!({ "model": "tiny", "messages": [{"role": "user", "content": "t5"}], "max_tokens": 5 }),
    ))
    .unwrap();
    assert_eq!(answer["object"], "chat.completion");
}
