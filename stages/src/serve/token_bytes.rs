//! The raw bytes behind one token, for `logprobs` entries and streamed text.
//!
//! `Tokenizer::decode(&[id])` turns a token that holds part of a UTF-8 character (a
//! byte-level BPE piece of an emoji, a SentencePiece `<0xE2>` byte-fallback token) into
//! U+FFFD, losing the bytes that OpenAI's `bytes` field exists to carry. The `tokenizers`
//! crate has no public "bytes of a token" call (its byte-level decoder applies
//! `from_utf8_lossy` before returning), so this module inverts the two encodings itself:
//! GPT-2's byte-to-character table for byte-level vocabularies, and `<0xNN>` plus `▁` for
//! SentencePiece ones. Anything else (added tokens, other decoders) is its text's UTF-8.

use emflow_model::Tokenizer;

/// How a vocabulary spells bytes, read once from the tokenizer's decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spelling {
    /// GPT-2 style: every byte is one printable character (`Ġ` is a space).
    ByteLevel,
    /// SentencePiece style: `▁` is a space, `<0xNN>` is the byte NN.
    Metaspace,
    /// Token text is the text.
    Plain,
}

impl Spelling {
    pub fn of(tok: &Tokenizer) -> Spelling {
        let decoder = tok
            .inner()
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .unwrap_or_default();
        if decoder.contains("\"ByteLevel\"") {
            Spelling::ByteLevel
        } else if decoder.contains("\"ByteFallback\"") || decoder.contains("\"Metaspace\"") {
            Spelling::Metaspace
        } else {
            Spelling::Plain
        }
    }
}

/// The bytes token `id` stands for; empty for an id outside the vocabulary.
pub fn token_bytes(tok: &Tokenizer, spelling: Spelling, id: u32) -> Vec<u8> {
    let Some(piece) = tok.token_str(id) else {
        return Vec::new();
    };
    if tok.inner().get_added_vocabulary().is_special_token(&piece) {
        return piece.into_bytes();
    }
    match spelling {
        Spelling::ByteLevel => piece.chars().flat_map(byte_level_char).collect(),
        Spelling::Metaspace => match fallback_byte(&piece) {
            Some(b) => vec![b],
            None => piece.replace('\u{2581}', " ").into_bytes(),
        },
        Spelling::Plain => piece.into_bytes(),
    }
}

/// `<0xNN>` -> NN.
fn fallback_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// GPT-2's table maps the 188 printable Latin-1 bytes to themselves and the other 68 bytes,
/// in order, to U+0100 onwards. A character outside the table (an added token's text) is
/// its own UTF-8.
fn byte_level_char(c: char) -> Vec<u8> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let code = c as u32;
    if code < 0x100 && printable(code) {
        return vec![code as u8];
    }
    if (0x100..0x100 + 68).contains(&code) {
        let nth = (code - 0x100) as usize;
        if let Some(b) = (0u32..256).filter(|&b| !printable(b)).nth(nth) {
            return vec![b as u8];
        }
    }
    c.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_inverts_gpt2() {
        assert_eq!(byte_level_char('A'), b"A");
        assert_eq!(byte_level_char('\u{120}'), b" "); // Ġ
        assert_eq!(byte_level_char('\u{100}'), [0u8]);
        assert_eq!(byte_level_char('\u{10A}'), b"\n"); // Ċ
        assert_eq!(byte_level_char('\u{143}'), [0xADu8]); // the last of the 68
        assert_eq!(byte_level_char('é'), [0xE9u8]);
    }

    /// The bytes of SmolLM2's tokens for text with accents, an emoji and CJK (characters
    /// split over several byte-level tokens) join to exactly the text's bytes.
    #[test]
    fn real_vocabulary_tokens_spell_the_text() {
        let Some(gguf) = emflow_model::testing::smollm2_gguf() else {
            return;
        };
        let lm = emflow_model::load(&gguf, &emflow_model::DeviceSetup::cpu()).unwrap();
        let tok = &lm.tokenizer;
        assert_eq!(Spelling::of(tok), Spelling::ByteLevel);
        let text = "héllo 😀 日本語 ß\n\tend";
        let ids = tok.encode(text).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| token_bytes(tok, Spelling::ByteLevel, id))
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
        assert!(
            ids.iter().any(
                |&id| std::str::from_utf8(&token_bytes(tok, Spelling::ByteLevel, id)).is_err()
            ),
            "the text should have a token holding part of a character"
        );
        // Special tokens are their text.
        let end = tok.token_id("<|im_end|>").unwrap();
        assert_eq!(token_bytes(tok, Spelling::ByteLevel, end), b"<|im_end|>");
    }

    #[test]
    fn fallback_bytes_parse() {
        assert_eq!(fallback_byte("<0xE2>"), Some(0xE2));
        assert_eq!(fallback_byte("<0xE>"), None);
        assert_eq!(fallback_byte("<0xZZ>"), None);
        assert_eq!(fallback_byte("hello"), None);
    }
}
