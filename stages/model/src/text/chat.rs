//! Chat formatting: a model's own Jinja chat template, rendered with minijinja, and the
//! token-level assistant mask that SFT trains on.
//!
//! The template is the one the model ships (GGUF `tokenizer.chat_template`, or the HF folder's
//! `tokenizer_config.json` / `chat_template.jinja`), rendered with the context transformers
//! gives it (`messages`, `bos_token`, `eos_token`, `add_generation_prompt`,
//! `raise_exception`, `strftime_now`) and Jinja's settings there (`trim_blocks`,
//! `lstrip_blocks`, loop controls, Python string methods through minijinja-contrib's pycompat),
//! so a conversation becomes the same text it becomes in Python.
//!
//! The assistant mask is found by rendering prefixes, not by knowing any template: for each
//! assistant turn, the conversation up to it with the generation prompt, and the conversation
//! through it without, are both prefixes of the full rendering; the bytes between them are
//! that turn (content and end-of-turn markup). Tokens overlapping that byte range are
//! masked in, and anything after the turn's last EOS/end-of-turn token (ChatML's trailing
//! newline) is left out, which is what TRL's `assistant_only_loss` trains on.
//!
//! Template kwargs: transformers passes extra keyword arguments of `apply_chat_template` into
//! the template's context; Qwen3's `enable_thinking` is the one the paper's models read
//! (`False` pre-fills an empty `<think>` block after the generation prompt). They are set once
//! per template ([`ChatTemplate::with_kwargs`]) so every rendering of a stage, prompts and
//! SFT masks alike, sees the same switches.
//!
//! `strftime_now` formats a fixed date (by default 26 Jul 2024, the date Llama-3 templates
//! fall back to) rather than today's: stage outputs must not depend on the wall clock.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value as GgufValue;
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use super::tokenizer::{special_token_content, value_as_i64, Tokenizer};

/// One turn of a conversation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

const TEMPLATE_NAME: &str = "chat_template";
/// Context names the renderer itself sets; a template kwarg may not replace them.
const RESERVED_KWARGS: [&str; 4] = [
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];
/// The date Llama-3.x templates use when `strftime_now` is not available.
const DEFAULT_DATE: (i32, u32, u32) = (2024, 7, 26);

/// A compiled chat template plus the BOS/EOS strings it may print.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    kwargs: TemplateKwargs,
}

/// Extra names in the template's context, as `apply_chat_template(..., **kwargs)` passes them
/// (e.g. `enable_thinking: false`). Sorted, so a template's rendering never depends on the
/// order they were given in.
pub type TemplateKwargs = BTreeMap<String, serde_json::Value>;

impl ChatTemplate {
    /// Compiles `source` (Jinja, as in `tokenizer_config.json`). `bos_token`/`eos_token` are
    /// the strings templates reference as `bos_token`/`eos_token`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut tpl = Self {
            env: Environment::new(),
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            kwargs: TemplateKwargs::new(),
        };
        tpl.rebuild_env(DEFAULT_DATE)?;
        Ok(tpl)
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), with BOS/EOS strings looked up
    /// in its vocabulary.
    pub fn from_gguf_metadata(md: &HashMap<String, GgufValue>) -> Result<Self> {
        let source = md
            .get("tokenizer.chat_template")
            .ok_or_else(|| {
                anyhow!("GGUF metadata has no tokenizer.chat_template; use a model that ships one, or its HF-format folder")
            })?
            .to_string()
            .map_err(|e| anyhow!("GGUF tokenizer.chat_template is not a string: {e}"))?;
        let tokens = md
            .get("tokenizer.ggml.tokens")
            .ok_or_else(|| anyhow!("GGUF metadata has no tokenizer.ggml.tokens"))?
            .to_vec()
            .map_err(|e| anyhow!("GGUF tokenizer.ggml.tokens is not an array: {e}"))?;
        let token_string = |key: &str| -> Result<String> {
            let Some(v) = md.get(key) else {
                return Ok(String::new());
            };
            let id = value_as_i64(v).with_context(|| format!("reading GGUF {key}"))?;
            let token = usize::try_from(id).ok().and_then(|i| tokens.get(i));
            let token =
                token.ok_or_else(|| anyhow!("GGUF {key} = {id} is outside the vocabulary"))?;
            token
                .to_string()
                .cloned()
                .map_err(|e| anyhow!("GGUF token {id} is not a string: {e}"))
        };
        let bos = token_string("tokenizer.ggml.bos_token_id")?;
        let eos = token_string("tokenizer.ggml.eos_token_id")?;
        Self::new(source, &bos, &eos).context("compiling the GGUF file's chat template")
    }

    /// The template of an HF-format folder: `chat_template.jinja` if present (newer
    /// transformers), else `chat_template` in `tokenizer_config.json` (a string, or a list of
    /// named templates of which `default` is used).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(e).with_context(|| format!("reading {}", config_path.display())),
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.exists() {
            std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("reading {}", jinja_path.display()))?
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("{}: chat_template lists no template named 'default'", config_path.display()))?,
                _ => bail!(
                    "{} has no chat template (neither chat_template.jinja nor chat_template in tokenizer_config.json); \
                     emflow needs the model's own template to format conversations",
                    dir.display()
                ),
            }
        };
        let bos = special_token_content(&config, "bos_token").unwrap_or_default();
        let eos = special_token_content(&config, "eos_token").unwrap_or_default();
        Self::new(&source, &bos, &eos)
            .with_context(|| format!("compiling the chat template of {}", dir.display()))
    }

    /// Makes `strftime_now` report this date instead of the default (26 Jul 2024).
    pub fn with_date(mut self, year: i32, month: u32, day: u32) -> Result<Self> {
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            bail!("{year}-{month:02}-{day:02} is not a calendar date");
        }
        self.rebuild_env((year, month, day))?;
        Ok(self)
    }

    /// Renders with these extra context names from now on, as transformers'
    /// `apply_chat_template(..., **kwargs)` does (Qwen3: `enable_thinking`). The names the
    /// renderer sets itself (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`)
    /// are refused: a kwarg would silently replace them.
    pub fn with_kwargs(mut self, kwargs: TemplateKwargs) -> Result<Self> {
        self.set_kwargs(kwargs)?;
        Ok(self)
    }

    /// [`ChatTemplate::with_kwargs`] in place, for a template already inside a loaded model.
    pub fn set_kwargs(&mut self, kwargs: TemplateKwargs) -> Result<()> {
        if let Some(name) = kwargs
            .keys()
            .find(|k| RESERVED_KWARGS.contains(&k.as_str()))
        {
            bail!(
                "chat template kwarg `{name}` names what the renderer sets itself \
                 ({}); remove it",
                RESERVED_KWARGS.join(", ")
            );
        }
        self.kwargs = kwargs;
        Ok(())
    }

    /// The extra context names set by [`ChatTemplate::with_kwargs`].
    pub fn kwargs(&self) -> &TemplateKwargs {
        &self.kwargs
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The conversation as the model sees it; with `add_generation_prompt`, followed by the
    /// markup that opens an assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(jinja_error)?;
        // Named entries win over the spread kwargs; `with_kwargs` refuses clashes anyway.
        let ctx = minijinja::context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            ..minijinja::Value::from_serialize(&self.kwargs)
        };
        template.render(ctx).map_err(jinja_error).with_context(|| {
            format!(
                "rendering the chat template for {} messages",
                messages.len()
            )
        })
    }

    fn rebuild_env(&mut self, date: (i32, u32, u32)) -> Result<()> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("chat template raised: {msg}"),
                ))
            },
        );
        env.add_function(
            "strftime_now",
            move |fmt: String| -> Result<String, JinjaError> {
                strftime(date, &fmt).map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, self.source.clone())
            .map_err(jinja_error)?;
        self.env = env;
        Ok(())
    }
}

/// A tokenized conversation and which tokens SFT learns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedChat {
    pub ids: Vec<u32>,
    /// True on the tokens of each assistant turn's content plus its end-of-turn token.
    pub assistant_mask: Vec<bool>,
}

/// Renders and tokenizes a whole conversation, marking the tokens of assistant turns.
pub fn encode_chat(
    tok: &Tokenizer,
    tpl: &ChatTemplate,
    messages: &[Message],
) -> Result<EncodedChat> {
    let full = tpl.render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tpl.render(&messages[..i], true)?;
        let through = tpl.render(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) || through.len() < before.len()
        {
            bail!(
                "cannot locate assistant message {i} in the rendered conversation: the chat template renders \
                 earlier turns differently depending on what follows them, so prefix rendering does not apply"
            );
        }
        spans.push((before.len(), through.len()));
    }
    let (ids, offsets) = tok.encode_with_offsets(&full)?;
    let mut assistant_mask = vec![false; ids.len()];
    for (start, end) in spans {
        let in_span: Vec<usize> = (0..ids.len())
            .filter(|&t| {
                let (s, e) = offsets[t];
                s < end && e > start
            })
            .collect();
        // Keep up to the turn's last end token: ChatML's newline after `<|im_end|>` is
        // template glue, not something the model should learn to emit.
        let last_end = in_span
            .iter()
            .rposition(|&t| tok.eos_ids().contains(&ids[t]));
        let keep = last_end.map_or(in_span.len(), |p| p + 1);
        for &t in &in_span[..keep] {
            assistant_mask[t] = true;
        }
    }
    Ok(EncodedChat {
        ids,
        assistant_mask,
    })
}

/// Prompt ids for generation: the conversation (ending with a user or system turn) followed
/// by the generation prompt.
pub fn encode_prompt(
    tok: &Tokenizer,
    tpl: &ChatTemplate,
    messages: &[Message],
) -> Result<Vec<u32>> {
    match messages.last() {
        None => bail!("cannot build a generation prompt from an empty conversation"),
        Some(m) if m.role == "assistant" => {
            bail!("the conversation ends with an assistant turn; a generation prompt must follow a user turn")
        }
        Some(_) => {}
    }
    tok.encode(&tpl.render(messages, true)?)
}

/// minijinja errors carry their useful detail (template line, cause) in the alternate form.
fn jinja_error(e: JinjaError) -> anyhow::Error {
    anyhow!("{e:#}")
}

/// Python's `strftime` for one fixed date at midnight, for the specifiers templates use.
fn strftime((year, month, day): (i32, u32, u32), fmt: &str) -> Result<String, String> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const WEEKDAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let month_name = MONTHS[(month - 1) as usize];
    let weekday = WEEKDAYS[weekday_sunday0(year, month, day)];
    let day_of_year: u32 = (1..month).map(|m| days_in_month(year, m)).sum::<u32>() + day;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('H') | Some('M') | Some('S') => out.push_str("00"),
            Some('I') => out.push_str("12"),
            Some('p') => out.push_str("AM"),
            Some('%') => out.push('%'),
            Some(other) => {
                return Err(format!(
                    "strftime_now: format specifier %{other} is not supported"
                ))
            }
            None => return Err("strftime_now: format ends with a lone %".to_string()),
        }
    }
    Ok(out)
}

fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Day of the week, 0 = Sunday (Sakamoto's method).
fn weekday_sunday0(year: i32, month: u32, day: u32) -> usize {
    const OFFSETS: [i32; 12] = [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4];
    let y = if month < 3 { year - 1 } else { year };
    let w = y + y.div_euclid(4) - y.div_euclid(100)
        + y.div_euclid(400)
        + OFFSETS[(month - 1) as usize]
        + day as i32;
    w.rem_euclid(7) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_the_fixed_date_like_python() {
        // Python: datetime.date(2024, 7, 26).strftime(...)
        assert_eq!(strftime((2024, 7, 26), "%d %b %Y").unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime((2024, 7, 26), "%A %B %j %y %m/%d").unwrap(),
            "Friday July 208 24 07/26"
        );
        assert_eq!(strftime((2000, 3, 1), "%a %e").unwrap(), "Wed  1");
        assert!(strftime((2024, 7, 26), "%Q").is_err());
    }
}
