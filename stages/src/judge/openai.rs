//! The `openai` judge backend: any OpenAI-compatible `/v1/chat/completions` server (OpenAI,
//! vLLM, llama.cpp's server, `emflow serve`).
//!
//! 0-100 scores ask for one token at temperature 0 with `logprobs: true, top_logprobs: 20`
//! and apply the top-20 formula ([`ScoreMode::Logprobs`], the default). For a server that
//! cannot give log-probabilities, `score_mode: text` asks for a short text answer instead and
//! parses it (mass 1 for a bare number, else 0); that is a choice made in the manifest (and
//! part of the judge's identity), never a silent downgrade.
//!
//! Only a well-formed answer is ever returned. Everything else is a *fault*: a transport
//! error, an HTTP error status, a body that is not JSON, a 200 without `choices`, without
//! the log-probabilities that were asked for, or without message content. Faults that can
//! pass (transport errors, 408/409/425/429/5xx, malformed 200s) are retried with a
//! deterministic exponential backoff that honours `Retry-After`; then, or at once for a
//! fault that cannot pass (400, 401, 403, 404, ...), the call fails with an error naming the
//! endpoint and the fault. No fault ever reaches the memo.
//!
//! The API key never leaves in anything but the `Authorization` header: every text built
//! from a server's answer or a transport error is redacted (see [`redact`]) where it is
//! created, so no error, log, event or stored file can carry it.
//!
//! Requests run on a private thread pool of `concurrency` threads.

use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::score::{score_from_text, score_from_top_logprobs, Score};
use super::Judge;

/// How an `openai` judge reads a 0-100 score.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreMode {
    /// The next token's top-20 log-probabilities (the paper's formula). A response without
    /// them is a fault, retried and then reported.
    #[default]
    Logprobs,
    /// A short text answer read as a bare number (mass 1) or not (mass 0): for servers that
    /// cannot return log-probabilities. Coarser; a different judge identity.
    Text,
}

impl ScoreMode {
    fn is_default(&self) -> bool {
        *self == ScoreMode::Logprobs
    }
}

/// The manifest's settings for an OpenAI-compatible judge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The API root including `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// The `model` field of each request.
    pub model: String,
    /// Name of the environment variable holding the API key (sent as a Bearer token);
    /// omit it for a server without authentication.
    pub api_key_env: Option<String>,
    /// Per-request timeout, seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Retries after a fault that can pass (transport error, 408, 409, 425, 429, 5xx, a
    /// malformed 200), waiting `backoff_s`, then twice that, ... or what `Retry-After` says.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// The first wait before a retry, seconds; it doubles on each further retry.
    #[serde(default = "default_backoff_s")]
    pub backoff_s: f64,
    /// The longest wait before one retry, seconds: caps the backoff and `Retry-After`.
    #[serde(default = "default_max_wait_s")]
    pub max_wait_s: f64,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Ask for `response_format: {"type": "json_object"}` on grader completions.
    #[serde(default = "default_true")]
    pub json_mode: bool,
    /// How 0-100 scores are read: `logprobs` (default) or `text`.
    #[serde(default, skip_serializing_if = "ScoreMode::is_default")]
    pub score_mode: ScoreMode,
}

/// The settings of [`OpenAiConfig`] that say how to reach the server, not what it computes:
/// left out of stage keys ([`super::JudgeParam`]) and of the memo's judge identity.
pub const CONNECTION_SETTINGS: [&str; 7] = [
    "base_url",
    "api_key_env",
    "timeout_s",
    "max_retries",
    "backoff_s",
    "max_wait_s",
    "concurrency",
];

fn default_timeout_s() -> f64 {
    120.0
}
fn default_retries() -> u32 {
    5
}
fn default_backoff_s() -> f64 {
    0.5
}
fn default_max_wait_s() -> f64 {
    60.0
}
fn default_concurrency() -> usize {
    8
}
fn default_true() -> bool {
    true
}

/// Tokens asked for in text mode ("100" plus room for a stray space or period).
pub const TEXT_SCORE_TOKENS: usize = 8;

/// What replaces a secret in any text.
pub const REDACTED: &str = "[redacted]";

/// `text` with every occurrence of `secret` replaced by [`REDACTED`]. An empty secret
/// redacts nothing (it would match everywhere).
pub fn redact(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() => text.replace(s, REDACTED),
        _ => text.to_string(),
    }
}

/// Why one attempt gave no well-formed answer. Its text is already redacted.
struct Fault {
    what: String,
    /// Whether another attempt may succeed.
    transient: bool,
    /// The server's `Retry-After`, when it sent one.
    retry_after: Option<Duration>,
}

impl Fault {
    /// A 200 whose body does not hold the answer: worth another attempt.
    fn malformed(what: String) -> Self {
        Fault {
            what,
            transient: true,
            retry_after: None,
        }
    }
}

/// Whether an HTTP status may pass on a later attempt (timeouts, conflicts, rate limits,
/// server errors).
fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 409 | 425 | 429) || status >= 500
}

/// A `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 §10.2.3); `None` when it is
/// neither. A date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

pub struct OpenAiJudge {
    cfg: OpenAiConfig,
    url: String,
    api_key: Option<String>,
    identity: String,
    agent: ureq::Agent,
    pool: rayon::ThreadPool,
}

impl OpenAiJudge {
    /// Checks the config and reads the API key; errors say which setting to fix.
    pub fn new(cfg: OpenAiConfig) -> Result<Self> {
        if !(cfg.base_url.starts_with("http://") || cfg.base_url.starts_with("https://")) {
            bail!(
                "openai judge: base_url `{}` must start with http:// or https://",
                cfg.base_url
            );
        }
        if cfg.concurrency == 0 {
            bail!("openai judge: concurrency must be at least 1");
        }
        if cfg.timeout_s.is_nan() || cfg.timeout_s <= 0.0 {
            bail!("openai judge: timeout_s must be positive");
        }
        for (name, v) in [("backoff_s", cfg.backoff_s), ("max_wait_s", cfg.max_wait_s)] {
            if !v.is_finite() || v < 0.0 {
                bail!("openai judge: {name} must be a number of seconds, 0 or more");
            }
        }
        let api_key = match &cfg.api_key_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| {
                anyhow!(
                    "openai judge: the API key environment variable `{var}` is not set; export it \
                     (e.g. `export {var}=...`), or drop `api_key_env` for a server without authentication"
                )
            })?),
        };
        let url = format!("{}/chat/completions", cfg.base_url.trim_end_matches('/'));
        // Not the base_url: a connection setting, like the stage key (CONNECTION_SETTINGS).
        let mut identity = format!("openai|{}", cfg.model);
        if cfg.score_mode == ScoreMode::Text {
            identity.push_str("|text");
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(cfg.timeout_s)))
            .http_status_as_error(false)
            .build()
            .into();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.concurrency)
            .thread_name(|i| format!("openai-judge-{i}"))
            .build()
            .context("starting the openai judge's request threads")?;
        Ok(OpenAiJudge {
            cfg,
            url,
            api_key,
            identity,
            agent,
            pool,
        })
    }

    fn redact(&self, text: &str) -> String {
        redact(text, self.api_key.as_deref())
    }

    /// The wait before attempt `attempt` (1-based retries): `Retry-After` when the server
    /// sent one, else `backoff_s * 2^(attempt-1)`; never more than `max_wait_s`.
    fn wait_before(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.cfg.backoff_s * 2f64.powi(attempt.saturating_sub(1).min(60) as i32);
        let secs = retry_after.map_or(backoff, |d| d.as_secs_f64());
        Duration::from_secs_f64(secs.min(self.cfg.max_wait_s))
    }

    /// POSTs `body` until `read` finds a well-formed answer in the response, retrying the
    /// faults that may pass; the error names the endpoint and the last fault.
    fn request<T>(&self, body: &Value, read: impl Fn(&Value) -> Result<T, String>) -> Result<T> {
        let attempts = self.cfg.max_retries.saturating_add(1);
        let mut last: Option<Fault> = None;
        for attempt in 0..attempts {
            if let Some(fault) = &last {
                std::thread::sleep(self.wait_before(attempt, fault.retry_after));
            }
            let fault = match self.attempt(body, &read) {
                Ok(answer) => return Ok(answer),
                Err(fault) => fault,
            };
            if !fault.transient {
                bail!(
                    "openai judge: POST {} failed: {} (not retried){}",
                    self.url,
                    fault.what,
                    self.hint(&fault.what)
                );
            }
            last = Some(fault);
        }
        let what = last.map_or_else(|| "no attempt was made".to_string(), |f| f.what);
        bail!(
            "openai judge: POST {} failed after {attempts} attempts; last fault: {what}. Check that the \
             server is up and answers chat completions{} (for `emflow serve`, that it was started on this \
             address), or raise max_retries/timeout_s",
            self.url,
            match self.cfg.score_mode {
                ScoreMode::Logprobs => " with logprobs (or set `score_mode: text`)",
                ScoreMode::Text => "",
            }
        )
    }

    fn hint(&self, what: &str) -> String {
        match (
            &self.cfg.api_key_env,
            what.starts_with("HTTP 401") || what.starts_with("HTTP 403"),
        ) {
            (Some(var), true) => format!("; check the API key in `{var}`"),
            (None, true) => "; the server wants an API key: set `api_key_env`".into(),
            _ => String::new(),
        }
    }

    /// One POST: the answer `read` finds, or the fault (redacted).
    fn attempt<T>(
        &self,
        body: &Value,
        read: &impl Fn(&Value) -> Result<T, String>,
    ) -> Result<T, Fault> {
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            req = req.header("Authorization", &format!("Bearer {key}"));
        }
        let mut resp = req.send_json(body).map_err(|e| Fault {
            what: self.redact(&format!("request failed: {e}")),
            transient: true,
            retry_after: None,
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        // Redacted before anything reads it, so no excerpt, parse error or answer holds the key.
        let text = match resp.body_mut().read_to_string() {
            Ok(text) => self.redact(&text),
            Err(e) => {
                return Err(Fault {
                    what: self.redact(&format!("HTTP {status} with an unreadable body: {e}")),
                    transient: true,
                    retry_after,
                })
            }
        };
        if !(200..300).contains(&status) {
            return Err(Fault {
                what: format!("HTTP {status}: {}", excerpt(&text)),
                transient: is_transient_status(status),
                retry_after,
            });
        }
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            Fault::malformed(format!(
                "HTTP {status} with a body that is not JSON ({e}): {}",
                excerpt(&text)
            ))
        })?;
        read(&json)
            .map_err(|what| Fault::malformed(format!("HTTP {status} {}", self.redact(&what))))
    }

    fn messages(prompt: &str) -> Value {
        json!([{ "role": "user", "content": prompt }])
    }

    fn score_one(&self, prompt: &str) -> Result<Score> {
        match self.cfg.score_mode {
            ScoreMode::Logprobs => {
                let body = json!({
                    "model": self.cfg.model,
                    "messages": Self::messages(prompt),
                    "max_tokens": 1,
                    "temperature": 0,
                    "logprobs": true,
                    "top_logprobs": 20,
                    "seed": 0,
                });
                self.request(&body, |resp| match first_token_top_logprobs(resp)? {
                    Some(top) => {
                        let score = score_from_top_logprobs(&top);
                        if score.is_well_formed() {
                            Ok(score)
                        } else {
                            Err(format!("with top_logprobs that are not probabilities: {}", excerpt(&resp.to_string())))
                        }
                    }
                    None => Err(format!(
                        "without the logprobs asked for (choices[0].logprobs.content[0].top_logprobs): {}",
                        excerpt(&resp.to_string())
                    )),
                })
            }
            ScoreMode::Text => {
                let body = json!({
                    "model": self.cfg.model,
                    "messages": Self::messages(prompt),
                    "max_tokens": TEXT_SCORE_TOKENS,
                    "temperature": 0,
                    "seed": 0,
                });
                self.request(&body, |resp| {
                    message_content(resp).map(|t| score_from_text(&t))
                })
            }
        }
    }

    fn complete_one(&self, prompt: &str, max_tokens: usize) -> Result<String> {
        let mut body = json!({
            "model": self.cfg.model,
            "messages": Self::messages(prompt),
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": 0,
        });
        if self.cfg.json_mode {
            body["response_format"] = json!({ "type": "json_object" });
        }
        self.request(&body, message_content)
    }
}

impl Judge for OpenAiJudge {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn score_0_100(&self, prompts: &[String]) -> Result<Vec<Score>> {
        self.pool
            .install(|| prompts.par_iter().map(|p| self.score_one(p)).collect())
    }

    fn complete(&self, prompts: &[String], max_tokens: usize) -> Result<Vec<String>> {
        self.pool.install(|| {
            prompts
                .par_iter()
                .map(|p| self.complete_one(p, max_tokens))
                .collect()
        })
    }

    fn accepts(&self, score: &Score) -> bool {
        // A text-read score carries its text, a probability-read one does not: an entry of
        // the other kind was not made by this judge as configured.
        score.is_well_formed() && score.text.is_some() == (self.cfg.score_mode == ScoreMode::Text)
    }
}

/// `choices[0].logprobs.content[0].top_logprobs` as (token, logprob); `None` when the response
/// has no (or an empty) list there; an error for a malformed entry.
pub fn first_token_top_logprobs(resp: &Value) -> Result<Option<Vec<(String, f64)>>, String> {
    let Some(top) = resp
        .pointer("/choices/0/logprobs/content/0/top_logprobs")
        .and_then(Value::as_array)
    else {
        return Ok(None);
    };
    if top.is_empty() {
        return Ok(None);
    }
    top.iter()
        .map(|entry| {
            let token = entry.get("token").and_then(Value::as_str);
            let lp = entry.get("logprob").and_then(Value::as_f64);
            match (token, lp) {
                (Some(t), Some(lp)) if !lp.is_nan() => Ok((t.to_string(), lp)),
                _ => Err(format!(
                    "with a malformed top_logprobs entry: {}",
                    excerpt(&entry.to_string())
                )),
            }
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Some)
}

/// `choices[0].message.content`; an error when the response has no such string.
pub fn message_content(resp: &Value) -> Result<String, String> {
    resp.pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "without choices[0].message.content: {}",
                excerpt(&resp.to_string())
            )
        })
}

fn excerpt(text: &str) -> String {
    let t: String = text.chars().take(300).collect();
    if t.len() < text.len() {
        format!("{t}...")
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> OpenAiConfig {
        serde_json::from_value(json!({ "base_url": url, "model": "m" })).unwrap()
    }

    #[test]
    fn missing_key_variable_is_a_clear_error() {
        let mut c = cfg("http://127.0.0.1:1/v1");
        c.api_key_env = Some("EMFLOW_TEST_SURELY_UNSET_KEY".into());
        let err = OpenAiJudge::new(c).err().unwrap().to_string();
        assert!(
            err.contains("EMFLOW_TEST_SURELY_UNSET_KEY") && err.contains("not set"),
            "{err}"
        );
    }

    #[test]
    fn reads_top_logprobs_and_content() {
        let resp = json!({"choices": [{"message": {"content": "7"}, "logprobs": {"content": [
            {"token": "7", "logprob": -0.1, "top_logprobs": [{"token": "7", "logprob": -0.1}, {"token": "x", "logprob": -3.0}]}
        ]}}]});
        let top = first_token_top_logprobs(&resp).unwrap().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(message_content(&resp).unwrap(), "7");
        let bare = json!({"choices": [{"message": {"content": "7"}}]});
        assert!(first_token_top_logprobs(&bare).unwrap().is_none());
    }

    #[test]
    fn content_that_is_missing_or_null_is_a_fault_and_empty_text_an_answer() {
        assert!(message_content(&json!({"choices": []})).is_err());
        assert!(message_content(&json!({"choices": [{"message": {"content": null}}]})).is_err());
        assert_eq!(
            message_content(&json!({"choices": [{"message": {"content": ""}}]})).unwrap(),
            ""
        );
        let bad =
            json!({"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "7"}]}]}}]});
        assert!(first_token_top_logprobs(&bad).is_err());
    }

    #[test]
    fn unreachable_server_fails_after_retries_with_a_hint() {
        let mut c = cfg("http://127.0.0.1:9/v1");
        c.max_retries = 1;
        c.timeout_s = 2.0;
        c.backoff_s = 0.01;
        let judge = OpenAiJudge::new(c).unwrap();
        let err = judge
            .score_0_100(&["q".to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("after 2 attempts"), "{err}");
        assert!(
            err.contains("http://127.0.0.1:9/v1/chat/completions"),
            "{err}"
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn waits_double_from_backoff_and_retry_after_wins_up_to_the_cap() {
        let mut c = cfg("http://127.0.0.1:9/v1");
        c.backoff_s = 0.5;
        c.max_wait_s = 3.0;
        let judge = OpenAiJudge::new(c).unwrap();
        let waits: Vec<f64> = (1..=5)
            .map(|a| judge.wait_before(a, None).as_secs_f64())
            .collect();
        assert_eq!(waits, vec![0.5, 1.0, 2.0, 3.0, 3.0]);
        assert_eq!(
            judge.wait_before(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            judge.wait_before(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn redaction_replaces_every_occurrence_and_ignores_an_empty_key() {
        assert_eq!(
            redact("Bearer sk-1 and sk-1", Some("sk-1")),
            "Bearer [redacted] and [redacted]"
        );
        assert_eq!(redact("abc", Some("")), "abc");
        assert_eq!(redact("abc", None), "abc");
    }

    #[test]
    fn score_mode_text_is_opt_in_and_changes_the_identity() {
        let plain = OpenAiJudge::new(cfg("http://h/v1")).unwrap();
        assert_eq!(plain.identity(), "openai|m");
        let mut c = cfg("http://h/v1");
        c.score_mode = ScoreMode::Text;
        let text = OpenAiJudge::new(c).unwrap();
        assert_eq!(text.identity(), "openai|m|text");
        // The default mode is not written out when a config is serialised.
        assert!(!serde_json::to_string(&cfg("http://h/v1"))
            .unwrap()
            .contains("score_mode"));
        let from_text = score_from_text("85");
        let from_logprobs = score_from_top_logprobs(&[("85".to_string(), 0.0)]);
        assert!(text.accepts(&from_text) && !text.accepts(&from_logprobs));
        assert!(plain.accepts(&from_logprobs) && !plain.accepts(&from_text));
    }
}
