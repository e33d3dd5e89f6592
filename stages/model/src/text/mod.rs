//! Text in and out of a model: the tokenizer (from an HF `tokenizer.json` or GGUF metadata) and
//! chat formatting (the model's own Jinja template, and the assistant mask SFT trains on).
//!
//! Knows nothing about tensors or weights; called by `weights::load` (to build both next to
//! the model), `generate` (decoding and stop strings) and the stages crate.

pub mod chat;
pub mod tokenizer;

pub use chat::{encode_chat, encode_prompt, ChatTemplate, EncodedChat, Message, TemplateKwargs};
pub use tokenizer::Tokenizer;
