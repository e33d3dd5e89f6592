//! A frozen projection with its LoRA adapter, `x W + scale * (x Aᵀ) Bᵀ`, as one graph node.
//!
//! Spelled with candle ops, an adapted projection is six nodes (two transposes, two small
//! matmuls, the scaling and the sum) besides the frozen product, and candle's backward
//! allocates a zeroed tensor and an accumulating sum per edge: three of those edges carry
//! (tokens, out)-sized gradients. With seven adapted projections per layer that was about a
//! tenth of a SmolLM2 LoRA step, and the scaling and sum alone a fifth of its forward pass.
//! This op computes the same products in the same order and writes each gradient once:
//!
//! ```text
//! gs = scale * g      dB = gsᵀ (x Aᵀ)      dA = (gs B)ᵀ x      dx = g Wᵀ + (gs B) A
//! ```
//!
//! `dx` is computed only when `x` is part of the graph (the first layer's input is not).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::frozen_matmul::{input_gradient, with_last_dim};
use super::{Forward, Grads3};
use crate::ops::cpu::{f32_slice, with_f32s};
use crate::ops::cpu::{gemm_into, gemm_new, matrix, with_matrix, MatRef};
use crate::ops::cpu::{matmul_few_cols, matmul_few_rows, FEW_COLS};

/// The op: `w` is the frozen (in, out) weight, captured as a constant.
pub(crate) struct LoraLinear {
    pub(crate) w: Tensor,
    /// `w`'s transpose, (out, in) row-major, when the caller keeps one (see
    /// [`input_gradient`]).
    pub(crate) w_rows: Option<Tensor>,
    pub(crate) scale: f32,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora_linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Forward {
        let dims = xl.shape().dims();
        let k = dims.last().copied().unwrap_or(0);
        let m = xl.shape().elem_count() / k.max(1);
        let (r, k_a) = al.shape().dims2()?;
        let (n, r_b) = bl.shape().dims2()?;
        let (k_w, n_w) = self.w.dims2()?;
        if k_a != k || r_b != r || k_w != k || n_w != n || !xl.is_contiguous() {
            return Err(candle_core::Error::Msg(format!(
                "lora_linear: x {:?}, A {:?}, B {:?} and W {:?} do not fit",
                xl.shape(),
                al.shape(),
                bl.shape(),
                self.w.shape()
            )));
        }
        let x = MatRef::rows(f32_slice(xs, xl, "lora_linear", "input")?, k);
        let a = matrix(a_s, al, "lora_linear")?;
        let b = matrix(bs, bl, "lora_linear")?;
        // y = x W, then y += scale * (x Aᵀ) Bᵀ in place.
        let mut y = with_matrix(&self.w, "lora_linear", |w| gemm_new((m, n, k), x, w, 1.0))?;
        let down = down_projection(x, a, (m, k, r));
        gemm_into(
            &mut y,
            n,
            (m, n, r),
            (MatRef::rows(&down, r), b.t()),
            (true, self.scale),
            false,
        );
        Ok((CpuStorage::F32(y), Shape::from(with_last_dim(dims, n))))
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads3 {
        // Leading dims as rows: (m, k) input, (m, n) gradient; A is (r, k), B is (n, r).
        let (k, n) = self.w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let r = a.dim(0)?;
        let (mut d_a, mut d_b, mut d_x) = (vec![0f32; r * k], vec![0f32; n * r], None);
        with_f32s([x, grad, a, b], "lora_linear", |[xv, gv, av, bv]| {
            let (xm, g) = (MatRef::rows(xv, k), MatRef::rows(gv, n));
            let (am, bm) = (MatRef::rows(av, k), MatRef::rows(bv, r));
            let down = down_projection(xm, am, (m, k, r));
            let mut gs_b = rank_product(g, bm, (m, n, r));
            gs_b.iter_mut().for_each(|v| *v *= self.scale);
            // dB = scale gᵀ (x Aᵀ) and dA = (scale g B)ᵀ x: r output rows, contractions over
            // the m rows, read in place through transposed views.
            let d_b_t = few_rows_product(MatRef::rows(&down, r).t(), g, (r, m, n));
            for (o, row) in d_b.chunks_exact_mut(r).enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = self.scale * d_b_t[j * n + o];
                }
            }
            let gs_b = MatRef::rows(&gs_b, r);
            d_a.copy_from_slice(&few_rows_product(gs_b.t(), xm, (r, m, k)));
            if x.track_op() {
                // dx = g Wᵀ + gs_b A
                let mut dx = input_gradient(gv, &self.w, self.w_rows.as_ref(), (m, k, n))?;
                gemm_into(&mut dx, k, (m, k, r), (gs_b, am), (true, 1.0), false);
                d_x = Some(dx);
            }
            Ok::<(), candle_core::Error>(())
        })??;
        let dev = x.device();
        let d_x = match d_x {
            Some(dx) => Some(Tensor::from_vec(dx, x.shape(), dev)?),
            None => None,
        };
        Ok((
            d_x,
            Some(Tensor::from_vec(d_a, (r, k), dev)?),
            Some(Tensor::from_vec(d_b, (n, r), dev)?),
        ))
    }
}

/// `x Aᵀ` (m, r) for `x` (m, k) row-major and `a` (r, k).
fn down_projection(x: MatRef, a: MatRef, (m, k, r): (usize, usize, usize)) -> Vec<f32> {
    let mut a_t = vec![0f32; k * r];
    for (kk, row) in a_t.chunks_exact_mut(r.max(1)).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = a.data[j * a.rs + kk * a.cs];
        }
    }
    rank_product(x, MatRef::rows(&a_t, r), (m, k, r))
}

/// `x rhs` (m, r) for `x` (m, k) row-major and a rank-wide `rhs` (k, r): the panel crate's
/// few-columns kernel when `rhs` is row-major and narrow enough, else the GEMM.
fn rank_product(x: MatRef, rhs: MatRef, (m, k, r): (usize, usize, usize)) -> Vec<f32> {
    let row_major = |t: &MatRef, cols: usize| t.cs == 1 && t.rs == cols;
    if r <= FEW_COLS
        && row_major(&x, k)
        && row_major(&rhs, r)
        && x.data.len() == m * k
        && rhs.data.len() == k * r
    {
        matmul_few_cols(x.data, rhs.data, (m, k, r))
    } else {
        gemm_new((m, r, k), x, rhs, 1.0)
    }
}

/// `lhs rhs` (r, n) for a few output rows: the panel kernel when `rhs`'s rows are contiguous.
fn few_rows_product(lhs: MatRef, rhs: MatRef, (r, m, n): (usize, usize, usize)) -> Vec<f32> {
    if rhs.cs == 1 {
        matmul_few_rows(lhs, rhs, (r, m, n))
    } else {
        gemm_new((r, n, m), lhs, rhs, 1.0)
    }
}

/// `x W + scale * (x Aᵀ) Bᵀ` for `x` (.., in), frozen `w` (in, out), `a` (r, in) and `b`
/// (out, r), all f32 on the CPU; the result is (.., out).
pub(crate) fn lora_linear(
    x: &Tensor,
    (w, w_rows): (&Tensor, Option<&Tensor>),
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(
        a,
        b,
        LoraLinear {
            w: w.detach(),
            w_rows: w_rows.map(Tensor::detach),
            scale: scale as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::train::test_inputs::{randn, randn_var};
    use crate::testing::assert_op_matches;

    #[test]
    fn values_and_gradients_match_the_composite_spelling() -> anyhow::Result<()> {
        let (m, k, n, r) = (7, 12, 10, 3);
        // Leading dims (2, 7) are taken as rows.
        let x = randn_var((2, m, k), 0.0, 1.0)?;
        let w = randn((k, n), 0.0, 1.0)?;
        let a = randn_var((r, k), 0.0, 1.0)?;
        let b = randn_var((n, r), 0.0, 1.0)?;
        let upstream = randn((2, m, n), 0.0, 1.0)?;
        let scale = 2.0;

        let ours = lora_linear(
            x.as_tensor(),
            (&w, None),
            a.as_tensor(),
            b.as_tensor(),
            scale,
        )?;
        let plain = (x.as_tensor().broadcast_matmul(&w)?
            + (x.as_tensor()
                .broadcast_matmul(&a.as_tensor().t()?)?
                .broadcast_matmul(&b.as_tensor().t()?)?
                * scale)?)?;
        // Values of order 10 from random inputs, summed in another order than candle's.
        let vars = [("x", &x), ("A", &a), ("B", &b)];
        let g_ours = assert_op_matches(
            "lora_linear",
            (&ours, &plain),
            &upstream,
            &vars,
            (1e-4, 1e-4),
        )?;
        assert!(
            g_ours.get(&w).is_none(),
            "the frozen weight gets no gradient"
        );

        // An input outside the graph gets no gradient computed for it.
        let detached = randn((2, m, k), 0.0, 1.0)?;
        let y = lora_linear(&detached, (&w, None), a.as_tensor(), b.as_tensor(), scale)?;
        let grads = (y * &upstream)?.sum_all()?.backward()?;
        assert!(grads.get(&detached).is_none());
        assert!(grads.get(b.as_tensor()).is_some());
        Ok(())
    }
}
