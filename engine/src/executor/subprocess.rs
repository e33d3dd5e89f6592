//! Runs each job in its own `emflow exec-stage` child process: the default executor.
//!
//! Why a process per stage: a stage that leaks memory, aborts in a native library or
//! is killed by the OOM killer takes only itself down; its peak memory is measured exactly
//! (`wait4`); and cancelling it is a signal to its process group, which also reaches any
//! commands it started. The child dies with the driver (`PR_SET_PDEATHSIG`), so a killed
//! `emflow run` leaves nothing running that still holds a key lock.
//!
//! The job goes to the child as a JSON file and comes back as an atomically written result
//! file: the same exit-record protocol a Slurm job uses. Progress flows back as JSON lines
//! on the child's stdout ([`WireEvent`]); the child's stderr goes to a log file whose tail
//! is shown when the stage fails.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use emflow_cache::Store;

use super::{Executor, Finished, InProcessExecutor, JobHandle, Wake};
use crate::context::Progress;
use crate::job::{write_json_atomic, Job, JobDevice, JobOutcome};
use crate::kind::Registry;

/// A progress event on the wire between `exec-stage` and the driver.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "emflow_progress", rename_all = "snake_case")]
pub enum WireEvent {
    Phase {
        name: String,
        total: u64,
        unit: String,
    },
    Inc {
        n: u64,
    },
    Message {
        text: String,
    },
    Log {
        line: String,
    },
}

pub struct SubprocessExecutor {
    /// The `emflow` binary (normally the running one).
    exe: PathBuf,
    /// Folder for job files, result files and logs: `<store>/jobs/<run id>`.
    jobs_dir: PathBuf,
    /// Where kinds that say [`crate::StageKind::runs_in_driver`] go instead of a child.
    driver: Option<(Registry, InProcessExecutor)>,
}

impl SubprocessExecutor {
    /// Every job in a child process.
    pub fn new(exe: PathBuf, jobs_dir: PathBuf) -> Self {
        SubprocessExecutor {
            exe,
            jobs_dir,
            driver: None,
        }
    }

    /// Jobs of kinds that may run in the driver ([`crate::StageKind::runs_in_driver`]) run on
    /// a thread of this process; every other job still gets its own child process.
    pub fn with_driver_threads(mut self, registry: Registry, store: Arc<Store>) -> Self {
        self.driver = Some((registry.clone(), InProcessExecutor::new(registry, store)));
        self
    }
}

struct ChildHandle {
    pid: libc::pid_t,
    stage_id: String,
    result_path: PathBuf,
    log_path: PathBuf,
    done: bool,
}

impl Executor for SubprocessExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    fn submit(
        &self,
        mut job: Job,
        progress: Arc<dyn Progress>,
        wake: Wake,
    ) -> anyhow::Result<Box<dyn JobHandle>> {
        // A job with GPUs still gets a child: only a child's environment can say which
        // devices it sees (`CUDA_VISIBLE_DEVICES`, below), and everything it starts inherits it.
        if let Some((registry, threads)) = &self.driver {
            let light = registry.kind(&job.kind).is_some_and(|k| k.runs_in_driver());
            if light && job.gpu_ids.is_empty() {
                return threads.submit(job, progress, wake);
            }
        }
        let mode = if matches!(job.mode, crate::job::JobMode::Verify) {
            "-verify"
        } else {
            ""
        };
        let dir = self.jobs_dir.join(format!(
            "{}-{}{mode}",
            &job.key[..job.key.len().min(12)],
            file_safe(&job.stage_id)
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating job folder {}", dir.display()))?;
        if let JobDevice::Cuda { .. } = job.device {
            // The child sees exactly its own GPUs, numbered from 0.
            job.device = JobDevice::Cuda { ordinal: 0 };
        }
        let job_path = dir.join("job.json");
        let result_path = dir.join("result.json");
        let log_path = dir.join("stderr.log");
        let _ = std::fs::remove_file(&result_path);
        write_json_atomic(&job_path, &job)?;
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;

        let mut cmd = Command::new(&self.exe);
        cmd.arg("exec-stage")
            .arg(&job_path)
            .arg("--result")
            .arg(&result_path);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if !job.gpu_ids.is_empty() {
            cmd.env("CUDA_VISIBLE_DEVICES", job.gpu_ids.join(","));
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    return Err(std::io::Error::other(
                        "the emflow driver exited while starting a stage",
                    ));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting `{} exec-stage` for stage {}",
                self.exe.display(),
                job.stage_id
            )
        })?;
        let pid = child.id() as libc::pid_t;
        let exited = crate::host::ExitWatch::new(pid);
        if let Some(stdout) = child.stdout.take() {
            // Detached on purpose: a grandchild may hold the pipe open after the child exits.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    forward(&line, progress.as_ref());
                }
                // The pipe closes a moment before the child is reapable; waking the scheduler
                // then made it find nothing and sleep its 100 ms tick (issue 22).
                exited.wait(Duration::from_secs(1));
                wake.wake();
            });
        }
        Ok(Box::new(ChildHandle {
            pid,
            stage_id: job.stage_id,
            result_path,
            log_path,
            done: false,
        }))
    }
}

fn forward(line: &str, progress: &dyn Progress) {
    match serde_json::from_str::<WireEvent>(line) {
        Ok(WireEvent::Phase { name, total, unit }) => progress.phase(&name, total, &unit),
        Ok(WireEvent::Inc { n }) => progress.inc(n),
        Ok(WireEvent::Message { text }) => progress.message(&text),
        Ok(WireEvent::Log { line }) => progress.log(&line),
        Err(_) => progress.log(line),
    }
}

impl JobHandle for ChildHandle {
    fn poll(&mut self) -> anyhow::Result<Option<Finished>> {
        if self.done {
            return Ok(None);
        }
        let mut status = 0;
        // SAFETY: rusage is plain data, filled by wait4.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut usage) };
        if rc == 0 {
            return Ok(None);
        }
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            // Our own child cannot be waited for: nothing more will be learnt about it.
            self.done = true;
            let error = format!(
                "lost track of the process of stage {}: {err}",
                self.stage_id
            );
            return Ok(Some(Finished {
                outcome: JobOutcome::Failed { error },
                peak_rss_bytes: None,
            }));
        }
        self.done = true;
        let peak = (usage.ru_maxrss.max(0) as u64) * 1024;
        let outcome = match std::fs::read(&self.result_path) {
            Ok(bytes) => match serde_json::from_slice::<JobOutcome>(&bytes) {
                Ok(JobOutcome::Failed { error }) => JobOutcome::Failed {
                    error: with_log_tail(error, &self.log_path),
                },
                Ok(outcome) => outcome,
                Err(e) => JobOutcome::Failed {
                    error: format!("unreadable result file {}: {e}", self.result_path.display()),
                },
            },
            Err(_) => JobOutcome::Failed {
                error: with_log_tail(describe_exit(status), &self.log_path),
            },
        };
        Ok(Some(Finished {
            outcome,
            peak_rss_bytes: Some(peak),
        }))
    }

    fn cancel(&mut self) {
        if !self.done {
            // SAFETY: signalling our own child's process group.
            unsafe { libc::kill(-self.pid, libc::SIGTERM) };
        }
    }

    fn kill(&mut self) {
        if !self.done {
            // SAFETY: as above.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
    }
}

impl Drop for ChildHandle {
    fn drop(&mut self) {
        if !self.done {
            let mut status = 0;
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(-self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, &mut status, 0);
            }
        }
    }
}

fn describe_exit(status: libc::c_int) -> String {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let hint = match sig {
            libc::SIGKILL => " (SIGKILL: out of memory, or killed by hand)",
            libc::SIGSEGV => " (SIGSEGV: a crash in native code)",
            libc::SIGABRT => " (SIGABRT: an abort in native code)",
            _ => "",
        };
        format!("the stage process was killed by signal {sig}{hint} before it wrote a result")
    } else {
        format!(
            "the stage process exited with code {} without writing a result",
            libc::WEXITSTATUS(status)
        )
    }
}

fn with_log_tail(error: String, log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return error;
    }
    let tail = &lines[lines.len().saturating_sub(15)..];
    format!(
        "{error}\nlast lines of its stderr ({}):\n  {}",
        log.display(),
        tail.join("\n  ")
    )
}

/// A folder name from a stage id: `grpo[seed=1]` -> `grpo_seed_1_`.
fn file_safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect()
}

/// The progress sink of `exec-stage`: JSON lines on stdout, `inc`s coalesced to at most
/// ten lines a second so a tight training loop does not flood the pipe.
pub struct WireProgress {
    pending: Mutex<(u64, Instant)>,
}

impl Default for WireProgress {
    fn default() -> Self {
        WireProgress {
            pending: Mutex::new((0, Instant::now())),
        }
    }
}

impl WireProgress {
    fn send(&self, event: &WireEvent) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    fn flush_incs(&self) {
        let n = match self.pending.lock() {
            Ok(mut p) => {
                let n = p.0;
                *p = (0, Instant::now());
                n
            }
            Err(_) => 0,
        };
        if n > 0 {
            self.send(&WireEvent::Inc { n });
        }
    }
}

impl Progress for WireProgress {
    fn phase(&self, name: &str, total: u64, unit: &str) {
        self.flush_incs();
        self.send(&WireEvent::Phase {
            name: name.into(),
            total,
            unit: unit.into(),
        });
    }
    fn inc(&self, n: u64) {
        let due = match self.pending.lock() {
            Ok(mut p) => {
                p.0 += n;
                p.1.elapsed() >= Duration::from_millis(100)
            }
            Err(_) => false,
        };
        if due {
            self.flush_incs();
        }
    }
    fn message(&self, msg: &str) {
        self.flush_incs();
        self.send(&WireEvent::Message { text: msg.into() });
    }
    fn log(&self, line: &str) {
        self.flush_incs();
        self.send(&WireEvent::Log { line: line.into() });
    }
}

impl Drop for WireProgress {
    fn drop(&mut self) {
        self.flush_incs();
    }
}
