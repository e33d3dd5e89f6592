//! Generation and scoring on random-weight models: the cached, left-padded decode path agrees
//! with a plain forward pass; seeded samples do not depend on batch size or thread count; stop
//! strings and lengths end rows; scores match log-softmaxed logits.

use std::process::Command;

use crate::common::*;
use candle_core::{IndexOp, Tensor};
use emflow_model::{
    derive_seed, Arch, Finish, Generation, GenerationObserver, GenerationRequest, ModelConfig,
    SamplingParams, Transformer, MIN_SHARED_PREFIX,
};

fn prompts(n: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..(3 + (i * 5) % 11))
                .map(|j| ((i * 31 + j * 7 + 3) as u32) % (vocab - 3) + 3)
                .collect()
        })
        .collect()
}

fn requests(prompts: &[Vec<u32>]) -> Vec<GenerationRequest> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerationRequest {
            prompt_ids: p.clone(),
            seed: derive_seed(42, &format!("prompt-{i}"), 0),
        })
        .collect()
}

fn sampling(max_new_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        top_k: 0,
        min_p: 0.0,
        max_new_tokens,
        stop: vec![],
    }
}

#[test]
fn greedy_cached_decode_matches_full_forward_argmax() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer(dir.path(), 256);
    for arch in [Arch::Llama, Arch::Qwen2] {
        let model = tiny(arch, 11);
        let ps = prompts(5, 256);
        let gens = model
            .generate(
                &tok,
                &requests(&ps),
                &SamplingParams::greedy(12),
                5,
                &|_| {},
            )
            .unwrap();
        for (p, g) in ps.iter().zip(&gens) {
            let mut seq = p.clone();
            seq.extend(&g.tokens);
            let logits = model
                .forward_eval(&ids(&[seq.clone()]), &ones(1, seq.len()))
                .unwrap();
            for (k, &t) in g.tokens.iter().enumerate() {
                let pos = p.len() + k - 1;
                let want = logits
                    .i((0, pos))
                    .unwrap()
                    .argmax(0)
                    .unwrap()
                    .to_scalar::<u32>()
                    .unwrap();
                assert_eq!(t, want, "{arch:?}: token {k} of prompt {p:?}");
            }
            assert!(g.finish == Finish::Eos || g.tokens.len() == 12);
        }
    }
}

#[test]
fn same_seeds_give_same_samples_at_batch_1_and_8() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer(dir.path(), 256);
    let model = tiny(Arch::Qwen2, 12);
    let reqs = requests(&prompts(8, 256));
    let params = sampling(16);
    let one = model.generate(&tok, &reqs, &params, 1, &|_| {}).unwrap();
    let eight = model.generate(&tok, &reqs, &params, 8, &|_| {}).unwrap();
    assert_eq!(one, eight);
    // The seed matters: another stage seed gives other samples.
    let other: Vec<GenerationRequest> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| GenerationRequest {
            prompt_ids: r.prompt_ids.clone(),
            seed: derive_seed(43, &format!("prompt-{i}"), 0),
        })
        .collect();
    assert_ne!(
        one,
        model.generate(&tok, &other, &params, 8, &|_| {}).unwrap()
    );
}

/// What an observer was told, in order.
#[derive(Debug, PartialEq)]
enum Seen {
    Token(usize, u32),
    Finished(usize, Generation),
}

#[derive(Default)]
struct Recorder(std::cell::RefCell<Vec<Seen>>);

impl GenerationObserver for Recorder {
    fn token(&self, request: usize, token: u32) {
        self.0.borrow_mut().push(Seen::Token(request, token));
    }
    fn finished(&self, request: usize, generation: &Generation) {
        self.0
            .borrow_mut()
            .push(Seen::Finished(request, generation.clone()));
    }
}

/// An observer hears each token as its decode step samples it (every row's k-th token
/// before any row's k+1-th: step by step, not replayed at the end), then each row's end
/// right after its last token; and observing changes no sample.
#[test]
fn an_observer_hears_tokens_step_by_step_and_changes_nothing() {
    let (model, reqs) = (tiny(Arch::Llama, 12), requests(&prompts(4, 256)));
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer(dir.path(), 256);
    let mut params = sampling(14);
    // A stop string that ends the longest row early: the text of its middle token.
    let plain = model.generate(&tok, &reqs, &params, 4, &|_| {}).unwrap();
    let longest = plain
        .iter()
        .map(|g| &g.tokens)
        .max_by_key(|t| t.len())
        .unwrap();
    let middle = longest.len() / 2;
    params.stop = vec![tok.decode(&longest[middle..=middle]).unwrap()];
    let plain = model.generate(&tok, &reqs, &params, 4, &|_| {}).unwrap();
    let recorder = Recorder::default();
    let observed = model
        .generate_observed(&tok, &reqs, &params, 4, &recorder)
        .unwrap();
    assert_eq!(observed, plain, "observing must not change generation");
    let seen = recorder.0.into_inner();
    let lengths: Vec<usize> = plain.iter().map(|g| g.tokens.len()).collect();
    assert!(
        lengths.iter().min() < lengths.iter().max(),
        "test premise: rows of different lengths, got {lengths:?}"
    );
    let mut heard: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
    let mut step = 0;
    for event in &seen {
        match event {
            Seen::Token(r, t) => {
                heard[*r].push(*t);
                assert!(heard[*r].len() >= step, "a row fell behind: {seen:?}");
                step = step.max(heard[*r].len());
            }
            Seen::Finished(r, g) => {
                assert_eq!(g, &plain[*r]);
                assert_eq!(heard[*r], g.tokens, "finished before its last token");
                assert_eq!(heard[*r].len(), step, "finished later than its last step");
            }
        }
    }
    let tokens: Vec<Vec<u32>> = plain.iter().map(|g| g.tokens.clone()).collect();
    assert_eq!(heard, tokens);
    assert_eq!(
        seen.iter()
            .filter(|e| matches!(e, Seen::Finished(..)))
            .count(),
        reqs.len()
    );
}

#[test]
fn a_group_of_one_prompt_prefills_once_and_changes_no_sample() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer(dir.path(), 256);
    let model = tiny(Arch::Llama, 14);
    // Three prompts, four generations each (as a GRPO step asks), interleaved.
    let ps = prompts(3, 256);
    let reqs: Vec<GenerationRequest> = (0..12)
        .map(|k| GenerationRequest {
            prompt_ids: ps[k % 3].clone(),
            seed: derive_seed(7, &format!("prompt-{}", k % 3), (k / 3) as u64),
        })
        .collect();
    let params = sampling(12);
    let grouped = model.generate(&tok, &reqs, &params, 12, &|_| {}).unwrap();
    let alone = model.generate(&tok, &reqs, &params, 1, &|_| {}).unwrap();
    assert_eq!(grouped, alone);
    // Each generation's own seed drew it: a group's members differ.
    assert_ne!(grouped[0].tokens, grouped[3].tokens);
}

#[test]
fn a_shared_prompt_prefix_runs_once_and_changes_no_sample() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer(dir.path(), 256);
    // A template of 40 tokens, then items of different lengths (as a grader's prompts are).
    let template: Vec<u32> = (0..40).map(|j| (j * 13 + 5) % 250 + 3).collect();
    let with_template: Vec<Vec<u32>> = prompts(6, 256)
        .into_iter()
        .map(|item| template.iter().copied().chain(item).collect())
        .collect();
    assert!(MIN_SHARED_PREFIX <= template.len());
    for arch in [Arch::Llama, Arch::Qwen2] {
        let model = tiny(arch, 21);
        let reqs = requests(&with_template);
        for params in [SamplingParams::greedy(10), sampling(10)] {
            let plain = model.generate(&tok, &reqs, &params, 4, &|_| {}).unwrap();
            for batch in [1, 4] {
                let shared = model
                    .generate_sharing_prefix(&tok, &reqs, &params, batch, &|_| {})
                    .unwrap();
                assert_eq!(plain, shared, "{arch:?}, batch {batch}");
            }
        }
        // A whole prompt that is the prefix of another still keeps a token of its own.
        let nested = requests(&[template.clone(), [template.clone(), vec![9, 8]].concat()]);
        let greedy = SamplingParams::greedy(6);
        assert_eq!(
            model.generate(&tok, &nested, &greedy, 2, &|_| {}).unwrap(),
            model
                .generate_sharing_prefix(&tok, &nested, &greedy, 2, &|_| {})
                .unwrap()
        );
    }
}

/// A model large enough for candle's matmuls to split across threads.
fn threaded_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 2048,
        hidden_size: 256,
        intermediate_size: 768,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 32,
        ..ModelConfig::tiny(Arch::Llama)
    }
}

/// Run in a child process by the test below, with RAYON_NUM_THREADS set.
#[test]
#[ignore = "child process of same_samples_with_one_or_two_threads"]
fn sampling_child() {
    let Some(out) = std::env::var_os("EMFLOW_SAMPLING_CHILD_OUT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer(dir.path(), 2048);
    let model = Transformer::random(&threaded_config(), &cpu(), 13).unwrap();
    let gens = model
        .generate(
            &tok,
            &requests(&prompts(4, 2048)),
            &sampling(12),
            4,
            &|_| {},
        )
        .unwrap();
    std::fs::write(out, serde_json::to_string(&gens).unwrap()).unwrap();
}

#[test]
fn same_samples_with_one_or_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.path().join(format!("threads-{threads}.json"));
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "generation::sampling_child",
                "--exact",
                "--ignored",
                "--quiet",
            ])
            .env("RAYON_NUM_THREADS", threads)
            .env("EMFLOW_SAMPLING_CHILD_OUT", &out)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        outputs.push(std::fs::read_to_string(&out).unwrap());
    }
    assert_eq!(outputs[0], outputs[1]);
}

#[test]
fn stop_strings_and_lengths_end_rows() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer(dir.path(), 256);
    let model = tiny(Arch::Llama, 14);
    let mut greedy = SamplingParams::greedy(10);
    let reqs = requests(&prompts(1, 256));
    let free = model
        .generate(&tok, &reqs, &greedy, 1, &|_| {})
        .unwrap()
        .remove(0);
    if free.tokens.len() < 4 || free.finish != Finish::Length {
        panic!("test premise: the greedy run should run to length, got {free:?}");
    }
    // Stop on the text of the third generated token.
    let stop = tok.decode(&free.tokens[2..3]).unwrap();
    greedy.stop = vec![stop.clone()];
    let stopped = model
        .generate(&tok, &reqs, &greedy, 1, &|_| {})
        .unwrap()
        .remove(0);
    assert_eq!(stopped.finish, Finish::Stop);
    let until = (1..=free.tokens.len())
        .find(|&k| tok.decode(&free.tokens[..k]).unwrap().contains(&stop))
        .unwrap();
    assert_eq!(stopped.tokens, free.tokens[..until].to_vec());
    assert!(!stopped.text.contains(&stop));
    let none = model
        .generate(&tok, &reqs, &SamplingParams::greedy(0), 1, &|_| {})
        .unwrap();
    assert!(none[0].tokens.is_empty() && none[0].finish == Finish::Length);
}

fn log_softmax(row: &Tensor) -> Vec<f32> {
    candle_nn::ops::log_softmax(row, 0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn scores_match_log_softmax_of_the_logits() {
    let model = tiny(Arch::Qwen2, 15);
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = vec![
        (vec![5, 6, 7], vec![8, 9]),
        (vec![10], vec![11, 12, 13, 14]),
        (vec![20, 21], vec![]),
    ];
    let scores = model.score(&pairs, 2).unwrap();
    for ((prompt, completion), got) in pairs.iter().zip(&scores) {
        assert_eq!(got.len(), completion.len());
        let mut seq = prompt.clone();
        seq.extend(completion);
        let logits = model
            .forward_eval(&ids(&[seq.clone()]), &ones(1, seq.len()))
            .unwrap();
        for (k, &t) in completion.iter().enumerate() {
            let want = log_softmax(&logits.i((0, prompt.len() + k - 1)).unwrap())[t as usize];
            assert!((got[k] - want).abs() < 1e-4, "{got:?} vs {want}");
        }
    }
    let prompt = vec![3, 4, 5, 6];
    let candidates = vec![vec![7], vec![8, 9, 10], vec![], vec![11, 12]];
    let totals = model.score_candidates(&prompt, &candidates).unwrap();
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = candidates
        .iter()
        .map(|c| (prompt.clone(), c.clone()))
        .collect();
    for (total, per_token) in totals.iter().zip(model.score(&pairs, 4).unwrap()) {
        let want: f64 = per_token.iter().map(|&x| x as f64).sum();
        assert!((total - want).abs() < 1e-4, "{total} vs {want}");
    }
}
