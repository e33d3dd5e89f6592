//! Attention of a few new positions over the KV cache, on the CPU in f32, as plain loops.
//!
//! At a decode step the attention itself is tiny (one query row per head against a few hundred
//! cached keys), but spelled as candle ops it is two batched products of batch x kv-heads small
//! GEMM calls each (every call dispatching to the thread pool), a scaling, a masked softmax and
//! a transposing copy, per layer: at batch 16 that overhead cost more than the arithmetic. Here
//! each (row, query position) is one task that reads its cached keys and values in place.
//!
//! Each output is computed from its own row's data in a fixed order, so it does not depend on
//! the batch size or the thread count.

use candle_core::{Tensor, D};
use rayon::prelude::*;

use crate::ops::cpu::with_f32;

/// Lanes of the partial sums in a query-key dot product: independent accumulators, so the
/// compiler can keep them in vector registers instead of one serial chain of adds.
const LANES: usize = 16;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `softmax(q kᵀ * scale + mask) v` for queries `q` (b, heads, t, d), the first `len` slots of
/// caches `k_cache`/`v_cache` (b, kv_heads, capacity, d) and an additive `mask` (b, .., t, len);
/// query head `h` reads kv head `h / (heads / kv_heads)`. Returns (b, t, heads * d).
pub(crate) fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let (_, kv_heads, capacity, _) = k_cache.dims4()?;
    if mask.elem_count() != b * t * len || mask.dim(D::Minus1)? != len || heads % kv_heads != 0 {
        return Err(candle_core::Error::Msg(format!(
            "decode_attention: q {:?}, cache {:?} ({len} filled) and mask {:?} do not fit",
            q.dims(),
            k_cache.dims(),
            mask.dims()
        )));
    }
    let rep = heads / kv_heads;
    let scale = scale as f32;
    let mut out = vec![0f32; b * t * heads * d];
    with_f32(q, "decode_attention", |q| {
        with_f32(k_cache, "decode_attention", |k| {
            with_f32(v_cache, "decode_attention", |v| {
                with_f32(mask, "decode_attention", |mask| {
                    out.par_chunks_mut(heads * d)
                        .enumerate()
                        .for_each(|(row, out_row)| {
                            let (item, pos) = (row / t, row % t);
                            let mask_row = &mask[row * len..][..len];
                            let mut probs = vec![0f32; len];
                            for h in 0..heads {
                                let qv = &q[((item * heads + h) * t + pos) * d..][..d];
                                let cache_base = (item * kv_heads + h / rep) * capacity * d;
                                let mut max = f32::NEG_INFINITY;
                                for (j, p) in probs.iter_mut().enumerate() {
                                    let kj = &k[cache_base + j * d..][..d];
                                    *p = dot(qv, kj) * scale + mask_row[j];
                                    max = max.max(*p);
                                }
                                let mut sum = 0f32;
                                for p in probs.iter_mut() {
                                    *p = (*p - max).exp();
                                    sum += *p;
                                }
                                let o = &mut out_row[h * d..][..d];
                                for (j, p) in probs.iter().enumerate() {
                                    let w = p / sum;
                                    for (o, vj) in o.iter_mut().zip(&v[cache_base + j * d..][..d]) {
                                        *o += w * vj;
                                    }
                                }
                            }
                        })
                })
            })
        })
    })????;
    Tensor::from_vec(out, (b, t, heads * d), q.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::Device;

    /// The same attention spelled with candle ops, as the prefill path computes it.
    fn composite(
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask: &Tensor,
        scale: f64,
    ) -> anyhow::Result<Tensor> {
        let (b, heads, t, d) = q.dims4()?;
        let kv_heads = k.dim(1)?;
        let rep = heads / kv_heads;
        let expand = |x: &Tensor| -> anyhow::Result<Tensor> {
            let (b, g, n, d) = x.dims4()?;
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, g, rep, n, d))?
                .reshape((b, g * rep, n, d))?)
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let scores = ((q.matmul(&k.t()?)? * scale)?).broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, heads * d))?)
    }

    #[test]
    fn matches_batched_matmul_attention_over_the_filled_slots() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // Head width 20: one full 16-lane chunk and a tail.
        let (b, heads, kv_heads, t, d, capacity, len) = (3, 6, 2, 2, 20, 11, 7);
        let q = Tensor::randn(0f32, 1.0, (b, heads, t, d), &dev)?;
        let k_cache = Tensor::randn(0f32, 1.0, (b, kv_heads, capacity, d), &dev)?;
        let v_cache = Tensor::randn(0f32, 1.0, (b, kv_heads, capacity, d), &dev)?;
        // Causal over the new positions, and row 1 has a padded first slot.
        let mut mask = vec![0f32; b * t * len];
        for item in 0..b {
            for pos in 0..t {
                for j in 0..len {
                    let future = j > len - t + pos;
                    if future || (item == 1 && j == 0) {
                        mask[(item * t + pos) * len + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, len), &dev)?;
        let scale = 0.3;
        let ours = decode_attention(&q, &k_cache, &v_cache, len, &mask, scale)?;
        let filled = |c: &Tensor| c.narrow(2, 0, len)?.contiguous();
        let plain = composite((&q, &filled(&k_cache)?, &filled(&v_cache)?), &mask, scale)?;
        let diff = max_abs_diff(&ours, &plain)?;
        assert!(diff < 1e-5, "outputs differ by {diff}");
        Ok(())
    }
}
