//! `emflow exec-stage JOB --result PATH`: runs one job file and writes its outcome
//! atomically to PATH (the exit record executors read). Exit code 0 on commit, 1 on
//! failure, [`EXIT_INTERRUPTED`] when the stage checkpointed and asks to be run again.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use emflow_cache::Store;

use crate::executor::WireProgress;
use crate::job::{execute_job, read_job, write_json_atomic, JobOutcome, EXIT_INTERRUPTED};
use crate::kind::Registry;

pub fn main(registry: &Registry, job_path: &Path, result_path: &Path) -> ExitCode {
    let interrupt = crate::signals::install_stage();
    let outcome = match read_job(job_path).and_then(|job| {
        let store = Store::open(&job.store)
            .with_context(|| format!("opening the store at {}", job.store.display()))?;
        Ok((job, Arc::new(store)))
    }) {
        Ok((job, store)) => execute_job(
            &job,
            registry,
            &store,
            Arc::new(WireProgress::default()),
            interrupt,
            true,
        ),
        Err(err) => JobOutcome::failed(&err),
    };
    let code = match &outcome {
        JobOutcome::Committed { .. } | JobOutcome::Verified { .. } => 0,
        JobOutcome::Failed { .. } => 1,
        JobOutcome::Interrupted => EXIT_INTERRUPTED as u8,
    };
    if let Err(err) = write_json_atomic(result_path, &outcome) {
        eprintln!(
            "emflow exec-stage: could not write the result file: {}",
            crate::job::error_chain(&err)
        );
        return ExitCode::from(1);
    }
    ExitCode::from(code)
}
