//! `--executor slurm`: each stage the driver decides to run becomes one Slurm job.
//!
//! The driver plans and looks up the cache itself, so a cache hit never reaches Slurm.
//! A job runs `emflow exec-stage` against the shared store from a per-attempt folder
//! (`<store>/slurm/work/<key[:2]>/<key>/attempt-<n>/`), through a script that always
//! leaves an exit record ([`script`]). The driver decides how a job ended from that
//! record first; the scheduler's view ([`queue`]: one `squeue` per interval for all jobs)
//! only says "still active" or "gone", and, for a job gone without a record after a grace
//! period, why (time limit, out of memory, cancelled, node failure). Out-of-memory and
//! time-limit failures are resubmitted with more (profile `retries`, `growth`); a stage
//! that checkpointed on the pre-limit USR2 and asked to be run again is resubmitted and
//! resumes. The [`journal`] plus the job names let a restarted driver attach to jobs
//! still queued or running instead of submitting them twice.

mod dry_run;
mod journal;
mod profile;
mod queue;
mod script;

pub use dry_run::print_dry_run;
pub use profile::{ClusterProfile, GpuFlag};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use serde::Deserialize;

use super::{Executor, Finished, JobHandle, Wake};
use crate::context::Progress;
use crate::job::{write_json_atomic, Job, JobDevice, JobOutcome, EXIT_INTERRUPTED};
use journal::{Entry, Journal};
use profile::{sbatch_args, Request, Submission};
use queue::{JobState, Queue};

pub struct SlurmExecutor {
    emflow: PathBuf,
    /// `<store>/slurm`: attempt folders and the journal.
    root: PathBuf,
    profile: ClusterProfile,
    queue: Arc<Queue>,
    journal: Arc<Journal>,
    /// Active emflow jobs by stage key, read once per driver (for re-attaching).
    active: OnceLock<HashMap<String, (String, String)>>,
}

impl SlurmExecutor {
    /// `emflow`: the binary the jobs run (the profile's `emflow` wins).
    pub fn new(emflow: PathBuf, store_root: &Path, profile: ClusterProfile) -> Self {
        let root = store_root.join("slurm");
        SlurmExecutor {
            emflow: profile.emflow.clone().unwrap_or(emflow),
            queue: Arc::new(Queue::new(Duration::from_secs_f64(
                profile.poll_interval_s.max(0.2),
            ))),
            journal: Arc::new(Journal::new(&root)),
            root,
            profile,
            active: OnceLock::new(),
        }
    }

    fn active_jobs(&self, progress: &dyn Progress) -> &HashMap<String, (String, String)> {
        self.active
            .get_or_init(|| match queue::active_emflow_jobs() {
                Ok(jobs) => jobs,
                Err(err) => {
                    progress.log(&format!(
                        "warning: could not list active Slurm jobs to re-attach to ({err:#}); relying on the journal"
                    ));
                    HashMap::new()
                }
            })
    }

    /// The job this driver (or a killed one before it) already has in the queue for
    /// `key`, if any.
    fn find_active(&self, key: &str, progress: &dyn Progress) -> Option<Entry> {
        let active = self.active_jobs(progress);
        let journaled = self.journal.get(key);
        if let Some(entry) = &journaled {
            if let Ok(states) = queue::squeue(std::slice::from_ref(&entry.job_id)) {
                if let Some(JobState::Active(_)) = states.get(&entry.job_id) {
                    return journaled;
                }
            }
        }
        let (job_id, dir) = active.get(key)?;
        if journaled.as_ref().is_some_and(|e| &e.job_id == job_id) {
            return journaled;
        }
        // Submitted by a driver killed before it wrote its journal entry.
        let attempt_dir = PathBuf::from(dir);
        let attempt = attempt_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("attempt-"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        Some(Entry {
            job_id: job_id.clone(),
            attempt,
            attempt_dir,
            run_id: String::new(),
            submitted_at: String::new(),
            memory: journaled.as_ref().map_or(0, |e| e.memory),
            time_s: journaled.as_ref().map_or(0, |e| e.time_s),
            retries: journaled.as_ref().map_or(0, |e| e.retries),
            requeues: journaled.as_ref().map_or(0, |e| e.requeues),
        })
    }
}

impl Executor for SlurmExecutor {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn submit(
        &self,
        mut job: Job,
        progress: Arc<dyn Progress>,
        _wake: Wake,
    ) -> anyhow::Result<Box<dyn JobHandle>> {
        // On the node, Slurm sets CUDA_VISIBLE_DEVICES to the job's own GPUs.
        job.gpu_ids.clear();
        job.device = if job.resources.gpus > 0 {
            JobDevice::Cuda { ordinal: 0 }
        } else {
            JobDevice::Cpu
        };
        job.threads = job.resources.cpus.max(1) as usize;
        let ctx = Attempts {
            emflow: self.emflow.clone(),
            root: self.root.clone(),
            profile: self.profile.clone(),
            queue: self.queue.clone(),
            journal: self.journal.clone(),
            job,
            progress,
        };
        let entry = match self.find_active(&ctx.job.key, ctx.progress.as_ref()) {
            Some(entry) => {
                ctx.progress.message(&format!(
                    "re-attached to Slurm job {} (attempt {})",
                    entry.job_id, entry.attempt
                ));
                ctx.queue.track(&entry.job_id);
                entry
            }
            None => {
                let previous = self.journal.get(&ctx.job.key);
                let attempt = previous.as_ref().map_or(1, |e| e.attempt + 1);
                let req = Request::from_resources(&ctx.job.resources, &self.profile);
                ctx.submit(attempt, req, 0, 0)?
            }
        };
        Ok(Box::new(SlurmHandle {
            ctx,
            entry,
            gone_since: None,
            cancelled: false,
            done: false,
            started: Instant::now(),
        }))
    }
}

/// What a handle needs to submit further attempts of its job.
struct Attempts {
    emflow: PathBuf,
    root: PathBuf,
    profile: ClusterProfile,
    queue: Arc<Queue>,
    journal: Arc<Journal>,
    job: Job,
    progress: Arc<dyn Progress>,
}

impl Attempts {
    fn submit(
        &self,
        attempt: u32,
        req: Request,
        retries: u32,
        requeues: u32,
    ) -> anyhow::Result<Entry> {
        let key = &self.job.key;
        let dir = self
            .root
            .join("work")
            .join(&key[..key.len().min(2)])
            .join(key)
            .join(format!("attempt-{attempt}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("clearing the old attempt folder {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the attempt folder {}", dir.display()))?;
        let mut job = self.job.clone();
        job.resources.memory = req.memory;
        job.resources.time_limit = req.time_s;
        write_json_atomic(&dir.join(script::JOB_FILE), &job)?;
        let script_path = dir.join(script::SCRIPT_FILE);
        std::fs::write(&script_path, script::job_script(&self.emflow, &dir))
            .with_context(|| format!("writing the job script {}", script_path.display()))?;
        let job_name = format!("emflow-{}", job.run_id);
        let args = sbatch_args(
            &self.profile,
            &req,
            &Submission {
                job_name: &job_name,
                stage_key: key,
                attempt_dir: &dir,
                script: &script_path,
            },
        );
        let job_id = sbatch(&args)?;
        let entry = Entry {
            job_id: job_id.clone(),
            attempt,
            attempt_dir: dir,
            run_id: job.run_id.clone(),
            submitted_at: crate::host::now_rfc3339(),
            memory: req.memory,
            time_s: req.time_s,
            retries,
            requeues,
        };
        self.journal.put(key, &entry)?;
        self.queue.track(&job_id);
        self.progress.message(&format!(
            "submitted as Slurm job {job_id} (attempt {attempt})"
        ));
        Ok(entry)
    }
}

/// Runs `sbatch`, retrying errors that look transient (controller busy or unreachable).
fn sbatch(args: &[String]) -> anyhow::Result<String> {
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=4 {
        let out = Command::new("sbatch")
            .args(args)
            .output()
            .context("running sbatch (is slurm-client installed and SLURM_CONF set?)")?;
        if out.status.success() {
            return queue::parse_job_id(&String::from_utf8_lossy(&out.stdout));
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let transient = [
            "timed out",
            "Socket",
            "try again",
            "Unable to contact",
            "busy",
        ]
        .iter()
        .any(|p| err.contains(p));
        if !transient || attempt == 4 {
            return Err(anyhow!(
                "sbatch refused the job: {err}\ncommand: {}",
                profile::command_line("sbatch", args)
            ));
        }
        std::thread::sleep(delay);
        delay *= 2;
    }
    unreachable!("the loop returns on its last attempt")
}

#[derive(Deserialize)]
struct ExitRecord {
    exit_code: i32,
    signal: String,
}

struct SlurmHandle {
    ctx: Attempts,
    entry: Entry,
    /// When the job was first seen gone from the queue without an exit record.
    gone_since: Option<Instant>,
    /// The driver asked to stop this job.
    cancelled: bool,
    done: bool,
    started: Instant,
}

/// The request for a retry after the scheduler ended a job in `state`: memory grown by
/// `growth` after running out of it, time after hitting the limit, with the changed sbatch
/// option for the log. None when more of something would not help (or nothing was asked for).
fn grown_request(state: &str, mut req: Request, growth: f64) -> Option<(Request, String)> {
    match state {
        "OUT_OF_MEMORY" if req.memory > 0 => {
            req.memory = (req.memory as f64 * growth).ceil() as u64;
            let flag = format!("--mem={}M", req.memory.div_ceil(1024 * 1024));
            Some((req, flag))
        }
        "TIMEOUT" | "DEADLINE" if req.time_s > 0 => {
            req.time_s = (req.time_s as f64 * growth).ceil() as u64;
            let flag = format!("--time={}", profile::slurm_time(req.time_s));
            Some((req, flag))
        }
        _ => None,
    }
}

impl SlurmHandle {
    fn finish(&mut self, outcome: JobOutcome) -> anyhow::Result<Option<Finished>> {
        self.done = true;
        self.ctx.queue.untrack(&self.entry.job_id);
        Ok(Some(Finished {
            outcome,
            peak_rss_bytes: None,
        }))
    }

    fn fail(&mut self, why: String) -> anyhow::Result<Option<Finished>> {
        let error = format!(
            "Slurm job {} (attempt {}): {why}{}",
            self.entry.job_id,
            self.entry.attempt,
            log_tail(&self.entry.attempt_dir, &self.entry.job_id)
        );
        self.finish(JobOutcome::Failed { error })
    }

    /// Submits the next attempt; the handle follows it from now on.
    fn resubmit(
        &mut self,
        req: Request,
        retries: u32,
        requeues: u32,
    ) -> anyhow::Result<Option<Finished>> {
        self.ctx.queue.untrack(&self.entry.job_id);
        match self
            .ctx
            .submit(self.entry.attempt + 1, req, retries, requeues)
        {
            Ok(entry) => {
                self.entry = entry;
                self.gone_since = None;
                Ok(None)
            }
            Err(err) => self.fail(format!("could not resubmit: {err:#}")),
        }
    }

    fn request(&self) -> Request {
        Request {
            cpus: self.ctx.job.resources.cpus.max(1),
            gpus: self.ctx.job.resources.gpus,
            memory: self.entry.memory,
            time_s: self.entry.time_s,
        }
    }

    /// A failure the scheduler explains (`state`): retry with more if that may help.
    fn scheduler_failure(&mut self, state: &str) -> anyhow::Result<Option<Finished>> {
        let (why, retryable) = queue::reason(state);
        if self.cancelled {
            return self.finish(JobOutcome::Interrupted);
        }
        if retryable && self.entry.retries < self.ctx.profile.retries {
            if let Some((req, grown)) =
                grown_request(state, self.request(), self.ctx.profile.growth)
            {
                self.ctx.progress.message(&format!(
                    "{why}; resubmitting with {grown} (retry {} of {})",
                    self.entry.retries + 1,
                    self.ctx.profile.retries
                ));
                let requeues = self.entry.requeues;
                return self.resubmit(req, self.entry.retries + 1, requeues);
            }
        }
        self.fail(why)
    }

    fn settle_from_exit_record(&mut self, exit: ExitRecord) -> anyhow::Result<Option<Finished>> {
        let result = read_result(&self.entry.attempt_dir.join(script::RESULT_FILE));
        if let Some(JobOutcome::Committed { .. }) = &result {
            return self.finish(result.unwrap_or(JobOutcome::Interrupted));
        }
        if self.cancelled {
            return self.finish(JobOutcome::Interrupted);
        }
        let killed = matches!(exit.signal.as_str(), "TERM" | "INT");
        if killed {
            // The scheduler stopped the job (time limit, scancel, node going down): its
            // state says which, once the job has left the running states.
            return match self.ctx.queue.state(&self.entry.job_id)? {
                Some(JobState::Ended(state)) if state != "COMPLETED" && state != "FAILED" => {
                    self.scheduler_failure(&state)
                }
                Some(JobState::Active(_)) => Ok(None),
                _ => self.fail(format!(
                    "the stage was stopped by SIG{} (exit code {})",
                    exit.signal, exit.exit_code
                )),
            };
        }
        if exit.exit_code == EXIT_INTERRUPTED {
            if self.entry.requeues >= self.ctx.profile.max_requeue {
                return self.fail(format!(
                    "the stage asked to be run again {} times; giving up (raise `max_requeue` in the cluster config, or `resources.time`)",
                    self.entry.requeues
                ));
            }
            self.ctx.progress.message(&format!(
                "saved a checkpoint before the time limit; resubmitting to resume (requeue {})",
                self.entry.requeues + 1
            ));
            let (req, retries, requeues) =
                (self.request(), self.entry.retries, self.entry.requeues + 1);
            return self.resubmit(req, retries, requeues);
        }
        match result {
            Some(JobOutcome::Failed { error }) => {
                self.fail(format!("failed with exit code {}: {error}", exit.exit_code))
            }
            Some(other) => self.finish(other),
            None => self.fail(format!(
                "failed with exit code {} before writing a result",
                exit.exit_code
            )),
        }
    }
}

impl JobHandle for SlurmHandle {
    fn poll(&mut self) -> anyhow::Result<Option<Finished>> {
        if self.done {
            return Ok(None);
        }
        // The exit record decides; the queue only says whether to keep waiting for it.
        if let Some(exit) = read_exit(&self.entry.attempt_dir) {
            return self.settle_from_exit_record(exit);
        }
        let state = self.ctx.queue.state(&self.entry.job_id)?;
        let ended = match state {
            Some(JobState::Active(_)) => {
                self.gone_since = None;
                return Ok(None);
            }
            Some(JobState::Ended(state)) => state,
            None if self.started.elapsed()
                < Duration::from_secs_f64(self.ctx.profile.poll_interval_s * 3.0) =>
            {
                return Ok(None)
            }
            None => "UNKNOWN".to_string(),
        };
        if self.cancelled {
            return self.finish(JobOutcome::Interrupted);
        }
        let since = *self.gone_since.get_or_insert_with(Instant::now);
        if since.elapsed() < Duration::from_secs_f64(self.ctx.profile.grace_s) {
            // A shared file system may publish the record late: list the folder again
            // (refreshes NFS attribute caches) and wait.
            let _ = std::fs::read_dir(&self.entry.attempt_dir).map(|d| d.count());
            return Ok(None);
        }
        if ended == "COMPLETED" || ended == "FAILED" || ended == "UNKNOWN" {
            return self.fail(format!(
                "the job ended ({ended}) without leaving an exit record in {} within the {}s grace period (was the store visible on the node?)",
                self.entry.attempt_dir.display(),
                self.ctx.profile.grace_s
            ));
        }
        self.scheduler_failure(&ended)
    }

    fn cancel(&mut self) {
        if !self.done {
            self.cancelled = true;
            self.ctx.queue.cancel(&self.entry.job_id);
            self.ctx.queue.refresh_soon();
        }
    }

    fn kill(&mut self) {
        if !self.done {
            let _ = Command::new("scancel")
                .args(["--signal=KILL", "--full", &self.entry.job_id])
                .output();
        }
    }
}

fn read_exit(dir: &Path) -> Option<ExitRecord> {
    let bytes = std::fs::read(dir.join(script::EXIT_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn read_result(path: &Path) -> Option<JobOutcome> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The last lines of the stage's stderr and of Slurm's own output file.
fn log_tail(dir: &Path, job_id: &str) -> String {
    let mut out = String::new();
    for name in [
        script::STDERR_FILE.to_string(),
        format!("slurm-{job_id}.out"),
    ] {
        let path = dir.join(&name);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            continue;
        }
        let tail = &lines[lines.len().saturating_sub(10)..];
        out.push_str(&format!(
            "\nlast lines of {}:\n  {}",
            path.display(),
            tail.join("\n  ")
        ));
    }
    out
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    fn req(memory: u64, time_s: u64) -> Request {
        Request {
            cpus: 2,
            gpus: 0,
            memory,
            time_s,
        }
    }

    #[test]
    fn out_of_memory_grows_memory_and_time_limit_grows_time() {
        let gib = 1024 * 1024 * 1024;
        let (r, flag) = grown_request("OUT_OF_MEMORY", req(2 * gib, 600), 1.5).unwrap();
        assert_eq!((r.memory, r.time_s, r.cpus), (3 * gib, 600, 2));
        assert_eq!(flag, "--mem=3072M");
        let (r, flag) = grown_request("TIMEOUT", req(gib, 90), 2.0).unwrap();
        assert_eq!((r.memory, r.time_s), (gib, 180));
        assert_eq!(flag, "--time=00:03:00");
        assert!(grown_request("DEADLINE", req(0, 60), 2.0).is_some());
    }

    #[test]
    fn nothing_to_grow_means_no_retry() {
        // No memory was asked for: the cluster default ran out; more of nothing cannot help.
        assert!(grown_request("OUT_OF_MEMORY", req(0, 600), 2.0).is_none());
        assert!(grown_request("TIMEOUT", req(1024, 0), 2.0).is_none());
        assert!(grown_request("NODE_FAIL", req(1024, 600), 2.0).is_none());
        assert!(grown_request("FAILED", req(1024, 600), 2.0).is_none());
    }
}
