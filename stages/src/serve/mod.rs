//! `emflow serve`: an OpenAI-compatible HTTP server backed by one local model.
//!
//! It exists so that one loaded judge can serve many stages, runs or cluster jobs (they use
//! the `openai` judge backend pointed at it), and so that backend is tested against a real
//! server. It behaves like the servers it stands in for (vLLM, llama.cpp's server) where a
//! client can tell:
//!
//! - `POST /v1/chat/completions` (messages -> the model's chat template) and
//!   `POST /v1/completions` (a raw prompt): `max_tokens`, `temperature`, `top_p`, `n`,
//!   `seed` (absent: a fresh one per request), `stop`, `stream` (server-sent events in
//!   OpenAI's chunk format, `stream_options.include_usage`; each token's text is sent as its
//!   decode step samples it, see [`stream`]), and log-probabilities read from the model at
//!   temperature 1 (chat: `logprobs`/`top_logprobs`; completions: `logprobs: k`; a streamed
//!   choice with log-probabilities is sent as it ends, since they are read by a second pass
//!   over its tokens);
//! - `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`;
//! - errors in OpenAI's shape: a prompt that does not fit the context is a 400
//!   (`context_length_exceeded`) found before any tensor is allocated, and a value the server
//!   would otherwise ignore is a 400 naming its field ([`api`]);
//! - one log line per request on stderr: method, path, status, tokens, milliseconds.
//!
//! The layout: this file accepts connections and answers what needs no model; [`api`]
//! parses and checks bodies; [`worker`] batches and generates; [`reply`] shapes answers and
//! chunks; [`stream`] writes a streamed answer's events from its own thread as tokens come;
//! [`token_bytes`] recovers the bytes behind a token.

mod api;
mod reply;
mod stream;
mod token_bytes;
mod worker;

use std::io::Read as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _, Result};
use emflow_model::{encode_prompt, LoadedModel};
use serde_json::{json, Value};

use api::{ApiError, Endpoint, Input, DEFAULT_MAX_TOKENS};
use token_bytes::Spelling;
use worker::Job;

/// Largest request body read (a 100k-token prompt is well under 1 MiB).
const MAX_BODY_BYTES: u64 = 32 << 20;
/// Requests that may wait for the worker; more are answered 503 at once.
const MAX_QUEUED: usize = 256;

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
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) and serves `lm` on background threads: one
    /// accepts and answers what needs no model, one generates ([`worker`]).
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
        let shared = Arc::new(Shared {
            spelling: Spelling::of(&lm.tokenizer),
            lm,
            name: name.to_string(),
            created: unix_now(),
            next_id: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        });
        let (jobs, queue) = sync_channel::<Job>(MAX_QUEUED);
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("emflow-serve-gen".into())
                .spawn(move || worker::run(shared, queue))
                .context("starting the generation thread")?
        };
        let acceptor = {
            let (http, stop, requests, shared) =
                (http.clone(), stop.clone(), requests.clone(), shared.clone());
            std::thread::Builder::new()
                .name("emflow-serve".into())
                .spawn(move || accept(&http, &stop, &requests, &shared, &jobs))
                .context("starting the server thread")?
        };
        Ok(Server {
            http,
            addr: bound,
            stop,
            requests,
            shared,
            threads: vec![acceptor, worker],
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

    /// Batches the model has generated so far: fewer than the requests when concurrent
    /// requests were batched.
    pub fn batches_generated(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }

    /// Blocks until the server threads end (they run until the process stops).
    pub fn join(mut self) -> Result<()> {
        for t in self.threads.drain(..) {
            t.join().map_err(|_| anyhow!("a server thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.http.unblock();
        // The acceptor ends first and drops the queue's sender; the worker then finishes
        // what is queued and ends.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the acceptor and the worker share.
pub(crate) struct Shared {
    lm: LoadedModel,
    name: String,
    spelling: Spelling,
    /// When the server started: `/v1/models`' `created`.
    created: u64,
    next_id: AtomicU64,
    /// `generate` calls made (see [`Server::batches_generated`]).
    batches: AtomicU64,
}

impl Shared {
    fn next_id(&self, endpoint: Endpoint) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        match endpoint {
            Endpoint::Chat => format!("chatcmpl-{n}"),
            Endpoint::Completions => format!("cmpl-{n}"),
        }
    }

    fn model_object(&self) -> Value {
        json!({ "id": self.name, "object": "model", "created": self.created, "owned_by": "emflow" })
    }

    /// Answers `err` and logs the request.
    fn fail(&self, req: tiny_http::Request, started: Instant, err: &ApiError) {
        let (method, url) = (req.method().to_string(), req.url().to_string());
        respond_json(req, err.status, &err.body());
        log_line(&method, &url, err.status, None, started);
    }
}

fn accept(
    http: &tiny_http::Server,
    stop: &AtomicBool,
    requests: &AtomicU64,
    shared: &Shared,
    jobs: &SyncSender<Job>,
) {
    while !stop.load(Ordering::Relaxed) {
        match http.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(req)) => {
                requests.fetch_add(1, Ordering::Relaxed);
                route(shared, req, jobs);
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("emflow serve: accepting a request failed: {e}");
                break;
            }
        }
    }
}

fn route(shared: &Shared, req: tiny_http::Request, jobs: &SyncSender<Job>) {
    use tiny_http::Method::{Get, Post};
    let started = Instant::now();
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let answer = |req: tiny_http::Request, body: Value| {
        let method = req.method().to_string();
        respond_json(req, 200, &body);
        log_line(&method, &path, 200, None, started);
    };
    match (req.method(), path.as_str()) {
        (Get, "/health") => answer(req, json!({ "status": "ok" })),
        (Get, "/v1/models") => answer(
            req,
            json!({ "object": "list", "data": [shared.model_object()] }),
        ),
        (Get, p) if p.strip_prefix("/v1/models/") == Some(shared.name.as_str()) => {
            answer(req, shared.model_object())
        }
        (Get, p) if p.starts_with("/v1/models/") => {
            let err = ApiError::status(
                404,
                format!(
                    "the model `{}` does not exist here; this server serves `{}`",
                    &p[11..],
                    shared.name
                ),
            )
            .with_code("model_not_found");
            shared.fail(req, started, &err)
        }
        (Post, "/v1/chat/completions") => submit(shared, req, Endpoint::Chat, started, jobs),
        (Post, "/v1/completions") => submit(shared, req, Endpoint::Completions, started, jobs),
        (_, "/health" | "/v1/models" | "/v1/chat/completions" | "/v1/completions") => {
            let err = ApiError::status(405, format!("{} is not allowed on {path}", req.method()));
            shared.fail(req, started, &err)
        }
        _ => {
            let err = ApiError::status(
                404,
                format!("no route for {path}; endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health"),
            );
            shared.fail(req, started, &err)
        }
    }
}

/// Reads, checks and tokenises a generation request and queues it for the worker.
fn submit(
    shared: &Shared,
    mut req: tiny_http::Request,
    endpoint: Endpoint,
    started: Instant,
    jobs: &SyncSender<Job>,
) {
    let job = read_body(&mut req)
        .and_then(|body| api::parse(endpoint, &body, &shared.name))
        .and_then(|r| prepare(shared, r));
    let (prompt, ask) = match job {
        Ok(j) => j,
        Err(e) => return shared.fail(req, started, &e),
    };
    let job = Job {
        req,
        endpoint,
        prompt,
        ask,
        started,
    };
    if let Err(e) = jobs.try_send(job) {
        let job = match e {
            std::sync::mpsc::TrySendError::Full(j)
            | std::sync::mpsc::TrySendError::Disconnected(j) => j,
        };
        let err = ApiError::status(
            503,
            format!("{MAX_QUEUED} requests are already waiting; retry later"),
        );
        shared.fail(job.req, started, &err);
    }
}

fn read_body(req: &mut tiny_http::Request) -> Result<String, ApiError> {
    let mut body = String::new();
    req.as_reader()
        .take(MAX_BODY_BYTES + 1)
        .read_to_string(&mut body)
        .map_err(|e| ApiError::status(400, format!("unreadable request body: {e}")))?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return Err(ApiError::status(
            413,
            format!("the request body is over {} MiB", MAX_BODY_BYTES >> 20),
        ));
    }
    Ok(body)
}

/// The prompt's token ids, and the ask with its token budget fitted to the context: a
/// prompt that leaves no room is refused here, before the model allocates anything for it.
fn prepare(shared: &Shared, r: api::ApiRequest) -> Result<(Vec<u32>, api::Ask), ApiError> {
    let lm = &shared.lm;
    let prompt = match &r.input {
        Input::Messages(m) => encode_prompt(&lm.tokenizer, &lm.chat, m),
        Input::Prompt(p) => lm.tokenizer.encode(p),
    }
    .map_err(|e| {
        ApiError::invalid(
            if matches!(r.input, Input::Messages(_)) {
                "messages"
            } else {
                "prompt"
            },
            format!("{e:#}"),
        )
    })?;
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt has no tokens"));
    }
    let mut ask = r.ask;
    ask.sampling.max_new_tokens =
        fit_context(lm.config.max_position, prompt.len(), ask.max_tokens)?;
    Ok((prompt, ask))
}

/// The completion budget: `max_tokens` if prompt + completion fits the context, else a 400
/// worded like OpenAI's; without `max_tokens`, the default or what room is left.
fn fit_context(
    context: usize,
    prompt: usize,
    max_tokens: Option<usize>,
) -> Result<usize, ApiError> {
    let exceeded =
        |msg: String| Err(ApiError::invalid("messages", msg).with_code("context_length_exceeded"));
    match max_tokens {
        Some(m) if prompt + m > context => exceeded(format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt} in the prompt, {m} in the completion). Please reduce the length of the prompt or completion.",
            prompt + m
        )),
        Some(m) => Ok(m),
        None if prompt >= context => exceeded(format!(
            "This model's maximum context length is {context} tokens. However, your prompt has {prompt} tokens, leaving no room for a completion. Please reduce the length of the prompt."
        )),
        None => Ok(DEFAULT_MAX_TOKENS.min(context - prompt)),
    }
}

pub(crate) fn respond_json(req: tiny_http::Request, status: u16, body: &Value) {
    let mut resp = tiny_http::Response::from_string(body.to_string()).with_status_code(status);
    if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]) {
        resp = resp.with_header(h);
    }
    if let Err(e) = req.respond(resp) {
        eprintln!("emflow serve: writing a response failed: {e}");
    }
}

/// `emflow serve: POST /v1/chat/completions 200 41+16 tokens 812 ms`
pub(crate) fn log_line(
    method: &str,
    path: &str,
    status: u16,
    tokens: Option<(usize, usize)>,
    started: Instant,
) {
    let tokens = tokens.map_or(String::new(), |(p, c)| format!(" {p}+{c} tokens"));
    eprintln!(
        "emflow serve: {method} {path} {status}{tokens} {} ms",
        started.elapsed().as_millis()
    );
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_bounds_prompt_and_completion() {
        assert_eq!(fit_context(100, 40, Some(60)).unwrap(), 60);
        let e = fit_context(100, 40, Some(61)).unwrap_err();
        assert_eq!((e.status, e.code), (400, Some("context_length_exceeded")));
        assert!(
            e.message
                .contains("101 tokens (40 in the prompt, 61 in the completion)"),
            "{}",
            e.message
        );
        assert_eq!(fit_context(8192, 8000, None).unwrap(), 192);
        assert_eq!(fit_context(8192, 10, None).unwrap(), DEFAULT_MAX_TOKENS);
        assert_eq!(fit_context(100, 100, None).unwrap_err().status, 400);
        assert_eq!(fit_context(100, 100_000, None).unwrap_err().status, 400);
    }
}
