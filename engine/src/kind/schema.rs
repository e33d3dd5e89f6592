//! A kind's [`ParamSpec`]s derived from the JSON Schema of its typed params struct: the one
//! place where a struct's fields become the names, types, defaults, docs and ranges that
//! validation, keys and `emflow kinds` use.
//!
//! Why a JSON Schema (from `schemars` 1.x) rather than a derive of our own: schemars already
//! reads everything serde knows about a struct (renames, `#[serde(default = ...)]`,
//! `deny_unknown_fields`, `flatten`, `Option`, enums of unit variants with their serde
//! names) plus doc comments and `#[schemars(range(...))]`, and it is well kept. A derive of
//! our own would re-implement serde's attribute rules and drift from them. Version 1.x emits
//! draft 2020-12 with defaults serialised by serde itself, so a default in the schema is
//! exactly the JSON the field's default deserialises from.
//!
//! What the schema keywords become:
//! - `type` (`boolean`, `integer`, `number`, `string`, `array`, `object`) -> [`ParamType`];
//!   a `"null"` among the types, or a `{"type": "null"}` branch of `anyOf`/`oneOf`, makes the
//!   param nullable; string `enum`s and `const`s -> [`ParamType::Enum`]; several other
//!   types, or no `type` at all (a `serde_json::Value` field) -> [`ParamType::Any`];
//! - a `$ref` is followed into `$defs`: a nested struct or tagged enum is a `Map`;
//! - `default` -> the default; a field serde may omit without a default is nullable and
//!   defaults to `null`; any other field is required;
//! - `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` -> the [`Range`];
//! - `title` and `description` (the doc comment) -> the doc;
//! - `additionalProperties` other than `false` on the struct (a `#[serde(flatten)]` map) ->
//!   open params: names the struct does not declare are accepted as they are;
//! - [`CONNECTION_FIELDS`] (an array of field names) on a param's type -> [`ParamSpec::connection_fields`];
//!   on the value type of a map param -> [`ParamSpec::entry_connection_fields`].

use serde_json::{Map, Value};

use super::{Bound, ParamSpec, ParamType, Range};

/// The schema keyword by which a param's type names its fields that are connection settings
/// (an address, a timeout, a concurrency) rather than anything results depend on: an array
/// of field names, written by the type's `JsonSchema` impl or with
/// `#[schemars(extend("x-emflow-connection-fields" = ["base_url"]))]`. The stage key leaves them
/// out ([`ParamSpec::connection_fields`]).
pub const CONNECTION_FIELDS: &str = "x-emflow-connection-fields";

/// A params struct as the engine sees it.
#[derive(Clone, Debug)]
pub struct DerivedParams {
    /// In the struct's field order.
    pub params: Vec<ParamSpec>,
    /// Whether params the struct does not name are accepted (a flattened map).
    pub open: bool,
}

/// The params declared by `root`, the JSON Schema of a params struct. `Err` when the schema
/// is not one of an object with named fields (a kind whose params type is not a struct).
pub fn derive_params(root: &Value) -> Result<DerivedParams, String> {
    let object = root
        .as_object()
        .filter(|o| o.get("type").and_then(Value::as_str) == Some("object"))
        .ok_or("a kind's params must be a struct with named fields")?;
    let required: Vec<&str> = object
        .get("required")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let empty = Map::new();
    let properties = object
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let params = properties
        .iter()
        .map(|(name, schema)| param_of(root, name, schema, required.contains(&name.as_str())))
        .collect::<Result<_, _>>()?;
    let open = object
        .get("additionalProperties")
        .is_some_and(|a| a != &Value::Bool(false));
    Ok(DerivedParams { params, open })
}

/// The schema extension that marks a param keyed only away from its default
/// ([`ParamSpec::key_omits_default`]).
pub const KEY_OMITS_DEFAULT: &str = "x-emflow-key-omits-default";

/// One property of the struct.
fn param_of(root: &Value, name: &str, schema: &Value, required: bool) -> Result<ParamSpec, String> {
    let shape = shape_of(root, schema);
    let default = match schema.get("default") {
        Some(d) => Some(d.clone()),
        None if required => None,
        None if shape.nullable => Some(Value::Null),
        // schemars leaves a default out when it cannot serialise it; the param would look
        // required to users while serde fills it in.
        None => {
            return Err(format!(
                "field `{name}` has a serde default the schema does not show \
                 (does its type implement Serialize?)"
            ))
        }
    };
    let doc = doc_of(schema)
        .or_else(|| doc_of(resolve(root, schema)))
        .unwrap_or_default();
    let key_omits_default = schema
        .get(KEY_OMITS_DEFAULT)
        .is_some_and(|v| v == &Value::Bool(true));
    if key_omits_default && default.is_none() {
        return Err(format!(
            "field `{name}` says {KEY_OMITS_DEFAULT} but has no default"
        ));
    }
    Ok(ParamSpec {
        key_omits_default,
        name: name.to_string(),
        ty: shape.ty.unwrap_or(ParamType::Any),
        nullable: shape.nullable,
        range: shape.range,
        default,
        doc,
        connection_fields: connection_fields_of(root, schema),
        entry_connection_fields: match resolve(root, schema).get("additionalProperties") {
            Some(entry @ Value::Object(_)) => connection_fields_of(root, entry),
            _ => Vec::new(),
        },
    })
}

/// The field names a param's (sub)schema lists under [`CONNECTION_FIELDS`].
fn connection_fields_of(root: &Value, schema: &Value) -> Vec<String> {
    let listed = |s: &Value| s.get(CONNECTION_FIELDS).and_then(Value::as_array).cloned();
    listed(schema)
        .or_else(|| listed(resolve(root, schema)))
        .unwrap_or_default()
        .iter()
        .filter_map(|name| name.as_str().map(String::from))
        .collect()
}

/// A schema's title and description, as one text.
fn doc_of(schema: &Value) -> Option<String> {
    let title = schema.get("title").and_then(Value::as_str);
    let description = schema.get("description").and_then(Value::as_str);
    match (title, description) {
        (Some(t), Some(d)) => Some(format!("{t}\n\n{d}")),
        (Some(one), None) | (None, Some(one)) => Some(one.to_string()),
        (None, None) => None,
    }
}

/// What a (sub)schema admits: a type (`None` when it admits only `null`), whether `null`
/// is admitted too, and the range of numbers.
#[derive(Clone, Debug, PartialEq)]
struct Shape {
    ty: Option<ParamType>,
    nullable: bool,
    range: Range,
}

impl Shape {
    fn any() -> Shape {
        Shape {
            ty: Some(ParamType::Any),
            nullable: true,
            range: Range::default(),
        }
    }
}

/// `schema` with a local `$ref` (`#/$defs/Name`) followed; itself otherwise.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    let target = schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix('#'))
        .and_then(|pointer| root.pointer(pointer));
    target.unwrap_or(schema)
}

fn shape_of(root: &Value, schema: &Value) -> Shape {
    let schema = resolve(root, schema);
    let Some(object) = schema.as_object() else {
        // `true` (anything) or `false` (nothing): no use for a param but `Any`.
        return Shape::any();
    };
    let range = range_of(object);
    if let Some(branches) = object
        .get("anyOf")
        .or_else(|| object.get("oneOf"))
        .and_then(Value::as_array)
    {
        let shapes: Vec<Shape> = branches.iter().map(|b| shape_of(root, b)).collect();
        return merge(shapes);
    }
    let mut nullable = false;
    if let Some(options) = object.get("enum").and_then(Value::as_array) {
        nullable = options.contains(&Value::Null);
        let names = options.iter().filter_map(Value::as_str).map(String::from);
        return Shape {
            ty: Some(ParamType::Enum(names.collect())),
            nullable,
            range,
        };
    }
    if let Some(Value::String(only)) = object.get("const") {
        return Shape {
            ty: Some(ParamType::Enum(vec![only.clone()])),
            nullable,
            range,
        };
    }
    let types: Vec<&str> = match object.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => return Shape::any(),
    };
    nullable = types.contains(&"null");
    let named: Vec<ParamType> = types.iter().filter_map(|t| type_named(t)).collect();
    let ty = match named.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        _ => Some(ParamType::Any),
    };
    Shape {
        ty,
        nullable,
        range,
    }
}

/// The branches of an `anyOf`/`oneOf` as one shape: their common type (enums merged), or
/// `Any` when they differ; nullable when one branch is.
fn merge(shapes: Vec<Shape>) -> Shape {
    let nullable = shapes.iter().any(|s| s.nullable);
    let typed: Vec<Shape> = shapes.into_iter().filter(|s| s.ty.is_some()).collect();
    let range = match typed.as_slice() {
        [one] => one.range,
        _ => Range::default(),
    };
    let mut ty: Option<ParamType> = None;
    for shape in typed {
        let next = shape.ty.unwrap_or(ParamType::Any);
        ty = Some(match (ty, next) {
            (None, next) => next,
            (Some(ParamType::Enum(mut a)), ParamType::Enum(b)) => {
                a.extend(b.into_iter().filter(|o| !a.contains(o)).collect::<Vec<_>>());
                ParamType::Enum(a)
            }
            (Some(same), next) if same == next => same,
            _ => ParamType::Any,
        });
    }
    Shape {
        ty,
        nullable,
        range,
    }
}

fn type_named(name: &str) -> Option<ParamType> {
    Some(match name {
        "boolean" => ParamType::Bool,
        "integer" => ParamType::Int,
        "number" => ParamType::Float,
        "string" => ParamType::String,
        "array" => ParamType::List,
        "object" => ParamType::Map,
        _ => return None,
    })
}

fn range_of(schema: &Map<String, Value>) -> Range {
    let bound = |inclusive: &str, exclusive: &str| {
        let at = |key: &str| schema.get(key).and_then(Value::as_f64);
        match (at(inclusive), at(exclusive)) {
            (_, Some(value)) => Some(Bound {
                value,
                exclusive: true,
            }),
            (Some(value), None) => Some(Bound {
                value,
                exclusive: false,
            }),
            (None, None) => None,
        }
    };
    Range {
        min: bound("minimum", "exclusiveMinimum"),
        max: bound("maximum", "exclusiveMaximum"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::schema_of;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    /// A learning-rate schedule.
    #[derive(Deserialize, Serialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    #[allow(dead_code)]
    enum Schedule {
        Constant,
        /// Straight down to zero.
        Linear,
        Cosine,
    }

    #[derive(Deserialize, JsonSchema, Default)]
    #[serde(default, deny_unknown_fields)]
    #[allow(dead_code)]
    struct Nested {
        r: usize,
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Toy {
        /// Peak learning rate.
        ///
        /// A second paragraph.
        #[schemars(range(min = 0.0, max = 1.0))]
        lr: f64,
        /// Steps to run; null = one epoch.
        #[serde(default)]
        #[schemars(range(min = 1))]
        max_steps: Option<u64>,
        #[serde(default = "linear")]
        schedule: Schedule,
        #[serde(default)]
        then: Option<Schedule>,
        #[serde(default)]
        #[schemars(extend("default" = {}))]
        nested: Nested,
        #[serde(default)]
        maybe_nested: Option<Nested>,
        #[serde(default)]
        tags: Vec<String>,
        anything: serde_json::Value,
        #[serde(default)]
        label: Option<String>,
    }

    fn linear() -> Schedule {
        Schedule::Linear
    }

    fn derived() -> DerivedParams {
        derive_params(&schema_of::<Toy>()).unwrap()
    }

    fn param(name: &str) -> ParamSpec {
        let all = derived().params;
        all.into_iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn fields_in_order_closed_struct() {
        let d = derived();
        let names: Vec<&str> = d.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "lr",
                "max_steps",
                "schedule",
                "then",
                "nested",
                "maybe_nested",
                "tags",
                "anything",
                "label"
            ]
        );
        assert!(!d.open);
    }

    #[test]
    fn a_required_float_with_a_range_and_its_doc() {
        let lr = param("lr");
        assert_eq!(lr.ty, ParamType::Float);
        assert!(!lr.nullable && lr.default.is_none());
        assert!(lr.keys_as_float());
        assert_eq!(lr.range.to_string(), "[0, 1]");
        assert_eq!(lr.doc, "Peak learning rate.\n\nA second paragraph.");
        assert_eq!(lr.summary(), "Peak learning rate.");
    }

    #[test]
    fn options_are_nullable_with_a_null_default_and_keep_their_range() {
        let steps = param("max_steps");
        assert_eq!(steps.ty, ParamType::Int);
        assert!(steps.nullable);
        assert_eq!(steps.default, Some(Value::Null));
        assert_eq!(steps.range.to_string(), ">= 1");
        let label = param("label");
        assert_eq!((label.ty, label.nullable), (ParamType::String, true));
    }

    /// The options of an enum param, sorted: schemars lists undocumented variants before
    /// documented ones, so declaration order is not kept when some variants have docs.
    fn options(p: &ParamSpec) -> Vec<String> {
        let ParamType::Enum(mut names) = p.ty.clone() else {
            panic!("{} is {:?}, not an enum", p.name, p.ty);
        };
        names.sort();
        names
    }

    #[test]
    fn enums_by_their_serde_names_documented_variants_or_not() {
        let schedule = param("schedule");
        assert_eq!(options(&schedule), ["constant", "cosine", "linear"]);
        assert_eq!(schedule.default, Some(json!("linear")));
        assert_eq!(schedule.doc, "A learning-rate schedule.");
        let then = param("then");
        assert_eq!(options(&then), ["constant", "cosine", "linear"]);
        assert!(then.nullable);
        #[derive(Deserialize, JsonSchema)]
        #[serde(rename_all = "snake_case")]
        #[allow(dead_code)]
        enum Plain {
            Zeta,
            Alpha,
        }
        #[derive(Deserialize, JsonSchema)]
        #[allow(dead_code)]
        struct WithPlain {
            plain: Plain,
        }
        let d = derive_params(&schema_of::<WithPlain>()).unwrap();
        assert_eq!(
            d.params[0].ty,
            ParamType::Enum(vec!["zeta".into(), "alpha".into()])
        );
    }

    #[test]
    fn nested_structs_are_maps_with_the_default_the_struct_declares() {
        let nested = param("nested");
        assert_eq!(nested.ty, ParamType::Map);
        assert_eq!(nested.default, Some(json!({})));
        let maybe = param("maybe_nested");
        assert_eq!((maybe.ty, maybe.nullable), (ParamType::Map, true));
        assert_eq!(param("tags").ty, ParamType::List);
        assert_eq!(param("tags").default, Some(json!([])));
    }

    #[test]
    fn a_json_value_field_is_any_and_required() {
        let any = param("anything");
        assert_eq!(any.ty, ParamType::Any);
        assert!(any.default.is_none());
    }

    #[test]
    fn a_param_type_names_its_connection_fields() {
        #[derive(Deserialize, JsonSchema)]
        #[schemars(extend("x-emflow-connection-fields" = ["base_url", "timeout_s"]))]
        #[allow(dead_code)]
        struct Remote {
            model: String,
            base_url: String,
            timeout_s: f64,
        }
        #[derive(Deserialize, JsonSchema)]
        #[allow(dead_code)]
        struct WithRemote {
            judge: Remote,
            lr: f64,
        }
        let d = derive_params(&schema_of::<WithRemote>()).unwrap();
        assert_eq!(d.params[0].connection_fields, ["base_url", "timeout_s"]);
        assert!(d.params[1].connection_fields.is_empty());
        // A map of such values: each entry's fields.
        #[derive(Deserialize, JsonSchema)]
        #[allow(dead_code)]
        struct WithRemotes {
            judges: std::collections::BTreeMap<String, Remote>,
        }
        let d = derive_params(&schema_of::<WithRemotes>()).unwrap();
        assert!(d.params[0].connection_fields.is_empty());
        assert_eq!(
            d.params[0].entry_connection_fields,
            ["base_url", "timeout_s"]
        );
    }

    #[test]
    fn a_flattened_map_opens_the_params() {
        #[derive(Deserialize, JsonSchema)]
        #[allow(dead_code)]
        struct Open {
            run: String,
            #[serde(flatten)]
            extra: serde_json::Map<String, Value>,
        }
        let d = derive_params(&schema_of::<Open>()).unwrap();
        assert!(d.open);
        assert_eq!(d.params.len(), 1);
        assert_eq!(d.params[0].ty, ParamType::String);
    }

    #[test]
    fn exclusive_bounds_and_non_structs() {
        let schema = json!({"type": "number", "exclusiveMinimum": 0});
        let shape = shape_of(&schema, &schema);
        assert_eq!(shape.range.to_string(), "> 0");
        assert!(!shape.range.contains(0.0) && shape.range.contains(1e-9));
        assert!(derive_params(&json!({"type": "integer"})).is_err());
    }

    #[test]
    fn a_default_the_schema_cannot_show_is_an_error_not_a_required_param() {
        #[derive(Deserialize, JsonSchema, Default)]
        #[allow(dead_code)]
        enum NoSerialize {
            #[default]
            A,
        }
        #[derive(Deserialize, JsonSchema)]
        #[allow(dead_code)]
        struct Hidden {
            #[serde(default)]
            quiet: NoSerialize,
        }
        let err = derive_params(&schema_of::<Hidden>()).unwrap_err();
        assert!(err.contains("field `quiet`"), "{err}");
    }
}
