//! Each kind's params as the engine sees them (names in order, defaults, which key as floats)
//! against a golden file captured before the params moved from hand-written `ParamSpec` lists
//! to the typed structs: the move must not change a byte of what enters a stage key. The
//! types, ranges and docs that `emflow kinds` prints are in it too, so that a params struct
//! can be refactored (a shared field type) without users seeing a difference.
//! Params declared `key_omits_default` (added later, keyed only when set away from their
//! default) are left out: at their default they add nothing to a key.
//! `EMFLOW_UPDATE_GOLDEN=1` rewrites the file (only ever on purpose, with a kind's version bump).

use serde_json::{json, Value};

const GOLDEN: &str = "tests/it/kind_params.golden.json";

fn current() -> Value {
    let registry = emflow_stages::registry();
    let mut kinds = serde_json::Map::new();
    for name in registry.kind_names() {
        let spec = registry.kind(name).expect("listed kind").spec();
        let params: Vec<Value> = spec
            .params
            .iter()
            .filter(|p| !p.key_omits_default)
            .map(|p| {
                json!({
                    "name": p.name,
                    "default": p.default,
                    "required": p.default.is_none(),
                    "float_key": p.keys_as_float(),
                    "type": p.ty.describe(),
                    "nullable": p.nullable,
                    "range": p.range.to_string(),
                    "doc": p.doc,
                })
            })
            .collect();
        kinds.insert(
            name.to_string(),
            json!({"open": spec.open_params, "params": params}),
        );
    }
    Value::Object(kinds)
}

#[test]
fn every_kind_declares_the_params_and_defaults_it_always_had() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    let now = current();
    if std::env::var_os("EMFLOW_UPDATE_GOLDEN").is_some() {
        let text = serde_json::to_string_pretty(&now).unwrap() + "\n";
        std::fs::write(&path, text).unwrap();
    }
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (kind, want) in golden.as_object().unwrap() {
        assert_eq!(&now[kind], want, "kind `{kind}` declares different params");
    }
    assert_eq!(now, golden);
}

/// A judge's connection settings (where the server is, how long to wait, how many requests
/// at once) are not part of any stage key: moving a judge server to another port keeps every
/// stage cached. Its model and scoring mode are.
#[test]
fn a_judges_connection_settings_stay_out_of_every_stage_key() {
    let key = |kind: &str, judge: Value| crate::support::stage_key(kind, json!({ "judge": judge }));
    let here =
        json!({"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "judge-1"});
    let moved = json!({
        "backend": "openai", "base_url": "http://10.0.0.7:9001/v1", "model": "judge-1",
        "api_key_env": "JUDGE_KEY", "timeout_s": 30, "max_retries": 2, "backoff_s": 1,
        "max_wait_s": 10, "concurrency": 64,
    });
    let other_model =
        json!({"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "judge-2"});
    let text_mode = json!({"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "judge-1", "score_mode": "text"});
    for kind in ["eval", "rl", "safety_data"] {
        assert_eq!(key(kind, here.clone()), key(kind, moved.clone()), "{kind}");
        assert_ne!(
            key(kind, here.clone()),
            key(kind, other_model.clone()),
            "{kind}"
        );
        assert_ne!(
            key(kind, here.clone()),
            key(kind, text_mode.clone()),
            "{kind}"
        );
    }
}
