//! Next-token distributions read from a local model, shared by the local judge and
//! `emflow serve` (whose `top_logprobs` must match the local judge's exactly).

use anyhow::{Context as _, Result};
use candle_core::{DType, Tensor, D};
use emflow_model::{Tokenizer, Transformer};

/// Log-probabilities (temperature 1) of the token after each position `from..ids.len()` of
/// `ids`: row `i` is the distribution of token `from + i` given `ids[..from + i]`... shifted so
/// that `from = prompt_len` gives the distributions of the tokens that *follow* the prompt.
/// Returns one row per position in `from - 1 .. ids.len()`, i.e. `ids.len() - from + 1` rows.
pub fn position_logprobs(model: &Transformer, ids: &[u32], from: usize) -> Result<Vec<Vec<f32>>> {
    anyhow::ensure!(
        from >= 1 && from <= ids.len(),
        "position_logprobs: `from` ({from}) must be in 1..={}",
        ids.len()
    );
    let device = model.device();
    let t = ids.len();
    let input = Tensor::from_slice(ids, (1, t), device)?;
    let mask = Tensor::ones((1, t), DType::U8, device)?;
    let logits = model
        .forward_eval(&input, &mask)
        .context("forward pass for next-token log-probabilities")?;
    let rows = logits
        .squeeze(0)?
        .narrow(0, from - 1, t - from + 1)?
        .to_dtype(DType::F32)?;
    let logprobs = candle_nn::ops::log_softmax(&rows, D::Minus1)?;
    Ok(logprobs.to_vec2::<f32>()?)
}

/// The distribution of the token that follows `prompt`.
pub fn next_token_logprobs(model: &Transformer, prompt: &[u32]) -> Result<Vec<f32>> {
    let mut rows = position_logprobs(model, prompt, prompt.len())?;
    rows.pop().context("empty prompt")
}

/// The `k` most likely tokens as (id, logprob), most likely first; ties broken by id so the
/// list is deterministic.
pub fn top_k(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let k = k.min(idx.len());
    let cmp = |a: &u32, b: &u32| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
            .then(a.cmp(b))
    };
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

/// A token's text as an API shows it (`" 42"` for a space-prefixed BPE token).
pub fn token_text(tok: &Tokenizer, id: u32) -> Result<String> {
    tok.decode(&[id])
}
