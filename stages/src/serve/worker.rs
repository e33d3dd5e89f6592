//! The generation worker: batches what is queued, generates, and answers each request.
//!
//! One worker owns the model. It takes every request waiting when it is free (up to
//! [`MAX_BATCH_ROWS`] choices), runs those that share sampling settings as one batch, and
//! answers each: a forward pass over a batch costs little more than over one row, so
//! concurrent clients (a judge with `concurrency: 8`) are served together, not in turn.
//! Every row keeps its own seeded random stream, so a seeded request's sample does not
//! depend on what it was batched with.
//!
//! A streamed request (`stream: true`) is handed to its own writer thread ([`super::stream`])
//! before generation starts; the decode loop's observer ([`Relay`]) posts each of its tokens
//! down an unbounded channel as the step samples it, so a slow or vanished client never
//! holds up the other rows. The other requests are answered whole once the batch is done.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use emflow_model::{Generation, GenerationObserver, GenerationRequest};

use super::api::{ApiError, Ask, Endpoint};
use super::reply::{token_entries, usage, Reply};
use super::stream::{self, Event};
use super::Shared;

/// Most choices generated in one batch.
pub const MAX_BATCH_ROWS: usize = 16;

/// One accepted request, tokenised and checked, waiting for the worker.
pub struct Job {
    pub req: tiny_http::Request,
    pub endpoint: Endpoint,
    pub prompt: Vec<u32>,
    pub ask: Ask,
    pub started: Instant,
}

/// Runs until every sender is gone.
pub fn run(shared: Arc<Shared>, jobs: Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let mut rows = batch[0].ask.n;
        while rows < MAX_BATCH_ROWS {
            match jobs.try_recv() {
                Ok(job) => {
                    rows += job.ask.n;
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        for group in same_sampling(batch) {
            generate_group(&shared, group);
        }
    }
}

/// Jobs split into groups that share sampling settings (one `generate` call each), in
/// arrival order.
fn same_sampling(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        match groups
            .iter_mut()
            .find(|g| g[0].ask.sampling == job.ask.sampling)
        {
            Some(g) => g.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

/// A job of the batch being generated: answered whole at the end, or streamed as it goes.
enum Answer {
    Whole(Box<Job>),
    Streamed {
        events: Sender<Event>,
        /// For the log-probabilities of a finished choice.
        prompt: Vec<u32>,
        logprobs: Option<usize>,
    },
}

impl Answer {
    fn open(shared: &Arc<Shared>, job: Job) -> Answer {
        if !job.ask.stream {
            return Answer::Whole(Box::new(job));
        }
        let (prompt, logprobs) = (job.prompt.clone(), job.ask.logprobs);
        Answer::Streamed {
            events: stream::start(shared.clone(), job),
            prompt,
            logprobs,
        }
    }
}

fn generate_group(shared: &Arc<Shared>, jobs: Vec<Job>) {
    let lm = &shared.lm;
    let rows: Vec<GenerationRequest> = jobs
        .iter()
        .flat_map(|j| {
            j.ask.seeds().into_iter().map(|seed| GenerationRequest {
                prompt_ids: j.prompt.clone(),
                seed,
            })
        })
        .collect();
    // Row r is choice `owners[r].1` of job `owners[r].0`.
    let owners: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..job.ask.n).map(move |c| (j, c)))
        .collect();
    let params = jobs[0].ask.sampling.clone();
    let choices: Vec<usize> = jobs.iter().map(|j| j.ask.n).collect();
    let answers: Vec<Answer> = jobs.into_iter().map(|j| Answer::open(shared, j)).collect();
    shared
        .batches
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let relay = Relay {
        shared,
        owners,
        answers: &answers,
    };
    let generated = lm
        .model
        .generate_observed(&lm.tokenizer, &rows, &params, rows.len(), &relay);
    let mut generated = match generated {
        Ok(g) => g.into_iter(),
        Err(e) => {
            let message = format!("generation failed: {e:#}");
            for answer in answers {
                match answer {
                    Answer::Whole(job) => {
                        shared.fail(job.req, job.started, &ApiError::status(500, &message))
                    }
                    Answer::Streamed { events, .. } => {
                        let _ = events.send(Event::Failed(message.clone()));
                    }
                }
            }
            return;
        }
    };
    for (answer, n) in answers.into_iter().zip(choices) {
        let gens: Vec<Generation> = generated.by_ref().take(n).collect();
        // A streamed job's writer has had every choice already, as each ended.
        if let Answer::Whole(job) = answer {
            answer_whole(shared, *job, &gens);
        }
    }
}

/// The decode loop's observer: passes each streamed row's tokens and ending to its writer.
/// A choice that asked for log-probabilities has them read here as it ends (one forward pass
/// over its prompt and tokens, as a whole answer's are read after the batch), which holds the
/// batch's other rows for that pass.
struct Relay<'a> {
    shared: &'a Shared,
    owners: Vec<(usize, usize)>,
    answers: &'a [Answer],
}

impl Relay<'_> {
    fn streamed(&self, request: usize) -> Option<(&Answer, usize)> {
        let (job, choice) = self.owners[request];
        let answer = &self.answers[job];
        matches!(answer, Answer::Streamed { .. }).then_some((answer, choice))
    }
}

impl GenerationObserver for Relay<'_> {
    fn token(&self, request: usize, token: u32) {
        #[cfg(test)]
        test_gate::pass(&self.shared.name);
        if let Some((Answer::Streamed { events, .. }, choice)) = self.streamed(request) {
            // A writer whose client went away has dropped its receiver: nothing to tell.
            let _ = events.send(Event::Token { choice, id: token });
        }
    }

    fn finished(&self, request: usize, generation: &Generation) {
        let Some((
            Answer::Streamed {
                events,
                prompt,
                logprobs,
            },
            choice,
        )) = self.streamed(request)
        else {
            return;
        };
        let event = match logprobs.map(|k| token_entries(self.shared, prompt, generation, k)) {
            Some(Err(e)) => Event::Failed(format!("reading log-probabilities failed: {e:#}")),
            entries => Event::Done {
                choice,
                generation: generation.clone(),
                logprobs: entries.and_then(Result::ok),
            },
        };
        let _ = events.send(event);
    }
}

fn answer_whole(shared: &Shared, job: Job, gens: &[Generation]) {
    let completion_tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
    let reply = Reply::new(shared, job.endpoint);
    let body = reply.whole(
        &job.prompt,
        &job.ask,
        gens,
        usage(job.prompt.len(), completion_tokens),
    );
    match body {
        Ok(body) => {
            let (method, url) = (job.req.method().to_string(), job.req.url().to_string());
            super::respond_json(job.req, 200, &body);
            let tokens = Some((job.prompt.len(), completion_tokens));
            super::log_line(&method, &url, 200, tokens, job.started);
        }
        Err(e) => shared.fail(
            job.req,
            job.started,
            &ApiError::status(500, format!("{e:#}")),
        ),
    }
}

/// A test seam: holds the decode loop of the server whose model id is `name` after a given
/// number of sampled tokens, so a test can read streamed chunks while generation is provably
/// still under way (no timing involved).
#[cfg(test)]
pub(crate) mod test_gate {
    use std::sync::{Arc, Condvar, Mutex};

    /// Tokens seen so far and tokens let through.
    pub struct Gate {
        counts: Mutex<(u64, u64)>,
        moved: Condvar,
    }

    static GATES: Mutex<Vec<(String, Arc<Gate>)>> = Mutex::new(Vec::new());

    /// Holds the server `name`'s decode loop at its token call number `allowed + 1`.
    pub fn install(name: &str, allowed: u64) -> Arc<Gate> {
        let gate = Arc::new(Gate {
            counts: Mutex::new((0, allowed)),
            moved: Condvar::new(),
        });
        GATES.lock().unwrap().push((name.to_string(), gate.clone()));
        gate
    }

    pub(super) fn pass(name: &str) {
        let gate = GATES
            .lock()
            .unwrap()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, g)| g.clone());
        if let Some(gate) = gate {
            let mut counts = gate.counts.lock().unwrap();
            counts.0 += 1;
            gate.moved.notify_all();
            while counts.0 > counts.1 {
                counts = gate.moved.wait(counts).unwrap();
            }
        }
    }

    impl Gate {
        /// Token calls made so far, the held one included.
        pub fn seen(&self) -> u64 {
            self.counts.lock().unwrap().0
        }

        /// Blocks until the decode loop has reached (and, if held, stopped at) token call `n`.
        pub fn wait_for(&self, n: u64) {
            let mut counts = self.counts.lock().unwrap();
            while counts.0 < n {
                counts = self.moved.wait(counts).unwrap();
            }
        }

        /// Lets every further token through.
        pub fn open(&self) {
            self.counts.lock().unwrap().1 = u64::MAX;
            self.moved.notify_all();
        }
    }
}
