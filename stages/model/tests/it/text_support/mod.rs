//! Shared by the `text_*` tests: a tiny byte-level BPE tokenizer in GGUF metadata form (so the
//! converter and chat masking are tested without real weights), and the real SmolLM2 file.

#![allow(dead_code)]

pub mod templates;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, Value};
use emflow_model::Tokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// The tokenizer of [`synthetic_gguf_metadata`] with the [`CONTROL`] tokens, built through
/// the GGUF converter.
pub fn synthetic_tokenizer(pre: &str, merges: &[(&str, &str)], eos: &str) -> Tokenizer {
    Tokenizer::from_gguf_metadata(&synthetic_gguf_metadata(pre, CONTROL, merges, eos)).unwrap()
}

/// GGUF-style metadata for a byte-level BPE: `control` tokens first (ids 0..), then the 256
/// byte symbols, then one token per merge. `eos` names the EOS control token.
pub fn synthetic_gguf_metadata(
    pre: &str,
    control: &[&str],
    merges: &[(&str, &str)],
    eos: &str,
) -> HashMap<String, Value> {
    let mut tokens: Vec<String> = control.iter().map(|s| s.to_string()).collect();
    let mut types: Vec<i32> = vec![3; control.len()];
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    for c in alphabet {
        tokens.push(c.to_string());
        types.push(1);
    }
    for (a, b) in merges {
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    let eos_id = tokens
        .iter()
        .position(|t| t == eos)
        .expect("eos among tokens") as u32;
    let mut md = HashMap::new();
    md.insert(
        "tokenizer.ggml.model".to_string(),
        Value::String("gpt2".into()),
    );
    md.insert("tokenizer.ggml.pre".to_string(), Value::String(pre.into()));
    md.insert(
        "tokenizer.ggml.tokens".to_string(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    md.insert(
        "tokenizer.ggml.token_type".to_string(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    md.insert(
        "tokenizer.ggml.merges".to_string(),
        Value::Array(
            merges
                .iter()
                .map(|(a, b)| Value::String(format!("{a} {b}")))
                .collect(),
        ),
    );
    md.insert(
        "tokenizer.ggml.eos_token_id".to_string(),
        Value::U32(eos_id),
    );
    md
}

/// The control tokens of ChatML and Llama-3 markup.
pub const CONTROL: &[&str] = &[
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];

/// The real SmolLM2-135M-Instruct GGUF's metadata, or `None` (with a printed reason).
pub fn smollm2_metadata() -> Option<HashMap<String, Value>> {
    let path: PathBuf = emflow_model::testing::smollm2_gguf()?;
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = Content::read(&mut file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(content.metadata)
}
