//! HF-format model folders: `config.json` plus one or more `*.safetensors` shards, memory-mapped;
//! and a fully fine-tuned model written as one such folder and read back.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::device::DeviceSetup;
use crate::transformer::{ModelConfig, Transformer};

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

pub const FULL_WEIGHTS: &str = "model.safetensors";

impl Transformer {
    /// Write every weight (f32, HF names) as `model.safetensors` plus an HF `config.json`.
    pub fn save_full(&self, dir: &Path) -> Result<()> {
        if self.lora.is_some() {
            bail!("this model has a LoRA adapter: save it with save_adapter, or merge_lora first");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors: HashMap<String, Tensor> = self
            .named_weights()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let path = dir.join(FULL_WEIGHTS);
        candle_core::safetensors::save(&tensors, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&self.cfg.to_hf_json())?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Overwrite every weight from a folder written by [`Self::save_full`] (same architecture).
    pub fn load_full(&mut self, dir: &Path) -> Result<()> {
        let files = safetensors_files(dir)?;
        let tensors = read_tensors(
            &files,
            &DeviceSetup {
                device: self.device.clone(),
                compute_dtype: DType::F32,
            },
        )?;
        let mut missing: BTreeSet<String> = self
            .named_weight_refs()
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        for (name, t) in tensors {
            if self.cfg.tie_embeddings && name == "lm_head.weight" {
                continue;
            }
            let (w, transposed) = self.weight_mut(&name).with_context(|| {
                format!(
                    "{} holds {name}, which this model does not have",
                    dir.display()
                )
            })?;
            let t = if transposed { t.t()?.contiguous()? } else { t };
            w.set(&t)
                .with_context(|| format!("loading {name} from {}", dir.display()))?;
            missing.remove(&name);
        }
        self.refresh_embed_t()?;
        if let Some(name) = missing.iter().next() {
            bail!(
                "{} lacks {} weight(s), e.g. {name}",
                dir.display(),
                missing.len()
            );
        }
        Ok(())
    }
}
