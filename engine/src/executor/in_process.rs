//! Runs jobs on threads of the driver process. For engine tests and for kinds that are
//! cheap; no memory isolation and no per-stage peak memory figure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use emflow_cache::Store;

use super::{Executor, Finished, JobHandle, Wake};
use crate::context::Progress;
use crate::job::{execute_job, Job, JobOutcome};
use crate::kind::Registry;

pub struct InProcessExecutor {
    registry: Registry,
    store: Arc<Store>,
}

impl InProcessExecutor {
    pub fn new(registry: Registry, store: Arc<Store>) -> Self {
        InProcessExecutor { registry, store }
    }
}

struct ThreadHandle {
    result: Arc<Mutex<Option<JobOutcome>>>,
    interrupt: Arc<AtomicBool>,
}

impl Executor for InProcessExecutor {
    fn name(&self) -> &'static str {
        "in-process"
    }

    fn submit(
        &self,
        job: Job,
        progress: Arc<dyn Progress>,
        wake: Wake,
    ) -> anyhow::Result<Box<dyn JobHandle>> {
        let result = Arc::new(Mutex::new(None));
        let interrupt = Arc::new(AtomicBool::new(false));
        let (registry, store) = (self.registry.clone(), self.store.clone());
        let (slot, flag) = (result.clone(), interrupt.clone());
        std::thread::Builder::new()
            .name(format!("stage {}", job.stage_id))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    execute_job(&job, &registry, &store, progress, flag, false)
                }))
                .unwrap_or_else(|_| JobOutcome::Failed {
                    error: format!("stage {} panicked (see the message above)", job.stage_id),
                });
                if let Ok(mut slot) = slot.lock() {
                    *slot = Some(outcome);
                }
                wake.wake();
            })
            .context("starting a thread for a stage")?;
        Ok(Box::new(ThreadHandle { result, interrupt }))
    }
}

impl JobHandle for ThreadHandle {
    fn poll(&mut self) -> anyhow::Result<Option<Finished>> {
        let mut slot = self
            .result
            .lock()
            .map_err(|_| anyhow::anyhow!("stage result lock poisoned"))?;
        Ok(slot.take().map(|outcome| Finished {
            outcome,
            peak_rss_bytes: None,
        }))
    }

    fn cancel(&mut self) {
        self.interrupt.store(true, Ordering::Relaxed);
    }

    fn kill(&mut self) {
        // A thread cannot be killed; the stage sees the interrupt flag and the driver
        // stops waiting for it when it exits.
        self.interrupt.store(true, Ordering::Relaxed);
    }
}
