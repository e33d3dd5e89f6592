//! Hostile or broken manifests fail fast with a located error instead of exhausting memory,
//! the stack or time; values no run could honour are refused at plan time.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use crate::support::manifest::{errors, expect_problem, load, load_with, registry};
use emflow_engine::expand::{load_pipeline, read_manifest, LoadOptions};
use emflow_engine::manifest::yaml::{MAX_ALIAS_BYTES, MAX_ALIAS_NODES, MAX_DEPTH, MAX_TEXT_BYTES};

/// The classic "billion laughs": nine levels of nine aliases each, half a kilobyte, which
/// would expand to 9^9 (387 million) strings.
fn billion_laughs() -> String {
    let lol = ["\"lol\""; 9].join(", ");
    let mut s = format!("emflow: 1\nparams:\n  a: &a [{lol}]\n");
    for (prev, name) in "abcdefgh".chars().zip("bcdefghi".chars()) {
        let items = vec![format!("*{prev}"); 9].join(", ");
        let _ = writeln!(s, "  {name}: &{name} [{items}]");
    }
    s.push_str("stages:\n  s: {kind: gen, params: {n: 1}}\n");
    s
}

#[test]
fn a_billion_laughs_stops_at_the_alias_that_crosses_the_budget() {
    let src = billion_laughs();
    assert!(src.len() < 1100, "{} bytes", src.len());
    let started = Instant::now();
    let errs = errors(&src);
    let took = started.elapsed();
    println!("billion laughs ({} bytes) refused in {took:?}", src.len());
    // Levels b..e copy 74,718 values; each `*e` in `f` copies 66,430 more, so the third
    // crosses 250,000. The error points at it: line 8, `  f: &f [*e, *e, *e` (column 18).
    assert_eq!(MAX_ALIAS_NODES, 250_000);
    let p = expect_problem(
        &errs,
        "aliases in this manifest copy more than 250000 values or 4 MiB of text",
        "m.yaml:8:18",
        "billion laughs",
    );
    assert_eq!(errs.problems().len(), 1, "{}", errs.render_plain());
    assert!(
        p.labels[0].text.contains("66430 more values"),
        "{:?}",
        p.labels
    );
    // A sanity bound only: the work is bounded by the budget, not by this figure.
    assert!(took.as_secs() < 20, "took {took:?}");
}

#[test]
fn aliases_that_copy_much_text_in_few_values_stop_too() {
    // Few values, long strings: 5 levels of 9 aliases copy 9^5 = 59,049 strings of 400 bytes.
    let long = "x".repeat(400);
    let mut src = format!("emflow: 1\nparams:\n  a: &a \"{long}\"\n");
    for (prev, name) in "abcde".chars().zip("bcdef".chars()) {
        let items = vec![format!("*{prev}"); 9].join(", ");
        let _ = writeln!(src, "  {name}: &{name} [{items}]");
    }
    src.push_str("stages:\n  s: {kind: gen, params: {n: 1}}\n");
    assert!(src.len() < 1000, "{} bytes", src.len());
    assert_eq!(MAX_ALIAS_BYTES, 4 << 20);
    // b..d copy 327,600 bytes, the nine `*d` in `e` 2,624,400 more (2,952,000 in all, under
    // 4 MiB), and the first `*e` in `f` would copy another 2,624,400: it crosses.
    let errs = errors(&src);
    let p = expect_problem(&errs, "4 MiB of text", "m.yaml:8:10", "billion laughs");
    assert!(
        p.labels[0].text.contains("2624400 bytes of text"),
        "{:?}",
        p.labels
    );
}

#[test]
fn references_that_double_at_each_step_stop_at_the_copy_budget() {
    // Text: `p1: "${p0}${p0}"`, `p2: "${p1}${p1}"`, ... 40 steps would make 3 TiB. The copies
    // reach 12,582,906 bytes through p21; p22's first reference (+6,291,456) crosses 16 MiB.
    let mut src = String::from("emflow: 1\nparams:\n  p0: lol\n");
    for k in 1..40 {
        let _ = writeln!(src, "  p{k}: \"${{p{}}}${{p{}}}\"", k - 1, k - 1);
    }
    src.push_str("stages:\n  s: {kind: gen, params: {n: 1, label: '${p39}'}}\n");
    assert!(src.len() < 1100, "{} bytes", src.len());
    let started = Instant::now();
    let errs = errors(&src);
    println!("text reference bomb refused in {:?}", started.elapsed());
    expect_problem(
        &errs,
        "references in this manifest copy more than 500000 values or 16 MiB of text",
        "m.yaml:25:9",
        "refer to large values fewer times",
    );
    assert_eq!(errs.problems().len(), 1, "{}", errs.render_plain());

    // Values: `p1: ["${p0}", "${p0}"]` doubles a list. p_k has 3 * 2^k - 1 values; the copies
    // reach 393,178 through p16, and p17's first reference (+196,607) crosses 500,000.
    let mut src = String::from("emflow: 1\nparams:\n  p0: [1]\n");
    for k in 1..40 {
        let _ = writeln!(src, "  p{k}: [\"${{p{}}}\", \"${{p{}}}\"]", k - 1, k - 1);
    }
    src.push_str("stages:\n  s: {kind: gen, params: {n: 1, extra: '${p39}'}}\n");
    let errs = errors(&src);
    expect_problem(
        &errs,
        "references in this manifest copy more than 500000 values",
        "m.yaml:20:10",
        "refer to large values fewer times",
    );
    assert_eq!(errs.problems().len(), 1, "{}", errs.render_plain());
}

#[test]
fn aliases_below_the_budget_still_expand() {
    // Levels a..d: 8,290 values copied, well inside the budget.
    let src = billion_laughs()
        .lines()
        .filter(|l| {
            !["  e:", "  f:", "  g:", "  h:", "  i:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let l = load(&src);
    assert_eq!(l.pipeline.stages.len(), 1);
}

#[test]
fn nesting_deeper_than_the_limit_is_located_at_the_level_that_crosses_it() {
    assert_eq!(MAX_DEPTH, 128);
    // The top-level mapping and `params:` are two levels; the 127th `[` is the 129th level.
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let src =
        format!("emflow: 1\nparams:\n  x: {deep}\nstages:\n  s: {{kind: gen, params: {{n: 1}}}}\n");
    let errs = errors(&src);
    expect_problem(
        &errs,
        "lists and mappings nest 129 deep here; the limit is 128",
        "m.yaml:3:132",
        "almost always generated by mistake",
    );
    // Exactly at the limit is fine.
    let ok = format!("{}1{}", "[".repeat(126), "]".repeat(126));
    let src =
        format!("emflow: 1\nparams:\n  x: {ok}\nstages:\n  s: {{kind: gen, params: {{n: 1}}}}\n");
    load(&src);
}

#[test]
fn an_alias_that_copies_a_deep_value_deeper_is_located_at_the_alias() {
    // The anchored value is 100 levels deep; copied 40 levels down it would reach 142.
    let anchored = format!("&deep {}1{}", "[".repeat(100), "]".repeat(100));
    let host = format!("{}*deep{}", "[".repeat(40), "]".repeat(40));
    let src = format!(
        "emflow: 1\nparams:\n  a: {anchored}\n  b: {host}\nstages:\n  s: {{kind: gen, params: {{n: 1}}}}\n"
    );
    let errs = errors(&src);
    expect_problem(
        &errs,
        "nest 142 deep here; the limit is 128",
        "m.yaml:4:46",
        "an alias copies",
    );
}

#[test]
fn a_manifest_over_the_size_limit_is_refused_where_the_limit_is_crossed() {
    // 17 MiB of comment lines after a valid start.
    let line = format!("# {}\n", "x".repeat(1021));
    let mut src = String::from("emflow: 1\nstages:\n  s: {kind: gen, params: {n: 1}}\n");
    while src.len() <= MAX_TEXT_BYTES + (1 << 20) {
        src.push_str(&line);
    }
    let errs = errors(&src);
    let before = &src[..MAX_TEXT_BYTES];
    let line = before.matches('\n').count() + 1;
    let col = MAX_TEXT_BYTES - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let p = expect_problem(
        &errs,
        "manifests are limited to 16 MiB",
        &format!("m.yaml:{line}:{col}"),
        "keep large lists and texts in files",
    );
    assert_eq!(p.span().map(|s| s.offset), Some(MAX_TEXT_BYTES));

    // From a file, only the first 16 MiB (and one byte) are read.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    std::fs::write(&path, &src).unwrap();
    let errs = read_manifest(&path).unwrap_err();
    let p = &errs.problems()[0];
    assert!(
        p.message
            .contains(&format!("this text is {} bytes", src.len())),
        "{}",
        p.message
    );
    assert_eq!(p.span().map(|s| s.offset), Some(MAX_TEXT_BYTES));
}

#[test]
fn a_manifest_that_is_not_utf8_names_the_byte_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.yaml");
    // `café` in Latin-1: 0xe9 at line 3, column 13, byte 30.
    let mut bytes = b"emflow: 1\nparams:\n  label: caf".to_vec();
    bytes.push(0xe9);
    bytes.extend_from_slice(b"\nstages:\n  s: {kind: gen, params: {n: 1}}\n");
    std::fs::write(&path, &bytes).unwrap();
    let errs = match load_pipeline(&path, &LoadOptions::default(), &registry()) {
        Ok(_) => panic!("a Latin-1 manifest loaded"),
        Err(e) => e,
    };
    let at = format!("{}:3:13", path.display());
    let p = expect_problem(
        &errs,
        "not UTF-8 text: byte 0xe9 at line 3, column 13 (byte offset 30)",
        &at,
        "re-save the file as UTF-8",
    );
    assert_eq!(p.span().map(|s| s.offset), Some(30));
    assert_eq!(bytes[30], 0xe9);
}

#[test]
fn a_manifest_without_the_format_line_says_how_to_add_it() {
    let errs = errors("# a comment first\nstages:\n  s: {kind: gen, params: {n: 1}}\n");
    expect_problem(
        &errs,
        "the manifest has no `emflow:` format line",
        "m.yaml:2:1",
        "add `emflow: 1` as the first line",
    );
    assert_eq!(errs.problems().len(), 1, "{}", errs.render_plain());
    // A wrong version is its own error, at the value.
    let errs = errors("emflow: 2\nstages:\n  s: {kind: gen, params: {n: 1}}\n");
    expect_problem(
        &errs,
        "unsupported manifest format version 2",
        "m.yaml:1:9",
        "`emflow: 1`",
    );
}

#[test]
fn a_memory_request_no_machine_has_is_refused_at_the_value() {
    let src = "emflow: 1\nstages:\n  s:\n    kind: gen\n    params: {n: 1}\n    resources: {memory: 900TiB}\n";
    let errs = errors(src);
    expect_problem(
        &errs,
        "`memory` asks for 921600 GiB, more than any one machine has",
        "m.yaml:6:25",
        "needs on one machine, e.g. `memory: 64GiB`",
    );
    // Large but real requests plan.
    load("emflow: 1\nstages:\n  s:\n    kind: gen\n    params: {n: 1}\n    resources: {memory: 2TiB}\n");
}

/// `n` top-level params, one of them referenced by the only stage, and a profile `half`
/// that overrides every other one.
fn many_params(n: usize) -> String {
    let mut s = String::from("emflow: 1\nparams:\n");
    for i in 0..n {
        let _ = writeln!(s, "  p{i}: {i}");
    }
    let _ = writeln!(s, "  last: '${{p{}}}'", n - 1);
    s.push_str("profiles:\n  half:\n");
    for i in (1..n).step_by(2) {
        let _ = writeln!(s, "    p{i}: {}", i + 1);
    }
    s.push_str("stages:\n  s: {kind: gen, params: {n: '${last}'}}\n");
    s
}

#[test]
fn fifty_thousand_params_plan_in_linear_time() {
    let src = many_params(50_000);
    let started = Instant::now();
    let l = load(&src);
    println!("50,000 params planned in {:?}", started.elapsed());
    assert_eq!(l.pipeline.stages[0].params["n"], serde_json::json!(49_999));
    let started = Instant::now();
    let opts = LoadOptions {
        profile: Some("half".into()),
        sets: vec![],
    };
    let l = load_with(&src, &opts).unwrap_or_else(|e| panic!("{}", e.render_plain()));
    println!(
        "50,000 params with a profile of 25,000 planned in {:?}",
        started.elapsed()
    );
    assert_eq!(l.pipeline.stages[0].params["n"], serde_json::json!(50_000));
    // Not asserted (debug builds on shared machines are noisy): printed for comparison.
    for n in [25_000, 100_000] {
        let src = many_params(n);
        let started = Instant::now();
        load(&src);
        println!("{n} params planned in {:?}", started.elapsed());
    }
}

#[test]
fn read_manifest_of_a_missing_file_says_so() {
    let errs = read_manifest(Path::new("/nonexistent/m.yaml")).unwrap_err();
    assert!(errs.problems()[0].message.contains("cannot read manifest"));
}
