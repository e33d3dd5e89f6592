//! Reading model weights from disk into tensors with HF names and layout.
//!
//! Both sources (GGUF files and HF safetensors folders) produce the same thing: a config and a
//! map from HF parameter names (`model.layers.3.self_attn.q_proj.weight`) to tensors in HF layout.
//! The transformer, LoRA adapters and saved checkpoints then speak only HF names, so an adapter
//! trained on the GGUF copy of a model loads in PEFT on the HF copy.
//!
//! Here too: `load` (a path to a runnable model with its tokenizer and chat template), and
//! what training writes, `adapter` (PEFT adapter folders) and `hf`'s full-weight folders.
//! Builds on `transformer` and `text`; called by the stages crate and `bench`.

pub mod adapter;
pub mod gguf;
pub mod hf;
mod load;
pub mod pip;

pub use load::{load, LoadedModel};

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// blake3 of the weight file(s), memory-mapped and hashed on all cores. One file: the plain blake3
/// of its bytes (what `b3sum` prints). Several files: blake3 over each file's name and hash, in
/// name order, so the digest does not depend on directory listing order.
pub fn weights_digest(files: &[PathBuf]) -> Result<String> {
    let hash_file = |path: &Path| -> Result<blake3::Hash> {
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_mmap_rayon(path)
            .with_context(|| format!("hashing weight file {}", path.display()))?;
        Ok(hasher.finalize())
    };
    if let [single] = files {
        return Ok(hash_file(single)?.to_hex().to_string());
    }
    let mut sorted: Vec<&PathBuf> = files.iter().collect();
    sorted.sort();
    let mut combined = blake3::Hasher::new();
    for path in sorted {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        combined.update(name.as_bytes());
        combined.update(&[0]);
        combined.update(hash_file(path)?.as_bytes());
    }
    Ok(combined.finalize().to_hex().to_string())
}
