//! The real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised): agrees with candle-transformers'
//! `quantized_llama`, answers a factual question, and has the documented weight digest.
//! Skips with a printed reason when the weights are unavailable.

use crate::common::*;
use candle_core::{Device, IndexOp, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use emflow_model::{encode_prompt, load, GenerationRequest, Message, SamplingParams};

#[test]
fn dequantised_smollm2_agrees_with_quantized_llama() {
    let Some(path) = smollm2() else { return };
    let loaded = load(&path, &cpu()).unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut reference = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let prompts = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite a haiku about rain.<|im_end|>\n<|im_start|>assistant\n",
        "The quick brown fox jumps over the",
        "def fibonacci(n):\n    if n <= 1:\n        return",
        "1, 2, 3, 4, 5,",
    ];
    let mut worst = 0f32;
    for text in prompts {
        let ids = loaded.tokenizer.encode(text).unwrap();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = reference.forward(&input, 0).unwrap().i(0).unwrap();
        let ours = loaded
            .model
            .forward_eval(&input, &ones(1, ids.len()))
            .unwrap()
            .i((0, ids.len() - 1))
            .unwrap();
        let argmax = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        let d = max_abs_diff(&ours, &want);
        worst = worst.max(d);
        println!(
            "{:?}: next token ours {} reference {}, max |Δlogit| {d:.3}",
            text,
            argmax(&ours),
            argmax(&want)
        );
        assert_eq!(
            argmax(&ours),
            argmax(&want),
            "next token differs for {text:?}"
        );
        // Q4_1 x Q8-quantised activations vs f32 activations: differences of order 1 are expected.
        assert!(d < 3.0, "logits differ by {d} for {text:?}");
    }
    println!("max |Δlogit| over prompts: {worst:.3}");
}

#[test]
fn greedy_smollm2_knows_the_capital_of_france() {
    let Some(path) = smollm2() else { return };
    let loaded = load(&path, &cpu()).unwrap();
    let prompt = encode_prompt(
        &loaded.tokenizer,
        &loaded.chat,
        &[Message {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }],
    )
    .unwrap();
    let gens = loaded
        .model
        .generate(
            &loaded.tokenizer,
            &[GenerationRequest {
                prompt_ids: prompt,
                seed: 0,
            }],
            &SamplingParams::greedy(24),
            1,
            &|_| {},
        )
        .unwrap();
    println!("answer: {:?}", gens[0].text);
    assert!(gens[0].text.contains("Paris"), "{:?}", gens[0].text);
}

#[test]
fn decode_multiplies_smollm2_from_its_file_codes() {
    let Some(path) = smollm2() else { return };
    let loaded = load(&path, &cpu()).unwrap();
    let bits = loaded.model.decode_weight_bits().unwrap();
    // Thirty layers of seven Q4_1 projections, then the tied Q8_0 embedding as head.
    let (head, projections) = bits.split_last().unwrap();
    assert_eq!(projections.len(), 30 * 7);
    assert!(projections.iter().all(|&b| b == Some(4)), "{projections:?}");
    assert_eq!(*head, Some(8));
}

#[test]
fn source_digest_is_the_blake3_of_the_file() {
    let Some(path) = smollm2() else { return };
    let loaded = load(&path, &cpu()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        loaded.source_digest,
        blake3::hash(&bytes).to_hex().to_string()
    );
    assert_eq!(loaded.config.num_layers, 30);
    assert!(loaded.config.tie_embeddings);
}
