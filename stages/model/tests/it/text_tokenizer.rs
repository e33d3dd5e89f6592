//! The tokenizer: the GGUF converter against SmolLM2's known ids, round-trips, the per-`pre`
//! pre-tokenizers, and `tokenizer.json` folders.

use crate::text_support::{smollm2_metadata, synthetic_gguf_metadata, CONTROL};
use emflow_model::Tokenizer;

const ROUND_TRIP_TEXTS: &[&str] = &[
    "Hello world",
    "  leading spaces,   runs of spaces\tand tabs\n\n\nand newlines  ",
    "Unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, emoji 🦀🔥, combining é",
    "Digits 1234567890 and 3.14159, 1e-9, 0x7fff",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{v:?}\");\n}\n",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>\n",
    "",
];

#[test]
fn smollm2_ids_match_the_hf_tokenizer() {
    let Some(md) = smollm2_metadata() else { return };
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    assert_eq!(tok.encode("Hello world").unwrap(), vec![19556, 905]);
    assert_eq!(
        tok.encode("<|im_start|>user\nHi there!<|im_end|>\n")
            .unwrap(),
        vec![1, 4093, 198, 26843, 665, 17, 2, 198]
    );
    // Digits are split one by one (the `smollm` pre-tokenizer), each its own token.
    let digits = tok.encode("2024").unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.token_str(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn smollm2_round_trips_varied_text() {
    let Some(md) = smollm2_metadata() else { return };
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    for text in ROUND_TRIP_TEXTS {
        let ids = tok.encode(text).unwrap();
        assert_eq!(&tok.decode(&ids).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn the_gguf_pre_value_selects_how_digits_are_grouped() {
    let merges = [("1", "2"), ("12", "3"), ("4", "5")];
    let ids_of = |pre: &str| {
        let tok = Tokenizer::from_gguf_metadata(&synthetic_gguf_metadata(
            pre,
            CONTROL,
            &merges,
            "<|im_end|>",
        ))
        .unwrap();
        let ids = tok.encode("12345").unwrap();
        ids.iter()
            .map(|&i| tok.token_str(i).unwrap())
            .collect::<Vec<_>>()
    };
    // smollm and qwen2: one digit per token, so no digit merge ever applies.
    assert_eq!(ids_of("smollm"), ["1", "2", "3", "4", "5"]);
    assert_eq!(ids_of("qwen2"), ["1", "2", "3", "4", "5"]);
    // llama-3: groups of up to three digits, each merged within its group.
    assert_eq!(ids_of("llama-bpe"), ["123", "45"]);
    // gpt2: the whole number is one pre-token.
    assert_eq!(ids_of("default"), ["123", "45"]);
}

#[test]
fn synthetic_tokenizer_parses_control_tokens_and_round_trips() {
    let md = synthetic_gguf_metadata("qwen2", CONTROL, &[("H", "i")], "<|im_end|>");
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    let ids = tok.encode("<|im_start|>Hi<|im_end|>").unwrap();
    let strs: Vec<String> = ids.iter().map(|&i| tok.token_str(i).unwrap()).collect();
    assert_eq!(strs, ["<|im_start|>", "Hi", "<|im_end|>"]);
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.pad_id(), 2, "pad falls back to EOS");
    assert_eq!(tok.bos_id(), None);
    for text in ROUND_TRIP_TEXTS {
        assert_eq!(&tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    }
}

#[test]
fn unsupported_gguf_tokenizers_fail_with_a_way_out() {
    let md = synthetic_gguf_metadata("deepseek-coder", CONTROL, &[], "<|im_end|>");
    let err = format!("{:#}", Tokenizer::from_gguf_metadata(&md).unwrap_err());
    assert!(
        err.contains("deepseek-coder") && err.contains("HF-format folder"),
        "{err}"
    );

    let mut md = synthetic_gguf_metadata("smollm", CONTROL, &[], "<|im_end|>");
    md.insert(
        "tokenizer.ggml.model".into(),
        candle_core::quantized::gguf_file::Value::String("llama".into()),
    );
    let err = format!("{:#}", Tokenizer::from_gguf_metadata(&md).unwrap_err());
    assert!(err.contains("'llama' is not supported"), "{err}");
}

#[test]
fn hf_folder_gives_the_same_ids_and_reads_special_ids_from_its_configs() {
    let md = synthetic_gguf_metadata("smollm", CONTROL, &[("H", "i"), ("Ġ", "t")], "<|im_end|>");
    let from_gguf = Tokenizer::from_gguf_metadata(&md).unwrap();
    let dir = tempfile::tempdir().unwrap();
    from_gguf
        .inner()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 6]}"#,
    )
    .unwrap();
    let from_dir = Tokenizer::from_hf_dir(dir.path()).unwrap();
    for text in ROUND_TRIP_TEXTS {
        assert_eq!(
            from_dir.encode(text).unwrap(),
            from_gguf.encode(text).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(from_dir.bos_id(), Some(3));
    assert_eq!(from_dir.eos_ids(), &[2, 6]);
    assert_eq!(from_dir.pad_id(), 0);

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|nope|>"}"#,
    )
    .unwrap();
    let err = format!("{:#}", Tokenizer::from_hf_dir(dir.path()).unwrap_err());
    assert!(err.contains("<|nope|>"), "{err}");
}
