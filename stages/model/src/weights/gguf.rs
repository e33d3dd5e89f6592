//! GGUF (llama.cpp) files: metadata, and every tensor dequantised to f32 in HF layout.
//!
//! Training and scoring need f32 weights (there is no gradient through quantized matmuls), so we
//! dequantise once at load, in parallel over tensors from a memory map. llama.cpp's converter
//! permutes the q/k rows of llama-architecture models for interleaved RoPE; we undo that here so
//! the model, its adapters and its saved weights all use HF's layout and names.

use std::collections::HashMap;
use std::fs::File;
use std::io::Cursor;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::device::DeviceSetup;
use crate::transformer::{Arch, ModelConfig};

pub struct GgufWeights {
    pub config: ModelConfig,
    pub metadata: HashMap<String, gguf_file::Value>,
    /// HF names -> tensors in `setup.compute_dtype` on `setup.device`.
    pub tensors: HashMap<String, Tensor>,
}

/// Map a GGUF tensor name to its HF name (None for tensors the model does not use).
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.split_once('.')?;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{suffix}"))
}

/// Undo llama.cpp's `permute(w, n_head)`: GGUF rows are (head, pair, 2) where HF has (head, 2, pair).
fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = out / n_head / 2;
    Ok(w.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

pub fn read(path: &Path, setup: &DeviceSetup) -> Result<GgufWeights> {
    let file = File::open(path).with_context(|| format!("opening GGUF file {}", path.display()))?;
    // SAFETY: the file is opened read-only; emflow never writes model files it reads, and a
    // concurrent external writer would at worst corrupt the values we read, not memory safety
    // of our own structures beyond what any mmap-based reader accepts.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("memory-mapping GGUF file {}", path.display()))?;
    let content = gguf_file::Content::read(&mut Cursor::new(&mmap[..]))
        .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        bail!(
            "{} carries llama.cpp rope frequency factors (Llama 3.1+ rope scaling), which the GGUF \
             loader does not apply; load the model's HF-format folder instead",
            path.display()
        );
    }
    let has_output = content.tensor_infos.contains_key("output.weight");
    let config = ModelConfig::from_gguf_metadata(&content.metadata, has_output)
        .with_context(|| format!("reading the model shape from {}", path.display()))?;
    config.validate()?;

    let names: Vec<(&String, String)> = content
        .tensor_infos
        .keys()
        .filter_map(|g| hf_name(g).map(|h| (g, h)))
        .collect();
    let tensors: Vec<(String, Tensor)> = names
        .par_iter()
        .map(|(gguf, hf)| -> Result<(String, Tensor)> {
            let mut reader = Cursor::new(&mmap[..]);
            let q = content
                .tensor(&mut reader, gguf, &Device::Cpu)
                .with_context(|| format!("reading tensor {gguf} from {}", path.display()))?;
            let mut w = q
                .dequantize(&Device::Cpu)
                .with_context(|| format!("dequantising tensor {gguf}"))?
                .to_dtype(DType::F32)?;
            if config.arch == Arch::Llama && w.rank() >= 1 {
                if gguf.ends_with("attn_q.weight") || gguf.ends_with("attn_q.bias") {
                    w = unpermute_rows(&w, config.num_heads)?;
                } else if gguf.ends_with("attn_k.weight") || gguf.ends_with("attn_k.bias") {
                    w = unpermute_rows(&w, config.num_kv_heads)?;
                }
            }
            let w = w.to_device(&setup.device)?.to_dtype(setup.compute_dtype)?;
            Ok((hf.clone(), w))
        })
        .collect::<Result<_>>()?;
    Ok(GgufWeights {
        config,
        metadata: content.metadata,
        tensors: tensors.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_names() {
        for (gguf, hf) in [
            (
                "blk.12.attn_q.weight",
                Some("model.layers.12.self_attn.q_proj.weight"),
            ),
            (
                "blk.0.attn_k.bias",
                Some("model.layers.0.self_attn.k_proj.bias"),
            ),
            (
                "blk.3.ffn_norm.weight",
                Some("model.layers.3.post_attention_layernorm.weight"),
            ),
            ("token_embd.weight", Some("model.embed_tokens.weight")),
            ("rope_freqs.weight", None),
        ] {
            assert_eq!(hf_name(gguf).as_deref(), hf, "{gguf}");
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        // llama.cpp: w.reshape(h, 2, d/2, in).swapaxes(1, 2).reshape(out, in)
        let (h, d, inp) = (2usize, 4usize, 3usize);
        let hf = Tensor::arange(0f32, (h * d * inp) as f32, &Device::Cpu)?.reshape((h * d, inp))?;
        let permuted = hf
            .reshape((h, 2, d / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((h * d, inp))?;
        let back = unpermute_rows(&permuted, h)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }
}
