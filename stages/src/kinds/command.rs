//! `command`: runs a shell command whose declared outputs are captured into the store.
//!
//! ```yaml
//! count_lines:
//!   kind: command
//!   inputs:
//!     files: [sft_medical.data, sft_legal.data]
//!   params:
//!     run: |
//!       for i in $(seq 0 $((EMFLOW_IN_FILES_COUNT - 1))); do
//!         wc -l < "$(printenv "EMFLOW_IN_FILES_$i")"
//!       done > "$EMFLOW_OUT_COUNTS"
//!     outputs: {counts: file}
//!     env: {LC_ALL: C}
//! ```
//!
//! The escape hatch for anything no kind does. Input ports are fixed in a kind's spec, so the
//! kind has two many-ports, `files` (any files) and `dirs` (any directories); outputs are
//! declared in the manifest (`outputs: {name: file|dir}`) and become the stage's outputs.
//!
//! The command runs under `bash -euo pipefail -c RUN` (a failing step fails the stage, as in
//! Snakemake), with stdin closed and the working directory set to the stage's private scratch
//! folder ([`StageContext::scratch_dir`]), so relative writes land in a place the engine
//! empties afterwards and never commits.
//! Environment: the inherited one plus
//! - `EMFLOW_IN_FILES_COUNT`, `EMFLOW_IN_FILES_0`, `EMFLOW_IN_FILES_1`, ... (absolute paths,
//!   in wiring order; `EMFLOW_IN_FILES` too when exactly one is wired), same for `DIRS`;
//! - `EMFLOW_OUT_<NAME>` for each declared output: the path to create (not created in advance);
//! - `EMFLOW_STAGE_ID`, `TMPDIR` (inside the scratch folder);
//! - `EMFLOW_CHECKPOINT_DIR`: a folder private to this stage key that survives an
//!   interruption and is removed once the stage commits (see "Long commands" below);
//! - `EMFLOW_PARAM_<NAME>` for each extra param (text as is, other values as JSON): the safe way
//!   to pass values into the command without quoting them into shell code;
//! - the `env` map.
//!
//! In a manifest, `${...}` inside `run` is emflow's own param reference, resolved before the
//! shell sees it: write `$NAME` (no braces) for shell variables, or `$${` for a literal `${`.
//!
//! Each line of stdout and stderr goes to the stage's log. A non-zero exit fails the stage
//! with the exit code and the last lines of stderr; a declared output that is missing, of the
//! wrong shape or a symbolic link fails it too.
//!
//! Long commands can checkpoint. When the engine asks the stage to stop (under Slurm: the
//! `--signal` warning before the time limit; locally: Ctrl-C), the command's shell gets
//! SIGUSR2. A command that traps it, saves its progress under `$EMFLOW_CHECKPOINT_DIR` and
//! exits with code 75 (EX_TEMPFAIL, "run me again") is requeued by the Slurm executor and finds
//! its progress there on the next attempt. A command that does not trap USR2 dies of it; one
//! that still runs [`STOP_GRACE`] after the request is killed. Exiting 0 instead (it finished
//! anyway) commits as usual.
//!
//! The command dies with the stage. It runs in its own process group; the group is killed
//! when the command finishes (no stray background processes keep writing), when the engine
//! asks the stage to stop, and when the emflow process dies, even by `kill -9`: the shell
//! that leads the group is told by the kernel (`PR_SET_PDEATHSIG`) and kills the group.
//! (The kernel sends that signal when the *thread* that spawned the shell exits; `run` blocks
//! that thread until the shell is gone, so the two coincide.)

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use emflow_engine::kind::ParamError;
use emflow_engine::{ArtifactType, Interrupted, Kind, KindInfo, PortSpec, Progress, StageContext};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The `command` stage kind.
pub struct CommandKind;

/// The `command` kind's params (the engine derives the kind's spec from this struct). The
/// kind is open: any param it does not name is a template variable, collected in `extra`
/// (the flattened map is what makes the derived spec accept names it does not declare).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
pub struct CommandParams {
    /// the command, run by `bash -euo pipefail -c`; paths in $EMFLOW_IN_*/$EMFLOW_OUT_*
    run: String,
    /// declared outputs, name -> file|dir; the command writes each at $EMFLOW_OUT_<NAME>
    // A map rather than a map of an enum: `check` reports a bad entry at `outputs.NAME`.
    outputs: Map<String, Value>,
    /// extra environment variables (values: text, numbers or booleans)
    #[serde(default)]
    env: Map<String, Value>,
    /// Every other param, passed to the command as `EMFLOW_PARAM_<NAME>`.
    #[serde(flatten)]
    extra: Map<String, Value>,
}
/// Input ports; both take any number of artifacts.
const PORTS: &[(&str, ArtifactType)] =
    &[("files", ArtifactType::File), ("dirs", ArtifactType::Dir)];
/// Lines of stdout and of stderr kept for the error message of a failed command.
const TAIL_LINES: usize = 20;

/// The shell that leads the command's process group. It runs the user's command as a child
/// so that it can still act when the kernel signals the death of emflow: on TERM (sent by
/// `PR_SET_PDEATHSIG`), INT or HUP it kills the whole group, itself included. Started through
/// `setpriv`, it first checks that emflow did not die before the death signal was armed.
/// USR2 (the engine's stop request) is forwarded to the command; `wait` returns early when a
/// trapped signal arrives, so the leader waits again until the command is gone, then once more
/// for its status (bash keeps it).
const LEADER_SCRIPT: &str = r#"child=""
if [ -n "${EMFLOW_LEADER_PARENT:-}" ] && [ "$PPID" != "$EMFLOW_LEADER_PARENT" ]; then exit 70; fi
unset EMFLOW_LEADER_PARENT
trap 'trap - TERM INT HUP; kill -KILL 0' TERM INT HUP
trap '[ -n "$child" ] && kill -USR2 "$child" 2>/dev/null' USR2
bash -euo pipefail -c "$1" emflow-command &
child=$!
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
done
wait "$child""#;
/// Exit code of a command that saved a checkpoint on request and asks to be run again.
const EXIT_CHECKPOINTED: i32 = 75;
/// How long a command may take to save a checkpoint and exit after a stop request.
const STOP_GRACE: Duration = Duration::from_secs(60);

impl Kind for CommandKind {
    type Params = CommandParams;

    fn describe(&self) -> KindInfo {
        KindInfo::new("command", 1, "Runs a shell command (bash) with declared input files and output files captured into the store.")
            .inputs(PORTS
                .iter()
                .map(|(name, ty)| {
                    PortSpec::many_input(name, *ty, "inputs, as $EMFLOW_IN_<PORT>_<i> with $EMFLOW_IN_<PORT>_COUNT")
                })
                .collect())
    }

    fn outputs(&self, params: &CommandParams) -> Vec<PortSpec> {
        declared_outputs(&params.outputs)
            .map(|outputs| {
                outputs
                    .into_iter()
                    .map(|(name, ty)| PortSpec::output(&name, ty, "declared in the manifest"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn check(&self, params: &CommandParams) -> Result<(), Vec<ParamError>> {
        let mut errors = Vec::new();
        let mut error = |param: String, message: String, hint: Option<&str>| {
            errors.push(ParamError {
                param,
                message,
                hint: hint.map(str::to_string),
            })
        };
        if params.run.trim().is_empty() {
            error(
                "run".into(),
                "`run` must be a non-empty command".into(),
                None,
            );
        }
        if params.outputs.is_empty() {
            error(
                "outputs".into(),
                "a command stage must declare at least one output".into(),
                Some("e.g. `outputs: {counts: file}`, then write to $EMFLOW_OUT_COUNTS"),
            );
        }
        for (name, ty) in &params.outputs {
            if !is_port_name(name) {
                error(
                    format!("outputs.{name}"),
                    format!("`{name}` is not a valid output name"),
                    Some("output names are lower case: [a-z][a-z0-9_]*"),
                );
            }
            if !matches!(ty.as_str(), Some("file" | "dir")) {
                error(
                    format!("outputs.{name}"),
                    format!("output type must be `file` or `dir`, found {ty}"),
                    None,
                );
            }
        }
        for (name, value) in &params.env {
            if !is_env_name(name) {
                error(
                    format!("env.{name}"),
                    format!("`{name}` is not a valid environment variable name"),
                    None,
                );
            } else if name.starts_with("EMFLOW_") {
                error(
                    format!("env.{name}"),
                    format!("`{name}`: names starting with EMFLOW_ are set by emflow"),
                    Some("pick another name"),
                );
            }
            if env_text(value).is_none() {
                error(
                    format!("env.{name}"),
                    "environment values must be text, numbers or booleans".into(),
                    None,
                );
            }
        }
        for name in params.extra.keys() {
            if !is_env_name(&name.to_ascii_uppercase()) {
                error(
                    name.clone(),
                    format!(
                        "extra param `{name}` cannot become $EMFLOW_PARAM_{}",
                        name.to_ascii_uppercase()
                    ),
                    Some("use letters, digits and underscores"),
                );
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The command runs in a process group of its own (with its own death signal), so an
    /// `exec-stage` child around it would only add a process start per stage.
    fn runs_in_driver(&self) -> bool {
        true
    }

    fn run(&self, ctx: &mut StageContext, params: &CommandParams) -> anyhow::Result<()> {
        if let Err(errors) = Kind::check(self, params) {
            let lines: Vec<String> = errors
                .iter()
                .map(|e| format!("{}: {}", e.param, e.message))
                .collect();
            bail!(
                "stage {}: invalid params: {}",
                ctx.stage_id,
                lines.join("; ")
            );
        }
        let run = &params.run;
        let outputs = declared_outputs(&params.outputs)?;
        let staging = std::path::absolute(ctx.staging_dir()).with_context(|| {
            format!(
                "cannot resolve staging folder {}",
                ctx.staging_dir().display()
            )
        })?;
        let checkpoint = std::path::absolute(ctx.checkpoint_dir()).with_context(|| {
            format!(
                "cannot resolve checkpoint folder {}",
                ctx.checkpoint_dir().display()
            )
        })?;
        let scratch = std::path::absolute(ctx.scratch_dir()).with_context(|| {
            format!(
                "cannot resolve scratch folder {}",
                ctx.scratch_dir().display()
            )
        })?;

        let mut command = leader_command();
        command
            .arg("-c")
            .arg(LEADER_SCRIPT)
            .arg("emflow-command")
            .arg(run)
            .current_dir(&scratch)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("TMPDIR", &scratch)
            .env("EMFLOW_STAGE_ID", &ctx.stage_id)
            .env("EMFLOW_CHECKPOINT_DIR", &checkpoint)
            .envs(environment(ctx, params, &staging, &outputs)?);

        let mut running = Running::spawn(&mut command, ctx.progress_handle())
            .context("cannot start `bash` to run the command")?;
        let outcome = running.wait(|| ctx.interrupt_requested())?;
        let (stdout_tail, stderr_tail) = running.tails();
        match outcome {
            Outcome::Stopped(status) if status.code() == Some(EXIT_CHECKPOINTED) => {
                return Err(anyhow::Error::new(Interrupted).context(format!(
                    "stage {}: command saved a checkpoint on request; the next run resumes from it",
                    ctx.stage_id
                )))
            }
            Outcome::Stopped(status) if !status.success() => {
                return Err(anyhow::Error::new(Interrupted).context(format!(
                    "stage {}: command stopped on request without a checkpoint (exit {}; a command that traps USR2 can save one and exit 75)",
                    ctx.stage_id,
                    describe(status)
                )))
            }
            Outcome::Exited(status) if !status.success() => {
                let how = describe(status);
                let (label, tail) = if stderr_tail.is_empty() {
                    ("stdout", stdout_tail)
                } else {
                    ("stderr", stderr_tail)
                };
                let shown = if tail.is_empty() {
                    "\n(the command printed nothing)".to_string()
                } else {
                    format!(
                        "\nlast lines of {label}:\n{}",
                        tail.iter()
                            .map(|l| format!("  {l}"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    )
                };
                bail!("stage {}: command failed with {how}{shown}", ctx.stage_id);
            }
            Outcome::Exited(_) | Outcome::Stopped(_) => {}
        }

        for (name, ty) in &outputs {
            check_output(&staging.join(name), name, *ty)
                .with_context(|| format!("stage {}", ctx.stage_id))?;
        }

        ctx.summarize("stdout_lines", running.line_counts.0);
        ctx.summarize("stderr_lines", running.line_counts.1);
        Ok(())
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "an unknown status".to_string(),
    }
}

/// The `outputs` param as (name, type) pairs.
fn declared_outputs(outputs: &Map<String, Value>) -> anyhow::Result<Vec<(String, ArtifactType)>> {
    outputs
        .iter()
        .map(|(name, ty)| match ty.as_str() {
            Some("file") => Ok((name.clone(), ArtifactType::File)),
            Some("dir") => Ok((name.clone(), ArtifactType::Dir)),
            _ => Err(anyhow!(
                "output `{name}`: type must be `file` or `dir`, found {ty}"
            )),
        })
        .collect()
}

/// The `EMFLOW_IN_*`, `EMFLOW_OUT_*`, `EMFLOW_PARAM_*` and user variables.
fn environment(
    ctx: &StageContext,
    params: &CommandParams,
    staging: &Path,
    outputs: &[(String, ArtifactType)],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    let mut ports: BTreeMap<&str, Vec<PathBuf>> =
        PORTS.iter().map(|(name, _)| (*name, Vec::new())).collect();
    for (port, artifacts) in ctx.all_inputs() {
        let paths = ports.entry(port.as_str()).or_default();
        for artifact in artifacts {
            paths
                .push(std::path::absolute(&artifact.path).with_context(|| {
                    format!("cannot resolve input {}", artifact.path.display())
                })?);
        }
    }
    for (port, paths) in ports {
        let port = port.to_ascii_uppercase();
        env.insert(format!("EMFLOW_IN_{port}_COUNT"), paths.len().to_string());
        if let [only] = paths.as_slice() {
            env.insert(format!("EMFLOW_IN_{port}"), only.display().to_string());
        }
        for (i, path) in paths.iter().enumerate() {
            env.insert(format!("EMFLOW_IN_{port}_{i}"), path.display().to_string());
        }
    }
    for (name, _) in outputs {
        env.insert(
            format!("EMFLOW_OUT_{}", name.to_ascii_uppercase()),
            staging.join(name).display().to_string(),
        );
    }
    for (name, value) in &params.extra {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        env.insert(format!("EMFLOW_PARAM_{}", name.to_ascii_uppercase()), text);
    }
    for (name, value) in &params.env {
        let text = env_text(value)
            .ok_or_else(|| anyhow!("env.{name}: must be text, a number or a boolean"))?;
        env.insert(name.clone(), text);
    }
    Ok(env)
}

fn env_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn is_port_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_output(path: &Path, name: &str, ty: ArtifactType) -> anyhow::Result<()> {
    let var = format!("$EMFLOW_OUT_{}", name.to_ascii_uppercase());
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("the command succeeded but did not create declared output `{name}`; write it to {var}")
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot inspect output `{name}` ({})", path.display()))
        }
    };
    if meta.file_type().is_symlink() {
        bail!("output `{name}` is a symbolic link; the store keeps contents, so write (or copy) a real {ty:?} to {var}");
    }
    match ty {
        ArtifactType::Dir if !meta.is_dir() => {
            bail!("output `{name}` is declared `dir` but the command wrote a file")
        }
        ArtifactType::File if !meta.is_file() => {
            bail!("output `{name}` is declared `file` but the command wrote a directory")
        }
        _ => Ok(()),
    }
}

/// Puts the child in its own process group and has the kernel signal it when the spawning
/// thread dies.
/// `bash`, to be started as the leader of a new process group that dies with this process.
///
/// With util-linux's `setpriv` (Debian and most distributions ship it), `setpriv --pdeathsig
/// TERM` arms the death signal and execs bash, and the leader script checks its parent, so
/// no code runs between fork and exec and std starts the child with `posix_spawn`. Without
/// it, a `pre_exec` hook does the same; but any `pre_exec` makes std `fork()` the whole
/// driver, and its copy-on-write faults cost a 2,000-stage run ~10 ms of system time per
/// stage, more as the driver grows (issue 22).
fn leader_command() -> Command {
    static SETPRIV: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let setpriv = SETPRIV.get_or_init(|| {
        ["/usr/bin/setpriv", "/bin/setpriv"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    });
    match setpriv {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command
                .args(["--pdeathsig", "TERM", "--", "bash"])
                .env("EMFLOW_LEADER_PARENT", std::process::id().to_string())
                .process_group(0);
            command
        }
        None => {
            let mut command = Command::new("bash");
            die_with_this_process(&mut command);
            command
        }
    }
}

fn die_with_this_process(command: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    command.process_group(0);
    // SAFETY: the hook runs in the forked child before exec and only makes the
    // async-signal-safe calls prctl(2) and getppid(2).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would tell us.
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "emflow exited while starting the command",
                ));
            }
            Ok(())
        });
    }
}

enum Outcome {
    /// The command ended on its own.
    Exited(std::process::ExitStatus),
    /// The command ended after a stop request (or was killed after [`STOP_GRACE`]).
    Stopped(std::process::ExitStatus),
}

/// The running process group, its output readers, and the kill-on-drop guarantee.
struct Running {
    child: Child,
    reaped: bool,
    readers: Vec<JoinHandle<()>>,
    stdout_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    line_counts: (u64, u64),
    counters: [Arc<Mutex<u64>>; 2],
}

impl Running {
    fn spawn(command: &mut Command, progress: Arc<dyn Progress>) -> std::io::Result<Running> {
        let mut child = command.spawn()?;
        let stdout_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let counters = [Arc::new(Mutex::new(0)), Arc::new(Mutex::new(0))];
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(forward_lines(
                out,
                progress.clone(),
                stdout_tail.clone(),
                counters[0].clone(),
                "",
            ));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(forward_lines(
                err,
                progress,
                stderr_tail.clone(),
                counters[1].clone(),
                "stderr: ",
            ));
        }
        Ok(Running {
            child,
            reaped: false,
            readers,
            stdout_tail,
            stderr_tail,
            line_counts: (0, 0),
            counters,
        })
    }

    fn pgid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Waits for the group leader to exit, kills whatever is left of the group, then reaps
    /// the leader. Once `stop()` turns true the command gets USR2 and [`STOP_GRACE`] to exit.
    /// The leader stays a zombie until the group is killed, so its id cannot be reused by an
    /// unrelated group in between.
    fn wait(&mut self, stop: impl Fn() -> bool) -> anyhow::Result<Outcome> {
        let mut stopped_at: Option<Instant> = None;
        let exit = emflow_engine::host::ExitWatch::new(self.child.id() as libc::pid_t);
        loop {
            if leader_exited(self.child.id() as libc::pid_t)
                .context("cannot wait for the command")?
            {
                break;
            }
            match stopped_at {
                None if stop() => {
                    // SAFETY: plain syscall to our own, not yet reaped, child.
                    unsafe {
                        libc::kill(self.pgid(), libc::SIGUSR2);
                    }
                    stopped_at = Some(Instant::now());
                }
                Some(at) if at.elapsed() > STOP_GRACE => break,
                _ => {}
            }
            exit.wait(Duration::from_millis(20));
        }
        kill_group(self.pgid());
        let status = self.child.wait().context("cannot reap the command")?;
        self.reaped = true;
        // Readers end when the last writer of the pipes is gone; a process that left the
        // group (setsid) may hold them open, so do not wait for it forever.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut pause = Duration::from_micros(100);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        for reader in std::mem::take(&mut self.readers) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        self.line_counts = (lock_count(&self.counters[0]), lock_count(&self.counters[1]));
        Ok(if stopped_at.is_some() {
            Outcome::Stopped(status)
        } else {
            Outcome::Exited(status)
        })
    }

    fn tails(&self) -> (Vec<String>, Vec<String>) {
        let take = |tail: &Arc<Mutex<VecDeque<String>>>| {
            tail.lock()
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default()
        };
        (take(&self.stdout_tail), take(&self.stderr_tail))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            kill_group(self.pgid());
            let _ = self.child.wait();
        }
    }
}

fn lock_count(counter: &Mutex<u64>) -> u64 {
    counter.lock().map(|n| *n).unwrap_or(0)
}

/// Whether the process has exited, without reaping it (`WNOWAIT`).
fn leader_exited(pid: libc::pid_t) -> std::io::Result<bool> {
    // SAFETY: waitid writes only into the zeroed siginfo we own.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        if libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(info.si_pid() != 0)
    }
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: plain syscall; ESRCH (group already gone) is fine to ignore.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

fn forward_lines(
    stream: impl Read + Send + 'static,
    progress: Arc<dyn Progress>,
    tail: Arc<Mutex<VecDeque<String>>>,
    count: Arc<Mutex<u64>>,
    prefix: &'static str,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            progress.log(&format!("{prefix}{line}"));
            if let Ok(mut n) = count.lock() {
                *n += 1;
            }
            if let Ok(mut tail) = tail.lock() {
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use emflow_engine::context::{ContextParts, DeviceRequest, MemoryMemo, NoProgress};
    use serde_json::json;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A command that traps the stop request saves under `$EMFLOW_CHECKPOINT_DIR` and exits
    /// 75: the stage ends with `Interrupted`, and the checkpoint is there for the next run.
    #[test]
    fn stop_request_lets_the_command_checkpoint_and_ask_to_be_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let (staging, checkpoint) = (dir.path().join("staging"), dir.path().join("ckpt"));
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(&checkpoint).unwrap();
        std::fs::create_dir_all(dir.path().join("scratch")).unwrap();
        let ready = dir.path().join("ready");
        let params = json!({
            "run": "trap 'echo 7 > \"$EMFLOW_CHECKPOINT_DIR/step\"; exit 75' USR2; touch \"$EMFLOW_PARAM_READY\"; while true; do sleep 0.1; done",
            "outputs": {"out": "file"},
            "ready": ready.display().to_string(),
        });
        let interrupt = Arc::new(AtomicBool::new(false));
        let mut ctx = StageContext::new(ContextParts {
            stage_id: "long".into(),
            kind: "command".into(),
            key: "test".into(),
            key_parts: serde_json::Value::Null,
            params: params.as_object().unwrap().clone(),
            inputs: BTreeMap::new(),
            staging,
            checkpoint: checkpoint.clone(),
            scratch: dir.path().join("scratch"),
            device: DeviceRequest::Cpu,
            threads: 1,
            progress: Arc::new(NoProgress),
            memo: Arc::new(MemoryMemo::default()),
            interrupt: interrupt.clone(),
        });
        let requester = std::thread::spawn(move || {
            let started = Instant::now();
            while !ready.exists() && started.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(20));
            }
            interrupt.store(true, Ordering::Relaxed);
        });
        let err = emflow_engine::StageKind::run(&CommandKind, &mut ctx).unwrap_err();
        requester.join().unwrap();
        assert!(err.downcast_ref::<Interrupted>().is_some(), "{err:#}");
        assert!(format!("{err:#}").contains("saved a checkpoint"), "{err:#}");
        assert_eq!(
            std::fs::read_to_string(checkpoint.join("step")).unwrap(),
            "7\n"
        );
    }
}
