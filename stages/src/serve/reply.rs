//! The JSON of answers in OpenAI's shapes, for chat and for (legacy) completions: a whole
//! response body, the chunks of a streamed one, and per-token log-probabilities read from
//! the model.

use anyhow::{Context as _, Result};
use emflow_model::{Finish, Generation};
use serde_json::{json, Value};

use super::api::{Ask, Endpoint};
use super::token_bytes::token_bytes;
use super::Shared;
use crate::judge::logits::{position_logprobs, top_k};

/// What one response is built from: its id, its time and the endpoint's shapes.
pub struct Reply<'a> {
    shared: &'a Shared,
    endpoint: Endpoint,
    id: String,
    created: u64,
}

impl<'a> Reply<'a> {
    /// A reply with the next id of `endpoint`, created now.
    pub fn new(shared: &'a Shared, endpoint: Endpoint) -> Self {
        Reply {
            shared,
            endpoint,
            id: shared.next_id(endpoint),
            created: super::unix_now(),
        }
    }

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
    pub fn whole(
        &self,
        prompt: &[u32],
        ask: &Ask,
        gens: &[Generation],
        usage: Value,
    ) -> Result<Value> {
        let mut choices = Vec::with_capacity(gens.len());
        for (index, g) in gens.iter().enumerate() {
            let entries = match ask.logprobs {
                Some(k) => Some(token_entries(self.shared, prompt, g, k)?),
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

    /// A chat stream's first chunk of a choice: the role, no text yet. Completions have none.
    pub fn role_chunk(&self, index: usize) -> Option<Value> {
        (self.endpoint == Endpoint::Chat).then(|| {
            let choice = json!({ "index": index, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null });
            self.envelope(true, vec![choice])
        })
    }

    /// The chunk of one generated token: its text delta (empty while held back) and its
    /// log-probability entry when asked for.
    pub fn token_chunk(&self, index: usize, text: &str, entry: Option<Value>) -> Value {
        let choice = match self.endpoint {
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
        };
        self.envelope(true, vec![choice])
    }

    /// A choice's last chunk: why it ended, with the text still held back (`rest`, usually
    /// empty: a tail that could have grown into a stop string but did not).
    pub fn finish_chunk(&self, index: usize, rest: &str, finish: Finish) -> Value {
        let reason = finish_reason(finish);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = if rest.is_empty() {
                    json!({})
                } else {
                    json!({ "content": rest })
                };
                json!({ "index": index, "delta": delta, "logprobs": null, "finish_reason": reason })
            }
            Endpoint::Completions => {
                json!({ "index": index, "text": rest, "logprobs": null, "finish_reason": reason })
            }
        };
        self.envelope(true, vec![choice])
    }

    /// `stream_options.include_usage`'s chunk: no choices, the token counts.
    pub fn usage_chunk(&self, usage: Value) -> Value {
        let mut chunk = self.envelope(true, Vec::new());
        chunk["usage"] = usage;
        chunk
    }
}

/// OpenAI's `usage` object.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// OpenAI's chat `logprobs.content` entries for each generated token, with the `k` most
/// likely alternatives; read from the model at temperature 1, like the local judge.
pub fn token_entries(
    shared: &Shared,
    prompt: &[u32],
    g: &Generation,
    k: usize,
) -> Result<Vec<Value>> {
    if g.tokens.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = prompt.to_vec();
    ids.extend(&g.tokens);
    let rows = position_logprobs(&shared.lm.model, &ids, prompt.len())?;
    g.tokens
        .iter()
        .zip(&rows)
        .map(|(&tok, row)| {
            let lp = *row
                .get(tok as usize)
                .context("a generated id outside the vocabulary")?;
            let top = top_k(row, k)
                .into_iter()
                .map(|(id, lp)| entry(shared, id, lp, None))
                .collect();
            Ok(entry(shared, tok, lp, Some(top)))
        })
        .collect()
}

fn entry(shared: &Shared, id: u32, logprob: f32, top: Option<Vec<Value>>) -> Value {
    let bytes = token_bytes(&shared.lm.tokenizer, shared.spelling, id);
    let mut v =
        json!({ "token": String::from_utf8_lossy(&bytes), "logprob": logprob, "bytes": bytes });
    if let Some(top) = top {
        v["top_logprobs"] = Value::Array(top);
    }
    v
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
