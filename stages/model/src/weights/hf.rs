//! HF-format model folders: `config.json` plus one or more `*.safetensors` shards, memory-mapped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::config::ModelConfig;
use crate::device::DeviceSetup;

pub struct HfWeights {
    pub config: ModelConfig,
    /// HF names -> tensors in `setup.compute_dtype` on `setup.device`.
    pub tensors: HashMap<String, Tensor>,
    /// The safetensors shards read, for the weight digest.
    pub files: Vec<PathBuf>,
}

/// The model's safetensors shards in `dir` (adapter files excluded), sorted by name.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let is_weights = path.extension().is_some_and(|e| e == "safetensors")
            && !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("adapter_"));
        if is_weights {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "{} has no *.safetensors weights; an HF-format model folder needs config.json and model*.safetensors",
            dir.display()
        );
    }
    Ok(files)
}

pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (an HF-format model folder needs it)",
            path.display()
        )
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let config =
        ModelConfig::from_hf_json(&json).with_context(|| format!("in {}", path.display()))?;
    config.validate()?;
    Ok(config)
}

/// Read every tensor of the given safetensors files onto `setup`'s device in its compute dtype.
pub fn read_tensors(files: &[PathBuf], setup: &DeviceSetup) -> Result<HashMap<String, Tensor>> {
    // SAFETY: read-only mapping of model files that emflow does not modify while reading.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .with_context(|| format!("memory-mapping {} safetensors file(s)", files.len()))?;
    let mut tensors = HashMap::new();
    for (name, _) in st.tensors() {
        let t = st
            .load(&name, &setup.device)
            .with_context(|| format!("loading tensor {name}"))?
            .to_dtype(setup.compute_dtype)?;
        tensors.insert(name, t);
    }
    Ok(tensors)
}

pub fn read(dir: &Path, setup: &DeviceSetup) -> Result<HfWeights> {
    let config = read_config(dir)?;
    let files = safetensors_files(dir)?;
    let tensors = read_tensors(&files, setup)?;
    Ok(HfWeights {
        config,
        tensors,
        files,
    })
}
