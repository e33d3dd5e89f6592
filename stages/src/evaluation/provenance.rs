//! What an eval's summary records about how its numbers were made, for the report's
//! provenance: the parts of the eval's stage key less the emflow version (kind and version,
//! canonical params without a judge's connection settings, the digest of every input: model,
//! adapter or snapshots, questions, contrast set, judge model; device class and dtype) and the
//! judge of each metric (backend, model, how a score is read; never where its server is).
//!
//! Why the key's parts and not the key: the key's environment holds the emflow version, so a
//! summary naming the key would change bytes at every release although its numbers did not.
//! The report, run by the emflow that keyed the eval (every key of one plan has the same
//! version), puts the version back and recomputes the key ([`EvalProvenance::stage_key`]).
//!
//! Everything here is a function of the stage key, so an eval's outputs still depend only on
//! what its key covers: stage names and file paths (artifact origins) are left out, as keys
//! leave them out (a renamed stage reuses its cached outputs).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use emflow_engine::StageContext;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::judge::JudgeSpec;

/// An eval's provenance, in its `summary` (absent from summaries written before eval v2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalProvenance {
    /// The stage key's parts ([`emflow_engine::keys::KeyParts`] as JSON) without `env.emflow`.
    pub key_parts: Value,
    /// The judge of each metric the eval scored.
    pub judges: BTreeMap<String, JudgeIdentity>,
}

/// One judge as far as it decides the scores: what a stage key keeps of a judge param.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JudgeIdentity {
    /// `local` or `openai`.
    pub backend: String,
    /// `openai`: the `model` each request names; `local`: the blake3 digest of the judge model
    /// (the stage's `judge_model` input).
    pub model: String,
    /// How a score is read: `auto`, `exact` or `top20` (local), `logprobs` or `text` (openai).
    pub scoring: String,
}

impl JudgeIdentity {
    /// The identity of `spec`; `judge_model` is the digest of the stage's local judge model.
    pub fn of(spec: &JudgeSpec, judge_model: Option<&str>) -> JudgeIdentity {
        let name = |v: Value| v.as_str().unwrap_or_default().to_string();
        match spec {
            JudgeSpec::Local { method, .. } => JudgeIdentity {
                backend: "local".into(),
                model: judge_model.unwrap_or("not wired").to_string(),
                scoring: name(serde_json::to_value(method).unwrap_or_default()),
            },
            JudgeSpec::Openai(cfg) => JudgeIdentity {
                backend: "openai".into(),
                model: cfg.model.clone(),
                scoring: name(serde_json::to_value(cfg.score_mode).unwrap_or_default()),
            },
        }
    }

    /// `openai gpt-4o (logprobs)`; a local model's digest cut to 12 characters.
    pub fn short(&self) -> String {
        self.text(false)
    }

    /// `openai gpt-4o (logprobs)`; a local model's digest whole (`full`) or cut to 12
    /// characters.
    pub fn text(&self, full: bool) -> String {
        let model = match self.backend.as_str() {
            "local" if !full => short_digest(&self.model),
            _ => &self.model,
        };
        format!("{} {model} ({})", self.backend, self.scoring)
    }
}

/// The first 12 characters of a digest (all of a shorter string).
pub fn short_digest(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

impl EvalProvenance {
    /// The provenance of the eval running in `ctx`, whose metrics are judged by `judges`
    /// (metric, spec).
    pub fn of<'a>(
        ctx: &StageContext,
        judges: impl IntoIterator<Item = (&'a String, &'a JudgeSpec)>,
    ) -> Result<EvalProvenance> {
        let mut key_parts = ctx.key_parts().clone();
        match key_parts.get_mut("env").and_then(Value::as_object_mut) {
            Some(env) => env.remove("emflow"),
            None => bail!(
                "stage {}: the engine gave no key parts (an environment is missing), so the summary cannot say how it was made",
                ctx.stage_id
            ),
        };
        let judge_model = ctx
            .optional_input("judge_model")?
            .map(|a| a.digest.as_str());
        let judges = judges
            .into_iter()
            .map(|(metric, spec)| (metric.clone(), JudgeIdentity::of(spec, judge_model)))
            .collect();
        Ok(EvalProvenance { key_parts, judges })
    }

    /// The eval's stage key, recomputed with this emflow's version, or `None` when the
    /// recorded parts have no environment.
    pub fn stage_key(&self) -> Option<String> {
        let mut parts = self.key_parts.clone();
        let env = parts.get_mut("env")?.as_object_mut()?;
        env.insert(
            "emflow".into(),
            Value::String(emflow_engine::keys::EMFLOW_VERSION.into()),
        );
        Some(emflow_engine::keys::digest_value(&parts))
    }

    /// The eval kind's version from the key parts.
    pub fn kind_version(&self) -> Option<u64> {
        self.key_parts.get("kind_version")?.as_u64()
    }

    /// The digests of the artifacts wired to input `port` (empty when none was).
    pub fn input(&self, port: &str) -> Vec<&str> {
        self.key_parts
            .get("inputs")
            .and_then(|i| i.get(port))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }

    /// The recorded input ports, in key order.
    pub fn ports(&self) -> Vec<&str> {
        self.key_parts
            .get("inputs")
            .and_then(Value::as_object)
            .map(|i| i.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn openai(more: Value) -> JudgeSpec {
        let mut v =
            json!({"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "gpt-4o"});
        v.as_object_mut()
            .unwrap()
            .extend(more.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_judge_identity_names_backend_model_and_scoring_never_the_connection() {
        let a = JudgeIdentity::of(&openai(json!({})), None);
        let moved = openai(
            json!({"base_url": "https://judge.example:9443/v1", "timeout_s": 5.0,
            "concurrency": 64, "max_retries": 1, "api_key_env": "KEY"}),
        );
        assert_eq!(JudgeIdentity::of(&moved, None), a);
        assert_eq!(a.short(), "openai gpt-4o (logprobs)");
        let text = JudgeIdentity::of(&openai(json!({"score_mode": "text"})), None);
        assert_eq!(text.scoring, "text");
        let local = JudgeIdentity::of(&JudgeSpec::default(), Some(&"ab".repeat(32)));
        assert_eq!(local.short(), "local abababababab (auto)");
        let text = serde_json::to_string(&a).unwrap();
        assert!(
            !text.contains("127.0.0.1") && !text.contains("timeout"),
            "{text}"
        );
    }

    #[test]
    fn the_stage_key_is_recomputed_from_the_parts_with_this_emflow() {
        use emflow_engine::keys::{EnvParts, KeyParts};
        let parts = KeyParts {
            schema: 1,
            kind: "eval".into(),
            kind_version: 2,
            params: json!({"seed": 3}),
            inputs: BTreeMap::from([("model".into(), vec!["m".repeat(64)])]),
            env: EnvParts::new(emflow_engine::kind::Precision::default(), 0),
        };
        let mut recorded = parts.to_value();
        recorded["env"].as_object_mut().unwrap().remove("emflow");
        let p = EvalProvenance {
            key_parts: recorded,
            judges: BTreeMap::new(),
        };
        assert_eq!(p.stage_key(), Some(parts.key()));
        assert_eq!(p.kind_version(), Some(2));
        assert_eq!(p.input("model"), vec!["m".repeat(64).as_str()]);
        assert!(p.input("adapter").is_empty());
        assert_eq!(p.ports(), vec!["model"]);
    }
}
