//! A parameter (frozen tensor or trainable `Var`) and the two modes a forward pass reads it in.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};

/// Which kernels and which view of the weights a forward pass uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Differentiable ops; trainable weights tracked.
    Train,
    /// Fused kernels; all weights detached, no graph.
    Eval,
}

/// A parameter: a plain tensor (frozen, in the compute dtype) or a trainable f32 master `Var`.
pub(crate) enum Weight {
    Frozen(Tensor),
    Trainable(Var),
}

impl Weight {
    /// The weight as used by a forward pass in `mode`, cast to `dtype`.
    pub(crate) fn get(&self, mode: Mode, dtype: DType) -> Result<Tensor> {
        let t = match (self, mode) {
            (Weight::Frozen(t), _) => t.clone(),
            (Weight::Trainable(v), Mode::Train) => v.as_tensor().clone(),
            (Weight::Trainable(v), Mode::Eval) => v.as_detached_tensor(),
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// The stored values, detached.
    pub(crate) fn detached(&self) -> Tensor {
        match self {
            Weight::Frozen(t) => t.clone(),
            Weight::Trainable(v) => v.as_detached_tensor(),
        }
    }

    /// Make this weight trainable (an f32 master copy), if it is not already.
    pub(crate) fn make_trainable(&mut self) -> Result<()> {
        if let Weight::Frozen(t) = self {
            *self = Weight::Trainable(Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        Ok(())
    }

    /// Overwrite the stored values (shape must match), keeping the weight's kind and dtype.
    pub(crate) fn set(&mut self, value: &Tensor) -> Result<()> {
        match self {
            Weight::Frozen(t) => {
                if t.shape() != value.shape() {
                    bail!("shape {:?} does not match {:?}", value.shape(), t.shape());
                }
                *t = value.to_device(t.device())?.to_dtype(t.dtype())?;
            }
            Weight::Trainable(v) => {
                let value = value.to_device(v.device())?.to_dtype(v.dtype())?;
                v.set(&value)?;
            }
        }
        Ok(())
    }
}
