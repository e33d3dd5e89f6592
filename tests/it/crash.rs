//! `kill -9` of a running `emflow run` in the middle of a `command` stage, then a rerun:
//! it completes with correct outputs and nothing to clean by hand. Also: a fully cached
//! rerun runs nothing and says so for every stage. Drives the real binary (and so the
//! `exec-stage` child-process executor).

use std::path::Path;
use std::process::Output;

use crate::support::{
    emflow_in, kill_when_started, output, scratch, start_and_wait_for, write_manifest,
};

fn emflow(dir: &Path, args: &[&str]) -> Output {
    output(emflow_in(dir).args(args))
}

const MANIFEST: &str = r#"
emflow: 1
name: crash
stages:
  slow:
    kind: command
    params:
      run: 'echo started > "$EMFLOW_PARAM_MARKER"; sleep 2; echo done > "$EMFLOW_OUT_OUT"'
      outputs: {out: file}
      marker: MARKER_PATH
  after:
    kind: command
    inputs:
      files: [slow.out]
    params:
      run: 'tr a-z A-Z < "$EMFLOW_IN_FILES" > "$EMFLOW_OUT_LOUD"'
      outputs: {loud: file}
"#;

#[test]
fn kill_dash_nine_mid_stage_then_rerun_completes() {
    let dir = scratch("crash-kill");
    let marker = dir.join("started.txt");
    write_manifest(
        &dir,
        &MANIFEST.replace("MARKER_PATH", &marker.display().to_string()),
    );
    kill_when_started(emflow_in(&dir).args(["run", "m.yaml"]), "slow", || {
        marker.exists()
    });

    let out = emflow(&dir, &["run", "m.yaml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rerun failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("PASS  slow") && text.contains("PASS  after"),
        "{text}"
    );

    let cached = emflow(&dir, &["run", "m.yaml"]);
    let text = String::from_utf8_lossy(&cached.stdout);
    assert!(
        text.contains("CACHED  slow") && text.contains("CACHED  after"),
        "{text}"
    );
    assert!(
        text.contains("nothing to do: all 2 stages cached"),
        "{text}"
    );

    let show = emflow(&dir, &["graph", "m.yaml", "--format", "json"]);
    let graph = String::from_utf8_lossy(&show.stdout);
    assert_eq!(
        graph.matches("\"status\": \"cached\"").count(),
        2,
        "{graph}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ctrl-C (SIGINT to `emflow run`) mid-stage: the footer says the run was interrupted and in
/// which stage, and the exit status is 130, as a shell reports an interrupted command.
#[test]
fn ctrl_c_mid_stage_names_the_stage_and_exits_130() {
    let dir = scratch("crash-ctrl-c");
    let marker = dir.join("started.txt");
    let manifest = MANIFEST
        .replace("MARKER_PATH", &marker.display().to_string())
        .replace("sleep 2", "sleep 60");
    write_manifest(&dir, &manifest);
    let child = start_and_wait_for(
        emflow_in(&dir).args(["run", "m.yaml"]),
        "slow",
        true,
        || marker.exists(),
    );
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{text}");
    assert!(text.contains("STOPPED  slow"), "{text}");
    assert!(
        text.contains("the run was interrupted during slow; exit status 130"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
