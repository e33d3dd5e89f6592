//! Log-probabilities of given completions (judges, evaluation, RL bookkeeping), without a graph.
//!
//! Sequences are batched by similar length and right-padded; only the hidden states that predict
//! completion tokens go through the output projection, in bounded chunks, so scoring long
//! completions over a large vocabulary does not materialise (batch, seq, vocab) logits.
//! Many candidate continuations of one prompt (a judge's "0".."100") are scored as one token
//! tree after the prompt's cache instead (see [`candidate_tree`]).
//!
//! Methods on [`Transformer`] (eval mode, KV cache); called by the stages crate's judges,
//! evaluation and RL.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

use crate::transformer::{Mode, Transformer};

mod candidate_tree;
use candidate_tree::CandidateTree;

/// Rows of hidden states projected to the vocabulary at once.
const LOGIT_ROWS: usize = 256;
/// Candidate-tree nodes run in one forward pass after the cached prompt (bounds the mask).
const TREE_NODES: usize = 512;

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

    /// Total log-probability of each candidate continuation of one prompt (0 for an empty one).
    ///
    /// The prompt is run once into a KV cache; the distinct prefixes of all candidates then
    /// run as one token tree after it (see [`candidate_tree`]), so shared prefixes are computed
    /// once, no cache is copied, and only one output distribution per distinct context is
    /// projected to the vocabulary.
    pub fn score_candidates(&self, prompt: &[u32], candidates: &[Vec<u32>]) -> Result<Vec<f64>> {
        self.score_candidate_tree(prompt, candidates, TREE_NODES)
    }

    /// [`Self::score_candidates`] running at most `tree_nodes` tree nodes per forward pass.
    fn score_candidate_tree(
        &self,
        prompt: &[u32],
        candidates: &[Vec<u32>],
        tree_nodes: usize,
    ) -> Result<Vec<f64>> {
        if prompt.is_empty() {
            bail!("score_candidates needs a non-empty prompt");
        }
        let vocab = self.cfg.vocab_size;
        for (i, cand) in candidates.iter().enumerate() {
            if let Some(t) = cand.iter().find(|&&t| t as usize >= vocab) {
                bail!("candidate {i} has token {t}, outside the model's vocabulary of {vocab}");
            }
        }
        let tree = CandidateTree::build(candidates);
        let mut cache = self.kv_cache(None, 1, prompt.len() + tree.len())?;
        let ids = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &self.device)?;
        let h = self.hidden_eval(&ids, &[vec![true; prompt.len()]], Some(&mut cache))?;
        // Row c of `contexts` is the hidden state predicting the token after context c.
        let mut contexts = vec![h
            .narrow(1, prompt.len() - 1, 1)?
            .reshape((1, self.cfg.hidden_size))?];
        let mut start = 0;
        while start < tree.len() {
            let end = (start + tree_nodes.max(1)).min(tree.len());
            let (positions, mask) = tree.layout(prompt.len(), start..end);
            let h =
                self.hidden_eval_laid_out(&tree.tokens[start..end], positions, mask, &mut cache)?;
            contexts.push(h.reshape((end - start, self.cfg.hidden_size))?);
            start = end;
        }
        let contexts = Tensor::cat(&contexts, 0)?;
        let edge_lp = self.edge_logprobs(&contexts, &tree.edges)?;
        Ok(tree
            .paths
            .iter()
            .map(|path| path.iter().map(|&e| edge_lp[e] as f64).sum())
            .collect())
    }

    /// log p(token | context) for each edge, from the hidden states `contexts` (n, hidden):
    /// each context row goes through the output projection once, whatever its edge count.
    fn edge_logprobs(&self, contexts: &Tensor, edges: &[(usize, u32)]) -> Result<Vec<f32>> {
        let vocab = self.cfg.vocab_size;
        let mut by_context: Vec<usize> = (0..edges.len()).collect();
        by_context.sort_by_key(|&e| edges[e].0);
        let mut out = vec![0f32; edges.len()];
        let mut at = 0;
        while at < by_context.len() {
            let first = edges[by_context[at]].0;
            let rows = (contexts.dim(0)? - first).min(LOGIT_ROWS);
            let group_end = by_context[at..]
                .iter()
                .position(|&e| edges[e].0 >= first + rows)
                .map_or(by_context.len(), |n| at + n);
            let group = &by_context[at..group_end];
            let flat: Vec<u32> = group
                .iter()
                .map(|&e| ((edges[e].0 - first) * vocab + edges[e].1 as usize) as u32)
                .collect();
            let logits = self.logits(&contexts.narrow(0, first, rows)?, Mode::Eval)?;
            let lp = log_softmax_rows(&logits)?
                .flatten_all()?
                .index_select(&Tensor::new(flat, &self.device)?, 0)?
                .to_vec1::<f32>()?;
            for (&e, v) in group.iter().zip(lp) {
                out[e] = v;
            }
            at = group_end;
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Arch, DeviceSetup, ModelConfig};

    /// Candidates sharing prefixes at every depth, repeated ones, an empty one, and ones that
    /// are prefixes of others (the judge's "1", "10", "100" followed by end tokens).
    fn candidates() -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        for number in [
            vec![1],
            vec![1, 0],
            vec![1, 0, 0],
            vec![9],
            vec![9, 9],
            vec![4, 2],
        ] {
            for end in [200u32, 201] {
                let mut c = number.clone();
                c.push(end);
                out.push(c);
            }
        }
        out.extend([vec![1, 0], vec![], vec![1, 0, 0, 201], vec![77, 1, 9, 9, 3]]);
        out
    }

    #[test]
    fn candidate_tree_equals_scoring_each_candidate_on_its_own() {
        for (arch, seed) in [(Arch::Llama, 3), (Arch::Qwen2, 4)] {
            let model =
                Transformer::random(&ModelConfig::tiny(arch), &DeviceSetup::cpu(), seed).unwrap();
            let prompt = vec![5, 17, 3, 250, 8];
            let cands = candidates();
            let pairs: Vec<(Vec<u32>, Vec<u32>)> =
                cands.iter().map(|c| (prompt.clone(), c.clone())).collect();
            // `score` runs every pair as its own uncached, causally masked sequence.
            let want: Vec<f64> = model
                .score(&pairs, 1)
                .unwrap()
                .iter()
                .map(|lps| lps.iter().map(|&x| x as f64).sum())
                .collect();
            assert_eq!(want[cands.len() - 3], 0.0);
            // One pass, and the tree split over passes so ancestors come from the cache.
            for tree_nodes in [TREE_NODES, 3, 1] {
                let got = model
                    .score_candidate_tree(&prompt, &cands, tree_nodes)
                    .unwrap();
                assert_eq!(got.len(), cands.len());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() < 1e-4,
                        "{arch:?}, {tree_nodes} nodes/pass, candidate {i} {:?}: {g} vs {w}",
                        cands[i]
                    );
                }
            }
        }
    }

    #[test]
    fn out_of_vocabulary_candidate_is_an_error_naming_it() {
        let model =
            Transformer::random(&ModelConfig::tiny(Arch::Llama), &DeviceSetup::cpu(), 5).unwrap();
        let vocab = ModelConfig::tiny(Arch::Llama).vocab_size as u32;
        let err = model
            .score_candidates(&[1, 2], &[vec![3], vec![4, vocab]])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("candidate 1") && err.contains(&vocab.to_string()),
            "{err}"
        );
    }
}
