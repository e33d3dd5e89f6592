//! HF-format model folders: `config.json` plus one or more `*.safetensors` shards (named by
//! `model.safetensors.index.json` when sharded), memory-mapped, in f32, bf16 or f16; and a fully
//! fine-tuned model written as one such folder and read back. A folder fetched from
//! `hf:org/name@revision` (`emflow_stages::fetch`) is such a folder and loads the same way.

use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::device::DeviceSetup;
use crate::transformer::{ModelConfig, Transformer};

pub struct HfWeights {
    pub config: ModelConfig,
    /// HF names -> tensors in `setup.compute_dtype` on `setup.device`.
    pub tensors: HashMap<String, Tensor>,
    /// The safetensors shards read, for the weight digest.
    pub files: Vec<PathBuf>,
}

/// The index transformers writes beside sharded weights: tensor name -> shard file.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// Below this many bytes of weights, loading shows no progress bar (it takes a blink).
const BAR_FROM_BYTES: u64 = 256 << 20;

/// The model's safetensors shards in `dir`, sorted by name: those `model.safetensors.index.json`
/// names when it exists (each must be there), else every `*.safetensors` but adapter files.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.join(SHARD_INDEX).is_file() {
        let shards: BTreeSet<String> = read_shard_index(dir)?.into_values().collect();
        let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            bail!(
                "{} names the shard {}, which is missing (an interrupted download?)",
                dir.join(SHARD_INDEX).display(),
                missing.display()
            );
        }
        return Ok(files);
    }
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

/// The `weight_map` of `dir`'s `model.safetensors.index.json`.
fn read_shard_index(dir: &Path) -> Result<HashMap<String, String>> {
    let path = dir.join(SHARD_INDEX);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let index: Index = serde_json::from_str(&text)
        .with_context(|| format!("parsing {} (it needs a weight_map)", path.display()))?;
    if index.weight_map.is_empty() {
        bail!("{} has an empty weight_map", path.display());
    }
    Ok(index.weight_map)
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

/// Read every tensor of the given safetensors files onto `setup`'s device in its compute dtype
/// (bf16, f16 and f32 files alike). The files are memory-mapped and each tensor is copied
/// once from the map to its device (and converted there), so the host never holds a shard,
/// only the tensor being converted; a bar on a terminal shows the bytes read.
pub fn read_tensors(files: &[PathBuf], setup: &DeviceSetup) -> Result<HashMap<String, Tensor>> {
    // SAFETY: read-only mapping of model files that emflow does not modify while reading.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .with_context(|| format!("memory-mapping {} safetensors file(s)", files.len()))?;
    let views = st.tensors();
    let bytes: u64 = views.iter().map(|(_, v)| v.data().len() as u64).sum();
    let bar = load_bar(bytes);
    let mut tensors = HashMap::new();
    for (name, view) in views {
        let t = st
            .load(&name, &setup.device)
            .with_context(|| format!("loading tensor {name}"))?
            .to_dtype(setup.compute_dtype)?;
        bar.inc(view.data().len() as u64);
        tensors.insert(name, t);
    }
    bar.finish_and_clear();
    Ok(tensors)
}

/// A bytes bar on stderr while weights load: drawn only on a terminal and for large models
/// (like the engine's bars, never into logs or pipes).
fn load_bar(bytes: u64) -> ProgressBar {
    if bytes < BAR_FROM_BYTES || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix:>8}  loading weights [{bar:25}] {bytes}/{total_bytes} {elapsed} (eta {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix("LOAD");
    bar
}

/// An HF-format folder's config and weights; with a shard index, every tensor it names must
/// be in the shards.
pub fn read(dir: &Path, setup: &DeviceSetup) -> Result<HfWeights> {
    let config = read_config(dir)?;
    let files = safetensors_files(dir)?;
    let tensors = read_tensors(&files, setup)?;
    if dir.join(SHARD_INDEX).is_file() {
        let index = read_shard_index(dir)?;
        let mut absent: Vec<&String> = index.keys().filter(|n| !tensors.contains_key(*n)).collect();
        absent.sort();
        if let Some(name) = absent.first() {
            bail!(
                "{} names {} tensor(s) its shards lack, e.g. {name:?} in {}",
                dir.join(SHARD_INDEX).display(),
                absent.len(),
                index[*name]
            );
        }
    }
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
