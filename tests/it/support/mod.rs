//! Fixtures shared by the end-to-end tests, which drive the real `emflow` binary in child
//! processes: the command itself, its output as text, scratch folders and polling.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The `emflow` binary Cargo built for these tests, blind to the user's `EMFLOW_HOME`.
pub fn emflow() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_emflow"));
    cmd.env_remove("EMFLOW_HOME");
    cmd
}

/// `emflow` started in `dir`, where a test keeps its manifest.
pub fn emflow_in(dir: &Path) -> Command {
    let mut cmd = emflow();
    cmd.current_dir(dir);
    cmd
}

/// `emflow --store STORE` started at the repository root, for the shipped manifests.
pub fn emflow_in_repo(store: &Path) -> Command {
    let mut cmd = emflow_in(Path::new(env!("CARGO_MANIFEST_DIR")));
    cmd.arg("--store").arg(store);
    cmd
}

/// The paper's data as an absolute path (the commands run from the repository root) and
/// `data_root=` it for `--set`, or `None` when it is missing (the test skips, saying why; in
/// CI it fails).
pub fn paper_data_root() -> Option<(PathBuf, String)> {
    let data = std::path::absolute(emflow_model::testing::paper_data()?).unwrap();
    let set = format!("data_root={}", data.display());
    Some((data, set))
}

/// What a test of `manifests/paper.yaml`'s `paper` profile on the paper's data starts from:
/// a fresh store, the data, and the arguments that name both.
pub struct PaperProfile {
    pub store: tempfile::TempDir,
    /// The paper's data (absolute).
    pub data: PathBuf,
    /// `data_root=DATA`, for `--set`.
    set: String,
}

impl PaperProfile {
    /// `None` when the paper's data is missing (the test skips; see [`paper_data_root`]).
    pub fn new() -> Option<PaperProfile> {
        let (data, set) = paper_data_root()?;
        let store = tempfile::tempdir().unwrap();
        Some(PaperProfile { store, data, set })
    }

    /// The arguments after the command: `manifests/paper.yaml --profile paper --set
    /// data_root=DATA`.
    pub fn args(&self) -> [&str; 5] {
        [
            "manifests/paper.yaml",
            "--profile",
            "paper",
            "--set",
            &self.set,
        ]
    }
}

/// Runs `cmd` to its end.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Runs `cmd`, fails the test (showing what it said) unless it succeeds, and returns its
/// stdout and stderr as text.
pub fn succeed(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    text(&out)
}

/// Runs `cmd`, fails the test (showing stdout and stderr) unless it succeeds, and returns its
/// stdout as text.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stdout, then stderr, as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An empty folder `emflow-it-NAME-PID` in the system's temporary folder, removed when the
/// test passes (the guard drops outside a panic) and kept after a failure for a look. The
/// names carry the PID, so before this guard every run left its folders behind for good.
/// `name` is unique among the tests of this binary.
pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("emflow-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// A [`scratch`] folder: a path that removes itself when dropped outside a panic.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for a look: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Writes `text` as `m.yaml` in `dir`, the manifest the tests' commands name.
pub fn write_manifest(dir: &Path, text: &str) {
    std::fs::write(dir.join("m.yaml"), text).unwrap();
}

/// A [`scratch`] folder holding `manifest` as `m.yaml`.
pub fn scratch_with_manifest(name: &str, manifest: &str) -> Scratch {
    let dir = scratch(name);
    write_manifest(&dir, manifest);
    dir
}

/// Starts `cmd`, its output piped when `capture` (else discarded), and waits (up to a
/// minute) until `started` holds: a driver in the middle of a stage, named `stage` in the
/// timeout message.
pub fn start_and_wait_for(
    cmd: &mut Command,
    stage: &str,
    capture: bool,
    started: impl FnMut() -> bool,
) -> std::process::Child {
    let stdio = || {
        if capture {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        }
    };
    let child = cmd
        .stdout(stdio())
        .stderr(stdio())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    wait_for(
        &format!("the {stage} stage to start"),
        Duration::from_secs(60),
        started,
    );
    child
}

/// [`start_and_wait_for`], then SIGKILL and reap it: a driver killed in the middle of a stage.
pub fn kill_when_started(cmd: &mut Command, stage: &str, started: impl FnMut() -> bool) {
    let mut child = start_and_wait_for(cmd, stage, false, started);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// Polls `ready` (after 20 ms, then less often, up to every 200 ms: some checks start
/// processes); fails the test naming `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let clock = Instant::now();
    let mut pause = Duration::from_millis(20);
    while !ready() {
        assert!(clock.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
