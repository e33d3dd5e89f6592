//! The generation worker: batches what is queued, generates, and answers each request.
//!
//! One worker owns the model. It takes every request waiting when it is free (up to
//! [`MAX_BATCH_ROWS`] choices), runs those that share sampling settings as one batch, and
//! answers each: a forward pass over a batch costs little more than over one row, so
//! concurrent clients (a judge with `concurrency: 8`) are served together, not in turn.
//! Every row keeps its own seeded random stream, so a seeded request's sample does not
//! depend on what it was batched with.

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, Result};
use emflow_model::{Finish, Generation, GenerationRequest, LoadedModel};
use serde_json::{json, Value};

use super::api::{ApiError, Ask, Endpoint};
use super::stream::{Deltas, EventStream};
use super::token_bytes::token_bytes;
use super::Shared;
use crate::judge::logits::{position_logprobs, top_k};

/// Most choices generated in one batch.
pub const MAX_BATCH_ROWS: usize = 16;

/// One accepted request, tokenised and checked, waiting for the worker.
pub struct Job {
    pub req: tiny_http::Request,
    pub endpoint: Endpoint,
    pub prompt: Vec<u32>,
    pub ask: Ask,
    pub started: Instant,
}

/// Runs until every sender is gone.
pub fn run(shared: Arc<Shared>, jobs: Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let mut rows = batch[0].ask.n;
        while rows < MAX_BATCH_ROWS {
            match jobs.try_recv() {
                Ok(job) => {
                    rows += job.ask.n;
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        for group in same_sampling(batch) {
            generate_group(&shared, group);
        }
    }
}

/// Jobs split into groups that share sampling settings (one `generate` call each), in
/// arrival order.
fn same_sampling(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        match groups
            .iter_mut()
            .find(|g| g[0].ask.sampling == job.ask.sampling)
        {
            Some(g) => g.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

fn generate_group(shared: &Shared, jobs: Vec<Job>) {
    let lm = &shared.lm;
    let rows: Vec<GenerationRequest> = jobs
        .iter()
        .flat_map(|j| {
            j.ask.seeds().into_iter().map(|seed| GenerationRequest {
                prompt_ids: j.prompt.clone(),
                seed,
            })
        })
        .collect();
    let params = &jobs[0].ask.sampling;
    shared
        .batches
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let generated = lm
        .model
        .generate(&lm.tokenizer, &rows, params, rows.len(), &|_| {});
    let mut generated = match generated {
        Ok(g) => g.into_iter(),
        Err(e) => {
            for job in jobs {
                shared.fail(
                    job.req,
                    job.started,
                    &ApiError::status(500, format!("generation failed: {e:#}")),
                );
            }
            return;
        }
    };
    for job in jobs {
        let gens: Vec<Generation> = generated.by_ref().take(job.ask.n).collect();
        answer(shared, job, &gens);
    }
}

fn answer(shared: &Shared, job: Job, gens: &[Generation]) {
    let completion_tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
    let usage = json!({
        "prompt_tokens": job.prompt.len(),
        "completion_tokens": completion_tokens,
        "total_tokens": job.prompt.len() + completion_tokens,
    });
    let reply = Reply {
        shared,
        endpoint: job.endpoint,
        id: shared.next_id(job.endpoint),
        created: super::unix_now(),
    };
    let tokens = (job.prompt.len(), completion_tokens);
    let (method, url) = (job.req.method().to_string(), job.req.url().to_string());
    let result = if job.ask.stream {
        reply
            .stream(job.req, &job.prompt, &job.ask, gens, usage)
            .map(|()| 200)
    } else {
        match reply.whole(&job.prompt, &job.ask, gens, usage) {
            Ok(body) => {
                super::respond_json(job.req, 200, &body);
                Ok(200)
            }
            Err(e) => {
                shared.fail(
                    job.req,
                    job.started,
                    &ApiError::status(500, format!("{e:#}")),
                );
                return;
            }
        }
    };
    match result {
        Ok(status) => super::log_line(&method, &url, status, Some(tokens), job.started),
        // The client went away mid-stream: nothing left to answer.
        Err(e) => eprintln!("emflow serve: {method} {url}: streaming stopped: {e:#}"),
    }
}

/// What one response is built from.
struct Reply<'a> {
    shared: &'a Shared,
    endpoint: Endpoint,
    id: String,
    created: u64,
}

impl Reply<'_> {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.shared.name,
            "choices": choices,
        })
    }

    /// The non-streaming body.
    fn whole(&self, prompt: &[u32], ask: &Ask, gens: &[Generation], usage: Value) -> Result<Value> {
        let mut choices = Vec::with_capacity(gens.len());
        for (index, g) in gens.iter().enumerate() {
            let entries = match ask.logprobs {
                Some(k) => Some(self.token_entries(prompt, g, k)?),
                None => None,
            };
            choices.push(match self.endpoint {
                Endpoint::Chat => json!({
                    "index": index,
                    "message": { "role": "assistant", "content": g.text },
                    "logprobs": entries.map(|e| json!({ "content": e })),
                    "finish_reason": finish_reason(g.finish),
                }),
                Endpoint::Completions => json!({
                    "index": index,
                    "text": g.text,
                    "logprobs": entries.map(|e| legacy_logprobs(&e)),
                    "finish_reason": finish_reason(g.finish),
                }),
            });
        }
        let mut body = self.envelope(false, choices);
        body["usage"] = usage;
        Ok(body)
    }

    /// The streamed answer: per choice, a role chunk (chat), one chunk per generated token
    /// with its text delta (and logprobs when asked), and a finish chunk; then the usage
    /// chunk when asked for, and `[DONE]`.
    fn stream(
        &self,
        req: tiny_http::Request,
        prompt: &[u32],
        ask: &Ask,
        gens: &[Generation],
        usage: Value,
    ) -> Result<()> {
        let mut events = EventStream::open(req.into_writer())?;
        for (index, g) in gens.iter().enumerate() {
            if self.endpoint == Endpoint::Chat {
                let first = json!({ "index": index, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null });
                events.send(&self.envelope(true, vec![first]))?;
            }
            let entries = match ask.logprobs {
                Some(k) => Some(self.token_entries(prompt, g, k)?),
                None => None,
            };
            let mut deltas = Deltas::new(&g.text);
            let spelling = self.shared.spelling;
            for (i, &tok) in g.tokens.iter().enumerate() {
                let bytes = token_bytes(&self.shared.lm.tokenizer, spelling, tok);
                let text = deltas.push(&bytes, i + 1 == g.tokens.len());
                let entry = entries.as_ref().map(|e| e[i].clone());
                events.send(&self.envelope(true, vec![self.token_chunk(index, text, entry)]))?;
            }
            let last = match self.endpoint {
                Endpoint::Chat => {
                    json!({ "index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason(g.finish) })
                }
                Endpoint::Completions => {
                    json!({ "index": index, "text": "", "logprobs": null, "finish_reason": finish_reason(g.finish) })
                }
            };
            events.send(&self.envelope(true, vec![last]))?;
        }
        if ask.stream_usage {
            let mut chunk = self.envelope(true, Vec::new());
            chunk["usage"] = usage;
            events.send(&chunk)?;
        }
        events.finish()
    }

    fn token_chunk(&self, index: usize, text: &str, entry: Option<Value>) -> Value {
        match self.endpoint {
            Endpoint::Chat => json!({
                "index": index,
                "delta": { "content": text },
                "logprobs": entry.map(|e| json!({ "content": [e] })),
                "finish_reason": null,
            }),
            Endpoint::Completions => json!({
                "index": index,
                "text": text,
                "logprobs": entry.map(|e| legacy_logprobs(&[e])),
                "finish_reason": null,
            }),
        }
    }

    /// OpenAI's chat `logprobs.content` entries for each generated token, with the `k` most
    /// likely alternatives; read from the model at temperature 1, like the local judge.
    fn token_entries(&self, prompt: &[u32], g: &Generation, k: usize) -> Result<Vec<Value>> {
        if g.tokens.is_empty() {
            return Ok(Vec::new());
        }
        let lm: &LoadedModel = &self.shared.lm;
        let mut ids = prompt.to_vec();
        ids.extend(&g.tokens);
        let rows = position_logprobs(&lm.model, &ids, prompt.len())?;
        g.tokens
            .iter()
            .zip(&rows)
            .map(|(&tok, row)| {
                let lp = *row
                    .get(tok as usize)
                    .context("a generated id outside the vocabulary")?;
                let top = top_k(row, k)
                    .into_iter()
                    .map(|(id, lp)| self.entry(id, lp, None))
                    .collect();
                Ok(self.entry(tok, lp, Some(top)))
            })
            .collect()
    }

    fn entry(&self, id: u32, logprob: f32, top: Option<Vec<Value>>) -> Value {
        let bytes = token_bytes(&self.shared.lm.tokenizer, self.shared.spelling, id);
        let mut v =
            json!({ "token": String::from_utf8_lossy(&bytes), "logprob": logprob, "bytes": bytes });
        if let Some(top) = top {
            v["top_logprobs"] = Value::Array(top);
        }
        v
    }
}

/// The legacy completions `logprobs` object from chat-style entries.
fn legacy_logprobs(entries: &[Value]) -> Value {
    let mut offset = 0;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for e in entries {
        let token = e["token"].as_str().unwrap_or_default();
        offsets.push(offset);
        offset += token.len();
        tokens.push(token.to_string());
        lps.push(e["logprob"].clone());
        let top: serde_json::Map<String, Value> = e["top_logprobs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["token"].as_str().unwrap_or_default().to_string(),
                    t["logprob"].clone(),
                )
            })
            .collect();
        tops.push(Value::Object(top));
    }
    json!({ "tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets })
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        Finish::Eos | Finish::Stop => "stop",
    }
}
