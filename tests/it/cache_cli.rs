//! `emflow cache` for scripts: `ls --json` and `show --json` print pure JSON on stdout, a
//! record is found by stage instance id, by stage name or by key prefix, and `cache path`
//! prints one output's path for a shell.

use std::path::Path;
use std::process::Output;

use crate::support::{emflow_in, output, text, write_manifest};

fn emflow(dir: &Path, args: &[&str]) -> Output {
    output(
        emflow_in(dir)
            .arg("--store")
            .arg(dir.join("store"))
            .args(args),
    )
}

/// stdout alone: these commands print pure JSON or a path there.
fn stdout_ok(dir: &Path, args: &[&str]) -> String {
    let out = emflow(dir, args);
    assert!(out.status.success(), "emflow {args:?}:\n{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

const MANIFEST: &str = r#"emflow: 1
name: cache-cli
stages:
  greet:
    kind: command
    matrix: {who: [ada, bob]}
    params:
      run: 'echo "hello ${matrix.who}" > "$EMFLOW_OUT_OUT"'
      outputs: {out: file}
  both:
    kind: command
    inputs:
      files: [greet.out]
    params:
      run: 'cat "$EMFLOW_IN_FILES_0" "$EMFLOW_IN_FILES_1" > "$EMFLOW_OUT_ALL"'
      outputs: {all: file}
"#;

#[test]
fn cache_commands_give_scripts_json_records_and_paths() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write_manifest(dir, MANIFEST);
    stdout_ok(dir, &["run", "m.yaml"]);

    let all: serde_json::Value =
        serde_json::from_str(&stdout_ok(dir, &["cache", "ls", "--json"])).unwrap();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    let both = all.iter().find(|r| r["stage_id"] == "both").unwrap();
    let path = both["outputs"]["all"]["path"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(path).unwrap(),
        "hello ada\nhello bob\n"
    );

    // By instance id, by a stage name with one instance, by key prefix: the same record.
    let cell: serde_json::Value = serde_json::from_str(&stdout_ok(
        dir,
        &["cache", "show", "greet[who=bob]", "--json"],
    ))
    .unwrap();
    assert_eq!(cell["stage_id"], "greet[who=bob]");
    let key = both["key"].as_str().unwrap();
    for what in ["both", &key[..10]] {
        let one: serde_json::Value =
            serde_json::from_str(&stdout_ok(dir, &["cache", "show", what, "--json"])).unwrap();
        assert_eq!(one["key"], key, "looked up by {what}");
    }
    assert_eq!(
        stdout_ok(dir, &["cache", "path", "both", "all"]).trim(),
        path
    );

    // A name with several instances, or an unknown output, is an error that says what to do.
    let several = emflow(dir, &["cache", "show", "greet"]);
    assert!(!several.status.success());
    let said = String::from_utf8_lossy(&several.stderr);
    assert!(
        said.contains("greet[who=ada]") && said.contains("name one"),
        "{said}"
    );
    let wrong = emflow(dir, &["cache", "path", "both", "nope"]);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("its outputs: all"));
}

/// `emflow cache` has no manifest to find the store next to, so it reads `./.emflow`. Where
/// there is none (the quickstart's store is `manifests/.emflow`), it says so and names the
/// stores below, instead of creating an empty store and listing nothing.
#[test]
fn cache_commands_name_the_store_below_instead_of_creating_an_empty_one() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let sub = dir.join("manifests");
    std::fs::create_dir(&sub).unwrap();
    write_manifest(&sub, MANIFEST);
    let ran = output(emflow_in(dir).args(["run", "manifests/m.yaml"]));
    assert!(ran.status.success(), "{}", text(&ran));

    let ls = output(emflow_in(dir).args(["cache", "ls", "--json"]));
    assert!(!ls.status.success(), "{}", text(&ls));
    assert!(ls.stdout.is_empty(), "{}", text(&ls));
    let said = String::from_utf8_lossy(&ls.stderr);
    assert!(
        said.contains("no emflow store at") && said.contains("pass --store manifests/.emflow"),
        "{said}"
    );
    assert!(!dir.join(".emflow").exists(), "an empty store was created");

    let named =
        output(emflow_in(dir).args(["--store", "manifests/.emflow", "cache", "ls", "--json"]));
    assert!(named.status.success(), "{}", text(&named));
    let all: serde_json::Value = serde_json::from_slice(&named.stdout).unwrap();
    assert_eq!(all.as_array().map(Vec::len), Some(3), "{all}");
}
