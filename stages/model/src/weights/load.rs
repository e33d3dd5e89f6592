//! One entry point from a path on disk to a runnable model with its tokenizer and chat template.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

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
    let parts = if path.is_dir() {
        read_hf(path, setup)
    } else if path.is_file() {
        read_gguf(path, setup)
    } else {
        bail!(
            "model path {} does not exist (expected a .gguf file or an HF-format folder)",
            path.display()
        )
    };
    parts
        .and_then(|parts| parts.build(path, setup))
        .with_context(|| format!("loading model {}", path.display()))
}

/// What a model file or folder gives before the model is built from it.
struct Parts {
    config: ModelConfig,
    tensors: HashMap<String, Tensor>,
    digest: String,
    tokenizer: Tokenizer,
    chat: ChatTemplate,
}

impl Parts {
    /// The model built from the tensors, named after `path` for saved adapters.
    fn build(self, path: &Path, setup: &DeviceSetup) -> Result<LoadedModel> {
        let mut model = Transformer::from_tensors(self.config.clone(), self.tensors, setup)?;
        model.set_base_model_name(path.display().to_string());
        Ok(LoadedModel {
            config: self.config,
            tokenizer: self.tokenizer,
            chat: self.chat,
            model,
            source_digest: self.digest,
        })
    }
}

fn read_gguf(path: &Path, setup: &DeviceSetup) -> Result<Parts> {
    let w = weights::gguf::read(path, setup)?;
    let digest = weights_digest(&[path.to_path_buf()])?;
    let tokenizer = Tokenizer::from_gguf_metadata(&w.metadata)
        .context("building the tokenizer from GGUF metadata")?;
    let chat = ChatTemplate::from_gguf_metadata(&w.metadata)
        .context("reading the chat template from GGUF metadata")?;
    Ok(Parts {
        config: w.config,
        tensors: w.tensors,
        digest,
        tokenizer,
        chat,
    })
}

fn read_hf(dir: &Path, setup: &DeviceSetup) -> Result<Parts> {
    let w = weights::hf::read(dir, setup)?;
    Ok(Parts {
        digest: weights_digest(&w.files)?,
        tokenizer: Tokenizer::from_hf_dir(dir)?,
        chat: ChatTemplate::from_hf_dir(dir)?,
        config: w.config,
        tensors: w.tensors,
    })
}
