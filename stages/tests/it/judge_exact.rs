//! Exact 0-100 scoring (number string + end-of-turn, enumerated with shared prompt cache)
//! against a brute-force walk over every digit continuation, token by token, on a tiny
//! random model with the real architecture.

use emflow_model::{Arch, DeviceSetup, ModelConfig, Transformer};
use emflow_stages::judge::local::number_probabilities;
use emflow_stages::judge::logits::next_token_logprobs;
use emflow_stages::judge::{expected_score, MIN_NUMBER_MASS};

/// Digit `d` is token `DIGIT0 + d` in this made-up vocabulary.
const DIGIT0: u32 = 48;
const END_IDS: [u32; 2] = [2, 7];

fn digits(k: u32) -> Vec<u32> {
    k.to_string()
        .bytes()
        .map(|b| DIGIT0 + (b - b'0') as u32)
        .collect()
}

/// P(number k then one end token) for every k, by walking digit prefixes with full softmaxes.
fn brute_force(model: &Transformer, prompt: &[u32]) -> Vec<(u32, f64)> {
    let mut out = Vec::new();
    // Every digit string of length 1..=3 is visited; those spelling 0..=100 canonically count.
    let mut stack: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 1.0)];
    while let Some((prefix, p_prefix)) = stack.pop() {
        let mut ids = prompt.to_vec();
        ids.extend(&prefix);
        let lps = next_token_logprobs(model, &ids).unwrap();
        if !prefix.is_empty() {
            let text: String = prefix
                .iter()
                .map(|&t| char::from(b'0' + (t - DIGIT0) as u8))
                .collect();
            let k: u32 = text.parse().unwrap();
            if k <= 100 && k.to_string() == text {
                let p_end: f64 = END_IDS
                    .iter()
                    .map(|&e| (lps[e as usize] as f64).exp())
                    .sum();
                out.push((k, p_prefix * p_end));
            }
        }
        if prefix.len() < 3 {
            for d in 0..10u32 {
                let mut next = prefix.clone();
                next.push(DIGIT0 + d);
                stack.push((next, p_prefix * (lps[(DIGIT0 + d) as usize] as f64).exp()));
            }
        }
    }
    out.sort_by_key(|&(k, _)| k);
    out
}

#[test]
fn exact_enumeration_equals_brute_force_over_continuations() {
    let setup = DeviceSetup::cpu();
    for (arch, seed) in [(Arch::Llama, 1), (Arch::Qwen2, 2)] {
        let model = Transformer::random(&ModelConfig::tiny(arch), &setup, seed).unwrap();
        let prompt: Vec<u32> = vec![1, 100, 17, 200, 33, 64];
        let numbers: Vec<(u32, Vec<u32>)> = (0..=100).map(|k| (k, digits(k))).collect();
        let exact = number_probabilities(&model, &prompt, &numbers, &END_IDS).unwrap();
        let brute = brute_force(&model, &prompt);
        assert_eq!(exact.len(), 101);
        assert_eq!(brute.len(), 101);
        for ((k1, p1), (k2, p2)) in exact.iter().zip(&brute) {
            assert_eq!(k1, k2);
            assert!(
                (p1 - p2).abs() <= 1e-4 * p2.max(1e-12) + 1e-9,
                "{arch:?} p({k1}) exact {p1} vs brute {p2}"
            );
        }
        // A random model spreads its mass over 256 tokens: the numbers get far below 25 %.
        let s = expected_score(&exact);
        assert!(s.mass < MIN_NUMBER_MASS && s.value.is_none(), "{s:?}");
        // The formula itself, on the same probabilities scaled into range, matches by hand.
        let scaled: Vec<(u32, f64)> = exact.iter().map(|&(k, p)| (k, p / s.mass)).collect();
        let by_hand = brute.iter().map(|&(k, p)| k as f64 * p).sum::<f64>()
            / brute.iter().map(|&(_, p)| p).sum::<f64>();
        let v = expected_score(&scaled).value.unwrap();
        assert!((v - by_hand).abs() < 1e-3, "{v} vs {by_hand}");
    }
}
