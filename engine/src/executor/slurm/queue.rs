//! The driver's view of the queue: one `squeue` per interval for every job of the run,
//! `sacct -c` for jobs the queue has forgotten, and batched `scancel`.
//!
//! Handles share one [`Queue`]; whichever handle polls first after the interval runs the
//! query for all of them. A failed query changes nothing (the last view stays, and the
//! next interval tries again): a job is never failed because a query failed.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};

/// A job's state as the scheduler reports it (`%T` of squeue, `State` of sacct).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Pending, configuring, running, completing, suspended, requeued...: not over.
    Active(String),
    /// Over, with the scheduler's word for how (COMPLETED, FAILED, TIMEOUT, ...).
    Ended(String),
}

impl JobState {
    pub fn parse(word: &str) -> JobState {
        // sacct writes e.g. `CANCELLED by 0`; the first word is the state.
        let word = word.split_whitespace().next().unwrap_or("").to_uppercase();
        match word.as_str() {
            "COMPLETED" | "FAILED" | "TIMEOUT" | "CANCELLED" | "OUT_OF_MEMORY" | "NODE_FAIL"
            | "BOOT_FAIL" | "DEADLINE" | "PREEMPTED" | "SPECIAL_EXIT" | "REVOKED" => {
                JobState::Ended(word)
            }
            _ => JobState::Active(word),
        }
    }
}

/// Why a job that ended without a usable result failed, in words a user acts on.
/// `retryable`: more memory or time could help.
pub fn reason(state: &str) -> (String, bool) {
    match state {
        "OUT_OF_MEMORY" => (
            "out of memory (Slurm: OUT_OF_MEMORY); raise `resources.memory`".into(),
            true,
        ),
        "TIMEOUT" | "DEADLINE" => (
            "time limit reached (Slurm: TIMEOUT); raise `resources.time`".into(),
            true,
        ),
        "CANCELLED" => (
            "cancelled (Slurm: CANCELLED, e.g. by `scancel` or an administrator)".into(),
            false,
        ),
        "NODE_FAIL" | "BOOT_FAIL" => (
            format!("node failure (Slurm: {state}); the stage may succeed on another node"),
            false,
        ),
        "PREEMPTED" => (
            "preempted by a higher-priority job (Slurm: PREEMPTED)".into(),
            false,
        ),
        other => (format!("the job ended as {other}"), false),
    }
}

struct View {
    states: HashMap<String, JobState>,
    last_query: Option<Instant>,
    /// Job ids to cancel with the next batch.
    to_cancel: BTreeSet<String>,
}

/// The run's jobs as the scheduler last reported them.
pub struct Queue {
    interval: Duration,
    tracked: Mutex<BTreeSet<String>>,
    view: Mutex<View>,
}

impl Queue {
    pub fn new(interval: Duration) -> Self {
        Queue {
            interval,
            tracked: Mutex::new(BTreeSet::new()),
            view: Mutex::new(View {
                states: HashMap::new(),
                last_query: None,
                to_cancel: BTreeSet::new(),
            }),
        }
    }

    pub fn track(&self, job_id: &str) {
        if let Ok(mut t) = self.tracked.lock() {
            t.insert(job_id.to_string());
        }
    }

    pub fn untrack(&self, job_id: &str) {
        if let Ok(mut t) = self.tracked.lock() {
            t.remove(job_id);
        }
    }

    /// The last known state of `job_id` (`None`: not seen yet), querying the scheduler
    /// first when the interval has passed. An `Err` is a failed query.
    pub fn state(&self, job_id: &str) -> anyhow::Result<Option<JobState>> {
        self.flush_cancels();
        let due = match self.view.lock() {
            Ok(v) => v.last_query.is_none_or(|t| t.elapsed() >= self.interval),
            Err(_) => true,
        };
        let mut result = Ok(());
        if due {
            result = self.refresh();
        }
        let known = self
            .view
            .lock()
            .map_err(|_| anyhow!("the Slurm queue view is poisoned"))?
            .states
            .get(job_id)
            .cloned();
        result.map(|_| known)
    }

    /// Forgets the interval: the next `state` queries the scheduler.
    pub fn refresh_soon(&self) {
        if let Ok(mut v) = self.view.lock() {
            v.last_query = None;
        }
    }

    fn refresh(&self) -> anyhow::Result<()> {
        let ids: Vec<String> = match self.tracked.lock() {
            Ok(t) => t.iter().cloned().collect(),
            Err(_) => return Err(anyhow!("the Slurm job list is poisoned")),
        };
        if let Ok(mut v) = self.view.lock() {
            v.last_query = Some(Instant::now());
        }
        if ids.is_empty() {
            return Ok(());
        }
        let mut states = squeue(&ids)?;
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !states.contains_key(*id))
            .cloned()
            .collect();
        if !missing.is_empty() {
            // Gone from the queue (MinJobAge passed): ask the accounting record. Without
            // slurmdbd, `-c` reads the job completion file.
            if let Ok(ended) = sacct(&missing) {
                states.extend(ended);
            }
        }
        if let Ok(mut v) = self.view.lock() {
            v.states.extend(states);
        }
        Ok(())
    }

    /// Queues `job_id` for the next batched `scancel`.
    pub fn cancel(&self, job_id: &str) {
        if let Ok(mut v) = self.view.lock() {
            v.to_cancel.insert(job_id.to_string());
        }
    }

    /// Cancels every queued job id, in batches of 100 ids per `scancel`.
    pub fn flush_cancels(&self) {
        let ids: Vec<String> = match self.view.lock() {
            Ok(mut v) => std::mem::take(&mut v.to_cancel).into_iter().collect(),
            Err(_) => return,
        };
        for batch in ids.chunks(100) {
            let _ = Command::new("scancel").args(batch).output();
        }
    }
}

/// One `squeue` for `ids`: id -> state. Jobs the queue no longer knows are absent.
pub fn squeue(ids: &[String]) -> anyhow::Result<HashMap<String, JobState>> {
    let out = Command::new("squeue")
        .args(["--noheader", "--states=all", "--format=%i|%T"])
        .arg(format!("--jobs={}", ids.join(",")))
        .output()
        .context("running squeue (is slurm-client installed and SLURM_CONF set?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // Asking for ids the controller has purged is an error with no output, not an outage.
        if err.contains("Invalid job id") {
            return Ok(HashMap::new());
        }
        return Err(anyhow!("squeue failed: {}", err.trim()));
    }
    Ok(job_states(&text))
}

/// `id|state` lines (what `squeue` and `sacct` are asked to print): id -> state.
fn job_states(text: &str) -> HashMap<String, JobState> {
    text.lines()
        .filter_map(|l| {
            let (id, state) = l.trim().split_once('|')?;
            Some((id.to_string(), JobState::parse(state)))
        })
        .collect()
}

/// The standard output of a Slurm query that succeeded. `running` is the context when the
/// command cannot start; a failure quotes its standard error.
fn query(cmd: &mut Command, running: &'static str) -> anyhow::Result<String> {
    let out = cmd.output().context(running)?;
    if !out.status.success() {
        return Err(anyhow!(
            "{} failed: {}",
            cmd.get_program().to_string_lossy(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `sacct -c` (job completion records) for `ids`: id -> state of the ended ones.
fn sacct(ids: &[String]) -> anyhow::Result<HashMap<String, JobState>> {
    let mut cmd = Command::new("sacct");
    cmd.args(["-c", "--noheader", "--parsable2", "--format=JobID,State"])
        .arg(format!("--jobs={}", ids.join(",")));
    Ok(job_states(&query(&mut cmd, "running sacct")?))
}

/// Active jobs whose name starts with `emflow-`: stage key (the comment) -> (job id,
/// working folder). Lets a restarted driver find jobs its journal may not name.
pub fn active_emflow_jobs() -> anyhow::Result<HashMap<String, (String, String)>> {
    let mut cmd = Command::new("squeue");
    cmd.args([
        "--noheader",
        "--states=PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED,REQUEUED,RESIZING",
        "--format=%i|%j|%k|%Z",
    ]);
    let listing = query(
        &mut cmd,
        "running squeue (is slurm-client installed and SLURM_CONF set?)",
    )?;
    let mut jobs = HashMap::new();
    for line in listing.lines() {
        let parts: Vec<&str> = line.trim().splitn(4, '|').collect();
        if let [id, name, comment, dir] = parts[..] {
            if name.starts_with("emflow-") && !comment.is_empty() {
                jobs.insert(comment.to_string(), (id.to_string(), dir.to_string()));
            }
        }
    }
    Ok(jobs)
}

/// The job id in `sbatch --parsable` output: `id` or `id;cluster`.
pub fn parse_job_id(stdout: &str) -> anyhow::Result<String> {
    let line = stdout
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let id = line.split(';').next().unwrap_or("").trim();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(anyhow!(
            "sbatch printed `{}` where a job id was expected",
            stdout.trim()
        ));
    }
    Ok(id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_split_into_active_and_ended() {
        let cases = [
            ("RUNNING", JobState::Active("RUNNING".into())),
            ("PENDING", JobState::Active("PENDING".into())),
            ("CANCELLED by 0", JobState::Ended("CANCELLED".into())),
            ("TIMEOUT", JobState::Ended("TIMEOUT".into())),
        ];
        for (text, state) in cases {
            assert_eq!(JobState::parse(text), state, "{text}");
        }
    }

    #[test]
    fn reasons_say_what_to_do() {
        assert!(reason("OUT_OF_MEMORY").0.starts_with("out of memory"));
        assert!(reason("OUT_OF_MEMORY").1);
        assert!(reason("TIMEOUT").0.starts_with("time limit"));
        assert!(reason("TIMEOUT").1);
        assert!(reason("CANCELLED").0.starts_with("cancelled"));
        assert!(!reason("CANCELLED").1);
        assert!(reason("NODE_FAIL").0.starts_with("node failure"));
    }

    #[test]
    fn job_ids_parse_strictly() {
        assert_eq!(parse_job_id("123\n").unwrap(), "123");
        assert_eq!(parse_job_id("123;cluster\n").unwrap(), "123");
        assert!(parse_job_id("sbatch: error").is_err());
        assert!(parse_job_id("").is_err());
    }
}
