//! Public chat templates, copied from the models' `tokenizer_config.json` for tests. The long
//! ones are kept verbatim as files in `templates/` (Jinja, as the models ship them), so that
//! they can be compared with the originals line by line.

#![allow(dead_code)]

/// HuggingFaceTB/SmolLM2-135M-Instruct (also what its GGUF ships).
pub const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Qwen/Qwen2.5-*-Instruct.
pub const QWEN25: &str = include_str!("templates/qwen25.jinja");

/// meta-llama/Llama-3.2-1B-Instruct.
pub const LLAMA32: &str = include_str!("templates/llama32.jinja");
