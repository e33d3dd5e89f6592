//! Text <-> token ids, built on the `tokenizers` crate.
//!
//! Two sources: an HF folder's `tokenizer.json` (loaded as is), and GGUF metadata, which we
//! convert ourselves. candle's own GGUF converter gives wrong ids for SmolLM2: it ignores
//! `tokenizer.ggml.pre` and so misses the per-model pre-tokenizer (SmolLM2's `smollm` splits
//! every digit before the GPT-2 regex). The converter here builds the byte-level BPE from the
//! vocabulary and merges, picks the pre-tokenizer that llama.cpp uses for that `pre` value,
//! and registers the control tokens (token_type 3) as special tokens so chat markup such as
//! `<|im_start|>` is one id, exactly as the HF tokenizer does.
//!
//! Conventions shared by every caller: `encode` never adds BOS or any post-processing (chat
//! templates write BOS into the text themselves when a model wants it) but does parse special
//! tokens written in the text; `decode` skips nothing, so decode(encode(s)) == s.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Qwen2's split regex (from its tokenizer.json): like Llama-3's but one digit at a time.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama-3's split regex (from its tokenizer.json): digits in groups of up to three.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `token_type` of control tokens (llama.cpp's LLAMA_TOKEN_TYPE_CONTROL).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `token_type` of user-defined tokens: matched whole in text, but not special.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A token's byte range `(start, end)` in the encoded text.
pub type ByteRange = (usize, usize);

/// A model's tokenizer plus the special ids generation and batching need.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_ids: Vec<u32>,
    bos_id: Option<u32>,
    pad_id: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_ids", &self.eos_ids)
            .field("bos_id", &self.bos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's metadata (`tokenizer.ggml.*`). Supports the
    /// byte-level BPE (`tokenizer.ggml.model = gpt2`) used by SmolLM2, Qwen2 and Llama-3.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = gguf_str(md, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            bail!(
                "GGUF tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2', is); \
                 use the model's HF-format folder (with tokenizer.json) instead"
            );
        }
        let vocab = GgufVocabulary::read(md)?;
        let vocab_size = vocab.tokens.len();
        let inner = vocab.into_byte_level_bpe(md)?;
        let (bos_id, eos_ids, pad_id) = gguf_special_ids(md, vocab_size)?;
        Ok(Self {
            inner,
            eos_ids,
            bos_id,
            pad_id,
        })
    }

    /// Loads `tokenizer.json` from an HF-format folder; special ids come from
    /// `tokenizer_config.json` and, when present, `generation_config.json` (whose
    /// `eos_token_id` list is what `generate()` in transformers stops on).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("disabling truncation of {}: {e}", path.display()))?;
        inner.with_padding(None);
        // Post-processors only add specials (which `encode` never wants) and trim offsets
        // (which would blur the assistant-mask spans in `chat`): drop them.
        inner.with_post_processor(None::<tokenizers::processors::PostProcessorWrapper>);
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let gen_config = read_json_if_exists(&dir.join("generation_config.json"))?;

        let id_of_config = |key: &str| -> Result<Option<u32>> {
            let Some(content) = config.as_ref().and_then(|c| special_token_content(c, key)) else {
                return Ok(None);
            };
            inner.token_to_id(&content).map(Some).ok_or_else(|| {
                anyhow!(
                    "tokenizer_config.json names {key} {content:?}, which is not in {}",
                    path.display()
                )
            })
        };
        let bos_id = id_of_config("bos_token")?;
        let mut eos_ids = Vec::new();
        if let Some(id) = id_of_config("eos_token")? {
            eos_ids.push(id);
        }
        if let Some(v) = gen_config.as_ref().and_then(|g| g.get("eos_token_id")) {
            let ids: Vec<&serde_json::Value> = match v {
                serde_json::Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for id in ids {
                let id = id
                    .as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| {
                        anyhow!(
                            "generation_config.json in {}: eos_token_id {id} is not a token id",
                            dir.display()
                        )
                    })?;
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let Some(&first_eos) = eos_ids.first() else {
            bail!(
                "{}: no eos_token in tokenizer_config.json and no eos_token_id in generation_config.json; \
                 cannot tell where generation ends",
                dir.display()
            );
        };
        let pad_id = id_of_config("pad_token")?.unwrap_or(first_eos);
        Ok(Self {
            inner,
            eos_ids,
            bos_id,
            pad_id,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|im_end|>`) become
    /// their ids; no BOS or other post-processing is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| {
            anyhow!(
                "tokenizing {} characters of text: {e}",
                text.chars().count()
            )
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like [`Tokenizer::encode`], also returning each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let enc = self.inner.encode(text, false).map_err(|e| {
            anyhow!(
                "tokenizing {} characters of text: {e}",
                text.chars().count()
            )
        })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding {} token ids: {e}", ids.len()))
    }

    /// Ids that end generation (EOS, and end-of-turn where the model has a distinct one).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The id used to pad batches (the model's pad token, else its first EOS id).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of token ids the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The token's string as stored in the vocabulary (byte-level form, e.g. `Ġworld`).
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token given its vocabulary string, e.g. `<|im_end|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer, for callers that need offsets or batch encoding.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// The pre-tokenizer llama.cpp associates with a GGUF `tokenizer.ggml.pre` value.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("compiling the '{pre}' pre-tokenizer regex: {e}"))?;
        Ok(split.into())
    };
    Ok(match pre {
        "smollm" | "starcoder" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        "qwen2" => Sequence::new(vec![split(QWEN2_PATTERN)?, ByteLevel::new(false, false, false).into()]).into(),
        "llama-bpe" | "llama3" | "llama-v3" => {
            Sequence::new(vec![split(LLAMA3_PATTERN)?, ByteLevel::new(false, true, false).into()]).into()
        }
        "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, true, true).into(),
        other => bail!(
            "GGUF tokenizer.ggml.pre = '{other}' is not supported (supported: smollm, starcoder, qwen2, \
             llama-bpe, llama3, default/gpt2); use the model's HF-format folder (with tokenizer.json) instead"
        ),
    })
}

fn gguf_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a String> {
    md.get(key)
        .ok_or_else(|| anyhow!("GGUF metadata has no '{key}'"))?
        .to_string()
        .map_err(|e| anyhow!("GGUF metadata '{key}' is not a string: {e}"))
}

fn gguf_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Vec<Value>> {
    md.get(key)
        .ok_or_else(|| anyhow!("GGUF metadata has no '{key}'"))?
        .to_vec()
        .map_err(|e| anyhow!("GGUF metadata '{key}' is not an array: {e}"))
}

/// Any GGUF integer as i64 (writers differ in which integer type they use for ids).
pub(crate) fn value_as_i64(v: &Value) -> Result<i64> {
    Ok(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).map_err(|_| anyhow!("integer {x} out of range"))?,
        Value::I64(x) => *x,
        other => bail!("expected an integer, found {:?}", other.value_type()),
    })
}

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {} as JSON", path.display()))?;
    Ok(Some(value))
}

/// The content of a special token in `tokenizer_config.json`: either a string or, in older
/// files, an object `{"content": ...}`.
pub(crate) fn special_token_content(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The vocabulary a GGUF file's `tokenizer.ggml.*` arrays describe.
struct GgufVocabulary {
    tokens: Vec<String>,
    merges: Vec<(String, String)>,
    /// Per token id; empty when the file has no `token_type` array.
    token_types: Vec<i64>,
}

impl GgufVocabulary {
    fn read(md: &HashMap<String, Value>) -> Result<Self> {
        let tokens: Vec<String> = gguf_array(md, "tokenizer.ggml.tokens")?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.to_string()
                    .cloned()
                    .map_err(|e| anyhow!("tokenizer.ggml.tokens[{i}] is not a string: {e}"))
            })
            .collect::<Result<_>>()?;
        let merges: Vec<(String, String)> = gguf_array(md, "tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let merge = v
                .to_string()
                .map_err(|e| anyhow!("tokenizer.ggml.merges[{i}] is not a string: {e}"))?;
            let (a, b) = merge.split_once(' ').ok_or_else(|| {
                anyhow!("tokenizer.ggml.merges[{i}] = {merge:?} is not two tokens separated by a space")
            })?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_>>()?;
        let token_types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| anyhow!("tokenizer.ggml.token_type is not an array: {e}"))?
                .iter()
                .map(value_as_i64)
                .collect::<Result<_>>()
                .context("reading tokenizer.ggml.token_type")?,
            None => Vec::new(),
        };
        Ok(Self {
            tokens,
            merges,
            token_types,
        })
    }

    /// The byte-level BPE over this vocabulary, with the pre-tokenizer `tokenizer.ggml.pre`
    /// names, and control and user-defined tokens registered as added tokens.
    fn into_byte_level_bpe(self, md: &HashMap<String, Value>) -> Result<tokenizers::Tokenizer> {
        let tokens = &self.tokens;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, self.merges)
            .build()
            .map_err(|e| anyhow!("building the BPE model from GGUF vocabulary and merges: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = md
            .get("tokenizer.ggml.pre")
            .map(|v| v.to_string().cloned())
            .transpose()
            .map_err(|e| anyhow!("tokenizer.ggml.pre is not a string: {e}"))?
            .unwrap_or_else(|| "default".to_string());
        inner.with_pre_tokenizer(Some(pre_tokenizer_for(&pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let mut specials = Vec::new();
        let mut user_defined = Vec::new();
        for (id, ty) in self.token_types.iter().enumerate() {
            let Some(content) = tokens.get(id) else { break };
            match *ty {
                TOKEN_TYPE_CONTROL => specials.push(AddedToken::from(content.clone(), true)),
                TOKEN_TYPE_USER_DEFINED => {
                    user_defined.push(AddedToken::from(content.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        inner
            .add_special_tokens(specials)
            .map_err(|e| anyhow!("registering GGUF control tokens as special tokens: {e}"))?;
        inner
            .add_tokens(user_defined)
            .map_err(|e| anyhow!("registering GGUF user-defined tokens: {e}"))?;
        Ok(inner)
    }
}

/// (BOS, the EOS ids generation stops on, padding) from GGUF metadata; padding defaults to the
/// first EOS id.
fn gguf_special_ids(
    md: &HashMap<String, Value>,
    vocab_size: usize,
) -> Result<(Option<u32>, Vec<u32>, u32)> {
    let id_of = |key: &str| -> Result<Option<u32>> {
        match md.get(key) {
            None => Ok(None),
            Some(v) => {
                let id = value_as_i64(v).with_context(|| format!("reading {key}"))?;
                let id = u32::try_from(id)
                    .ok()
                    .filter(|id| (*id as usize) < vocab_size)
                    .ok_or_else(|| {
                        anyhow!(
                            "{key} = {id} is not a token id (vocabulary has {vocab_size} tokens)"
                        )
                    })?;
                Ok(Some(id))
            }
        }
    };
    let bos_id = id_of("tokenizer.ggml.bos_token_id")?;
    let mut eos_ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = id_of(key)? {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
    }
    let Some(&first_eos) = eos_ids.first() else {
        bail!(
            "GGUF metadata has no tokenizer.ggml.eos_token_id; cannot tell where generation ends"
        );
    };
    let pad_id = id_of("tokenizer.ggml.padding_token_id")?.unwrap_or(first_eos);
    Ok((bos_id, eos_ids, pad_id))
}
