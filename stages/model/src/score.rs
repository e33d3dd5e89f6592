//! Log-probabilities of given completions (judges, evaluation, RL bookkeeping), without a graph.
//!
//! Sequences are batched by similar length and right-padded; only the hidden states that predict
//! completion tokens go through the output projection, in bounded chunks, so scoring long
//! completions over a large vocabulary does not materialise (batch, seq, vocab) logits.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};

use crate::transformer::{KvCache, Mode, Transformer};

/// Rows of hidden states projected to the vocabulary at once.
const LOGIT_ROWS: usize = 256;
/// Candidates scored together against one cached prompt.
const CANDIDATE_BATCH: usize = 16;

impl Transformer {
    /// Per-token log-probabilities (temperature 1) of each completion given its prompt.
    pub fn score(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        if batch_size == 0 {
            bail!("scoring batch size must be at least 1");
        }
        if let Some(i) = pairs.iter().position(|(p, _)| p.is_empty()) {
            bail!("scoring pair {i} has an empty prompt: the first completion token needs context");
        }
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| pairs[i].0.len() + pairs[i].1.len());
        let mut out = vec![Vec::new(); pairs.len()];
        for chunk in order.chunks(batch_size) {
            let chunk: Vec<usize> = chunk
                .iter()
                .copied()
                .filter(|&i| !pairs[i].1.is_empty())
                .collect();
            if chunk.is_empty() {
                continue;
            }
            let len = chunk
                .iter()
                .map(|&i| pairs[i].0.len() + pairs[i].1.len())
                .max()
                .unwrap_or(0);
            let mut ids = Vec::with_capacity(chunk.len() * len);
            let mut key_valid = Vec::with_capacity(chunk.len());
            let mut rows = Vec::new(); // flat hidden-state row predicting each completion token
            let mut targets = Vec::new();
            for (b, &i) in chunk.iter().enumerate() {
                let (prompt, completion) = &pairs[i];
                let n = prompt.len() + completion.len();
                ids.extend_from_slice(prompt);
                ids.extend_from_slice(completion);
                ids.extend(std::iter::repeat_n(0u32, len - n));
                let mut valid = vec![true; n];
                valid.resize(len, false);
                key_valid.push(valid);
                for (j, &t) in completion.iter().enumerate() {
                    rows.push((b * len + prompt.len() - 1 + j) as u32);
                    targets.push(t);
                }
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), len), &self.device)?;
            let h = self.hidden_eval(&ids, &key_valid, None)?;
            let h = h.reshape((chunk.len() * len, self.cfg.hidden_size))?;
            let lp = self.target_logprobs(&h, &rows, &targets)?;
            let mut at = 0;
            for &i in &chunk {
                let n = pairs[i].1.len();
                out[i] = lp[at..at + n].to_vec();
                at += n;
            }
        }
        Ok(out)
    }

    /// Total log-probability of each candidate continuation of one prompt; the prompt is run once
    /// and its KV cache shared by all candidates.
    pub fn score_candidates(&self, prompt: &[u32], candidates: &[Vec<u32>]) -> Result<Vec<f64>> {
        if prompt.is_empty() {
            bail!("score_candidates needs a non-empty prompt");
        }
        let longest = candidates.iter().map(Vec::len).max().unwrap_or(0);
        let mut cache = KvCache::new(self, 1, prompt.len() + longest.max(1))?;
        let ids = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &self.device)?;
        let h = self.hidden_eval(&ids, &[vec![true; prompt.len()]], Some(&mut cache))?;
        let last = h
            .narrow(1, prompt.len() - 1, 1)?
            .reshape((1, self.cfg.hidden_size))?;
        let first_lp = log_softmax_rows(&self.logits(&last, Mode::Eval)?)?;
        let first_lp = first_lp.squeeze(0)?.to_vec1::<f32>()?;
        let mut totals = vec![0f64; candidates.len()];
        let indexed: Vec<usize> = (0..candidates.len())
            .filter(|&i| !candidates[i].is_empty())
            .collect();
        for chunk in indexed.chunks(CANDIDATE_BATCH) {
            let len = chunk
                .iter()
                .map(|&i| candidates[i].len())
                .max()
                .unwrap_or(0);
            let mut ids = Vec::with_capacity(chunk.len() * len);
            let mut key_valid = Vec::with_capacity(chunk.len());
            let mut rows = Vec::new();
            let mut targets = Vec::new();
            for (b, &i) in chunk.iter().enumerate() {
                let cand = &candidates[i];
                let first = *cand
                    .first()
                    .context("internal: empty candidate in a chunk")?;
                totals[i] = *first_lp.get(first as usize).with_context(|| {
                    format!("candidate {i} has token {first}, outside the vocabulary")
                })? as f64;
                ids.extend_from_slice(cand);
                ids.extend(std::iter::repeat_n(0u32, len - cand.len()));
                let mut valid = vec![true; prompt.len() + cand.len()];
                valid.resize(prompt.len() + len, false);
                key_valid.push(valid);
                for (j, &t) in cand.iter().enumerate().skip(1) {
                    rows.push((b * len + j - 1) as u32);
                    targets.push(t);
                }
            }
            let mut shared = cache.repeat_row(chunk.len())?;
            let ids = Tensor::from_vec(ids, (chunk.len(), len), &self.device)?;
            let h = self.hidden_eval(&ids, &key_valid, Some(&mut shared))?;
            let h = h.reshape((chunk.len() * len, self.cfg.hidden_size))?;
            let lp = self.target_logprobs(&h, &rows, &targets)?;
            let mut at = 0;
            for &i in chunk {
                let n = candidates[i].len() - 1;
                totals[i] += lp[at..at + n].iter().map(|&x| x as f64).sum::<f64>();
                at += n;
            }
        }
        Ok(totals)
    }

    /// log p(targets[i] | hidden row rows[i]) for flat hidden states `h` (n, hidden).
    fn target_logprobs(&self, h: &Tensor, rows: &[u32], targets: &[u32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(rows.len());
        for (r, t) in rows.chunks(LOGIT_ROWS).zip(targets.chunks(LOGIT_ROWS)) {
            let idx = Tensor::new(r, &self.device)?;
            let logits = self.logits(&h.index_select(&idx, 0)?, Mode::Eval)?;
            let lp = log_softmax_rows(&logits)?;
            let t = Tensor::new(t, &self.device)?.unsqueeze(1)?;
            out.extend(lp.gather(&t, 1)?.squeeze(1)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// Numerically stable log-softmax over the last dim of f32 logits.
fn log_softmax_rows(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}
