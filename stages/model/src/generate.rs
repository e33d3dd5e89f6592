//! Batched, seeded generation: left-padded prompts, one prefill, then lockstep decode steps over
//! a preallocated KV cache with fused kernels and no autograd graph.
//!
//! Reproducibility is per sequence, not per batch: every request carries its own seed, which
//! keys its own ChaCha20 stream ([`crate::seed`]), and the sampler reads only that row's logits. So a sample does
//! not depend on which other requests share its batch, on the batch size, or on the thread count
//! (CPU matmuls are bitwise stable across thread counts; see the candle notes). The sampling
//! algorithm is written out here (not delegated to `rand`'s distributions) so its output is
//! pinned: temperature, then top-k, then top-p (nucleus), then min-p, then one uniform draw over
//! the kept tokens. Rows that finish are dropped from the batch (and from the KV cache) so the
//! remaining rows decode at the smaller batch's cost.
//!
//! A caller that passes text on as it is made (`emflow serve`'s `stream: true`) watches the
//! decode loop through a [`GenerationObserver`] ([`Transformer::generate_observed`]): it is told
//! each row's token as its step samples it and each row's generation as it ends. Watching
//! changes nothing in what is generated.

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use rand::RngCore;
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::seed::{self, Purpose};
use crate::text::Tokenizer;
use crate::transformer::{KvCache, Mode, Transformer};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// 1 = off.
    pub top_p: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 0 = off: drop tokens below min_p times the top token's probability.
    pub min_p: f64,
    pub max_new_tokens: usize,
    /// Generation ends when the decoded completion contains one of these; the returned text is
    /// cut before it.
    pub stop: Vec<String>,
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_new_tokens,
            stop: Vec::new(),
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "temperature {} must be a finite number >= 0",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p {} must be in (0, 1]", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("min_p {} must be in [0, 1]", self.min_p);
        }
        if self.stop.iter().any(String::is_empty) {
            bail!("stop strings must not be empty");
        }
        Ok(())
    }
}

pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    /// Usually `derive_seed(stage_seed, prompt_id, sample_index)`.
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Stop,
    Length,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Generation {
    /// Generated ids, including the final EOS or the token that completed a stop string.
    pub tokens: Vec<u32>,
    /// Decoded completion without the EOS token and cut before any stop string.
    pub text: String,
    pub finish: Finish,
}

/// A sampling seed from (stage seed, prompt key, sample index): [`Purpose::Sample`].
pub fn derive_seed(stage_seed: u64, prompt_key: &str, sample_index: u64) -> u64 {
    seed::seed_u64(Purpose::Sample {
        stage_seed,
        prompt: prompt_key,
        index: sample_index,
    })
}

/// One sequence's random stream and the pinned sampling procedure.
pub(crate) struct RowSampler {
    rng: ChaCha20Rng,
}

impl RowSampler {
    pub(crate) fn new(seed: u64) -> Self {
        RowSampler {
            rng: seed::stream(Purpose::TokenSampler { seed }),
        }
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Draw a token from `logits` (one row) under `p` (temperature > 0).
    pub(crate) fn sample(&mut self, logits: &[f32], p: &SamplingParams) -> u32 {
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let probs: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) * inv_t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        let vocab = probs.len();
        // Candidates as (id, weight); sorted by weight descending (ties: lower id first) when any
        // truncation is on, else in id order.
        let by_weight = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut cands: Vec<(u32, f64)>;
        let mut cand_total = total;
        if p.top_k > 0 && p.top_k < vocab {
            cands = probs
                .iter()
                .enumerate()
                .map(|(i, &w)| (i as u32, w))
                .collect();
            cands.select_nth_unstable_by(p.top_k - 1, by_weight);
            cands.truncate(p.top_k);
            cands.sort_by(by_weight);
            cand_total = cands.iter().map(|c| c.1).sum();
        } else if p.top_p < 1.0 {
            // The nucleus is a prefix of the sorted order, so it lies inside {w >= threshold}
            // once that set holds top_p of the mass: sort only that set.
            let mut threshold = 1e-4;
            loop {
                cands = probs
                    .iter()
                    .enumerate()
                    .filter(|(_, &w)| w >= threshold)
                    .map(|(i, &w)| (i as u32, w))
                    .collect();
                let mass: f64 = cands.iter().map(|c| c.1).sum();
                if mass >= p.top_p * total || threshold == 0.0 {
                    break;
                }
                threshold = if threshold < 1e-30 {
                    0.0
                } else {
                    threshold * 1e-4
                };
            }
            cands.sort_by(by_weight);
        } else {
            cands = probs
                .iter()
                .enumerate()
                .map(|(i, &w)| (i as u32, w))
                .collect();
        }
        if p.top_p < 1.0 {
            let target = p.top_p * cand_total;
            let mut acc = 0.0;
            let mut keep = cands.len();
            for (n, c) in cands.iter().enumerate() {
                acc += c.1;
                if acc >= target {
                    keep = n + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            // The top token has weight exp(0) = 1.
            cands.retain(|c| c.1 >= p.min_p);
        }
        let kept: f64 = cands.iter().map(|c| c.1).sum();
        let mut target = self.uniform() * kept;
        for c in &cands {
            if target < c.1 {
                return c.0;
            }
            target -= c.1;
        }
        // Rounding left `target` past the end: the last kept token.
        cands.last().map_or(0, |c| c.0)
    }
}

/// Sees generation as it runs, for a caller that passes tokens on as they come (a streaming
/// server). Calls come from the generating thread, inside the decode loop: an observer that
/// blocks holds up every row of the batch, so it should hand the work on (e.g. down a channel).
pub trait GenerationObserver {
    /// The decode step that just ran gave request `request` (its index in the call's
    /// requests) the token `token`; every generated token is reported once, in order,
    /// including the EOS or stop-string token that ends the row.
    fn token(&self, request: usize, token: u32);
    /// Request `request` has ended, with this generation (the one the call returns); it
    /// follows the row's last `token` call.
    fn finished(&self, request: usize, generation: &Generation);
}

/// The observer of the calls that watch nothing.
struct Unobserved;

impl GenerationObserver for Unobserved {
    fn token(&self, _: usize, _: u32) {}
    fn finished(&self, _: usize, _: &Generation) {}
}

/// Who watches one generation call: `progress` hears the requests finished so far after each
/// batch, `observer` each token and each ending.
struct Watch<'a> {
    progress: &'a dyn Fn(usize),
    observer: &'a dyn GenerationObserver,
}

struct Row {
    request: usize,
    sampler: RowSampler,
    tokens: Vec<u32>,
    key_valid: Vec<bool>,
    finish: Option<Finish>,
}

impl Transformer {
    /// Batched generation (left padding, KV cache, fused kernels); each row draws from its own
    /// seeded stream, so output is independent of batch size and threads. `progress` receives
    /// the number of requests finished so far.
    pub fn generate(
        &self,
        tok: &Tokenizer,
        reqs: &[GenerationRequest],
        params: &SamplingParams,
        batch_size: usize,
        progress: &dyn Fn(usize),
    ) -> Result<Vec<Generation>> {
        check_call(reqs, params, batch_size)?;
        let watch = Watch {
            progress,
            observer: &Unobserved,
        };
        self.generate_after(tok, reqs, params, batch_size, None, &watch)
    }

    /// [`Transformer::generate`] that reports each token to `observer` as its decode step
    /// samples it, and each request's generation as that request ends (before the rest of its
    /// batch is done). The generations are the same as `generate`'s, bit for bit.
    pub fn generate_observed(
        &self,
        tok: &Tokenizer,
        reqs: &[GenerationRequest],
        params: &SamplingParams,
        batch_size: usize,
        observer: &dyn GenerationObserver,
    ) -> Result<Vec<Generation>> {
        check_call(reqs, params, batch_size)?;
        let watch = Watch {
            progress: &|_| {},
            observer,
        };
        self.generate_after(tok, reqs, params, batch_size, None, &watch)
    }

    /// [`Transformer::generate`] for requests that open with the same long run of tokens, as a
    /// grader's or judge's prompts do (a fixed template, then the item): that common prefix
    /// runs through the model once and its keys and values are copied into every row, instead
    /// of being recomputed for each request. Below [`MIN_SHARED_PREFIX`] common tokens this is
    /// plain `generate`.
    ///
    /// The prefix is the whole call's, so a row's logits can differ in the last bits from a
    /// call with other company; seeds, batch size and thread count still do not matter.
    pub fn generate_sharing_prefix(
        &self,
        tok: &Tokenizer,
        reqs: &[GenerationRequest],
        params: &SamplingParams,
        batch_size: usize,
        progress: &dyn Fn(usize),
    ) -> Result<Vec<Generation>> {
        check_call(reqs, params, batch_size)?;
        let watch = Watch {
            progress,
            observer: &Unobserved,
        };
        let shared = common_prefix_len(reqs);
        if reqs.len() < 2 || shared < MIN_SHARED_PREFIX || params.max_new_tokens == 0 {
            return self.generate_after(tok, reqs, params, batch_size, None, &watch);
        }
        let mut prefix = self.kv_cache(None, 1, shared)?;
        let ids = Tensor::from_vec(
            reqs[0].prompt_ids[..shared].to_vec(),
            (1, shared),
            &self.device,
        )?;
        self.hidden_eval(&ids, &[vec![true; shared]], Some(&mut prefix))?;
        self.generate_after(tok, reqs, params, batch_size, Some(&prefix), &watch)
    }

    /// The batching loop of the entry points; `prefix` holds the keys and values of the first
    /// `prefix.len` tokens of every request (one row).
    fn generate_after(
        &self,
        tok: &Tokenizer,
        reqs: &[GenerationRequest],
        params: &SamplingParams,
        batch_size: usize,
        prefix: Option<&KvCache>,
        watch: &Watch,
    ) -> Result<Vec<Generation>> {
        // Similar lengths together: less padding. Outputs go back in request order.
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by_key(|&i| reqs[i].prompt_ids.len());
        let mut out: Vec<Option<Generation>> = vec![None; reqs.len()];
        let mut done = 0;
        for chunk in order.chunks(batch_size) {
            let batch = self.generate_batch(tok, reqs, chunk, params, prefix, watch.observer)?;
            for (i, g) in batch {
                out[i] = Some(g);
                done += 1;
                (watch.progress)(done);
            }
        }
        out.into_iter()
            .enumerate()
            .map(|(i, g)| {
                g.with_context(|| format!("internal: request {i} produced no generation"))
            })
            .collect()
    }

    /// One batch of requests (indices `chunk` into `reqs`): prefill, then decode steps until
    /// every row has finished, telling `observer` each step's tokens and each row's end.
    fn generate_batch(
        &self,
        tok: &Tokenizer,
        reqs: &[GenerationRequest],
        chunk: &[usize],
        params: &SamplingParams,
        prefix: Option<&KvCache>,
        observer: &dyn GenerationObserver,
    ) -> Result<Vec<(usize, Generation)>> {
        let prompts = lay_out_prompts(tok, reqs, chunk, prefix.map_or(0, |p| p.len));
        let mut rows = prompts.rows;
        if params.max_new_tokens == 0 {
            let empty = rows
                .into_iter()
                .map(|r| {
                    Ok((
                        r.request,
                        finish_row(tok, r.tokens, Finish::Length, params)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            announce_finished(observer, &empty);
            return Ok(empty);
        }
        let (mut cache, mut logits) = self.prefill(
            reqs,
            chunk,
            &rows,
            (&prompts.ids, prompts.len),
            prefix,
            params.max_new_tokens,
        )?;
        let mut finished = Vec::with_capacity(chunk.len());
        let stop_window = params.stop.iter().map(|s| s.len()).max().unwrap_or(0) + 8;
        loop {
            let next = draw_next(&logits, &mut rows, params)?;
            mark_finishes(tok, &mut rows, next, params, stop_window)?;
            for r in &rows {
                if let Some(&t) = r.tokens.last() {
                    observer.token(r.request, t);
                }
            }
            if rows.iter().any(|r| r.finish.is_some()) {
                let before = finished.len();
                let keep = retire_finished(tok, &mut rows, &mut finished, params)?;
                announce_finished(observer, &finished[before..]);
                if rows.is_empty() {
                    break;
                }
                cache.select_rows(&keep)?;
            }
            let last: Vec<u32> = rows
                .iter()
                .map(|r| *r.tokens.last().unwrap_or(&tok.pad_id()))
                .collect();
            let ids = Tensor::from_vec(last, (rows.len(), 1), &self.device)?;
            let key_valid: Vec<Vec<bool>> = rows.iter().map(|r| r.key_valid.clone()).collect();
            let h = self.hidden_eval(&ids, &key_valid, Some(&mut cache))?;
            logits = self.logits(&h, Mode::Eval)?.squeeze(1)?;
        }
        Ok(finished)
    }

    /// Runs the prompts laid out in `ids` (rows of `prompt_len`) into a fresh cache after
    /// `prefix`, sized for `max_new_tokens` more; returns it with each row's next-token
    /// logits. Rows with the same prompt (an RL group's generations) share one prefill: only
    /// the first row of each prompt runs, and the cache and logits rows are copied out after.
    fn prefill(
        &self,
        reqs: &[GenerationRequest],
        chunk: &[usize],
        rows: &[Row],
        (ids, prompt_len): (&[u32], usize),
        prefix: Option<&KvCache>,
        max_new_tokens: usize,
    ) -> Result<(KvCache, Tensor)> {
        let shared = prefix.map_or(0, |p| p.len);
        let mut unique: Vec<usize> = Vec::new();
        let copy_from: Vec<u32> = chunk
            .iter()
            .enumerate()
            .map(|(r, &i)| {
                let same = |&u: &usize| reqs[chunk[u]].prompt_ids == reqs[i].prompt_ids;
                let slot = unique.iter().position(same).unwrap_or_else(|| {
                    unique.push(r);
                    unique.len() - 1
                });
                slot as u32
            })
            .collect();
        let mut cache =
            self.kv_cache(prefix, unique.len(), shared + prompt_len + max_new_tokens)?;
        let unique_ids: Vec<u32> = unique
            .iter()
            .flat_map(|&r| &ids[r * prompt_len..(r + 1) * prompt_len])
            .copied()
            .collect();
        let ids = Tensor::from_vec(unique_ids, (unique.len(), prompt_len), &self.device)?;
        let key_valid: Vec<Vec<bool>> = unique.iter().map(|&r| rows[r].key_valid.clone()).collect();
        let h = self.hidden_eval(&ids, &key_valid, Some(&mut cache))?;
        let mut logits = self
            .logits(&h.narrow(1, prompt_len - 1, 1)?, Mode::Eval)?
            .squeeze(1)?;
        if unique.len() < chunk.len() {
            cache.select_rows(&copy_from)?;
            logits = logits.index_select(&Tensor::new(copy_from.as_slice(), &self.device)?, 0)?;
        }
        Ok((cache, logits))
    }
}

/// A batch's prompts, left-padded to one length, and a fresh row per request.
struct LaidOut {
    /// (rows, len) token ids, row-major.
    ids: Vec<u32>,
    len: usize,
    rows: Vec<Row>,
}

/// Left-pads the prompts of `chunk` after the `shared` tokens a prefix cache already holds
/// (positions count valid slots only, so the padding in the middle is unseen).
fn lay_out_prompts(
    tok: &Tokenizer,
    reqs: &[GenerationRequest],
    chunk: &[usize],
    shared: usize,
) -> LaidOut {
    let prompt_len = chunk
        .iter()
        .map(|&i| reqs[i].prompt_ids.len() - shared)
        .max()
        .unwrap_or(0);
    let pad = tok.pad_id();
    let mut ids = Vec::with_capacity(chunk.len() * prompt_len);
    let mut rows = Vec::with_capacity(chunk.len());
    for &i in chunk {
        let prompt = &reqs[i].prompt_ids[shared..];
        let padding = prompt_len - prompt.len();
        ids.extend(std::iter::repeat_n(pad, padding));
        ids.extend_from_slice(prompt);
        let mut key_valid = vec![true; shared];
        key_valid.resize(shared + padding, false);
        key_valid.resize(shared + prompt_len, true);
        rows.push(Row {
            request: i,
            sampler: RowSampler::new(reqs[i].seed),
            tokens: Vec::new(),
            key_valid,
            finish: None,
        });
    }
    LaidOut {
        ids,
        len: prompt_len,
        rows,
    }
}

/// Each row's next token from its logits row: the argmax at temperature 0, else a draw from
/// the row's own generator (so rows can be drawn in parallel without changing any draw).
fn draw_next(logits: &Tensor, rows: &mut [Row], params: &SamplingParams) -> Result<Vec<u32>> {
    Ok(if params.temperature == 0.0 {
        logits.argmax(D::Minus1)?.to_vec1::<u32>()?
    } else {
        let host = logits.to_vec2::<f32>()?;
        rows.par_iter_mut()
            .zip(host.par_iter())
            .map(|(r, l)| r.sampler.sample(l, params))
            .collect()
    })
}

/// Appends each row's new token and marks the rows it finishes: EOS, a stop string, or the
/// length limit.
fn mark_finishes(
    tok: &Tokenizer,
    rows: &mut [Row],
    next: Vec<u32>,
    params: &SamplingParams,
    stop_window: usize,
) -> Result<()> {
    let eos = tok.eos_ids();
    for (r, t) in rows.iter_mut().zip(next) {
        r.tokens.push(t);
        r.key_valid.push(true);
        if eos.contains(&t) {
            r.finish = Some(Finish::Eos);
        } else if !params.stop.is_empty() && hits_stop(tok, &r.tokens, &params.stop, stop_window)? {
            r.finish = Some(Finish::Stop);
        } else if r.tokens.len() >= params.max_new_tokens {
            r.finish = Some(Finish::Length);
        }
    }
    Ok(())
}

/// Moves the finished rows' generations to `finished`; returns the indices (in the old order)
/// of the rows still running, for the cache to keep.
fn retire_finished(
    tok: &Tokenizer,
    rows: &mut Vec<Row>,
    finished: &mut Vec<(usize, Generation)>,
    params: &SamplingParams,
) -> Result<Vec<u32>> {
    let keep: Vec<u32> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.finish.is_none())
        .map(|(i, _)| i as u32)
        .collect();
    let mut still = Vec::with_capacity(keep.len());
    for r in rows.drain(..) {
        match r.finish {
            Some(f) => {
                let request = r.request;
                finished.push((request, finish_row(tok, r.tokens, f, params)?));
            }
            None => still.push(r),
        }
    }
    *rows = still;
    Ok(keep)
}

fn announce_finished(observer: &dyn GenerationObserver, finished: &[(usize, Generation)]) {
    for (request, generation) in finished {
        observer.finished(*request, generation);
    }
}

fn check_call(
    reqs: &[GenerationRequest],
    params: &SamplingParams,
    batch_size: usize,
) -> Result<()> {
    params.validate()?;
    if batch_size == 0 {
        bail!("generation batch size must be at least 1");
    }
    if let Some(i) = reqs.iter().position(|r| r.prompt_ids.is_empty()) {
        bail!("generation request {i} has an empty prompt");
    }
    Ok(())
}

/// Common tokens below which [`Transformer::generate_sharing_prefix`] does not bother: a
/// chat template's opening alone is about this long.
pub const MIN_SHARED_PREFIX: usize = 32;

/// Tokens every request starts with, leaving each at least one token of its own (the last
/// prompt token's logits pick the first generated token).
fn common_prefix_len(reqs: &[GenerationRequest]) -> usize {
    let Some((first, rest)) = reqs.split_first() else {
        return 0;
    };
    let mut n = first.prompt_ids.len();
    for r in rest {
        n = n.min(
            first.prompt_ids[..n]
                .iter()
                .zip(&r.prompt_ids)
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    let shortest = reqs.iter().map(|r| r.prompt_ids.len()).min().unwrap_or(0);
    n.min(shortest.saturating_sub(1))
}

/// Whether the tail of the completion contains a stop string (only the last `window` tokens are
/// decoded: a stop string of n bytes spans at most n tokens).
fn hits_stop(tok: &Tokenizer, tokens: &[u32], stop: &[String], window: usize) -> Result<bool> {
    let tail = &tokens[tokens.len().saturating_sub(window)..];
    let text = tok.decode(tail)?;
    Ok(stop.iter().any(|s| text.contains(s.as_str())))
}

fn finish_row(
    tok: &Tokenizer,
    tokens: Vec<u32>,
    finish: Finish,
    params: &SamplingParams,
) -> Result<Generation> {
    let body = match finish {
        Finish::Eos => &tokens[..tokens.len().saturating_sub(1)],
        _ => &tokens[..],
    };
    let mut text = tok.decode(body)?;
    if finish == Finish::Stop {
        if let Some(cut) = params
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
        }
    }
    Ok(Generation {
        tokens,
        text,
        finish,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_p: f64, top_k: usize, min_p: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            max_new_tokens: 1,
            stop: vec![],
        }
    }

    #[test]
    fn sampling_frequencies_follow_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln(), f32::NEG_INFINITY];
        let mut s = RowSampler::new(7);
        let mut counts = [0usize; 4];
        for _ in 0..60_000 {
            counts[s.sample(&logits, &params(1.0, 1.0, 0, 0.0)) as usize] += 1;
        }
        let freq: Vec<f64> = counts.iter().map(|&c| c as f64 / 60_000.0).collect();
        for (f, want) in freq.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0, 0.0]) {
            assert!((f - want).abs() < 0.01, "{freq:?}");
        }
    }

    #[test]
    fn truncations_keep_only_allowed_tokens() {
        let logits = [3.0f32, 2.0, 1.0, 0.0, -1.0];
        let mut s = RowSampler::new(3);
        for _ in 0..2000 {
            assert!(s.sample(&logits, &params(1.0, 1.0, 2, 0.0)) < 2);
            // p(0) = 0.64, p(0)+p(1) = 0.88: nucleus 0.8 keeps two tokens.
            assert!(s.sample(&logits, &params(1.0, 0.8, 0, 0.0)) < 2);
            // min_p 0.3: exp(-1) = 0.37 kept, exp(-2) = 0.14 dropped.
            assert!(s.sample(&logits, &params(1.0, 1.0, 0, 0.3)) < 2);
            assert_eq!(s.sample(&logits, &params(1.0, 0.5, 0, 0.0)), 0);
        }
    }

    #[test]
    fn same_seed_same_stream() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let p = params(0.8, 0.9, 0, 0.0);
        let a: Vec<u32> = (0..50)
            .scan(RowSampler::new(11), |s, _| Some(s.sample(&logits, &p)))
            .collect();
        let b: Vec<u32> = (0..50)
            .scan(RowSampler::new(11), |s, _| Some(s.sample(&logits, &p)))
            .collect();
        let c: Vec<u32> = (0..50)
            .scan(RowSampler::new(12), |s, _| Some(s.sample(&logits, &p)))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
