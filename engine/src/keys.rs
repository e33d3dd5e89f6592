//! Stage keys: what makes two executions of a stage interchangeable.
//!
//! A key is the blake3 digest of a canonical JSON document of *named parts*
//! ([`KeyParts`]): key schema, kind name and implementation version, canonical params,
//! the content digests of every input, and an environment fingerprint. Naming the parts
//! (rather than hashing one opaque string) is what lets `emflow status` say *why* a stage
//! is stale: the parts are stored in each record and diffed against the current ones.
//!
//! Inputs enter by content digest, never by upstream key, so an upstream rerun that
//! produces the same bytes leaves every downstream key unchanged (early cutoff). Anything
//! operational (threads, device ordinals, paths, executor, progress) is absent by
//! construction: it is simply not a field here.
//!
//! Canonical JSON: object keys sorted, no whitespace, numbers as serde_json prints them
//! (shortest round-trip form), `-0.0` folded into `0.0`, and integers written as floats
//! where the kind declares the param a non-nullable [`ParamType::Float`]
//! ([`ParamSpec::keys_as_float`]), so `1` and `1.0` key the same.
//!
//! [`ParamType::Float`]: crate::kind::ParamType::Float
//! [`ParamSpec::keys_as_float`]: crate::kind::ParamSpec::keys_as_float
//! Changing anything here changes every key: bump [`KEY_SCHEMA`] and update the golden test.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use crate::kind::{KindSpec, ParamSpec, Params, Precision};

/// Version of the key scheme. Part of every key, so a scheme change never reuses old results.
pub const KEY_SCHEMA: u32 = 1;

/// The emflow version folded into every key's environment part.
pub const EMFLOW_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where a stage computes: the device *class* (never the ordinal) and the default dtype.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EnvParts {
    pub emflow: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// The format the kind declares for that device class ([`KindSpec::precision`]).
    pub dtype: String,
}

impl EnvParts {
    /// The environment of a stage of a kind computing in `precision` that asks for `gpus`
    /// GPUs.
    pub fn new(precision: Precision, gpus: u32) -> Self {
        let (device, dtype) = precision.on(gpus);
        EnvParts {
            emflow: EMFLOW_VERSION.to_string(),
            device: device.into(),
            dtype: dtype.name().into(),
        }
    }

    /// The environment of a stage of kind `spec` that asks for `gpus` GPUs.
    pub fn for_stage(spec: &KindSpec, gpus: u32) -> Self {
        EnvParts::new(spec.precision, gpus)
    }
}

/// The named parts a stage key is computed from. Stored in every record as `key_parts`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyParts {
    pub schema: u32,
    pub kind: String,
    pub kind_version: u32,
    /// Canonical params (see [`canonical_params`]).
    pub params: Value,
    /// Input port -> content digest of each wired artifact, in wiring order.
    pub inputs: BTreeMap<String, Vec<String>>,
    pub env: EnvParts,
}

impl KeyParts {
    pub fn new(
        spec: &KindSpec,
        params: &Params,
        inputs: BTreeMap<String, Vec<String>>,
        env: EnvParts,
    ) -> Self {
        KeyParts {
            schema: KEY_SCHEMA,
            kind: spec.name.to_string(),
            kind_version: spec.version,
            params: canonical_params(spec, params),
            inputs,
            env,
        }
    }

    /// The stage key: blake3 hex of the canonical JSON of these parts.
    pub fn key(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        digest_value(&value)
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// blake3 hex of the canonical JSON form of `value`.
pub fn digest_value(value: &Value) -> String {
    let mut text = String::with_capacity(256);
    write_canonical(value, &mut text);
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

/// Key of a model fetched by a [`crate::kind::ModelFetcher`]: depends only on the source
/// string, so a source is fetched once per store.
pub fn model_fetch_key(source: &str) -> String {
    let value =
        serde_json::json!({ "schema": KEY_SCHEMA, "kind": "model_fetch", "source": source });
    digest_value(&value)
}

/// Params with integers turned into floats where the spec says the param keys as a float,
/// without the connection settings a param's type declares
/// ([`crate::kind::ParamSpec::connection_fields`]), and without params that key only away
/// from their default while at it ([`crate::kind::ParamSpec::key_omits_default`]).
/// Key order is fixed later by the canonical writer.
pub fn canonical_params(spec: &KindSpec, params: &Params) -> Value {
    let mut out = serde_json::Map::new();
    for (name, value) in params {
        let declared = spec.params.iter().find(|p| &p.name == name);
        if declared.is_some_and(|p| p.unkeyed(value)) {
            continue;
        }
        let is_float = declared.is_some_and(ParamSpec::keys_as_float);
        let value = match declared {
            Some(p) => without_connection_settings(p, value),
            None => value.clone(),
        };
        let value = match value {
            Value::Number(n) if is_float => n
                .as_f64()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .unwrap_or(Value::Number(n)),
            other => other,
        };
        out.insert(name.clone(), value);
    }
    Value::Object(out)
}

/// `value` of param `p` without the connection settings its type declares: fields of the
/// value ([`ParamSpec::connection_fields`]) and fields of each entry of a map of such values
/// ([`ParamSpec::entry_connection_fields`]).
fn without_connection_settings(p: &ParamSpec, value: &Value) -> Value {
    let strip = |v: &Value, fields: &[String]| match v {
        Value::Object(map) if !fields.is_empty() => {
            let mut kept = map.clone();
            kept.retain(|field, _| !fields.contains(field));
            Value::Object(kept)
        }
        other => other.clone(),
    };
    match strip(value, &p.connection_fields) {
        Value::Object(entries) if !p.entry_connection_fields.is_empty() => Value::Object(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let v = strip(&v, &p.entry_connection_fields);
                    (k, v)
                })
                .collect(),
        ),
        other => other,
    }
}

/// Writes `value` as canonical JSON: sorted keys, no whitespace.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f == 0.0 => out.push_str("0.0"),
            _ => {
                let _ = write!(out, "{n}");
            }
        },
        Value::String(s) => {
            let _ = write!(out, "{}", Value::String(s.clone()));
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => write_canonical_object(map, out),
    }
}

/// [`write_canonical`] of an object, without wrapping it in a `Value` first (cell identity
/// in `expand` writes every cell's params this way).
pub fn write_canonical_object(map: &serde_json::Map<String, Value>, out: &mut String) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    out.push('{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}", Value::String(k.clone()));
        out.push(':');
        write_canonical(&map[k], out);
    }
    out.push('}');
}

/// Compact canonical text of a value, for messages (strings without quotes).
pub fn show_value(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => {
            let mut s = String::new();
            write_canonical(other, &mut s);
            s
        }
    }
}

/// One named part of a key that differs between two key computations.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeyChange {
    /// `schema`, `kind`, `kind_version`, `params`, `inputs` or `env`.
    pub part: &'static str,
    /// What changed, for a human: `lr: 0.0001 -> 0.0002`, `input data: content changed`.
    pub detail: String,
}

/// The named differences from `old` (a record's `key_parts`, possibly of an older schema)
/// to `new`. Params come first: they are what users change most and care about most.
pub fn explain_change(old: &Value, new: &KeyParts) -> Vec<KeyChange> {
    let old: KeyParts = match serde_json::from_value(old.clone()) {
        Ok(parts) => parts,
        Err(_) => {
            return vec![KeyChange {
                part: "schema",
                detail: format!("the last record used an older key scheme (now v{KEY_SCHEMA})"),
            }]
        }
    };
    let mut changes = Vec::new();
    diff_params(&old.params, &new.params, &mut changes);
    let ports: std::collections::BTreeSet<&String> =
        old.inputs.keys().chain(new.inputs.keys()).collect();
    for port in ports {
        match (old.inputs.get(port), new.inputs.get(port)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) if a.len() != b.len() => changes.push(KeyChange {
                part: "inputs",
                detail: format!("input `{port}`: {} -> {} artifacts", a.len(), b.len()),
            }),
            (Some(a), Some(b)) => {
                let which: Vec<String> = a
                    .iter()
                    .zip(b)
                    .enumerate()
                    .filter(|(_, (x, y))| x != y)
                    .map(|(i, _)| i.to_string())
                    .collect();
                let detail = if a.len() == 1 {
                    format!(
                        "input `{port}`: content changed ({} -> {})",
                        short(&a[0]),
                        short(&b[0])
                    )
                } else {
                    format!(
                        "input `{port}`: content of item(s) {} changed",
                        which.join(", ")
                    )
                };
                changes.push(KeyChange {
                    part: "inputs",
                    detail,
                });
            }
            (None, Some(_)) => changes.push(KeyChange {
                part: "inputs",
                detail: format!("input `{port}` newly wired"),
            }),
            (Some(_), None) => changes.push(KeyChange {
                part: "inputs",
                detail: format!("input `{port}` no longer wired"),
            }),
            (None, None) => {}
        }
    }
    if old.kind != new.kind {
        changes.push(KeyChange {
            part: "kind",
            detail: format!("kind: {} -> {}", old.kind, new.kind),
        });
    }
    if old.kind_version != new.kind_version {
        changes.push(KeyChange {
            part: "kind_version",
            detail: format!(
                "kind {} implementation: v{} -> v{}",
                new.kind, old.kind_version, new.kind_version
            ),
        });
    }
    if old.env != new.env {
        let mut parts = Vec::new();
        if old.env.emflow != new.env.emflow {
            parts.push(format!("emflow {} -> {}", old.env.emflow, new.env.emflow));
        }
        if old.env.device != new.env.device {
            parts.push(format!("device {} -> {}", old.env.device, new.env.device));
        }
        if old.env.dtype != new.env.dtype {
            parts.push(format!("dtype {} -> {}", old.env.dtype, new.env.dtype));
        }
        changes.push(KeyChange {
            part: "env",
            detail: format!("environment: {}", parts.join(", ")),
        });
    }
    if old.schema != new.schema {
        changes.push(KeyChange {
            part: "schema",
            detail: format!("key scheme v{} -> v{}", old.schema, new.schema),
        });
    }
    changes
}

fn diff_params(old: &Value, new: &Value, changes: &mut Vec<KeyChange>) {
    let empty = serde_json::Map::new();
    let old = old.as_object().unwrap_or(&empty);
    let new = new.as_object().unwrap_or(&empty);
    let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for name in names {
        let detail = match (old.get(name), new.get(name)) {
            (Some(a), Some(b)) if canonical_eq(a, b) => continue,
            (Some(a), Some(b)) => format!("{name}: {} -> {}", show_value(a), show_value(b)),
            (None, Some(b)) => format!("{name}: (unset) -> {}", show_value(b)),
            (Some(a), None) => format!("{name}: {} -> (unset)", show_value(a)),
            (None, None) => continue,
        };
        changes.push(KeyChange {
            part: "params",
            detail,
        });
    }
}

fn canonical_eq(a: &Value, b: &Value) -> bool {
    let (mut x, mut y) = (String::new(), String::new());
    write_canonical(a, &mut x);
    write_canonical(b, &mut y);
    x == y
}

/// First 12 hex digits of a digest, for display.
pub fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::{Dtype, KindInfo, ParamSpec, ParamType};
    use serde_json::json;

    fn spec() -> KindSpec {
        let params = vec![
            ParamSpec::required("lr", ParamType::Float, ""),
            ParamSpec::required("steps", ParamType::Int, ""),
            ParamSpec::required("opts", ParamType::Any, ""),
        ];
        KindInfo::new("toy", 3, "").into_spec(params, false)
    }

    fn env(gpus: u32) -> EnvParts {
        EnvParts::for_stage(&spec(), gpus)
    }

    #[test]
    fn the_standard_precision_is_f32_on_cpu_and_bf16_on_cuda() {
        assert_eq!(
            (env(0).device.as_str(), env(0).dtype.as_str()),
            ("cpu", "f32")
        );
        assert_eq!(
            (env(1).device.as_str(), env(1).dtype.as_str()),
            ("cuda", "bf16")
        );
    }

    #[test]
    fn a_kind_declaring_another_precision_keys_apart() {
        let p = params(json!({"lr": 1e-4}));
        let mut f16 = spec();
        f16.precision.cuda = Dtype::F16;
        let standard = KeyParts::new(&spec(), &p, BTreeMap::new(), env(1));
        let other = KeyParts::new(&f16, &p, BTreeMap::new(), EnvParts::for_stage(&f16, 1));
        assert_eq!(other.env.dtype, "f16");
        assert_ne!(standard.key(), other.key());
        let cpu = KeyParts::new(&f16, &p, BTreeMap::new(), EnvParts::for_stage(&f16, 0));
        assert_eq!(
            cpu.key(),
            KeyParts::new(&spec(), &p, BTreeMap::new(), env(0)).key()
        );
    }

    #[test]
    fn a_param_added_with_key_omits_default_keys_only_away_from_it() {
        let mut s = spec();
        s.params.push(ParamSpec {
            key_omits_default: true,
            ..ParamSpec::optional("recompute", ParamType::Bool, json!(false), "")
        });
        let at_default = canonical_params(&s, &params(json!({"lr": 1, "recompute": false})));
        assert_eq!(at_default, json!({"lr": 1.0}));
        let set = canonical_params(&s, &params(json!({"lr": 1, "recompute": true})));
        assert_eq!(set, json!({"lr": 1.0, "recompute": true}));
    }

    #[test]
    fn nullable_numbers_key_as_written() {
        let mut s = spec();
        s.params.push(ParamSpec {
            nullable: true,
            ..ParamSpec::optional("eps", ParamType::Float, Value::Null, "")
        });
        let canon = canonical_params(&s, &params(json!({"lr": 1, "eps": 1})));
        assert_eq!(canon, json!({"lr": 1.0, "eps": 1}));
    }

    #[test]
    fn connection_settings_a_param_declares_stay_out_of_the_key() {
        let mut s = spec();
        s.params.push(ParamSpec {
            connection_fields: vec!["base_url".into(), "timeout_s".into()],
            ..ParamSpec::optional("judge", ParamType::Map, json!({}), "")
        });
        let judge = |url: &str, model: &str| {
            let p = params(
                json!({"lr": 1e-4, "judge": {"base_url": url, "timeout_s": 5, "model": model}}),
            );
            KeyParts::new(&s, &p, BTreeMap::new(), env(0)).key()
        };
        assert_eq!(judge("http://a:1/v1", "m"), judge("http://b:2/v1", "m"));
        assert_ne!(judge("http://a:1/v1", "m"), judge("http://a:1/v1", "other"));
    }

    #[test]
    fn connection_settings_of_each_entry_of_a_map_param_stay_out_of_the_key() {
        let mut s = spec();
        s.params.push(ParamSpec {
            entry_connection_fields: vec!["base_url".into()],
            ..ParamSpec::optional("judges", ParamType::Map, json!({}), "")
        });
        let judges = |url: &str, model: &str| {
            let p = params(
                json!({"lr": 1e-4, "judges": {"coherent": {"base_url": url, "model": model}}}),
            );
            KeyParts::new(&s, &p, BTreeMap::new(), env(0)).key()
        };
        assert_eq!(judges("http://a:1/v1", "m"), judges("http://b:2/v1", "m"));
        assert_ne!(
            judges("http://a:1/v1", "m"),
            judges("http://a:1/v1", "other")
        );
    }

    fn params(v: Value) -> Params {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn key_ignores_param_order_and_int_vs_float_for_float_params() {
        let env = env(0);
        let a = KeyParts::new(
            &spec(),
            &params(json!({"lr": 1, "steps": 3, "opts": {"b": 1, "a": 2}})),
            BTreeMap::new(),
            env.clone(),
        );
        let b = KeyParts::new(
            &spec(),
            &params(json!({"opts": {"a": 2, "b": 1}, "steps": 3, "lr": 1.0})),
            BTreeMap::new(),
            env,
        );
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn int_params_keep_their_type() {
        let env = env(0);
        let a = KeyParts::new(
            &spec(),
            &params(json!({"lr": 1, "steps": 3})),
            BTreeMap::new(),
            env.clone(),
        );
        let b = KeyParts::new(
            &spec(),
            &params(json!({"lr": 1, "steps": 4})),
            BTreeMap::new(),
            env,
        );
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn device_class_changes_the_key() {
        let p = params(json!({"lr": 1e-4}));
        let cpu = KeyParts::new(&spec(), &p, BTreeMap::new(), env(0));
        let gpu = KeyParts::new(&spec(), &p, BTreeMap::new(), env(2));
        assert_ne!(cpu.key(), gpu.key());
        assert_eq!(
            gpu.key(),
            KeyParts::new(&spec(), &p, BTreeMap::new(), env(1)).key()
        );
    }

    #[test]
    fn canonical_text_is_sorted_and_compact() {
        let mut s = String::new();
        write_canonical(
            &json!({"b": [1, 2.5, -0.0], "a": {"y": null, "x": "q\""}}),
            &mut s,
        );
        assert_eq!(s, r#"{"a":{"x":"q\"","y":null},"b":[1,2.5,0.0]}"#);
    }

    #[test]
    fn explain_names_param_diff_first() {
        let old = KeyParts::new(
            &spec(),
            &params(json!({"lr": 1e-4, "steps": 3})),
            BTreeMap::from([("data".to_string(), vec!["aa".repeat(32)])]),
            env(0),
        );
        let new = KeyParts::new(
            &spec(),
            &params(json!({"lr": 2e-4, "steps": 3})),
            BTreeMap::from([("data".to_string(), vec!["bb".repeat(32)])]),
            env(0),
        );
        let changes = explain_change(&old.to_value(), &new);
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].part, "params");
        assert_eq!(changes[0].detail, "lr: 0.0001 -> 0.0002");
        assert_eq!(changes[1].part, "inputs");
        assert!(changes[1]
            .detail
            .starts_with("input `data`: content changed"));
    }

    #[test]
    fn explain_old_schema_says_so() {
        let new = KeyParts::new(&spec(), &params(json!({})), BTreeMap::new(), env(0));
        let changes = explain_change(&json!({"something": "else"}), &new);
        assert_eq!(changes[0].part, "schema");
    }
}
