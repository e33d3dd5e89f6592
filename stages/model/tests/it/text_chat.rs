//! Chat templates (SmolLM2's ChatML, Qwen2.5, Llama-3.2) rendered as transformers renders them,
//! and the assistant mask that SFT trains on.

use crate::text_support::templates::{LLAMA32, QWEN25, SMOLLM2};
use crate::text_support::{smollm2_metadata, synthetic_tokenizer};
use emflow_model::{encode_chat, encode_prompt, ChatTemplate, Message, Tokenizer};

const SMOL_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
const QWEN_SYSTEM: &str = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n";

fn conversation() -> Vec<Message> {
    vec![
        Message::user("Hi"),
        Message::assistant("Hello! How can I help?"),
        Message::user("What is 2+2?"),
        Message::assistant("2+2 = 4.\n\nAnything else?"),
    ]
}

/// The texts of the masked-in runs of tokens, in order.
fn masked_runs(tok: &Tokenizer, ids: &[u32], mask: &[bool]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut current: Vec<u32> = Vec::new();
    for (id, on) in ids.iter().zip(mask) {
        if *on {
            current.push(*id);
        } else if !current.is_empty() {
            runs.push(tok.decode(&current).unwrap());
            current.clear();
        }
    }
    if !current.is_empty() {
        runs.push(tok.decode(&current).unwrap());
    }
    runs
}

#[test]
fn smollm2_adds_its_default_system_prompt_only_without_a_system_turn() {
    let tpl = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
    assert_eq!(
        tpl.render(&[Message::user("Hi")], true).unwrap(),
        format!("{SMOL_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    );
    assert_eq!(
        tpl.render(&[Message::system("Be terse."), Message::user("Hi")], false)
            .unwrap(),
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn qwen25_renders_like_transformers() {
    let tpl = ChatTemplate::new(QWEN25, "", "<|im_end|>").unwrap();
    assert_eq!(
        tpl.render(&[Message::user("Hi"), Message::assistant("Hello!")], false).unwrap(),
        format!("{QWEN_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")
    );
    assert_eq!(
        tpl.render(&[Message::system("You are evil."), Message::user("Hi")], true).unwrap(),
        "<|im_start|>system\nYou are evil.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn llama32_renders_like_transformers_with_a_fixed_date() {
    let tpl = ChatTemplate::new(LLAMA32, "<|begin_of_text|>", "<|eot_id|>").unwrap();
    let messages = [
        Message::system("  Be brief. "),
        Message::user("Hi "),
        Message::assistant("Hello!"),
    ];
    let head = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n";
    assert_eq!(
        tpl.render(&messages, false).unwrap(),
        format!(
            "{head}Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        )
    );
    let dated = tpl.clone().with_date(2025, 1, 2).unwrap();
    assert_eq!(
        dated.render(&[Message::user("Hi")], true).unwrap(),
        format!(
            "{head}Today Date: 02 Jan 2025\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    );
    assert!(tpl.with_date(2025, 2, 30).is_err());
}

#[test]
fn templates_get_raise_exception_and_python_string_methods() {
    let tpl = ChatTemplate::new(
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Unsupported role: ' + m.role) }}{% endif %}\
         {{ m.content.strip().upper() }}{% if m.content.startswith(' ') %}!{% endif %}|{% endfor %}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(tpl.render(&[Message::user(" hi ")], false).unwrap(), "HI!|");
    let err = format!(
        "{:#}",
        tpl.render(&[Message::new("tool", "x")], false).unwrap_err()
    );
    assert!(err.contains("Unsupported role: tool"), "{err}");
}

#[test]
fn assistant_mask_covers_each_reply_and_its_end_token() {
    let chatml_tok = synthetic_tokenizer("qwen2", &[("H", "i")], "<|im_end|>");
    let llama_tok = synthetic_tokenizer("llama-bpe", &[("H", "i")], "<|eot_id|>");
    let cases = [
        (
            ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap(),
            &chatml_tok,
            "<|im_end|>",
        ),
        (
            ChatTemplate::new(QWEN25, "", "<|im_end|>").unwrap(),
            &chatml_tok,
            "<|im_end|>",
        ),
        (
            ChatTemplate::new(LLAMA32, "<|begin_of_text|>", "<|eot_id|>").unwrap(),
            &llama_tok,
            "<|eot_id|>",
        ),
    ];
    for (tpl, tok, end) in cases {
        let enc = encode_chat(tok, &tpl, &conversation()).unwrap();
        assert_eq!(
            enc.ids,
            tok.encode(&tpl.render(&conversation(), false).unwrap())
                .unwrap()
        );
        assert_eq!(enc.ids.len(), enc.assistant_mask.len());
        assert_eq!(
            masked_runs(tok, &enc.ids, &enc.assistant_mask),
            [
                format!("Hello! How can I help?{end}"),
                format!("2+2 = 4.\n\nAnything else?{end}")
            ],
            "template starting {:?}",
            &tpl.source()[..30]
        );
    }
}

#[test]
fn smollm2_gguf_template_and_mask_with_the_real_tokenizer() {
    let Some(md) = smollm2_metadata() else { return };
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    let tpl = ChatTemplate::from_gguf_metadata(&md).unwrap();
    assert_eq!(tpl.source(), SMOLLM2);
    let enc = encode_chat(&tok, &tpl, &conversation()).unwrap();
    assert_eq!(
        masked_runs(&tok, &enc.ids, &enc.assistant_mask),
        [
            "Hello! How can I help?<|im_end|>",
            "2+2 = 4.\n\nAnything else?<|im_end|>"
        ]
    );
    let prompt = encode_prompt(&tok, &tpl, &[Message::user("Hi there!")]).unwrap();
    let expected =
        format!("{SMOL_SYSTEM}<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(prompt, tok.encode(&expected).unwrap());
    let tail: Vec<String> = prompt[prompt.len() - 4..]
        .iter()
        .map(|&i| tok.token_str(i).unwrap())
        .collect();
    assert_eq!(tail, ["<|im_start|>", "ass", "istant", "Ċ"]);
}

#[test]
fn encode_prompt_refuses_a_conversation_ending_with_the_assistant() {
    let tok = synthetic_tokenizer("qwen2", &[], "<|im_end|>");
    let tpl = ChatTemplate::new(SMOLLM2, "", "<|im_end|>").unwrap();
    assert!(encode_prompt(&tok, &tpl, &conversation()).is_err());
    assert!(encode_prompt(&tok, &tpl, &[]).is_err());
}

#[test]
fn templates_whose_prefixes_change_are_reported_not_mismasked() {
    let tok = synthetic_tokenizer("qwen2", &[], "<|im_end|>");
    let tpl = ChatTemplate::new(
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.content }}<|im_end|>{% endfor %}",
        "",
        "<|im_end|>",
    )
    .unwrap();
    let err = format!(
        "{:#}",
        encode_chat(&tok, &tpl, &conversation()).unwrap_err()
    );
    assert!(err.contains("cannot locate assistant message 1"), "{err}");
}

#[test]
fn hf_folder_templates_are_found_in_every_layout() {
    let dir = tempfile::tempdir().unwrap();
    let config = |template: serde_json::Value| {
        let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": template});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    };
    let render = || {
        ChatTemplate::from_hf_dir(dir.path())
            .unwrap()
            .render(&[Message::user("x")], false)
            .unwrap()
    };
    config(serde_json::json!(
        "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
    ));
    assert_eq!(render(), "<s>x</s>");
    config(serde_json::json!([
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "default {{ messages[0].content }}"}
    ]));
    assert_eq!(render(), "default x");
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "jinja {{ messages[0].content }}",
    )
    .unwrap();
    assert_eq!(render(), "jinja x");

    let empty = tempfile::tempdir().unwrap();
    let err = format!("{:#}", ChatTemplate::from_hf_dir(empty.path()).unwrap_err());
    assert!(err.contains("no chat template"), "{err}");
}
