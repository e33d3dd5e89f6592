//! One entry point from a path on disk to a runnable model with its tokenizer and chat template.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::device::DeviceSetup;
use crate::text::{ChatTemplate, Tokenizer};
use crate::transformer::{ModelConfig, Transformer};
use crate::weights::{self, weights_digest};

pub struct LoadedModel {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
    pub model: Transformer,
    /// blake3 of the weight file(s) (see [`weights_digest`]): identifies the base weights in
    /// stage keys.
    pub source_digest: String,
}

/// Load a `.gguf` file (llama or qwen2 architecture; dequantised) or an HF-format folder
/// (config.json, *.safetensors, tokenizer.json, tokenizer_config.json).
pub fn load(path: &Path, setup: &DeviceSetup) -> Result<LoadedModel> {
    let loaded = if path.is_dir() {
        load_hf(path, setup)
    } else if path.is_file() {
        load_gguf(path, setup)
    } else {
        bail!(
            "model path {} does not exist (expected a .gguf file or an HF-format folder)",
            path.display()
        )
    };
    loaded.with_context(|| format!("loading model {}", path.display()))
}

fn load_gguf(path: &Path, setup: &DeviceSetup) -> Result<LoadedModel> {
    let w = weights::gguf::read(path, setup)?;
    let digest = weights_digest(&[path.to_path_buf()])?;
    let tokenizer = Tokenizer::from_gguf_metadata(&w.metadata)
        .context("building the tokenizer from GGUF metadata")?;
    let chat = ChatTemplate::from_gguf_metadata(&w.metadata)
        .context("reading the chat template from GGUF metadata")?;
    let mut model = Transformer::from_tensors(w.config.clone(), w.tensors, setup)?;
    model.set_base_model_name(path.display().to_string());
    Ok(LoadedModel {
        config: w.config,
        tokenizer,
        chat,
        model,
        source_digest: digest,
    })
}

fn load_hf(dir: &Path, setup: &DeviceSetup) -> Result<LoadedModel> {
    let w = weights::hf::read(dir, setup)?;
    let digest = weights_digest(&w.files)?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let chat = ChatTemplate::from_hf_dir(dir)?;
    let mut model = Transformer::from_tensors(w.config.clone(), w.tensors, setup)?;
    model.set_base_model_name(dir.display().to_string());
    Ok(LoadedModel {
        config: w.config,
        tokenizer,
        chat,
        model,
        source_digest: digest,
    })
}
