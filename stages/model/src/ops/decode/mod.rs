//! The eval-mode kernels of a decode step, where a handful of rows meet every weight: attention
//! of the new positions over the KV cache as plain loops, products with each frozen weight's
//! decode copy (f32 panels, or the 4/8-bit codes a block-quantised file gave it), and an
//! adapter's share added on the host.
//!
//! Called by the transformer in eval mode; built on `ops::cpu`.

mod adapter;
mod decode_attention;
mod decode_weight;

pub(crate) use adapter::add_adapter;
pub(crate) use decode_attention::decode_attention;
pub(crate) use decode_weight::{DecodeWeight, PanelCache, Stored};
