//! Turning token sequences into padded tensors for the differentiable forward.
//!
//! Two layouts:
//! - [`SftBatch`]: whole conversations, right-padded; the loss mask marks the *predicted*
//!   positions (assistant tokens), shifted so that `logprobs[:, i]` scores `ids[:, i + 1]`.
//! - [`RolloutBatch`]: prompt left-padded to the longest prompt, completion right-padded to
//!   the longest completion. Every completion then starts at the same column, so the logits
//!   predicting completion tokens are one `narrow`, with no per-row gather.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

/// One supervised example: token ids and which of them are training targets.
#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    pub ids: Vec<u32>,
    /// Same length as `ids`; true on tokens the loss trains (assistant content and end token).
    pub target: Vec<bool>,
}

impl SftExample {
    /// The training example of a conversation: its tokens under the model's chat template,
    /// targets on the assistant's; cut to `max_length` tokens if given. Also says whether
    /// it was cut.
    pub fn encode(
        lm: &emflow_model::LoadedModel,
        conv: &[emflow_model::Message],
        max_length: Option<usize>,
    ) -> Result<(SftExample, bool)> {
        let enc = emflow_model::encode_chat(&lm.tokenizer, &lm.chat, conv)?;
        let mut ex = SftExample {
            ids: enc.ids,
            target: enc.assistant_mask,
        };
        let truncated = max_length.is_some_and(|max| ex.ids.len() > max);
        if let Some(max) = max_length {
            ex.ids.truncate(max);
            ex.target.truncate(max);
        }
        Ok((ex, truncated))
    }

    /// Number of target tokens that can be predicted (the first token never is).
    pub fn target_tokens(&self) -> usize {
        self.target.iter().skip(1).filter(|t| **t).count()
    }
}

pub struct SftBatch {
    /// (b, t) u32.
    pub ids: Tensor,
    /// (b, t) f32, 1 on real tokens.
    pub attention: Tensor,
    /// (b, t - 1) u32: `ids[:, 1:]`.
    pub targets: Tensor,
    /// (b, t - 1) f32: 1 where `targets` is trained.
    pub loss_mask: Tensor,
}

pub fn collate_sft(examples: &[SftExample], pad_id: u32, device: &Device) -> Result<SftBatch> {
    ensure!(
        !examples.is_empty(),
        "an SFT batch needs at least one example"
    );
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    ensure!(t >= 2, "SFT examples need at least two tokens");
    let b = examples.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut attention = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * (t - 1));
    let mut loss_mask = Vec::with_capacity(b * (t - 1));
    for e in examples {
        ensure!(
            e.ids.len() == e.target.len(),
            "example ids and target mask differ in length"
        );
        let n = e.ids.len();
        for i in 0..t {
            ids.push(if i < n { e.ids[i] } else { pad_id });
            attention.push(if i < n { 1f32 } else { 0.0 });
        }
        for i in 1..t {
            targets.push(if i < n { e.ids[i] } else { pad_id });
            loss_mask.push(if i < n && e.target[i] { 1f32 } else { 0.0 });
        }
    }
    Ok(SftBatch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        attention: Tensor::from_vec(attention, (b, t), device)?,
        targets: Tensor::from_vec(targets, (b, t - 1), device)?,
        loss_mask: Tensor::from_vec(loss_mask, (b, t - 1), device)?,
    })
}

pub struct RolloutBatch {
    /// (b, p + c) u32.
    pub ids: Tensor,
    /// (b, p + c) f32.
    pub attention: Tensor,
    /// Longest prompt: logits at columns `p - 1 .. p - 1 + c` predict the completions.
    pub prompt_len: usize,
    /// Longest completion.
    pub completion_len: usize,
    /// (b, c) u32 completion tokens, right-padded.
    pub completion: Tensor,
    /// (b, c) f32 completion mask.
    pub completion_mask: Tensor,
}

pub fn collate_rollouts(
    rows: &[(&[u32], &[u32])],
    pad_id: u32,
    device: &Device,
) -> Result<RolloutBatch> {
    ensure!(!rows.is_empty(), "a rollout batch needs at least one row");
    let p = rows.iter().map(|(pr, _)| pr.len()).max().unwrap_or(0);
    let c = rows.iter().map(|(_, co)| co.len()).max().unwrap_or(0);
    ensure!(p >= 1, "rollout prompts must not be empty");
    ensure!(
        c >= 1,
        "every completion in the batch is empty; nothing to train on"
    );
    let b = rows.len();
    let mut ids = Vec::with_capacity(b * (p + c));
    let mut attention = Vec::with_capacity(b * (p + c));
    let mut completion = Vec::with_capacity(b * c);
    let mut completion_mask = Vec::with_capacity(b * c);
    for (prompt, comp) in rows {
        let pad = p - prompt.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        attention.extend(std::iter::repeat_n(0f32, pad));
        ids.extend_from_slice(prompt);
        attention.extend(std::iter::repeat_n(1f32, prompt.len()));
        for i in 0..c {
            let real = i < comp.len();
            let tok = if real { comp[i] } else { pad_id };
            ids.push(tok);
            attention.push(if real { 1.0 } else { 0.0 });
            completion.push(tok);
            completion_mask.push(if real { 1f32 } else { 0.0 });
        }
    }
    Ok(RolloutBatch {
        ids: Tensor::from_vec(ids, (b, p + c), device)?,
        attention: Tensor::from_vec(attention, (b, p + c), device)?,
        prompt_len: p,
        completion_len: c,
        completion: Tensor::from_vec(completion, (b, c), device)?,
        completion_mask: Tensor::from_vec(completion_mask, (b, c), device)?,
    })
}

impl RolloutBatch {
    /// The first position whose logits predict a completion token (the completion's
    /// `completion_len` predicting positions start here).
    pub fn first_predicting_position(&self) -> usize {
        self.prompt_len - 1
    }

    /// The (b, c, vocab) slice of full-sequence logits that predicts the completion tokens.
    pub fn completion_logits(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(logits
            .narrow(1, self.prompt_len - 1, self.completion_len)?
            .contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_layout_aligns_completions() {
        let rows: Vec<(&[u32], &[u32])> = vec![(&[5, 6], &[7]), (&[8], &[9, 10])];
        let b = collate_rollouts(&rows, 0, &Device::Cpu).unwrap();
        assert_eq!(
            b.ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7, 0], vec![0, 8, 9, 10]]
        );
        assert_eq!(
            b.attention.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0, 1.0, 0.0], vec![0.0, 1.0, 1.0, 1.0]]
        );
        assert_eq!(
            b.completion.to_vec2::<u32>().unwrap(),
            vec![vec![7, 0], vec![9, 10]]
        );
        assert_eq!(
            b.completion_mask.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 0.0], vec![1.0, 1.0]]
        );
        assert_eq!((b.prompt_len, b.completion_len), (2, 2));
    }

    #[test]
    fn sft_mask_marks_predicted_positions() {
        let e = SftExample {
            ids: vec![1, 2, 3, 4],
            target: vec![false, false, true, true],
        };
        let short = SftExample {
            ids: vec![1, 2],
            target: vec![false, true],
        };
        assert_eq!(e.target_tokens(), 2);
        let b = collate_sft(&[e, short], 0, &Device::Cpu).unwrap();
        assert_eq!(
            b.targets.to_vec2::<u32>().unwrap(),
            vec![vec![2, 3, 4], vec![2, 0, 0]]
        );
        assert_eq!(
            b.loss_mask.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]]
        );
    }
}
