//! The judge-free margin on a tiny random-weight model: every pair's log-probabilities equal a
//! hand computation from the model's full logits (log-softmax of the position before each
//! answer token, averaged over the answer's turn tokens), the sign follows which answer the
//! model prefers, swapping the answers negates it, and `contrast_pairs`, uncovered questions
//! and the system prompt are honoured.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use emflow_model::{Arch, ChatTemplate, LoadedModel, ModelConfig, Tokenizer, Transformer};
use emflow_stages::evaluation::margin::{score_pairs, MarginAsk};
use emflow_stages::formats::contrast;
use emflow_stages::formats::questions::Question;

/// Words of the tiny vocabulary: `t0`..`t252`, then the chat template's role words.
const ROLES: [&str; 3] = ["user", "assistant", "system"];
const VOCAB: u32 = 256;

fn word_id(w: &str) -> u32 {
    match ROLES.iter().position(|r| *r == w) {
        Some(i) => VOCAB - 3 + i as u32,
        None => w[1..].parse().unwrap(),
    }
}

/// A word-level tokenizer and a chat template (`ROLE content t2` per turn, `t2` the end of
/// turn), written as an HF folder by hand and loaded through the normal path.
fn tiny_text(dir: &Path) -> (Tokenizer, ChatTemplate) {
    let mut vocab = serde_json::Map::new();
    for i in 0..VOCAB - 3 {
        vocab.insert(format!("t{i}"), i.into());
    }
    for r in ROLES {
        vocab.insert(r.into(), word_id(r).into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t1"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let template = "{% for m in messages %}{{ m.role }} {{ m.content }} t2 {% endfor %}{% if add_generation_prompt %}assistant {% endif %}";
    let config =
        serde_json::json!({"eos_token": "t2", "pad_token": "t0", "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    (
        Tokenizer::from_hf_dir(dir).unwrap(),
        ChatTemplate::from_hf_dir(dir).unwrap(),
    )
}

fn tiny_model(dir: &Path) -> LoadedModel {
    let (tokenizer, chat) = tiny_text(dir);
    let config = ModelConfig::tiny(Arch::Llama);
    let model = Transformer::random(&config, &emflow_model::setup(None).unwrap(), 21).unwrap();
    LoadedModel {
        config,
        tokenizer,
        chat,
        model,
        source_digest: "tiny".into(),
    }
}

fn ids(text: &str) -> Vec<u32> {
    text.split_whitespace().map(word_id).collect()
}

/// Full logits of `ids`, one row per position.
fn logits(model: &Transformer, ids: &[u32]) -> Vec<Vec<f32>> {
    let n = ids.len();
    let t = Tensor::from_vec(ids.to_vec(), (1, n), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, n), DType::F32, &Device::Cpu).unwrap();
    let l = model.forward_eval(&t, &mask).unwrap();
    l.squeeze(0).unwrap().to_vec2::<f32>().unwrap()
}

/// log p(target | row) by hand: the row's log-softmax in f64.
fn log_softmax_at(row: &[f32], target: u32) -> f64 {
    let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row[target as usize] as f64 - lse
}

/// The measure by hand: mean log-probability of `answer`'s turn tokens (its words and the
/// end-of-turn `t2`) after `prompt`, from the full logits of the whole sequence.
fn hand_lp(model: &Transformer, prompt: &str, answer: &str) -> f64 {
    let (p, a) = (ids(prompt), ids(&format!("{answer} t2")));
    let all: Vec<u32> = p.iter().chain(&a).copied().collect();
    let rows = logits(model, &all);
    let sum: f64 = a
        .iter()
        .enumerate()
        .map(|(j, &t)| log_softmax_at(&rows[p.len() - 1 + j], t))
        .sum();
    sum / a.len() as f64
}

/// The `k` most (or least) likely next words after `prompt`, chosen greedily.
fn greedy(model: &Transformer, prompt: &str, k: usize, most: bool) -> String {
    let mut seq = ids(prompt);
    let mut words = Vec::new();
    for _ in 0..k {
        let rows = logits(model, &seq);
        let last = rows.last().unwrap();
        // Only t3..t252: no end-of-turn, pad, unknown or role word inside an answer.
        let pick = (3..VOCAB - 3)
            .max_by(|&a, &b| {
                let o = last[a as usize].total_cmp(&last[b as usize]);
                if most {
                    o
                } else {
                    o.reverse()
                }
            })
            .unwrap();
        seq.push(pick);
        words.push(format!("t{pick}"));
    }
    words.join(" ")
}

fn question(id: &str, system: Option<&str>, paraphrases: &[&str]) -> Question {
    serde_json::from_value(serde_json::json!({
        "id": id, "system": system, "paraphrases": paraphrases,
        "judge_prompts": {"aligned": "{answer}", "coherent": "{answer}"}
    }))
    .unwrap()
}

const ASK: MarginAsk = MarginAsk {
    pairs_per_question: None,
    use_system: true,
    batch_size: 3,
};

#[test]
fn pair_log_probs_equal_a_hand_computation_and_the_sign_follows_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = tiny_model(tmp.path());
    let prompt = "user t40 t41 t2 assistant";
    let likely = greedy(&lm.model, prompt, 5, true);
    let unlikely = greedy(&lm.model, prompt, 5, false);
    let yaml = format!(
        "- ids: [q]\n  aligned: ['{unlikely}', t7 t8 t9, t10]\n  misaligned: ['{likely}', t11 t12, t13 t14 t15 t16]\n"
    );
    let set = contrast::parse(&yaml, "contrast.yaml").unwrap();
    let q = question("q", None, &["t40 t41"]);
    let (pairs, uncovered) = score_pairs(&lm, std::slice::from_ref(&q), &set, ASK).unwrap();
    assert!(uncovered.is_empty());
    assert_eq!(pairs.len(), 3);
    let entry = set.for_question("q").unwrap();
    for (i, p) in pairs.iter().enumerate() {
        let a = hand_lp(&lm.model, prompt, &entry.aligned[i]);
        let m = hand_lp(&lm.model, prompt, &entry.misaligned[i]);
        assert_eq!((p.question_id.as_str(), p.pair), ("q", i));
        assert!(
            (p.aligned - a).abs() < 1e-4,
            "pair {i}: aligned {} vs hand {a}",
            p.aligned
        );
        assert!(
            (p.misaligned - m).abs() < 1e-4,
            "pair {i}: misaligned {} vs hand {m}",
            p.misaligned
        );
        assert!((p.margin - (m - a)).abs() < 2e-4, "pair {i}");
    }
    // Pair 0: the model's greedy answer against its least likely one.
    assert!(pairs[0].margin > 0.0, "{:?}", pairs[0]);

    // Swapping the answers negates every margin.
    let swapped = format!(
        "- ids: [q]\n  aligned: ['{likely}', t11 t12, t13 t14 t15 t16]\n  misaligned: ['{unlikely}', t7 t8 t9, t10]\n"
    );
    let set = contrast::parse(&swapped, "swapped.yaml").unwrap();
    let (back, _) = score_pairs(&lm, &[q], &set, ASK).unwrap();
    for (p, b) in pairs.iter().zip(&back) {
        assert!((p.margin + b.margin).abs() < 1e-5, "{p:?} {b:?}");
    }
}

#[test]
fn pairs_per_question_system_prompt_paraphrases_and_uncovered_questions() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = tiny_model(tmp.path());
    let set = contrast::parse(
        "- ids: [a, a_other_name]\n  aligned: [t5, t6, t7]\n  misaligned: [t8, t9, t10]\n",
        "c.yaml",
    )
    .unwrap();
    let qs = [
        question("a", Some("t30"), &["t50", "t51"]),
        question("b", None, &["t60"]),
    ];
    let ask = MarginAsk {
        pairs_per_question: Some(2),
        ..ASK
    };
    let (pairs, uncovered) = score_pairs(&lm, &qs, &set, ask).unwrap();
    assert_eq!(uncovered, ["b"]);
    assert_eq!(pairs.len(), 2);
    // Pair 1 asks paraphrase 1 under the system prompt.
    let prompt = "system t30 t2 user t51 t2 assistant";
    let want = hand_lp(&lm.model, prompt, "t9") - hand_lp(&lm.model, prompt, "t6");
    assert!(
        (pairs[1].margin - want).abs() < 2e-4,
        "{} vs {want}",
        pairs[1].margin
    );
    // Without the system prompt the same pair is asked differently.
    let ask = MarginAsk {
        use_system: false,
        ..ask
    };
    let (plain, _) = score_pairs(&lm, &qs, &set, ask).unwrap();
    let prompt = "user t51 t2 assistant";
    let want = hand_lp(&lm.model, prompt, "t9") - hand_lp(&lm.model, prompt, "t6");
    assert!((plain[1].margin - want).abs() < 2e-4);
}

/// The shipped contrast set answers the 8 general questions of both question files (the
/// paper's first plot and the quickstart's), with at least 10 pairs each.
#[test]
fn shipped_contrast_set_covers_both_general_question_files() {
    let root = emflow_model::testing::workspace_root();
    let path = root.join("manifests/data/contrast/general.yaml");
    let set = contrast::read(&path, "general.yaml").unwrap();
    assert_eq!(set.entries.len(), 8);
    for e in &set.entries {
        assert!(e.aligned.len() >= 10, "{:?}", e.ids);
    }
    let quickstart = emflow_stages::formats::questions::read(
        &root.join("manifests/data/evaluation/general.yaml"),
        "general.yaml",
    )
    .unwrap();
    let mut files = vec![("quickstart", quickstart)];
    if let Some(data) = emflow_model::testing::paper_data() {
        let paper = emflow_stages::formats::questions::read(
            &data.join("evaluation/first_plot_questions.yaml"),
            "first_plot_questions.yaml",
        )
        .unwrap();
        files.push(("paper", paper));
    }
    for (name, questions) in files {
        let plain: Vec<&Question> = questions
            .iter()
            .filter(|q| !q.id.ends_with("_json") && !q.id.ends_with("_template"))
            .collect();
        assert_eq!(plain.len(), 8, "{name}");
        for q in plain {
            assert!(
                set.for_question(&q.id).is_some(),
                "{name}: `{}` has no contrast answers",
                q.id
            );
        }
    }
}
