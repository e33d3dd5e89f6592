//! The command kind: environment, outputs, failure reports, and that the command's whole
//! process group dies with the stage (on interrupt, and when the emflow process is killed).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::{child_test, file_input, with_defaults, TestStage};
use emflow_engine::{ArtifactType, Interrupted, StageKind};
use emflow_stages::kinds::command::CommandKind;
use serde_json::{json, Value};

fn stage(params: Value, inputs: Vec<(&str, Vec<emflow_engine::Artifact>)>) -> TestStage {
    TestStage::new(&CommandKind, params, inputs)
}

fn run_err(params: Value) -> String {
    let mut s = stage(params, vec![]);
    format!("{:#}", s.run(&CommandKind).unwrap_err())
}

/// Whether a process is gone (or a zombie nobody has reaped yet: dead all the same).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn command_sees_inputs_outputs_params_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.txt");
    let b = dir.path().join("b.txt");
    std::fs::write(&a, "one\ntwo\n").unwrap();
    std::fs::write(&b, "three\n").unwrap();
    let inputs = vec![
        ("files", vec![file_input(&a), file_input(&b)]),
        ("dirs", vec![file_input(dir.path())]),
    ];
    let params = json!({
        "run": "env | grep -E '^(EMFLOW_|GREETING=|TMPDIR=)' | sort > \"$EMFLOW_OUT_ENV\"\n\
                echo \"PWD=$PWD\" >> \"$EMFLOW_OUT_ENV\"\n\
                echo scratch > relative.txt\n\
                mkdir \"$EMFLOW_OUT_COUNTS\"\n\
                for i in $(seq 0 $((EMFLOW_IN_FILES_COUNT - 1))); do v=EMFLOW_IN_FILES_$i; wc -l < \"${!v}\" > \"$EMFLOW_OUT_COUNTS/$i\"; done\n\
                echo to stdout; echo to stderr >&2",
        "outputs": {"env": "file", "counts": "dir"},
        "env": {"GREETING": "hello", "NUMBER": 3},
        "limit": 5,
        "label": "run one"
    });
    let mut s = stage(params, inputs);
    s.run(&CommandKind).unwrap();

    let staging = std::path::absolute(s.ctx.staging_dir()).unwrap();
    let env = s.output_text("env");
    let expect = [
        format!("EMFLOW_IN_FILES_0={}", a.display()),
        format!("EMFLOW_IN_FILES_1={}", b.display()),
        "EMFLOW_IN_FILES_COUNT=2".to_string(),
        format!("EMFLOW_IN_DIRS={}", dir.path().display()),
        "EMFLOW_IN_DIRS_COUNT=1".to_string(),
        format!("EMFLOW_OUT_ENV={}", staging.join("env").display()),
        format!("EMFLOW_OUT_COUNTS={}", staging.join("counts").display()),
        "EMFLOW_PARAM_LIMIT=5".to_string(),
        "EMFLOW_PARAM_LABEL=run one".to_string(),
        "EMFLOW_STAGE_ID=test_command".to_string(),
        "GREETING=hello".to_string(),
        format!(
            "PWD={}",
            std::path::absolute(s.ctx.scratch_dir()).unwrap().display()
        ),
    ];
    for line in &expect {
        assert!(
            env.lines().any(|l| l == line),
            "missing `{line}` in:\n{env}"
        );
    }
    assert!(
        !env.contains("EMFLOW_IN_FILES="),
        "EMFLOW_IN_FILES is set only for a single input:\n{env}"
    );
    assert_eq!(
        std::fs::read_to_string(s.output("counts").join("0"))
            .unwrap()
            .trim(),
        "2"
    );
    assert_eq!(
        std::fs::read_to_string(s.output("counts").join("1"))
            .unwrap()
            .trim(),
        "1"
    );

    // The relative write went to the scratch folder (cwd, TMPDIR), which lies outside the
    // staging folder: only the declared outputs are there to be committed.
    assert!(s.ctx.scratch_dir().join("relative.txt").is_file());
    let mut left: Vec<String> = std::fs::read_dir(&staging)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["counts", "env"]);

    let log = s.progress.lines();
    assert!(
        log.contains(&"to stdout".to_string()) && log.contains(&"stderr: to stderr".to_string()),
        "{log:?}"
    );
}

#[test]
fn outputs_are_declared_by_the_manifest() {
    let params = with_defaults(
        &CommandKind,
        json!({"run": "true", "outputs": {"report": "dir", "n": "file"}}),
    );
    let outputs: Vec<(String, ArtifactType)> = CommandKind
        .outputs(&params)
        .into_iter()
        .map(|p| (p.name, p.ty))
        .collect();
    assert_eq!(
        outputs,
        [
            ("report".to_string(), ArtifactType::Dir),
            ("n".to_string(), ArtifactType::File)
        ]
    );
}

#[test]
fn failure_reports_exit_code_and_last_stderr_lines() {
    let err = run_err(json!({
        "run": "echo progress; for i in $(seq 1 30); do echo \"problem $i\" >&2; done; exit 3",
        "outputs": {"out": "file"}
    }));
    assert!(err.contains("command failed with exit code 3"), "{err}");
    assert!(
        err.contains("last lines of stderr:\n  problem 11\n") && err.ends_with("  problem 30"),
        "{err}"
    );
    assert!(!err.contains("problem 10\n"), "{err}");
}

#[test]
fn a_failing_pipeline_step_fails_the_stage() {
    let err =
        run_err(json!({"run": "false | cat > \"$EMFLOW_OUT_OUT\"", "outputs": {"out": "file"}}));
    assert!(err.contains("exit code 1"), "{err}");
    let err = run_err(
        json!({"run": "echo \"$NOT_SET_ANYWHERE\" > \"$EMFLOW_OUT_OUT\"", "outputs": {"out": "file"}}),
    );
    assert!(err.contains("NOT_SET_ANYWHERE: unbound variable"), "{err}");
}

#[test]
fn a_missing_or_misshapen_output_is_named() {
    let err = run_err(
        json!({"run": "echo hi > \"$EMFLOW_OUT_A\"", "outputs": {"a": "file", "result": "file"}}),
    );
    assert!(
        err.contains("did not create declared output `result`; write it to $EMFLOW_OUT_RESULT"),
        "{err}"
    );
    let err = run_err(json!({"run": "echo hi > \"$EMFLOW_OUT_TREE\"", "outputs": {"tree": "dir"}}));
    assert!(
        err.contains("output `tree` is declared `dir` but the command wrote a file"),
        "{err}"
    );
    let err =
        run_err(json!({"run": "ln -s /etc/hostname \"$EMFLOW_OUT_F\"", "outputs": {"f": "file"}}));
    assert!(err.contains("output `f` is a symbolic link"), "{err}");
}

#[test]
fn param_mistakes_are_reported_at_their_path() {
    let check = |params: Value| {
        let errors = CommandKind
            .check(&with_defaults(&CommandKind, params))
            .unwrap_err();
        errors.into_iter().map(|e| e.param).collect::<Vec<_>>()
    };
    assert_eq!(check(json!({"run": "true", "outputs": {}})), ["outputs"]);
    assert_eq!(
        check(json!({"run": "true", "outputs": {"x": "folder"}})),
        ["outputs.x"]
    );
    assert_eq!(
        check(json!({"run": "true", "outputs": {"Bad": "file"}})),
        ["outputs.Bad"]
    );
    assert_eq!(
        check(json!({"run": "true", "outputs": {"x": "file"}, "env": {"EMFLOW_X": "1"}})),
        ["env.EMFLOW_X"]
    );
    assert_eq!(
        check(json!({"run": " ", "outputs": {"x": "file"}, "env": {"A": [1]}})),
        ["run", "env.A"]
    );
}

#[test]
fn interrupt_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let mut s = stage(
        json!({
            "run": "sleep 300 & echo $! > \"$EMFLOW_PARAM_PIDFILE\"; sleep 300",
            "outputs": {"out": "file"},
            "pidfile": pidfile.display().to_string()
        }),
        vec![],
    );
    let interrupt = s.interrupt.clone();
    let pidfile_for_thread = pidfile.clone();
    let requester = std::thread::spawn(move || {
        wait_until("the command to start", Duration::from_secs(20), || {
            read_pid(&pidfile_for_thread).is_some()
        });
        interrupt.store(true, Ordering::Relaxed);
    });
    let started = Instant::now();
    let err = s.run(&CommandKind).unwrap_err();
    requester.join().unwrap();
    assert!(err.downcast_ref::<Interrupted>().is_some(), "{err:#}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let pid = read_pid(&pidfile).unwrap();
    wait_until(
        "the background sleep to die",
        Duration::from_secs(5),
        || is_dead(pid),
    );
}

/// Run by `command_dies_with_the_emflow_process` in a child process of the test binary:
/// starts a command that leaves a background process, and blocks.
#[test]
#[ignore = "helper: run by command_dies_with_the_emflow_process in a child process"]
fn command_child_process_for_parent_death() {
    let Some(pidfile) = std::env::var_os("EMFLOW_TEST_PIDFILE") else {
        return;
    };
    let mut s = stage(
        json!({
            "run": "sleep 300 & echo $! > \"$EMFLOW_PARAM_PIDFILE\"; wait",
            "outputs": {"out": "file"},
            "pidfile": Path::new(&pidfile).display().to_string()
        }),
        vec![],
    );
    let _ = s.run(&CommandKind);
}

#[test]
fn command_dies_with_the_emflow_process() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let mut child = child_test("command_run::command_child_process_for_parent_death")
        .env("EMFLOW_TEST_PIDFILE", &pidfile)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the command to start", Duration::from_secs(20), || {
        read_pid(&pidfile).is_some()
    });
    let pid = read_pid(&pidfile).unwrap();
    assert!(!is_dead(pid));
    child.kill().unwrap(); // SIGKILL: no destructor, no signal handler runs in the parent
    child.wait().unwrap();
    wait_until(
        "the orphaned background sleep to die",
        Duration::from_secs(5),
        || is_dead(pid),
    );
}
