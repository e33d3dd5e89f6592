//! Values of this crate's kinds that no run could honour are refused when the manifest is
//! planned, at the value's line and column, instead of after the model and data are loaded.

use std::path::Path;

use emflow_engine::diagnostics::ManifestErrors;
use emflow_engine::expand::{load_manifest_str, LoadOptions};

const HEAD: &str = "\
emflow: 1
models:
  base: {source: ./model.gguf}
stages:
";

/// Loads `HEAD` + `stages` as if from `path` (relative `file:` inputs are read next to it).
fn load_at(path: &Path, stages: &str) -> Result<(), ManifestErrors> {
    let src = format!("{HEAD}{stages}");
    load_manifest_str(
        &src,
        path,
        &LoadOptions::default(),
        &emflow_stages::registry(),
    )
    .map(|_| ())
}

fn load(stages: &str) -> Result<(), ManifestErrors> {
    load_at(Path::new("m.yaml"), stages)
}

/// The problems as `location: message`, for comparison.
fn problems_at(path: &Path, stages: &str) -> Vec<String> {
    match load_at(path, stages) {
        Ok(()) => panic!("expected the manifest to fail:\n{stages}"),
        Err(e) => e
            .problems()
            .iter()
            .map(|p| format!("{}: {}", e.location(p).unwrap_or_default(), p.message))
            .collect(),
    }
}

fn problems(stages: &str) -> Vec<String> {
    problems_at(Path::new("m.yaml"), stages)
}

#[test]
fn zero_steps_or_epochs_are_refused_at_the_value() {
    // The bounds are the `range(min = 1)` of the kinds' structs, checked by the engine.
    let sft = r#"  a:
    kind: sft
    inputs: {model: models.base, data: file:d.jsonl}
    params: {max_steps: 0}
"#;
    assert_eq!(
        problems(sft),
        ["m.yaml:8:25: stage `a`: param `max_steps` must be >= 1, not 0"]
    );
    let rl = r#"  r:
    kind: rl
    inputs: {model: models.base, prompts: file:p.jsonl}
    params:
      reward: {type: keyword, keywords: [x]}
      epochs: 0
      max_steps: -3
"#;
    assert_eq!(
        problems(rl),
        [
            "m.yaml:10:15: stage `r`: param `epochs` must be >= 1, not 0",
            "m.yaml:11:18: stage `r`: param `max_steps` must be >= 1, not -3",
        ]
    );
    // A text where a number belongs is located too, not reported against the whole stage.
    let text = sft.replace("max_steps: 0", "max_steps: ten");
    assert_eq!(
        problems(&text),
        ["m.yaml:8:25: stage `a`: param `max_steps` must be an integer, not a string"]
    );
}

#[test]
fn positive_steps_and_no_steps_plan() {
    for params in ["{max_steps: 1}", "{max_steps: null}", "{epochs: 2}"] {
        let sft = format!(
            "  a:\n    kind: sft\n    inputs: {{model: models.base, data: file:d.jsonl}}\n    params: {params}\n"
        );
        if let Err(e) = load(&sft) {
            panic!("{params}:\n{}", e.render_plain());
        }
    }
}

#[test]
fn take_skip_and_sample_beyond_a_file_source_are_refused_at_the_number() {
    let dir = tempfile::tempdir().unwrap();
    let row = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
    // Three rows; the blank line is not a row.
    std::fs::write(
        dir.path().join("d.jsonl"),
        format!("{row}\n{row}\n\n{row}\n"),
    )
    .unwrap();
    let path = dir.path().join("m.yaml");
    let at = |line_col: &str| format!("{}:{line_col}", path.display());
    let stage = |source: &str, ops: &str| {
        format!("  d:\n    kind: dataset\n    inputs: {{source: {source}}}\n    params:\n      ops: {ops}\n")
    };
    let file = "file:d.jsonl";
    assert_eq!(
        problems_at(&path, &stage(file, "[{shuffle: {seed: 0}}, {take: 5}]")),
        [format!(
            "{}: stage `d`: ops.1 (take) needs 5 rows but only 3 reach it",
            at("9:42")
        )]
    );
    assert_eq!(
        problems_at(&path, &stage(file, "[{skip: 1}, {take: 3}]")),
        [format!(
            "{}: stage `d`: ops.1 (take) needs 3 rows but only 2 reach it",
            at("9:31")
        )]
    );
    assert_eq!(
        problems_at(&path, &stage(file, "[{sample: {n: 4, seed: 1}}]")),
        [format!(
            "{}: stage `d`: ops.0 (sample) needs 4 rows but only 3 reach it",
            at("9:26")
        )]
    );
    let two = format!("[{file}, {file}]");
    assert_eq!(
        problems_at(&path, &stage(&two, "[{skip: 7}]")),
        [format!(
            "{}: stage `d`: ops.0 (skip) needs 7 rows but only 6 reach it",
            at("9:20")
        )]
    );
    // What the counts allow, or cannot tell, plans: the run checks the rest.
    for (source, ops) in [
        (file, "[{skip: 1}, {take: 2}]"),
        (file, "[{take: 3}, {sample: {n: 3, seed: 0}}]"),
        // After a filter the count is unknown.
        (
            file,
            "[{filter: {field: id, contains: x, if_missing: keep}}, {take: 5}]",
        ),
        // A missing file is the run's to report.
        ("file:missing.jsonl", "[{take: 5}]"),
        // So is a source made by another stage.
        ("[file:d.jsonl, e.data]", "[{take: 5}]"),
    ] {
        let stages = format!(
            "{}  e:\n    kind: dataset\n    inputs: {{source: file:d.jsonl}}\n",
            stage(source, ops)
        );
        if let Err(e) = load_at(&path, &stages) {
            panic!("{source} {ops}:\n{}", e.render_plain());
        }
    }
}
