//! The `openai` judge backend: any OpenAI-compatible `/v1/chat/completions` server (OpenAI,
//! vLLM, llama.cpp's server, `emflow serve`).
//!
//! 0-100 scores ask for one token at temperature 0 with `logprobs: true, top_logprobs: 20`
//! and apply the top-20 formula. A server that answers without log-probabilities gets a
//! second, short text request whose answer is parsed (mass 1 for a bare number, else 0), so
//! such a judge still works, only coarser. Requests run on a private thread pool of
//! `concurrency` threads; transport errors, 429 and 5xx are retried with exponential backoff.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::score::{score_from_text, score_from_top_logprobs, Score};
use super::Judge;

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
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Per-request timeout, seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Retries after a transport error, 429 or 5xx, with backoff 0.5 s, 1 s, 2 s, ... (max 30 s).
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Ask for `response_format: {"type": "json_object"}` on grader completions.
    #[serde(default = "default_true")]
    pub json_mode: bool,
}

fn default_timeout_s() -> f64 {
    120.0
}
fn default_retries() -> u32 {
    5
}
fn default_concurrency() -> usize {
    8
}
fn default_true() -> bool {
    true
}

/// Tokens asked for when the server gives no log-probabilities and the number is read from
/// text ("100" plus room for a stray space or period).
const TEXT_FALLBACK_TOKENS: usize = 8;

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
        let identity = format!(
            "openai|{}|{}",
            cfg.base_url.trim_end_matches('/'),
            cfg.model
        );
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

    /// POSTs one request, retrying transient failures; returns the response JSON.
    fn post(&self, body: &Value) -> Result<Value> {
        let mut last_error = String::new();
        for attempt in 0..=self.cfg.max_retries {
            if attempt > 0 {
                let backoff = (0.5 * 2f64.powi(attempt as i32 - 1)).min(30.0);
                std::thread::sleep(Duration::from_secs_f64(backoff));
            }
            let mut req = self
                .agent
                .post(&self.url)
                .header("Content-Type", "application/json");
            if let Some(key) = &self.api_key {
                req = req.header("Authorization", &format!("Bearer {key}"));
            }
            match req.send_json(body) {
                Err(e) => last_error = format!("request failed: {e}"),
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let text = resp.body_mut().read_to_string().unwrap_or_default();
                    if (200..300).contains(&status) {
                        return serde_json::from_str(&text).with_context(|| {
                            format!(
                                "openai judge: {} answered with invalid JSON: {}",
                                self.url,
                                excerpt(&text)
                            )
                        });
                    }
                    if status == 429 || status >= 500 {
                        last_error = format!("HTTP {status}: {}", excerpt(&text));
                        continue;
                    }
                    bail!(
                        "openai judge: {} refused the request with HTTP {status}: {}",
                        self.url,
                        excerpt(&text)
                    );
                }
            }
        }
        bail!(
            "openai judge: {} failed after {} attempts; last error: {last_error}. Check that the server \
             is up (for `emflow serve`, that it was started on this address) or raise max_retries/timeout_s",
            self.url,
            self.cfg.max_retries + 1
        )
    }

    fn messages(prompt: &str) -> Value {
        json!([{ "role": "user", "content": prompt }])
    }

    fn score_one(&self, prompt: &str) -> Result<Score> {
        let body = json!({
            "model": self.cfg.model,
            "messages": Self::messages(prompt),
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": true,
            "top_logprobs": 20,
            "seed": 0,
        });
        let resp = self.post(&body)?;
        if let Some(top) = first_token_top_logprobs(&resp)? {
            return Ok(score_from_top_logprobs(&top));
        }
        // No log-probabilities from this server: read the number from a short text answer.
        let body = json!({
            "model": self.cfg.model,
            "messages": Self::messages(prompt),
            "max_tokens": TEXT_FALLBACK_TOKENS,
            "temperature": 0,
            "seed": 0,
        });
        let resp = self.post(&body)?;
        Ok(score_from_text(&message_content(&resp)?))
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
        message_content(&self.post(&body)?)
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
}

/// `choices[0].logprobs.content[0].top_logprobs` as (token, logprob), or `None` when the
/// server sent no log-probabilities.
pub fn first_token_top_logprobs(resp: &Value) -> Result<Option<Vec<(String, f64)>>> {
    let Some(first) = resp.pointer("/choices/0/logprobs/content/0") else {
        return Ok(None);
    };
    let Some(top) = first.get("top_logprobs").and_then(Value::as_array) else {
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
                (Some(t), Some(lp)) => Ok((t.to_string(), lp)),
                _ => Err(anyhow!(
                    "openai judge: malformed top_logprobs entry {entry}"
                )),
            }
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// `choices[0].message.content` (an empty string for a `null` content).
pub fn message_content(resp: &Value) -> Result<String> {
    let msg = resp.pointer("/choices/0/message").ok_or_else(|| {
        anyhow!(
            "openai judge: response has no choices[0].message: {}",
            excerpt(&resp.to_string())
        )
    })?;
    Ok(msg
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string())
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
    fn unreachable_server_fails_after_retries_with_a_hint() {
        let mut c = cfg("http://127.0.0.1:9/v1");
        c.max_retries = 1;
        c.timeout_s = 2.0;
        let judge = OpenAiJudge::new(c).unwrap();
        let err = judge
            .score_0_100(&["q".to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("after 2 attempts"), "{err}");
    }
}
