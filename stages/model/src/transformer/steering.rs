//! Activation steering in training passes: a constant vector added to the residual stream at
//! the output of one decoder layer in every train-mode pass ([`Mode::Train`]), and in no
//! eval-mode pass (generation, scoring, `forward_eval`).
//!
//! This is what preventive steering needs (Chen et al. 2025, "Persona Vectors"): during
//! fine-tuning the layer's output `h` becomes `h + alpha v`, so the data's pull along `v` is
//! already met by the shift and the weights need not move that way; the shift is a
//! constant, never a trainable weight, and is never saved with an adapter, so what is
//! evaluated is the model without it. The training kinds decide which passes are steered:
//! `Policy::with_adapter_off` (the reference) switches it off with
//! [`Transformer::set_steering_enabled`]; sampling runs in eval mode.
//!
//! Off (`None`, the default) costs one comparison per layer and leaves every pass bit for bit
//! as it was.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::model::Transformer;
use super::weight::Mode;

/// A shift `alpha x v` added to the output of decoder `layer` (0-based; transformers'
/// `hidden_states[layer + 1]`) at every position of every train-mode pass.
#[derive(Clone, Debug)]
pub struct Steering {
    layer: usize,
    /// `alpha x v`, (hidden,), in the model's compute dtype and on its device once installed.
    shift: Tensor,
}

impl Steering {
    /// `alpha x vector` at the output of decoder `layer`; `vector` is (hidden,).
    pub fn new(layer: usize, vector: &Tensor, alpha: f64) -> Result<Self> {
        if vector.rank() != 1 {
            bail!(
                "a steering vector is one hidden state (hidden,), got shape {:?}",
                vector.dims()
            );
        }
        if !alpha.is_finite() {
            bail!("the steering coefficient must be a finite number, got {alpha}");
        }
        let shift = (vector.to_dtype(candle_core::DType::F32)? * alpha)?.detach();
        Ok(Steering { layer, shift })
    }

    /// The decoder layer whose output is shifted.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The shift, `alpha x v`, (hidden,).
    pub fn shift(&self) -> &Tensor {
        &self.shift
    }
}

impl Transformer {
    /// Installs (or with `None` removes) the steering of train-mode passes. Refuses a layer
    /// the model does not have and a vector of another width.
    pub fn set_steering(&mut self, steering: Option<Steering>) -> Result<()> {
        let Some(mut s) = steering else {
            self.steering = None;
            return Ok(());
        };
        let (layers, hidden) = (self.layers.len(), self.cfg.hidden_size);
        if s.layer >= layers {
            bail!(
                "steering at decoder layer {}, but the model has {layers} layers (0-based: 0..{})",
                s.layer,
                layers - 1
            );
        }
        if s.shift.dims() != [hidden] {
            bail!(
                "a steering vector of width {:?} for a model of hidden size {hidden}: was it \
                 extracted from another model?",
                s.shift.dims()
            );
        }
        s.shift = s.shift.to_device(&self.device)?.to_dtype(self.dtype)?;
        self.steering = Some(s);
        Ok(())
    }

    /// With `false`, train-mode passes are not steered (the reference policy) while the
    /// steering stays installed; `true` (the default) steers them again.
    pub fn set_steering_enabled(&mut self, on: bool) {
        self.steering_enabled = on;
    }

    /// The installed steering, if any.
    pub fn steering(&self) -> Option<&Steering> {
        self.steering.as_ref()
    }

    /// Layer `i`'s output `x` as the rest of a `mode` pass sees it: shifted when this is the
    /// steered layer of a train-mode pass, else `x` itself.
    pub(super) fn steer(&self, i: usize, x: Tensor, mode: Mode) -> Result<Tensor> {
        match &self.steering {
            Some(s) if s.layer == i && mode == Mode::Train && self.steering_enabled => {
                Ok(x.broadcast_add(&s.shift)?)
            }
            _ => Ok(x),
        }
    }
}
