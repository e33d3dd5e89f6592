//! One training forward and backward pass, optionally with activation (gradient)
//! checkpointing at layer granularity: [`Transformer::train_backward`].
//!
//! Written by hand because candle has no checkpointing and no custom backward for a whole
//! subgraph; what it does have is a [`GradStore`] that `backward()` returns and that can be
//! read and filled. So the checkpointed pass is three phases on the same maths as the plain
//! one:
//! 1. every decoder layer runs in train mode on a detached input, and only its input is kept
//!    (the layer's graph is dropped as soon as its output is detached); a steered layer's
//!    output carries its shift (`steering`) into the next layer's kept input, as in the plain
//!    pass;
//! 2. the final norm, head and loss run on a fresh leaf (`Var`) copy of the last layer's
//!    output (and of each layer output the loss reads, e.g. for LDIFS); their `backward()`
//!    gives the head's weight gradients and the gradient at that boundary;
//! 3. from the last layer to the first, the layer is re-run from its kept input (a leaf
//!    again) with the graph on, and `backward()` of `sum(out * grad_out)` gives its weights'
//!    gradients and the gradient at its input, carried down; a trainable embedding (full
//!    fine-tuning) is the last such step.
//!
//! The surrogate's gradient at `out` is exactly `grad_out`, so each layer's backward sees the
//! same numbers as in the whole graph; only the order in which candle sums a tensor's
//! gradient contributions can differ (f32 rounding). LoRA dropout masks are drawn from the
//! model's stream: each layer's re-run restores the stream's state from before that layer's
//! first run, so it draws the same masks, and the stream ends where the plain pass leaves it.
//!
//! Memory: phase 1 and 3 hold one layer's activations at a time, plus one hidden state per
//! layer boundary; phase 2 holds the head's (the logits). The estimate in `engine::memory`
//! counts the same.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::forward::TrainPass;
use super::layers::rms_norm;
use super::model::Transformer;
use super::pass::Ctx;
use super::weight::{Mode, Weight};
use crate::optim::accumulate;

/// What the second phase (head and loss) hands the third.
struct HeadGrads {
    /// The loss, detached (its graph is gone).
    loss: Tensor,
    /// The head's backward: the final norm's and output projection's weight gradients.
    weights: GradStore,
    /// The gradient at the last layer's output.
    at_top: Tensor,
    /// The gradient at the output of each other layer the loss read, by layer.
    at_layer: HashMap<usize, Tensor>,
}

/// What the first phase of a checkpointed pass keeps per layer.
struct LayerInputs {
    /// Each layer's input hidden state (b, t, hidden), detached; then the last layer's output.
    boundaries: Vec<Tensor>,
    /// The dropout stream's state before each layer, then after the last.
    dropout: Vec<ChaCha8Rng>,
}

impl Transformer {
    /// A training pass over `ids` (b, t) with the padding `attention_mask` (b, t): `loss`
    /// builds a scalar from the pass (its logits or scores, and the outputs of the decoder
    /// `layers` it asked for), and the result is that loss and the gradients of every
    /// trainable var ([`Self::trainable_vars`]) with respect to it.
    ///
    /// With `checkpointed`, activations are recomputed layer by layer (see the module doc):
    /// the gradients are the same within f32 rounding, the returned store holds only the
    /// trainable vars' gradients, and the returned loss is detached. Without, this is the
    /// plain pass and `loss.backward()`, bit for bit.
    pub fn train_backward(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layers: &[usize],
        checkpointed: bool,
        loss: impl FnOnce(&TrainPass) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        if !checkpointed {
            let pass = self.train_pass(ids, attention_mask, layers)?;
            let loss = loss(&pass)?;
            let grads = loss.backward()?;
            return Ok((loss, grads));
        }
        let cx = self.train_context(ids, attention_mask)?;
        let kept = self.forward_keeping_inputs(ids, &cx)?;
        let mut head = self.head_backward(&kept, layers, &cx, loss)?;
        let vars = self.trainable_vars();
        let mut total = None;
        accumulate(&mut total, &vars, head.weights, 1.0)?;
        let mut grad_out = head.at_top;
        let embed_trains = matches!(self.embed, Weight::Trainable(_));
        for (i, layer) in self.layers.iter().enumerate().rev() {
            if let Some(g) = head.at_layer.remove(&i) {
                grad_out = (grad_out + g)?;
            }
            *self.dropout_stream()? = kept.dropout[i].clone();
            let needs_input_grad = i > 0 || embed_trains;
            let input = leaf(&kept.boundaries[i], needs_input_grad)?;
            // The steering shift is a constant (d(out + s)/d out = 1): leaving it out of the
            // re-run gives the layer the same backward.
            let out = layer.forward(&self.cfg, i, &input, &cx, None)?;
            let layer_grads = (out * &grad_out)?.sum_all()?.backward()?;
            if needs_input_grad {
                grad_out = input_grad(&layer_grads, &input)?;
            }
            accumulate(&mut total, &vars, layer_grads, 1.0)?;
        }
        if embed_trains {
            let x = self.embed_tokens(ids, Mode::Train)?;
            let embed_grads = (x * &grad_out)?.sum_all()?.backward()?;
            accumulate(&mut total, &vars, embed_grads, 1.0)?;
        }
        *self.dropout_stream()? = kept.dropout[self.layers.len()].clone();
        Ok((head.loss, total.unwrap_or_default()))
    }

    /// Phase 1: every layer in train mode without keeping its graph; each layer's input and
    /// the dropout stream's state before it.
    fn forward_keeping_inputs(&self, ids: &Tensor, cx: &Ctx) -> Result<LayerInputs> {
        let n = self.layers.len();
        let mut kept = LayerInputs {
            boundaries: Vec::with_capacity(n + 1),
            dropout: Vec::with_capacity(n + 1),
        };
        let mut x = self.embed_tokens(ids, Mode::Train)?.detach();
        for (i, layer) in self.layers.iter().enumerate() {
            kept.dropout.push(self.dropout_stream()?.clone());
            let out = layer.forward(&self.cfg, i, &x, cx, None)?;
            let out = self.steer(i, out, Mode::Train)?.detach();
            kept.boundaries.push(std::mem::replace(&mut x, out));
        }
        kept.dropout.push(self.dropout_stream()?.clone());
        kept.boundaries.push(x);
        Ok(kept)
    }

    /// Phase 2: the final norm, the head and `loss` on leaf copies of the layer outputs the
    /// loss reads, and its backward.
    fn head_backward(
        &self,
        kept: &LayerInputs,
        layers: &[usize],
        cx: &Ctx,
        loss: impl FnOnce(&TrainPass) -> Result<Tensor>,
    ) -> Result<HeadGrads> {
        let n = self.layers.len();
        let top = leaf(&kept.boundaries[n], true)?;
        // Layer i's output is layer i + 1's input; the last one's is `top` itself.
        let mut captured = Vec::new();
        for i in (0..n).filter(|i| layers.contains(i)) {
            let h = match i + 1 == n {
                true => top.clone(),
                false => leaf(&kept.boundaries[i + 1], true)?,
            };
            captured.push((i, h));
        }
        self.check_captured(layers, captured.len())?;
        let pass = TrainPass {
            model: self,
            normed: rms_norm(&top, &self.final_norm, cx, self.cfg.rms_eps)?,
            hidden: captured.iter().map(|(_, h)| h.clone()).collect(),
        };
        let loss = loss(&pass)?;
        let mut weights = loss.backward()?;
        drop(pass);
        let mut at_layer = HashMap::new();
        for (i, h) in captured.iter().filter(|(i, _)| i + 1 != n) {
            if let Some(g) = weights.remove(h) {
                at_layer.insert(*i, g.detach());
            }
        }
        Ok(HeadGrads {
            loss: loss.detach(),
            at_top: input_grad(&weights, &top)?,
            at_layer,
            weights,
        })
    }

    /// The LoRA dropout stream, locked.
    fn dropout_stream(&self) -> Result<std::sync::MutexGuard<'_, ChaCha8Rng>> {
        self.dropout_rng
            .lock()
            .map_err(|_| anyhow::anyhow!("LoRA dropout RNG lock poisoned"))
    }
}

/// A copy of `x` that backward computes a gradient for (a `Var`), or `x` itself when no
/// gradient is needed there (the first layer's input under a frozen embedding).
fn leaf(x: &Tensor, tracked: bool) -> Result<Tensor> {
    Ok(match tracked {
        true => Var::from_tensor(x)?.as_tensor().clone(),
        false => x.clone(),
    })
}

/// The gradient `grads` holds at `x`, or zeros when the loss does not depend on it.
fn input_grad(grads: &GradStore, x: &Tensor) -> Result<Tensor> {
    Ok(match grads.get(x) {
        Some(g) => g.detach(),
        None => x.zeros_like()?,
    })
}
