//! Every class of manifest mistake is reported at the right line and column, with a hint.

use crate::support::manifest::{
    errors, errors_with, expect_problem, expect_problems, load, options,
};

#[test]
fn yaml_syntax_error_is_located() {
    let errs = errors("emflow: 1\nstages:\n  a:\n    kind: gen\n    params: {n: 1\n  b: 2\n");
    let p = expect_problem(
        &errs,
        "YAML syntax error",
        "m.yaml:6:4",
        "check the indentation",
    );
    assert_eq!(p.labels.len(), 1);
}

#[test]
fn tab_indentation_gets_its_own_hint() {
    let errs = errors("emflow: 1\nstages:\n\ta: 1\n");
    expect_problem(&errs, "YAML syntax error", "m.yaml:3:2", "spaces, not tabs");
}

#[test]
fn unknown_top_level_and_stage_keys_suggest_the_right_one() {
    let src = "emflow: 1\nparms:\n  x: 1\nstages:\n  a:\n    kind: gen\n    parmas: {n: 1}\n";
    expect_problems(
        &errors(src),
        &[
            (
                "unknown top-level key `parms`",
                "m.yaml:2:1",
                "did you mean `params`?",
            ),
            (
                "unknown stage key `parmas`",
                "m.yaml:7:5",
                "did you mean `params`?",
            ),
        ],
    );
}

#[test]
fn unknown_kind_lists_known_kinds_and_suggests_the_closest() {
    let errs = errors("emflow: 1\nstages:\n  a:\n    kind: trian\n");
    let p = expect_problem(
        &errs,
        "unknown stage kind `trian`",
        "m.yaml:4:11",
        "did you mean `train`?",
    );
    assert!(p
        .help
        .as_deref()
        .unwrap()
        .contains("known kinds: `cmd`, `eval`, `gen`, `report`, `train`"));
}

#[test]
fn unknown_param_suggests_a_declared_one_and_open_kinds_accept_anything() {
    let errs = errors(
        "emflow: 1\nstages:\n  a:\n    kind: gen\n    params:\n      n: 1\n      lable: x\n",
    );
    expect_problem(
        &errs,
        "unknown param `lable` for kind `gen`",
        "m.yaml:7:7",
        "did you mean `label`?",
    );
    let ok = load(
        "emflow: 1\nstages:\n  a:\n    kind: cmd\n    params: {run: echo, anything: [1, 2]}\n",
    );
    assert_eq!(
        ok.pipeline.stages[0].params["anything"],
        serde_json::json!([1, 2])
    );
}

#[test]
fn wrong_param_types_are_reported_per_type() {
    let src = "\
emflow: 1
stages:
  a:
    kind: gen
    params:
      n: 1.5
      lr: fast
      mode: quick
      label: 12
      flag: yes
      ops: {take: 1}
";
    let errs = errors(src);
    expect_problems(
        &errs,
        &[
            (
                "param `n` must be an integer, not a float",
                "m.yaml:6:10",
                "rows to make",
            ),
            (
                "param `lr` must be a number, not a string",
                "m.yaml:7:11",
                "a float",
            ),
            (
                "param `mode` must be one of `fast`, `slow`",
                "m.yaml:8:13",
                "use one of `fast`, `slow`",
            ),
            (
                "param `label` must be a string, not an integer",
                "m.yaml:9:14",
                "quote it",
            ),
            (
                "param `flag` must be a boolean, not a string",
                "m.yaml:10:13",
                "a flag",
            ),
            (
                "param `ops` must be a list, not a mapping",
                "m.yaml:11:12",
                "operations",
            ),
        ],
    );
    assert_eq!(errs.problems().len(), 6, "{}", errs.render_plain());
}

#[test]
fn missing_required_param_points_at_params() {
    let cases = [
        (
            "emflow: 1\nstages:\n  a:\n    kind: gen\n    params:\n      lr: 1\n",
            (
                "missing required param `n` of kind `gen`",
                "m.yaml:5:5",
                "add `n: ...`",
            ),
        ),
        (
            "emflow: 1\nstages:\n  a:\n    kind: gen\n",
            (
                "missing required param `n`",
                "m.yaml:3:3",
                "an integer: rows to make",
            ),
        ),
    ];
    for (src, expected) in cases {
        expect_problems(&errors(src), &[expected]);
    }
}

#[test]
fn references_to_missing_things_are_located_and_suggested() {
    let src = "\
emflow: 1
params:
  seed: 0
models:
  base: {source: ./base.gguf}
stages:
  data:
    kind: gen
    params: {n: '${sede}', label: 'run-${seed}-${nope}'}
  train:
    kind: train
    inputs: {data: dta.data, model: models.bsae}
";
    expect_problems(
        &errors(src),
        &[
            // `${sede}` inside quotes: the label points at the reference itself.
            (
                "reference to unknown param `sede`",
                "m.yaml:9:18",
                "did you mean `seed`?",
            ),
            (
                "reference to unknown param `nope`",
                "m.yaml:9:48",
                "top-level `params:`",
            ),
            (
                "reference to unknown stage `dta`",
                "m.yaml:12:20",
                "did you mean `data`?",
            ),
            (
                "reference to unknown model `bsae`",
                "m.yaml:12:37",
                "did you mean `base`?",
            ),
        ],
    );
    let src = "emflow: 1\nstages:\n  data: {kind: gen, params: {n: 1}}\n  t: {kind: train, inputs: {data: data.dat}}\n";
    expect_problems(
        &errors(src),
        &[(
            "stage `data` has no output `dat`",
            "m.yaml:4:35",
            "did you mean `data`?",
        )],
    );
}

#[test]
fn matrix_reference_to_a_missing_axis() {
    let src =
        "emflow: 1\nstages:\n  a:\n    kind: gen\n    matrix: {seed: [1]}\n    params: {n: '${matrix.sed}'}\n";
    let errs = errors(src);
    expect_problem(
        &errs,
        "stage `a` has no matrix axis `sed`",
        "m.yaml:6:18",
        "did you mean `seed`?",
    );
}

#[test]
fn wrong_input_port_and_unwired_required_port() {
    let src = "\
emflow: 1
stages:
  data: {kind: gen, params: {n: 1}}
  t:
    kind: train
    inputs:
      dta: data.data
";
    expect_problems(
        &errors(src),
        &[
            (
                "kind `train` has no input port `dta`",
                "m.yaml:7:7",
                "did you mean `data`?",
            ),
            (
                "required input port `data` of kind `train` is not wired",
                "m.yaml:6:5",
                "messages expected",
            ),
        ],
    );
}

#[test]
fn output_of_the_wrong_type_names_both_types() {
    let src = "\
emflow: 1
stages:
  data: {kind: gen, params: {n: 1}}
  t: {kind: train, inputs: {data: data.data}}
  e: {kind: eval, inputs: {adapter: t.metrics}}
";
    let errs = errors(src);
    let p = expect_problem(
        &errs,
        "input port `adapter` expects adapter artifacts, but `t.metrics` is metrics",
        "m.yaml:5:37",
        "wire an output of type adapter",
    );
    assert_eq!(p.labels[0].text, "metrics here, adapter expected");
}

#[test]
fn a_single_port_fed_several_artifacts() {
    let src = "\
emflow: 1
stages:
  data: {kind: gen, params: {n: 1}}
  more: {kind: gen, params: {n: 2}}
  t:
    kind: train
    inputs: {data: [data.data, more.data]}
  sweep:
    kind: train
    matrix: {seed: [0, 1]}
    inputs: {data: data.data}
    params: {seed: '${matrix.seed}'}
  e: {kind: eval, inputs: {adapter: sweep.adapter}}
";
    expect_problems(
        &errors(src),
        &[
            (
                "input port `data` takes one artifact, but is fed 2",
                "m.yaml:7:20",
                "only many-ports",
            ),
            (
                "input port `adapter` takes one artifact, but its reference matches 2 matrix cells",
                "m.yaml:13:37",
                "select one cell",
            ),
        ],
    );
}

#[test]
fn matrix_expanding_to_nothing() {
    let src = "\
emflow: 1
stages:
  a:
    kind: gen
    matrix: {seed: [], n: [1]}
    params: {n: 1}
  b:
    kind: gen
    matrix:
      n: [1, 2]
      exclude: [{n: 1}, {n: 2}]
    params: {n: '${matrix.n}'}
";
    let errs = errors(src);
    expect_problem(
        &errs,
        "stage `a`: the matrix expands to nothing",
        "m.yaml:5:14",
        "give the axis at least one value",
    );
    let p = expect_problem(
        &errs,
        "stage `b`: the matrix expands to nothing",
        "m.yaml:10:7",
        "at least one cell",
    );
    assert_eq!(p.labels[0].text, "`exclude` removes every cell");
}

#[test]
fn set_on_a_missing_path_says_which_part() {
    let src = "emflow: 1\nparams: {seed: 0}\nstages:\n  data: {kind: gen, params: {n: 1}}\n";
    let cases = [
        (
            "stages.dat.params.n=3",
            (
                "--set: `stages` has no `dat`",
                "--set #1:1:8",
                "did you mean `data`?",
            ),
        ),
        // A value of the wrong type given with --set is shown in the argument.
        (
            "stages.data.params.n=many",
            (
                "param `n` must be an integer, not a string",
                "--set #1:1:22",
                "rows to make",
            ),
        ),
    ];
    for (set, expected) in cases {
        expect_problems(&errors_with(src, &options(None, &[set])), &[expected]);
    }
}

#[test]
fn unknown_profile_lists_the_profiles() {
    let src = "emflow: 1\nparams: {n: 1}\nprofiles:\n  ci: {n: 2}\n  smoke: {n: 3}\nstages:\n  data: {kind: gen, params: {n: '${n}'}}\n";
    let errs = errors_with(src, &options(Some("cj"), &[]));
    let p = expect_problem(
        &errs,
        "unknown profile `cj`",
        "m.yaml:3:1",
        "did you mean `ci`?",
    );
    assert!(p
        .help
        .as_deref()
        .unwrap()
        .contains("profiles in this manifest: `ci`, `smoke`"));
}

#[test]
fn a_profile_setting_an_undeclared_param() {
    let src = "emflow: 1\nparams: {n_train: 1}\nprofiles:\n  ci: {n_trian: 2}\nstages:\n  data: {kind: gen, params: {n: 1}}\n";
    let errs = errors(src);
    expect_problem(
        &errs,
        "profile `ci` sets `n_trian`, which is not a param",
        "m.yaml:4:8",
        "did you mean `n_train`?",
    );
}

#[test]
fn bad_resources_strings() {
    let src = "\
emflow: 1
stages:
  a:
    kind: gen
    params: {n: 1}
    resources: {cpus: 0, memory: 4 gigs, time: 2 hours, gpu: 1}
";
    expect_problems(
        &errors(src),
        &[
            (
                "`cpus` must be a whole number of at least 1",
                "m.yaml:6:23",
                "cpus: 4",
            ),
            ("`memory` is not a size", "m.yaml:6:34", "`512MiB`, `4GiB`"),
            ("`time` is not a duration", "m.yaml:6:48", "`1:30:00`"),
            (
                "unknown resources key `gpu`",
                "m.yaml:6:57",
                "did you mean `gpus`?",
            ),
        ],
    );
}

#[test]
fn a_reference_cycle_between_params_is_printed() {
    let src = "emflow: 1\nparams:\n  a: '${b}'\n  b: 'x-${c}'\n  c: '${a}'\nstages:\n  s: {kind: gen, params: {n: 1, label: '${a}'}}\n";
    let errs = errors(src);
    let p = expect_problem(
        &errs,
        "params reference each other in a cycle: a -> b -> c -> a",
        "m.yaml:5:7",
        "replace one reference",
    );
    assert_eq!(p.labels.len(), 4, "{p:?}");
    // Reported once, and the stage using `a` adds nothing.
    assert_eq!(errs.problems().len(), 1, "{}", errs.render_plain());
}

#[test]
fn a_cycle_between_stages_is_printed() {
    let src = "\
emflow: 1
stages:
  a: {kind: train, inputs: {data: c.data}}
  b: {kind: gen, params: {n: 1}}
  c: {kind: cmd, params: {run: x, outputs: [data]}, inputs: {files: [a.adapter]}}
";
    let errs = errors(src);
    expect_problem(
        &errs,
        "stages depend on each other in a cycle: c -> a -> c",
        "m.yaml:5:70",
        "remove one of these inputs",
    );
}

#[test]
fn kind_check_errors_are_located_by_param_path() {
    let src = "\
emflow: 1
stages:
  a:
    kind: gen
    params:
      n: 1
      ops:
        - take: 3
        - take: -1
";
    let errs = errors(src);
    expect_problem(
        &errs,
        "stage `a`: `take` must not be negative",
        "m.yaml:9:17",
        "use 0 or more",
    );
}

#[test]
fn many_mistakes_are_all_reported_at_once() {
    let src = "\
emflow: 1
stages:
  a: {kind: gen, params: {n: x}}
  b: {kind: nope}
  c: {kind: eval, inputs: {adapter: zz.adapter}}
";
    let errs = errors(src);
    assert_eq!(errs.problems().len(), 3, "{}", errs.render_plain());
    let rendered = errs.render_plain();
    assert!(
        rendered.contains("manifest m.yaml has 3 problems"),
        "{rendered}"
    );
}

#[test]
fn invalid_names_and_duplicate_keys() {
    let cases = [
        (
            "emflow: 1\nstages:\n  Data-Prep: {kind: gen, params: {n: 1}}\n",
            ("invalid stage name `Data-Prep`", "m.yaml:3:3", "`data_prep`"),
        ),
        (
            "emflow: 1\nstages:\n  a: {kind: gen, params: {n: 1}}\n  a: {kind: gen, params: {n: 2}}\n",
            ("key `a` appears twice", "m.yaml:4:3", "remove one of them"),
        ),
    ];
    for (src, expected) in cases {
        expect_problems(&errors(src), &[expected]);
    }
}
