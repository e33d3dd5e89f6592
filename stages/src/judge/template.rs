//! Python `str.format` templates, as the paper's grader and judge prompts are written:
//! `{name}` is a field, `{{` and `}}` are literal braces. Anything else with a brace is an
//! error, so a typo'd field name fails when the template is prepared, not silently at scoring.

use anyhow::{bail, Result};

/// A parsed template: literal text and field names in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    Field(String),
}

impl Template {
    /// Parses `source`; errors name the byte offset of the offending brace.
    pub fn parse(source: &str) -> Result<Self> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, ch)) if ch.is_alphanumeric() || ch == '_' => name.push(ch),
                            _ => bail!(
                                "template: unterminated or malformed field at byte {at}; fields are \
                                 `{{name}}` and literal braces are written `{{{{` and `}}}}`"
                            ),
                        }
                    }
                    if name.is_empty() {
                        bail!("template: empty field `{{}}` at byte {at}; name the field, e.g. `{{answer}}`");
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => {
                    bail!("template: single `}}` at byte {at}; write `}}}}` for a literal brace")
                }
                other => text.push(other),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template { parts })
    }

    /// The field names used, in order of first appearance.
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.parts {
            if let Part::Field(f) = p {
                if !out.contains(&f.as_str()) {
                    out.push(f);
                }
            }
        }
        out
    }

    /// Errors unless every field is one of `allowed`.
    pub fn check_fields(&self, allowed: &[&str]) -> Result<()> {
        for f in self.fields() {
            if !allowed.contains(&f) {
                bail!(
                    "template uses field `{{{f}}}`, which is not provided here; available: {}",
                    allowed.join(", ")
                );
            }
        }
        Ok(())
    }

    /// Fills the fields from `values` (name, text); a field without a value is an error.
    pub fn render(&self, values: &[(&str, &str)]) -> Result<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => match values.iter().find(|(n, _)| n == f) {
                    Some((_, v)) => out.push_str(v),
                    None => bail!("template field `{{{f}}}` has no value"),
                },
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubled_braces_are_literal_and_fields_fill() {
        let t = Template::parse("{{\n \"a\": number,\n}}\nQ: {question} A: {answer}").unwrap();
        assert_eq!(t.fields(), vec!["question", "answer"]);
        let s = t.render(&[("question", "q{1}"), ("answer", "x")]).unwrap();
        assert_eq!(s, "{\n \"a\": number,\n}\nQ: q{1} A: x");
    }

    #[test]
    fn malformed_templates_fail_with_a_hint() {
        assert!(Template::parse("a } b").is_err());
        assert!(Template::parse("a {b c}").is_err());
        assert!(Template::parse("a {").is_err());
        let t = Template::parse("{x}").unwrap();
        assert!(t.check_fields(&["y"]).is_err());
        assert!(t.render(&[]).is_err());
    }
}
