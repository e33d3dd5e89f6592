//! A scripted OpenAI-compatible server on loopback, for fault-injection tests of the
//! `openai` backend (the crate's tests and the workspace's end-to-end tests share it): it
//! answers each request with the next [`Reply`] of its script, then repeats the last one,
//! and records when each request came. It only ever binds 127.0.0.1 and stops when dropped.
//! [`files_under`] lets those tests search a whole store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

/// Replaced in a reply's body by the request's `Authorization` header, as a careless server
/// that echoes what it got would do.
pub const ECHO_AUTH: &str = "{auth}";

/// One scripted reply.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    /// A `Retry-After` header value to send.
    pub retry_after: Option<String>,
}

impl Reply {
    /// `status` with `body` as it is (JSON or not).
    pub fn raw(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.to_string(),
            retry_after: None,
        }
    }

    /// The same reply with a `Retry-After` header.
    pub fn retry_after(mut self, value: &str) -> Reply {
        self.retry_after = Some(value.to_string());
        self
    }

    /// A chat completion whose first token's top log-probabilities put (nearly) all mass on
    /// `number`: scores `number`.
    pub fn scored(number: u32) -> Reply {
        let n = number.to_string();
        Self::completion(json!({
            "message": {"role": "assistant", "content": n},
            "logprobs": {"content": [{"token": n, "logprob": 0.0,
                "top_logprobs": [{"token": n, "logprob": 0.0}, {"token": "REF", "logprob": -30.0}]}]}
        }))
    }

    /// A chat completion with text only, as a server without log-probabilities answers.
    pub fn text(content: &str) -> Reply {
        Self::completion(json!({"message": {"role": "assistant", "content": content}}))
    }

    fn completion(choice: Value) -> Reply {
        let mut choice = choice;
        choice["index"] = json!(0);
        choice["finish_reason"] = json!("stop");
        Reply::raw(
            200,
            &json!({"object": "chat.completion", "choices": [choice]}).to_string(),
        )
    }
}

/// The running server.
pub struct ScriptedServer {
    http: Arc<tiny_http::Server>,
    base_url: String,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    thread: Option<JoinHandle<()>>,
}

impl ScriptedServer {
    /// Listens on 127.0.0.1 (a free port) and plays `script`.
    pub fn start(script: Vec<Reply>) -> Result<ScriptedServer> {
        if script.is_empty() {
            bail!("a scripted server needs at least one reply");
        }
        let http = tiny_http::Server::http("127.0.0.1:0")
            .map_err(|e| anyhow!("cannot listen on 127.0.0.1: {e}"))?;
        let addr = http
            .server_addr()
            .to_ip()
            .ok_or_else(|| anyhow!("the scripted server got no IP address"))?;
        let http = Arc::new(http);
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (http, arrivals) = (http.clone(), arrivals.clone());
            std::thread::Builder::new()
                .name("scripted-judge".into())
                .spawn(move || {
                    // Ends when `unblock` is called on drop.
                    for request in http.incoming_requests() {
                        let n = match arrivals.lock() {
                            Ok(mut seen) => {
                                seen.push(Instant::now());
                                seen.len()
                            }
                            Err(_) => return,
                        };
                        answer(request, &script[(n - 1).min(script.len() - 1)]);
                    }
                })
                .context("starting the scripted server's thread")?
        };
        Ok(ScriptedServer {
            http,
            base_url: format!("http://{addr}/v1"),
            arrivals,
            thread: Some(thread),
        })
    }

    /// The OpenAI base URL: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The chat-completions endpoint clients post to.
    pub fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.base_url)
    }

    /// When each request so far arrived.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Requests so far.
    pub fn requests(&self) -> usize {
        self.arrivals().len()
    }
}

fn answer(mut request: tiny_http::Request, reply: &Reply) {
    let mut body = String::new();
    let _ = request.as_reader().read_to_string(&mut body);
    let auth = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .map(|h| h.value.to_string())
        .unwrap_or_default();
    let mut response = tiny_http::Response::from_string(reply.body.replace(ECHO_AUTH, &auth))
        .with_status_code(reply.status);
    let headers = [
        ("Content-Type", Some("application/json")),
        ("Retry-After", reply.retry_after.as_deref()),
    ];
    for (name, value) in headers {
        if let Some(header) = value.and_then(|v| tiny_http::Header::from_bytes(name, v).ok()) {
            response = response.with_header(header);
        }
    }
    let _ = request.respond(response);
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every readable file under `dir` (recursively) with its bytes: how a test searches a whole
/// store, e.g. for a secret that must not be there.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}
