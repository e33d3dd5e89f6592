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
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// The custom op: right-multiplication by a constant matrix `w` of shape (k, n).
struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    /// (m, k) of a 2-D input layout, checked against `w`.
    fn dims(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (m, k) = layout.shape().dims2()?;
        let (k2, n) = self.w.dims2()?;
        if k != k2 {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: layout.shape().clone(),
                rhs: self.w.shape().clone(),
                op: "frozen_matmul",
            });
        }
        Ok((m, k, n))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen_matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, n) = self.dims(layout)?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            return Err(candle_core::Error::Msg(
                "frozen_matmul: the input is on the CPU but the weight is not".into(),
            ));
        };
        let out = storage.matmul(w, (1, m, n, k), layout, w_layout)?;
        Ok((out, Shape::from((m, n))))
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (m, k, n) = self.dims(layout)?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*w_storage else {
            return Err(candle_core::Error::Msg(
                "frozen_matmul: the input is on a CUDA device but the weight is not".into(),
            ));
        };
        let out = storage.matmul(w, (1, m, n, k), layout, w_layout)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w.t()?)?))
    }
}

/// `x @ w` for `x` (m, k) and a frozen `w` (k, n); gradients flow to `x` only. When `x` is not
/// part of a graph this is the plain matmul.
pub(crate) fn matmul_frozen_rhs(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.dtype() != w.dtype() || !x.device().same_device(w.device()) {
        bail!(
            "frozen matmul operands differ: input {:?} on {:?}, weight {:?} on {:?}",
            x.dtype(),
            x.device().location(),
            w.dtype(),
            w.device().location()
        );
    }
    if !x.track_op() {
        return Ok(x.matmul(w)?);
    }
    Ok(x.apply_op1(FrozenMatmul { w: w.detach() })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_input_gradient_match_plain_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 4), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (4, 3), &dev)?;
        let target = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let loss = |y: Tensor| -> Result<Tensor> { Ok((y - &target)?.sqr()?.sum_all()?) };

        let ours = matmul_frozen_rhs(x.as_tensor(), &w)?;
        let plain = x.as_tensor().matmul(&w)?;
        let diff = (&ours - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "forward differs by {diff}");

        let g_ours = loss(ours)?.backward()?;
        let g_plain = loss(plain)?.backward()?;
        let (a, b) = (
            g_ours.get(x.as_tensor()).expect("x has a gradient"),
            g_plain.get(x.as_tensor()).expect("x has a gradient"),
        );
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "input gradient differs by {diff}");
        assert!(a.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        // The frozen weight is not part of the graph, so no gradient is computed for it.
        assert!(g_ours.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn untracked_input_gives_plain_matmul_and_bad_operands_fail() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 4), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 3), &dev)?;
        let y = matmul_frozen_rhs(&x, &w)?;
        assert!(!y.track_op());
        assert_eq!(y.dims(), &[2, 3]);
        let x = Var::from_tensor(&x)?;
        let bad = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        assert!(matmul_frozen_rhs(x.as_tensor(), &bad).is_err());
        Ok(())
    }
}
