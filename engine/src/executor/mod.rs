//! Executors: where a job runs. The scheduler only ever submits a [`Job`], polls the
//! handle, and cancels it; it never learns whether the job is a thread, a child process
//! or a Slurm job. That is the seam a cluster executor plugs into: `submit` writes the job
//! file somewhere the compute node sees and calls `sbatch`; `poll` reads the exit record
//! (falling back to the queue's view); `cancel` calls `scancel`.
//!
//! Executors wake the scheduler through [`Wake`] when something may have changed, so a
//! local run reacts at once; executors that can only poll (Slurm) never wake, and the
//! scheduler polls them on its interval.

mod in_process;
pub mod slurm;
mod subprocess;

pub use in_process::InProcessExecutor;
pub use slurm::{ClusterProfile, SlurmExecutor};
pub use subprocess::{SubprocessExecutor, WireEvent, WireProgress};

use std::sync::mpsc::Sender;
use std::sync::Arc;

use crate::context::Progress;
use crate::job::{Job, JobOutcome};

/// Tells the scheduler to poll now.
#[derive(Clone)]
pub struct Wake(pub Sender<()>);

impl Wake {
    pub fn wake(&self) {
        let _ = self.0.send(());
    }
}

/// How a submitted job ended, as seen by the driver.
#[derive(Debug)]
pub struct Finished {
    pub outcome: JobOutcome,
    /// Peak memory of the process that ran the job, when the executor can measure it.
    pub peak_rss_bytes: Option<u64>,
}

/// Where jobs run.
pub trait Executor: Send + Sync {
    /// Shown in run headers and records: `local`, `in-process`, `slurm`.
    fn name(&self) -> &'static str;
    /// Starts `job`; progress events of the running stage go to `progress`.
    fn submit(
        &self,
        job: Job,
        progress: Arc<dyn Progress>,
        wake: Wake,
    ) -> anyhow::Result<Box<dyn JobHandle>>;
}

/// A submitted job.
pub trait JobHandle: Send {
    /// `Some` once the job has ended. An `Err` is a failure to *observe* the job (a query
    /// failed), never a verdict on it: the scheduler logs it and polls again.
    fn poll(&mut self) -> anyhow::Result<Option<Finished>>;
    /// Asks the job to stop (it may save a checkpoint first); `poll` reports the end.
    fn cancel(&mut self);
    /// Escalates a cancel that was ignored: stop now, no checkpoint.
    fn kill(&mut self);
}
