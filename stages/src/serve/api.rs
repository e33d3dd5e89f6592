//! The OpenAI request bodies `emflow serve` accepts, checked field by field.
//!
//! A value the server would otherwise have to ignore or replace (a negative temperature,
//! `top_p: 2`, `n: 0`, a string where a number goes, another model's name, a penalty it does
//! not implement) is a 400 naming the field, in OpenAI's error shape: silently sampling with
//! other settings than the client asked for would corrupt an experiment without a trace.
//! Fields the server does not know are ignored, as OpenAI's own API and vLLM do, so newer
//! clients that send extra defaults keep working. One known field is accepted without
//! effect, deliberately: `response_format: {"type": "json_object"}` (emflow's own judges send
//! it, and their prompts ask for JSON themselves); a JSON schema is refused.

use emflow_model::{derive_seed, Message, SamplingParams};
use serde_json::{json, Map, Value};

/// Most `top_logprobs` a chat request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// Most `logprobs` a legacy completions request may ask for (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u64 = 5;
/// Most choices one request may ask for.
pub const MAX_N: u64 = 16;
/// `max_tokens` when a request gives none (and the context has room for it).
pub const DEFAULT_MAX_TOKENS: usize = 512;

/// An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    pub fn status(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        let kind = if self.status < 500 {
            "invalid_request_error"
        } else {
            "server_error"
        };
        json!({ "error": { "message": self.message, "type": kind, "param": self.param, "code": self.code } })
    }
}

/// Which endpoint a request came to: they differ in input (messages or a prompt), in the
/// logprobs format and in the response objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// What the client wants generated from the prompt, endpoint-independent.
#[derive(Debug)]
pub struct Ask {
    pub sampling: SamplingParams,
    /// `None`: `max_tokens` was not given (fill the context up to the default).
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub seed: u64,
    /// Chat: `Some(top_logprobs)` when `logprobs: true`; completions: `Some(logprobs)`.
    pub logprobs: Option<usize>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub stream_usage: bool,
}

impl Ask {
    /// The per-choice seeds: choice 0 uses the request's seed itself, so `n: 1` and the first
    /// of `n: 4` with the same seed are the same sample.
    pub fn seeds(&self) -> Vec<u64> {
        (0..self.n)
            .map(|i| {
                if i == 0 {
                    self.seed
                } else {
                    derive_seed(self.seed, "choice", i as u64)
                }
            })
            .collect()
    }
}

/// The request's input: chat messages, or completion prompts (one choice set each).
#[derive(Debug)]
pub enum Input {
    Messages(Vec<Message>),
    Prompt(String),
}

/// A parsed and checked request body.
#[derive(Debug)]
pub struct ApiRequest {
    pub input: Input,
    pub ask: Ask,
}

/// Parses `body` for `endpoint`, checking it against the served model's id `served`.
pub fn parse(endpoint: Endpoint, body: &str, served: &str) -> Result<ApiRequest, ApiError> {
    let v: Value = serde_json::from_str(body)
        .map_err(|e| ApiError::status(400, format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(ApiError::status(
            400,
            "the request body must be a JSON object",
        ));
    };
    let f = Fields(&m);
    check_model(&f, served)?;
    check_unsupported(&f)?;
    let input = match endpoint {
        Endpoint::Chat => Input::Messages(messages(&f)?),
        Endpoint::Completions => Input::Prompt(prompt(&f)?),
    };
    let ask = ask(endpoint, &f)?;
    Ok(ApiRequest { input, ask })
}

/// Typed access to a request's top-level fields: `null` counts as absent, as OpenAI reads it.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn number(&self, name: &'static str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                ApiError::invalid(name, format!("`{name}` must be a number, not {v}"))
            }),
        }
    }

    fn count(&self, name: &'static str) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ApiError::invalid(
                    name,
                    format!("`{name}` must be a non-negative integer, not {v}"),
                )
            }),
        }
    }

    fn flag(&self, name: &'static str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be true or false, not {v}"),
            )),
        }
    }
}

fn check_model(f: &Fields<'_>, served: &str) -> Result<(), ApiError> {
    match f.get("model") {
        None => Err(ApiError::invalid("model", format!("`model` is required; this server serves `{served}`"))),
        Some(Value::String(s)) if s == served => Ok(()),
        Some(other) => Err(ApiError::invalid(
            "model",
            format!("the model {other} does not exist here; this server serves `{served}` (GET /v1/models)"),
        )
        .with_code("model_not_found")),
    }
}

/// Sampling controls OpenAI defines and this server does not implement: a 400 unless they
/// hold their no-op value.
fn check_unsupported(f: &Fields<'_>) -> Result<(), ApiError> {
    for name in ["frequency_penalty", "presence_penalty"] {
        if let Some(v) = f.get(name) {
            if v.as_f64() != Some(0.0) {
                return Err(ApiError::invalid(
                    name,
                    format!("`{name}` is not supported by emflow serve (only 0)"),
                ));
            }
        }
    }
    /// A field and the values of it that change nothing.
    type Harmless = (&'static str, fn(&Value) -> bool);
    let unsupported: [Harmless; 5] = [
        ("logit_bias", |v| {
            v.as_object().is_some_and(|m| m.is_empty())
        }),
        ("tools", |v| v.as_array().is_some_and(|a| a.is_empty())),
        // `json_object` is accepted but not enforced: emflow's own judges ask for it and
        // their prompts ask for JSON themselves; schemas would need constrained decoding.
        ("response_format", |v| {
            matches!(
                v.get("type").and_then(Value::as_str),
                Some("text" | "json_object")
            )
        }),
        ("echo", |v| v == &Value::Bool(false)),
        ("best_of", |v| v.as_u64() == Some(1)),
    ];
    for (name, harmless) in unsupported {
        if let Some(v) = f.get(name) {
            if !harmless(v) {
                return Err(ApiError::invalid(
                    name,
                    format!("`{name}` is not supported by emflow serve"),
                ));
            }
        }
    }
    Ok(())
}

fn messages(f: &Fields<'_>) -> Result<Vec<Message>, ApiError> {
    let list = f
        .get("messages")
        .ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?
        .as_array()
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be a list"))?;
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect()
}

fn message(i: usize, m: &Value) -> Result<Message, ApiError> {
    let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid("messages", format!("messages[{i}] needs a string `role`"))
    })?;
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        // Content parts: the text ones, joined (images and audio are not served).
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text") | None, Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            "messages",
                            format!(
                                "messages[{i}]: content part {:?} is not supported (text only)",
                                kind.unwrap_or("?")
                            ),
                        ))
                    }
                }
            }
            text
        }
        _ => {
            return Err(ApiError::invalid(
                "messages",
                format!("messages[{i}] needs a string `content`"),
            ))
        }
    };
    Ok(Message {
        role: role.to_string(),
        content,
    })
}

fn prompt(f: &Fields<'_>) -> Result<String, ApiError> {
    match f.get("prompt") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Ok(a[0].as_str().unwrap_or_default().to_string()),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "prompt",
            "one prompt per request: send a string (batch several prompts as concurrent requests; the server batches them)",
        )),
        Some(v) => Err(ApiError::invalid("prompt", format!("`prompt` must be a string, not {v}"))),
        None => Err(ApiError::invalid("prompt", "`prompt` is required")),
    }
}

fn ask(endpoint: Endpoint, f: &Fields<'_>) -> Result<Ask, ApiError> {
    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` must be in [0, 2], not {temperature}"),
        ));
    }
    let top_p = f.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` must be in (0, 1], not {top_p}"),
        ));
    }
    let n = f.count("n")?.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be in 1..={MAX_N}, not {n}"),
        ));
    }
    let max_tokens = match f.count("max_completion_tokens")?.or(f.count("max_tokens")?) {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "`max_tokens` must be at least 1",
            ))
        }
        other => other.map(|n| n as usize),
    };
    let seed = match f.get("seed") {
        None => rand::random::<u64>(),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|i| i as u64))
            .ok_or_else(|| {
                ApiError::invalid("seed", format!("`seed` must be an integer, not {v}"))
            })?,
    };
    let stream = f.flag("stream")?;
    let stream_usage = stream
        && f.get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
    Ok(Ask {
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k: 0,
            min_p: 0.0,
            max_new_tokens: max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            stop: stop(f)?,
        },
        max_tokens,
        n: n as usize,
        seed,
        logprobs: logprobs(endpoint, f)?,
        stream,
        stream_usage,
    })
}

fn stop(f: &Fields<'_>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "stop",
            "`stop` must be a non-empty string or a list of up to 4 of them",
        )
    };
    let stops: Vec<String> = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if stops.len() > 4 || stops.iter().any(String::is_empty) {
        return Err(bad());
    }
    Ok(stops)
}

fn logprobs(endpoint: Endpoint, f: &Fields<'_>) -> Result<Option<usize>, ApiError> {
    match endpoint {
        Endpoint::Chat => {
            let top = f.count("top_logprobs")?;
            if !f.flag("logprobs")? {
                return match top {
                    Some(_) => Err(ApiError::invalid(
                        "top_logprobs",
                        "`top_logprobs` needs `logprobs: true`",
                    )),
                    None => Ok(None),
                };
            }
            let k = top.unwrap_or(0);
            if k > MAX_TOP_LOGPROBS {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}"),
                ));
            }
            Ok(Some(k as usize))
        }
        Endpoint::Completions => match f.count("logprobs")? {
            Some(k) if k > MAX_COMPLETION_LOGPROBS => Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be at most {MAX_COMPLETION_LOGPROBS}"),
            )),
            k => Ok(k.map(|k| k as usize)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<ApiRequest, ApiError> {
        parse(Endpoint::Chat, &body.to_string(), "m")
    }

    fn base() -> Value {
        json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }] })
    }

    fn with(field: &str, value: Value) -> Value {
        let mut b = base();
        b[field] = value;
        b
    }

    #[test]
    fn bad_values_name_their_field() {
        for (field, value) in [
            ("temperature", json!(-0.1)),
            ("temperature", json!("hot")),
            ("top_p", json!(0)),
            ("top_p", json!(1.5)),
            ("n", json!(0)),
            ("model", json!("other")),
            ("max_tokens", json!(0)),
            ("seed", json!("x")),
            ("stop", json!([""])),
            ("frequency_penalty", json!(0.5)),
            ("top_logprobs", json!(3)),
        ] {
            let err = chat(with(field, value.clone())).expect_err(&format!("{field}: {value}"));
            assert_eq!(err.status, 400, "{field}");
            assert_eq!(err.param, Some(field), "{field}: {}", err.message);
        }
        assert_eq!(
            chat(with("model", json!("x"))).unwrap_err().code,
            Some("model_not_found")
        );
    }

    #[test]
    fn seeds_are_fresh_unless_given() {
        let a = chat(base()).unwrap().ask.seed;
        let b = chat(base()).unwrap().ask.seed;
        assert_ne!(a, b, "two requests without a seed must not share one");
        let r = chat(with("seed", json!(7))).unwrap();
        assert_eq!(r.ask.seed, 7);
        let mut four = with("seed", json!(7));
        four["n"] = json!(4);
        let seeds = chat(four).unwrap().ask.seeds();
        assert_eq!(seeds[0], 7);
        assert_eq!(
            seeds
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            4
        );
    }

    #[test]
    fn null_means_absent_and_unknown_fields_are_ignored() {
        let mut b = with("temperature", Value::Null);
        b["some_future_field"] = json!({ "x": 1 });
        let r = chat(b).unwrap();
        assert_eq!(r.ask.sampling.temperature, 1.0);
        assert_eq!(r.ask.max_tokens, None);
    }
}
