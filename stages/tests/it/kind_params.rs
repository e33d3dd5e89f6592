//! Each kind's params as the engine sees them (names in order, defaults, which key as floats)
//! against a golden file captured before the params moved from hand-written `ParamSpec` lists
//! to the typed structs: the move must not change a byte of what enters a stage key. The
//! types, ranges and docs that `emflow kinds` prints are in it too, so that a params struct
//! can be refactored (a shared field type) without users seeing a difference.
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
