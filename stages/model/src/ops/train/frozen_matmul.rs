//! `x @ W` for a frozen `W` whose backward computes only the input's gradient.
//!
//! candle's `matmul` backward always computes the gradient of both operands, whether or not the
//! right-hand side leads to a variable. With LoRA every base projection and the tied output
//! projection are frozen, so a plain matmul spends a weight-sized matmul per layer on a gradient
//! that is thrown away, about a third of the backward pass. This op records only its input
//! `x` in the graph, with `W` captured as a constant, so its backward is the single
//! `grad @ Wᵀ` product.

use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};

use super::{Forward, Grad1};
use crate::ops::cpu::{f32_slice, with_f32};
use crate::ops::cpu::{gemm_new, matrix, with_matrix, MatRef};

/// `dims` with its last entry replaced by `n`: the shape of a product over the last dim.
pub(crate) fn with_last_dim(dims: &[usize], n: usize) -> Vec<usize> {
    let mut out = dims.to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    out
}

/// The custom op: right-multiplication by a constant matrix `w` of shape (k, n).
struct FrozenMatmul {
    w: Tensor,
    /// `w`'s transpose, (n, k) row-major, when the caller keeps one.
    w_rows: Option<Tensor>,
}

/// `g wᵀ` (m, k) for the row-major gradient `g` (m, n) and a frozen `w` (k, n): through
/// `w_rows`, w's transpose stored row-major, when given. The `gemm` crate packs a transposed
/// view slowly: on SmolLM2's projections at 512 rows it ran at 112-134 GFLOPS against 158-167
/// for the same product from a row-major copy.
pub(crate) fn input_gradient(
    g: &[f32],
    w: &Tensor,
    w_rows: Option<&Tensor>,
    (m, k, n): (usize, usize, usize),
) -> candle_core::Result<Vec<f32>> {
    let g = MatRef::rows(g, n);
    match w_rows {
        Some(rows) => with_matrix(rows, "frozen_matmul", |wt| gemm_new((m, k, n), g, wt, 1.0)),
        None => with_matrix(w, "frozen_matmul", |w| gemm_new((m, k, n), g, w.t(), 1.0)),
    }
}

impl FrozenMatmul {
    /// (m, k, n) of a contiguous input (.., k) seen as m rows, checked against `w`, with the
    /// input's 2-D layout and the output's shape (.., n).
    fn dims(&self, layout: &Layout) -> candle_core::Result<((usize, usize, usize), Layout, Shape)> {
        let (k2, n) = self.w.dims2()?;
        let dims = layout.shape().dims();
        let k = dims.last().copied().unwrap_or(0);
        if k != k2 || !layout.is_contiguous() {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: layout.shape().clone(),
                rhs: self.w.shape().clone(),
                op: "frozen_matmul",
            });
        }
        let m = layout.shape().elem_count() / k.max(1);
        let rows = Layout::contiguous_with_offset((m, k), layout.start_offset());
        Ok(((m, k, n), rows, Shape::from(with_last_dim(dims, n))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen_matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Forward {
        let ((m, k, n), rows, shape) = self.dims(layout)?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            return Err(candle_core::Error::Msg(
                "frozen_matmul: the input is on the CPU but the weight is not".into(),
            ));
        };
        if !matches!(storage, CpuStorage::F32(_)) {
            return Ok((storage.matmul(w, (1, m, n, k), &rows, w_layout)?, shape));
        }
        let x = MatRef::rows(f32_slice(storage, &rows, "frozen_matmul", "input")?, k);
        let out = gemm_new((m, n, k), x, matrix(w, w_layout, "frozen_matmul")?, 1.0);
        Ok((CpuStorage::F32(out), shape))
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let ((m, k, n), rows, shape) = self.dims(layout)?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*w_storage else {
            return Err(candle_core::Error::Msg(
                "frozen_matmul: the input is on a CUDA device but the weight is not".into(),
            ));
        };
        let out = storage.matmul(w, (1, m, n, k), &rows, w_layout)?;
        Ok((out, shape))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Grad1 {
        let (k, n) = self.w.dims2()?;
        let m = grad_res.elem_count() / n.max(1);
        let shape = with_last_dim(grad_res.dims(), k);
        if grad_res.device().is_cpu() && grad_res.dtype() == DType::F32 {
            let dx = with_f32(grad_res, "frozen_matmul", |g| {
                input_gradient(g, &self.w, self.w_rows.as_ref(), (m, k, n))
            })??;
            return Ok(Some(Tensor::from_vec(dx, shape, grad_res.device())?));
        }
        let grad_x = grad_res.reshape((m, n))?.matmul(&self.w.t()?)?;
        Ok(Some(grad_x.reshape(shape)?))
    }
}

/// `x @ w` for `x` (.., k) and a frozen `w` (k, n), giving (.., n); gradients flow to `x` only.
/// Any leading dims are taken as rows, so callers need no reshape (each would be one more graph
/// node whose backward zero-fills and sums an activation-sized tensor). When `x` is not part of
/// a graph this is the plain matmul.
pub(crate) fn matmul_frozen_rhs(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul_frozen_rhs_with(x, w, None)
}

/// [`matmul_frozen_rhs`] with `w`'s transpose as a row-major (n, k) tensor for the backward
/// product (see [`input_gradient`]).
pub(crate) fn matmul_frozen_rhs_with(
    x: &Tensor,
    w: &Tensor,
    w_rows: Option<&Tensor>,
) -> Result<Tensor> {
    if x.dtype() != w.dtype() || !x.device().same_device(w.device()) {
        bail!(
            "frozen matmul operands differ: input {:?} on {:?}, weight {:?} on {:?}",
            x.dtype(),
            x.device().location(),
            w.dtype(),
            w.device().location()
        );
    }
    let (k, n) = w.dims2()?;
    if x.dims().last() != Some(&k) {
        bail!(
            "frozen matmul: input {:?} does not end in the weight's {k} rows",
            x.dims()
        );
    }
    if !x.track_op() {
        let dims = x.dims();
        let m = x.elem_count() / k.max(1);
        return Ok(x
            .reshape((m, k))?
            .matmul(w)?
            .reshape(with_last_dim(dims, n))?);
    }
    Ok(x.contiguous()?.apply_op1(FrozenMatmul {
        w: w.detach(),
        w_rows: w_rows.map(Tensor::detach),
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::train::test_inputs::{randn, randn_var};
    use crate::testing::{assert_op_matches, max_abs_diff};
    use candle_core::Var;

    #[test]
    fn forward_and_input_gradient_match_plain_matmul() -> Result<()> {
        let x = randn_var((5, 4), 0.0, 1.0)?;
        let w = randn((4, 3), 0.0, 1.0)?;
        let target = randn((5, 3), 0.0, 1.0)?;
        let loss = |y: Tensor| -> Result<Tensor> { Ok((y - &target)?.sqr()?.sum_all()?) };

        let ours = matmul_frozen_rhs(x.as_tensor(), &w)?;
        let plain = x.as_tensor().matmul(&w)?;
        let diff = max_abs_diff(&ours, &plain)?;
        assert!(diff < 1e-6, "forward differs by {diff}");

        let g_ours = loss(ours)?.backward()?;
        let g_plain = loss(plain)?.backward()?;
        let (a, b) = (
            g_ours.get(x.as_tensor()).expect("x has a gradient"),
            g_plain.get(x.as_tensor()).expect("x has a gradient"),
        );
        let diff = max_abs_diff(a, b)?;
        assert!(diff < 1e-5, "input gradient differs by {diff}");
        assert!(a.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        // The frozen weight is not part of the graph, so no gradient is computed for it.
        assert!(g_ours.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn leading_dims_are_rows_forward_and_backward() -> Result<()> {
        let x = randn_var((2, 3, 4), 0.0, 1.0)?;
        let w = randn((4, 5), 0.0, 1.0)?;
        let upstream = randn((2, 3, 5), 0.0, 1.0)?;
        let ours = matmul_frozen_rhs(x.as_tensor(), &w)?;
        assert_eq!(ours.dims(), &[2, 3, 5]);
        let plain = x.as_tensor().broadcast_matmul(&w)?;
        let vars = [("x", &x)];
        let grads = assert_op_matches("matmul", (&ours, &plain), &upstream, &vars, (1e-6, 1e-5))?;
        assert_eq!(
            grads.get(x.as_tensor()).map(|g| g.dims()),
            Some(&[2, 3, 4][..])
        );
        Ok(())
    }

    #[test]
    fn untracked_input_gives_plain_matmul_and_bad_operands_fail() -> Result<()> {
        let x = randn((2, 4), 0.0, 1.0)?;
        let w = randn((4, 3), 0.0, 1.0)?;
        let y = matmul_frozen_rhs(&x, &w)?;
        assert!(!y.track_op());
        assert_eq!(y.dims(), &[2, 3]);
        let x = Var::from_tensor(&x)?;
        let bad = randn((5, 3), 0.0, 1.0)?;
        assert!(matmul_frozen_rhs(x.as_tensor(), &bad).is_err());
        assert!(matmul_frozen_rhs(&x.as_detached_tensor(), &bad).is_err());
        Ok(())
    }
}
