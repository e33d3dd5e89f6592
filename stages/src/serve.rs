//! `emflow serve`: an OpenAI-compatible HTTP server backed by one local model.
//!
//! It exists so that one loaded judge can serve many stages, runs or cluster jobs (they use
//! the `openai` judge backend pointed at it), and so that backend is tested against a real
//! server. Endpoints: `GET /v1/models` and `POST /v1/chat/completions` (messages -> chat
//! template -> generation; `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, and
//! `logprobs` / `top_logprobs` read from the model's next-token distribution at temperature 1).
//! Requests are answered one at a time: a forward pass already uses every core (or the GPU),
//! so concurrent requests would only contend; clients' concurrency just queues here.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use emflow_model::{
    encode_prompt, Finish, GenerationRequest, LoadedModel, Message, SamplingParams,
};
use serde_json::{json, Value};

use crate::judge::logits::{position_logprobs, token_text, top_k};

/// Most `top_logprobs` a request may ask for (the OpenAI limit).
const MAX_TOP_LOGPROBS: usize = 20;
/// `max_tokens` when a request gives none.
const DEFAULT_MAX_TOKENS: usize = 512;

/// Loads `model_path` (+ optional adapter) and serves it on `addr` (e.g. `127.0.0.1:8000`)
/// until the process is stopped. `name` is the model id clients send and `/v1/models` lists.
pub fn serve(
    model_path: &Path,
    adapter: Option<&Path>,
    addr: &str,
    name: &str,
    cuda_ordinal: Option<usize>,
) -> Result<()> {
    let setup = emflow_model::setup(cuda_ordinal)?;
    let lm = crate::train::setup::load_model(model_path, adapter, &setup)?;
    let server = Server::start(lm, name, addr)?;
    eprintln!(
        "emflow serve: {} on http://{}/v1 (model id `{name}`); Ctrl-C to stop",
        model_path.display(),
        server.addr()
    );
    server.join()
}

/// The `emflow serve` command: `--model PATH --addr HOST:PORT [--adapter DIR] [--name ID]
/// [--cuda ORDINAL]`, as the CLI passes them.
pub fn serve_command(args: &[String]) -> Result<()> {
    let mut model = None;
    let mut adapter = None;
    let mut addr = "127.0.0.1:8000".to_string();
    let mut name = None;
    let mut cuda = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("emflow serve: `{flag}` needs a value"))?;
        match flag.as_str() {
            "--model" => model = Some(std::path::PathBuf::from(value)),
            "--adapter" => adapter = Some(std::path::PathBuf::from(value)),
            "--addr" => addr = value.clone(),
            "--name" => name = Some(value.clone()),
            "--cuda" => {
                cuda = Some(
                    value
                        .parse::<usize>()
                        .map_err(|e| anyhow::anyhow!("--cuda {value}: {e}"))?,
                )
            }
            other => anyhow::bail!("emflow serve: unknown option `{other}`"),
        }
    }
    let model = model.ok_or_else(|| anyhow::anyhow!("emflow serve: no model given"))?;
    let name = name.unwrap_or_else(|| {
        model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_string())
    });
    serve(&model, adapter.as_deref(), &addr, &name, cuda)
}

/// A running server; stops when dropped.
pub struct Server {
    http: Arc<tiny_http::Server>,
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) and serves `lm` on a background thread.
    pub fn start(lm: LoadedModel, name: &str, addr: &str) -> Result<Server> {
        let http =
            tiny_http::Server::http(addr).map_err(|e| anyhow!("cannot listen on {addr}: {e}"))?;
        let bound = http
            .server_addr()
            .to_ip()
            .ok_or_else(|| anyhow!("listening on {addr} gave no IP address"))?;
        let http = Arc::new(http);
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let state = State {
            lm,
            name: name.to_string(),
            next_id: AtomicU64::new(0),
        };
        let thread = {
            let (http, stop, requests) = (http.clone(), stop.clone(), requests.clone());
            std::thread::Builder::new()
                .name("emflow-serve".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match http.recv_timeout(Duration::from_millis(200)) {
                            Ok(Some(req)) => {
                                requests.fetch_add(1, Ordering::Relaxed);
                                state.handle(req);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                eprintln!("emflow serve: accepting a request failed: {e}");
                                break;
                            }
                        }
                    }
                })
                .context("starting the server thread")?
        };
        Ok(Server {
            http,
            addr: bound,
            stop,
            requests,
            thread: Some(thread),
        })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The OpenAI base URL clients use: `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// HTTP requests received so far (any endpoint).
    pub fn requests_served(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Blocks until the server thread ends (it runs until the process stops).
    pub fn join(mut self) -> Result<()> {
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow!("the server thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct State {
    lm: LoadedModel,
    name: String,
    next_id: AtomicU64,
}

/// An error answered as OpenAI does: `{"error": {"message", "type"}}` with a status.
struct HttpError(u16, String);

impl State {
    fn handle(&self, mut req: tiny_http::Request) {
        let result = match (req.method(), req.url().split('?').next().unwrap_or("")) {
            (tiny_http::Method::Get, "/v1/models") => Ok(self.models()),
            (tiny_http::Method::Post, "/v1/chat/completions") => {
                let mut body = String::new();
                match req.as_reader().read_to_string(&mut body) {
                    Err(e) => Err(HttpError(400, format!("unreadable request body: {e}"))),
                    Ok(_) => self.chat(&body),
                }
            }
            (_, url) => Err(HttpError(
                404,
                format!("no route for {url}; endpoints: GET /v1/models, POST /v1/chat/completions"),
            )),
        };
        let (status, body) = match result {
            Ok(v) => (200, v),
            Err(HttpError(status, message)) => {
                let kind = if status < 500 {
                    "invalid_request_error"
                } else {
                    "server_error"
                };
                (
                    status,
                    json!({ "error": { "message": message, "type": kind } }),
                )
            }
        };
        let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]);
        let mut resp = tiny_http::Response::from_string(body.to_string()).with_status_code(status);
        if let Ok(h) = header {
            resp = resp.with_header(h);
        }
        if let Err(e) = req.respond(resp) {
            eprintln!("emflow serve: writing a response failed: {e}");
        }
    }

    fn models(&self) -> Value {
        json!({ "object": "list", "data": [{ "id": self.name, "object": "model", "owned_by": "emflow" }] })
    }

    fn chat(&self, body: &str) -> Result<Value, HttpError> {
        let req = ChatRequest::parse(body).map_err(|e| HttpError(400, format!("{e:#}")))?;
        self.complete(&req)
            .map_err(|e| HttpError(500, format!("{e:#}")))
    }

    fn complete(&self, req: &ChatRequest) -> Result<Value> {
        let lm = &self.lm;
        let prompt = encode_prompt(&lm.tokenizer, &lm.chat, &req.messages)?;
        let params = SamplingParams {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: 0,
            min_p: 0.0,
            max_new_tokens: req.max_tokens,
            stop: req.stop.clone(),
        };
        let gen = lm
            .model
            .generate(
                &lm.tokenizer,
                &[GenerationRequest {
                    prompt_ids: prompt.clone(),
                    seed: req.seed,
                }],
                &params,
                1,
                &|_| {},
            )?
            .pop()
            .context("generation returned nothing")?;
        let logprobs = match req.top_logprobs {
            None => Value::Null,
            Some(_) if gen.tokens.is_empty() => json!({ "content": [] }),
            Some(k) => {
                let mut ids = prompt.clone();
                ids.extend(&gen.tokens);
                let rows = position_logprobs(&lm.model, &ids, prompt.len())?;
                let content = gen
                    .tokens
                    .iter()
                    .zip(&rows)
                    .map(|(&tok, row)| {
                        let top = top_k(row, k)
                            .into_iter()
                            .map(|(id, lp)| token_entry(lm, id, lp, None))
                            .collect::<Result<Vec<_>>>()?;
                        token_entry(lm, tok, row[tok as usize], Some(top))
                    })
                    .collect::<Result<Vec<_>>>()?;
                json!({ "content": content })
            }
        };
        let finish = match gen.finish {
            Finish::Length => "length",
            Finish::Eos | Finish::Stop => "stop",
        };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(json!({
            "id": format!("chatcmpl-{}", self.next_id.fetch_add(1, Ordering::Relaxed)),
            "object": "chat.completion",
            "created": created,
            "model": self.name,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": gen.text },
                "logprobs": logprobs,
                "finish_reason": finish,
            }],
            "usage": {
                "prompt_tokens": prompt.len(),
                "completion_tokens": gen.tokens.len(),
                "total_tokens": prompt.len() + gen.tokens.len(),
            },
        }))
    }
}

fn token_entry(lm: &LoadedModel, id: u32, logprob: f32, top: Option<Vec<Value>>) -> Result<Value> {
    let text = token_text(&lm.tokenizer, id)?;
    let mut v = json!({ "token": text, "logprob": logprob, "bytes": text.as_bytes() });
    if let Some(top) = top {
        v["top_logprobs"] = Value::Array(top);
    }
    Ok(v)
}

/// The fields of a chat-completions request this server honours.
struct ChatRequest {
    messages: Vec<Message>,
    max_tokens: usize,
    temperature: f64,
    top_p: f64,
    seed: u64,
    stop: Vec<String>,
    /// `Some(k)` when `logprobs: true` (k = `top_logprobs`, 0 if absent).
    top_logprobs: Option<usize>,
}

impl ChatRequest {
    fn parse(body: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(body).context("request body is not JSON")?;
        let messages: Vec<Message> = v
            .get("messages")
            .context("`messages` is required")
            .and_then(|m| {
                m.as_array()
                    .context("`messages` must be a list")?
                    .iter()
                    .map(|msg| {
                        let role = msg
                            .get("role")
                            .and_then(Value::as_str)
                            .context("each message needs a string `role`")?;
                        let content = match msg.get("content") {
                            Some(Value::String(s)) => s.clone(),
                            Some(Value::Array(parts)) => parts
                                .iter()
                                .filter_map(|p| p.get("text").and_then(Value::as_str))
                                .collect::<Vec<_>>()
                                .join(""),
                            _ => bail!("each message needs a string `content`"),
                        };
                        Ok(Message {
                            role: role.to_string(),
                            content,
                        })
                    })
                    .collect()
            })?;
        if messages.is_empty() {
            bail!("`messages` is empty");
        }
        if let Some(n) = v.get("n").and_then(Value::as_u64) {
            if n != 1 {
                bail!(
                    "only n = 1 is supported (got {n}); send several requests with different seeds"
                );
            }
        }
        let max_tokens = v
            .get("max_completion_tokens")
            .or_else(|| v.get("max_tokens"))
            .and_then(Value::as_u64)
            .map_or(DEFAULT_MAX_TOKENS, |n| n as usize);
        if max_tokens == 0 {
            bail!("max_tokens must be at least 1");
        }
        let temperature = v.get("temperature").and_then(Value::as_f64).unwrap_or(1.0);
        let top_p = v.get("top_p").and_then(Value::as_f64).unwrap_or(1.0);
        let seed = v.get("seed").and_then(Value::as_u64).unwrap_or(0);
        let stop = match v.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(_) => bail!("`stop` must be a string or a list of strings"),
        };
        let top_logprobs = if v.get("logprobs").and_then(Value::as_bool).unwrap_or(false) {
            let k = v.get("top_logprobs").and_then(Value::as_u64).unwrap_or(0) as usize;
            if k > MAX_TOP_LOGPROBS {
                bail!("top_logprobs must be at most {MAX_TOP_LOGPROBS}");
            }
            Some(k)
        } else {
            None
        };
        Ok(ChatRequest {
            messages,
            max_tokens,
            temperature,
            top_p,
            seed,
            stop,
            top_logprobs,
        })
    }
}
