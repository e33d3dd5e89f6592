//! The hand-written kernels under the transformer, by when they run.
//!
//! * `train`: differentiable CPU ops (one graph node each, with their own backward) for a
//!   training pass in f32; plus the candle-op spellings they replace where those are the
//!   fallback (RoPE).
//! * `decode`: the eval-mode kernels of a decode step (attention over the KV cache, products
//!   with packed or block-coded weights).
//! * `cpu`: host-side building blocks both of those share (strided GEMM, panel products,
//!   softmax statistics, borrowing a tensor's f32 storage).
//! * `derived_copy`: the once-made copies of frozen weights those kernels multiply by.
//!
//! Who may call what: the transformer calls `train`, `decode` and `derived_copy`; `losses`
//! calls `train`'s fused log-probabilities; `cpu` is called by `train` and `decode`, by the
//! optimiser's fused AdamW update, and by `bench`, which times the kernels. Nothing here calls
//! back into the transformer, so the layering has no circle. Every op's numerics are pinned by
//! its unit tests against candle's own spelling.

pub(crate) mod cpu;
pub(crate) mod decode;
pub(crate) mod derived_copy;
pub(crate) mod train;
