//! The model layer's integration tests, in one binary (one link of candle instead of one per
//! file). `common` and `text_support` hold the shared fixtures: tiny random models and
//! tokenizers, synthetic GGUF metadata, and the real SmolLM2 file where it is present.
//!
//! `cuda` is built only with `--features cuda`; scripts/gpu-check.sh runs its tests on a GPU
//! (`it cuda::`).

mod architectures;
mod chat_parity;
mod checkpointing;
mod common;
#[cfg(feature = "cuda")]
mod cuda;
mod generation;
mod matches_candle;
mod smollm2;
mod steering;
mod text_chat;
mod text_losses;
mod text_optim;
mod text_support;
mod text_tokenizer;
mod training;
