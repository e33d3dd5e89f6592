//! The execute phase of a run: the scheduling loop. Each turn settles what needs no work
//! (cache hits, stages whose upstream failed), starts queued jobs that fit the free slots,
//! waits for a wake-up or 100 ms, handles a stop request and collects finished jobs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use emflow_cache::StageRecord;
use serde_json::json;

use super::lines::intact_record;
use super::{make_job, RunEnv, RunOptions, RunPlan, StageResult};
use crate::console::{duration, StageProgress, Word};
use crate::executor::{Finished, JobHandle, Wake};
use crate::job::{error_chain, Job, JobArtifact, JobMode, JobOutcome};
use crate::keys::short;
use crate::pipeline::Pipeline;
use crate::plan::{Planner, Resolved, State};
use crate::slots::{Allocation, Slots};

/// Where a selected stage is in the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Its upstream has not all settled yet.
    Waiting,
    Queued,
    Running,
    Settled,
}

struct Running {
    i: usize,
    handle: Box<dyn JobHandle>,
    alloc: Allocation,
    progress: Arc<StageProgress>,
    started: Instant,
}

/// What the execute phase leaves for the summary.
pub(super) struct Executed {
    /// The selected stages in topological order.
    pub order: Vec<usize>,
    /// Each stage's record, once cached or committed.
    pub records: Vec<Option<StageRecord>>,
    pub results: HashMap<usize, StageResult>,
    /// Failed instance id -> error chain.
    pub errors: BTreeMap<String, String>,
}

/// The state of one run's scheduling loop.
pub(super) struct Schedule<'a> {
    pipeline: &'a Pipeline,
    env: &'a RunEnv<'a>,
    opts: &'a RunOptions,
    run_id: &'a str,
    planner: Planner<'a>,
    forced: BTreeSet<usize>,
    models: HashMap<String, JobArtifact>,
    order: Vec<usize>,
    slot: Vec<Slot>,
    records: Vec<Option<StageRecord>>,
    /// Records the plan already read and found intact, by key: a no-op rerun reads and
    /// checks each record once, not once for the header and again to settle the stage.
    planned: HashMap<String, StageRecord>,
    results: HashMap<usize, StageResult>,
    errors: BTreeMap<String, String>,
    queue: Vec<(usize, Job)>,
    running: Vec<Running>,
    slots: Slots,
    stopping: bool,
    cancel_deadline: Option<Instant>,
}

impl<'a> Schedule<'a> {
    pub(super) fn new(
        plan: RunPlan<'a>,
        env: &'a RunEnv<'a>,
        opts: &'a RunOptions,
        run_id: &'a str,
    ) -> anyhow::Result<Self> {
        let RunPlan {
            mut planner,
            selection,
            forced,
            statuses,
            ..
        } = plan;
        let pipeline = planner.pipeline;
        let models = planner.available_models(&planner.models_used(selection.iter().copied()))?;
        let n = pipeline.stages.len();
        let order: Vec<usize> = (planner.dag.order().iter().copied())
            .filter(|i| selection.contains(i))
            .collect();
        let mut slot = vec![Slot::Settled; n];
        for &i in &order {
            slot[i] = Slot::Waiting;
        }
        let planned = statuses
            .into_iter()
            .filter(|(_, s)| matches!(s.state, State::Cached))
            .filter_map(|(_, s)| Some((s.key?, s.record?)))
            .collect();
        Ok(Schedule {
            pipeline,
            env,
            opts,
            run_id,
            planner,
            forced,
            models,
            order,
            slot,
            records: vec![None; n],
            planned,
            results: HashMap::new(),
            errors: BTreeMap::new(),
            queue: Vec::new(),
            running: Vec::new(),
            slots: Slots::new(opts.jobs, opts.cpus, opts.gpus.clone()),
            stopping: false,
            cancel_deadline: None,
        })
    }

    /// Runs the loop until nothing runs and nothing more can start.
    pub(super) fn run(mut self) -> anyhow::Result<Executed> {
        let (tx, rx) = mpsc::channel();
        let wake = Wake(tx);
        loop {
            self.settle_waiting()?;
            if !self.stopping {
                self.start_queued(&wake);
            }
            // With nothing running and nothing queued, every waiting stage has been settled:
            // the pass above resolves a waiting stage as soon as its upstream is settled.
            if self.running.is_empty() && (self.stopping || self.queue.is_empty()) {
                break;
            }
            let _ = rx.recv_timeout(Duration::from_millis(100));
            while rx.try_recv().is_ok() {}
            self.handle_stop_request();
            self.collect_finished()?;
        }
        self.skip_unstarted();
        Ok(Executed {
            order: self.order,
            records: self.records,
            results: self.results,
            errors: self.errors,
        })
    }

    fn id(&self, i: usize) -> &'a str {
        &self.pipeline.stages[i].id
    }

    fn settle(&mut self, i: usize, result: StageResult) {
        self.slot[i] = Slot::Settled;
        self.results.insert(i, result);
    }

    /// Settles what can be settled without running anything, in topological order, so a
    /// chain of cache hits resolves in one pass; queues the misses.
    fn settle_waiting(&mut self) -> anyhow::Result<()> {
        for k in 0..self.order.len() {
            let i = self.order[k];
            if self.slot[i] != Slot::Waiting {
                continue;
            }
            let ups: Vec<usize> = self.planner.dag.upstream(i).collect();
            if let Some(&bad) = ups.iter().find(|j| {
                matches!(
                    self.results.get(j),
                    Some(StageResult::Failed | StageResult::Skipped | StageResult::Interrupted)
                )
            }) {
                let reason = format!("upstream {} did not complete", self.id(bad));
                self.skip(i, &reason, &reason);
                continue;
            }
            if ups.iter().any(|&j| self.records[j].is_none()) {
                continue;
            }
            match self.planner.resolve(i, &self.records, &self.models)? {
                Resolved::Pending { waiting_on } => {
                    return Err(anyhow!(
                        "stage {} still waits on {} after its upstream completed; this is a bug",
                        self.id(i),
                        waiting_on.join(", ")
                    ))
                }
                Resolved::Ready { inputs, parts, key } => {
                    self.settle_or_queue(i, inputs, parts.to_value(), key)?
                }
            }
        }
        Ok(())
    }

    /// A stage whose key is known: settled from its record when cached (and not forced),
    /// else queued as a job.
    fn settle_or_queue(
        &mut self,
        i: usize,
        inputs: BTreeMap<String, Vec<JobArtifact>>,
        key_parts: serde_json::Value,
        key: String,
    ) -> anyhow::Result<()> {
        let id = self.id(i);
        let forced = self.forced.contains(&i);
        let cached = if forced {
            None
        } else if let Some(record) = self.planned.remove(&key) {
            Some(record)
        } else {
            intact_record(&mut self.planner, &self.env.reporter, id, &key)?
        };
        let Some(record) = cached else {
            let mode = JobMode::Commit { force: forced };
            let store = self.env.store.as_ref();
            let job = make_job(
                self.run_id,
                self.pipeline,
                i,
                inputs,
                key_parts,
                key,
                store,
                mode,
            );
            self.queue.push((i, job));
            self.slot[i] = Slot::Queued;
            return Ok(());
        };
        self.env.store.note_stage_record(id, &key)?;
        let env = self.env;
        let reporter = &env.reporter;
        reporter.status(Word::Cached, id, &format!("({})", short(&key)), "");
        reporter.event("cached", json!({ "stage": id, "key": key }));
        self.records[i] = Some(record);
        self.settle(i, StageResult::Cached);
        Ok(())
    }

    /// Starts what fits, in topological order (the queue keeps insertion order).
    fn start_queued(&mut self, wake: &Wake) {
        let mut k = 0;
        while k < self.queue.len() {
            let i = self.queue[k].0;
            let Some(alloc) = self.slots.try_take(&self.pipeline.stages[i].resources) else {
                k += 1;
                continue;
            };
            let (i, mut job) = self.queue.remove(k);
            job.threads = alloc.cpus;
            job.refresh_memo = self.opts.refresh_memo;
            job.device = alloc.device();
            job.gpu_ids = alloc.gpu_ids();
            let progress = self.env.reporter.stage_progress(self.id(i));
            match self
                .env
                .executor
                .submit(job, progress.clone(), wake.clone())
            {
                Ok(handle) => {
                    self.slot[i] = Slot::Running;
                    let started = Instant::now();
                    self.running.push(Running {
                        i,
                        handle,
                        alloc,
                        progress,
                        started,
                    });
                }
                Err(err) => {
                    self.slots.give_back(alloc);
                    progress.finish();
                    self.fail(i, 0.0, &error_chain(&err));
                }
            }
        }
    }

    /// Ctrl-C: ask running stages to checkpoint and stop; after 10 s, or a second Ctrl-C,
    /// kill them.
    fn handle_stop_request(&mut self) {
        let stop = &self.env.stop;
        if stop.load(Ordering::Relaxed) && self.cancel_deadline.is_none() {
            self.stopping = true;
            self.cancel_deadline = Some(Instant::now() + Duration::from_secs(10));
            self.env.reporter.line("stopping: asking running stages to save a checkpoint and stop (Ctrl-C again to kill them now)");
            for r in &mut self.running {
                r.handle.cancel();
            }
        }
        if let Some(deadline) = self.cancel_deadline {
            if Instant::now() > deadline
                || stop.load(Ordering::Relaxed) && crate::signals::second_interrupt()
            {
                for r in &mut self.running {
                    r.handle.kill();
                }
            }
        }
    }

    fn collect_finished(&mut self) -> anyhow::Result<()> {
        let mut k = 0;
        while k < self.running.len() {
            let finished = match self.running[k].handle.poll() {
                Ok(f) => f,
                Err(err) => {
                    let warning = format!("warning: {}", error_chain(&err));
                    self.env.reporter.line(&warning);
                    None
                }
            };
            let Some(finished) = finished else {
                k += 1;
                continue;
            };
            let r = self.running.remove(k);
            self.slots.give_back(r.alloc);
            r.progress.finish();
            self.slot[r.i] = Slot::Settled;
            self.finished(r.i, r.started.elapsed().as_secs_f64(), finished)?;
        }
        Ok(())
    }

    /// Reports how stage `i`'s job ended, after `secs` seconds.
    fn finished(&mut self, i: usize, secs: f64, finished: Finished) -> anyhow::Result<()> {
        let id = self.id(i);
        let env = self.env;
        let reporter = &env.reporter;
        match finished.outcome {
            JobOutcome::Committed { record, reused } => {
                if reused {
                    self.reused(i, &record);
                } else {
                    let rss = finished.peak_rss_bytes.unwrap_or(record.peak_rss_bytes);
                    let mem = if rss > 0 {
                        format!("  peak {}", crate::host::human_bytes(rss))
                    } else {
                        String::new()
                    };
                    reporter.status(Word::Pass, id, &format!("{}{mem}", duration(secs)), "");
                    reporter.event("pass", json!({ "stage": id, "key": record.key, "duration_s": secs, "peak_rss_bytes": rss }));
                    self.results.insert(i, StageResult::Ran);
                }
                self.records[i] = Some(*record);
            }
            JobOutcome::Failed { error } => self.fail(i, secs, &error),
            JobOutcome::Interrupted => {
                reporter.status(
                    Word::Stop,
                    id,
                    &format!(
                        "{}  stopped on request; the next `emflow run` runs it again (from its checkpoint, if it saved one)",
                        duration(secs)
                    ),
                    "",
                );
                reporter.event("interrupted", json!({ "stage": id, "duration_s": secs }));
                self.results.insert(i, StageResult::Interrupted);
                self.stopping = true;
            }
            JobOutcome::Verified { .. } => {
                return Err(anyhow!("executor returned a verify result for a run job"))
            }
        }
        Ok(())
    }

    /// A job that found its key committed by someone else while it waited for the lock.
    fn reused(&mut self, i: usize, record: &StageRecord) {
        let id = self.id(i);
        // Same id: another process ran this very stage. Another id: a stage whose inputs
        // turned out identical to this one's (its upstream produced the same bytes)
        // committed the key first.
        let origin = if record.stage_id == id {
            "produced meanwhile by another emflow process".to_string()
        } else {
            format!(
                "the same key as {}, which produced it first",
                record.stage_id
            )
        };
        let env = self.env;
        let reporter = &env.reporter;
        let detail = format!("({}, {origin})", short(&record.key));
        reporter.status(Word::Cached, id, &detail, "");
        reporter.event(
            "cached",
            json!({ "stage": id, "key": record.key, "reused": true }),
        );
        self.results.insert(i, StageResult::Reused);
    }

    fn fail(&mut self, i: usize, secs: f64, error: &str) {
        let id = self.id(i);
        self.env
            .reporter
            .status(Word::Fail, id, &duration(secs), error);
        self.env.reporter.event(
            "fail",
            json!({ "stage": id, "duration_s": secs, "error": error }),
        );
        self.errors.insert(id.to_string(), error.to_string());
        self.settle(i, StageResult::Failed);
        self.stopping |= !self.opts.keep_going;
    }

    /// Settles stage `i` as skipped: `detail` on its status line, `reason` in the event.
    fn skip(&mut self, i: usize, detail: &str, reason: &str) {
        let id = self.id(i);
        self.env.reporter.status(Word::Skip, id, detail, "");
        self.env
            .reporter
            .event("skip", json!({ "stage": id, "reason": reason }));
        self.settle(i, StageResult::Skipped);
    }

    /// After the loop: what never started because the run stopped.
    fn skip_unstarted(&mut self) {
        let why = if self.env.stop.load(Ordering::Relaxed) {
            "the run was stopped"
        } else {
            "the run stopped after a failure (--keep-going runs independent stages)"
        };
        for k in 0..self.order.len() {
            let i = self.order[k];
            if self.slot[i] != Slot::Settled {
                self.skip(i, &format!("not started: {why}"), why);
            }
        }
    }
}
