//! Server-sent events for `stream: true`, and the text deltas they carry.
//!
//! tiny_http's own chunked encoder buffers 8 KiB before it sends anything, so a stream
//! would arrive in one piece at the end; the response is therefore written by hand on the
//! raw connection: a header, then one HTTP chunk per event, flushed as it is written.

use std::io::Write;

use anyhow::Result;
use serde_json::Value;

/// An open event stream on one connection.
pub struct EventStream {
    out: Box<dyn Write + Send>,
}

impl EventStream {
    /// Writes the 200 header of an event stream.
    pub fn open(mut out: Box<dyn Write + Send>) -> Result<Self> {
        out.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
              Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
        )?;
        out.flush()?;
        Ok(EventStream { out })
    }

    /// One `data: {json}` event.
    pub fn send(&mut self, event: &Value) -> Result<()> {
        self.chunk(format!("data: {event}\n\n").as_bytes())
    }

    /// The `data: [DONE]` event and the end of the body.
    pub fn finish(mut self) -> Result<()> {
        self.chunk(b"data: [DONE]\n\n")?;
        self.out.write_all(b"0\r\n\r\n")?;
        self.out.flush()?;
        Ok(())
    }

    fn chunk(&mut self, data: &[u8]) -> Result<()> {
        write!(self.out, "{:x}\r\n", data.len())?;
        self.out.write_all(data)?;
        self.out.write_all(b"\r\n")?;
        self.out.flush()?;
        Ok(())
    }
}

/// Cuts a finished completion into per-token text deltas whose concatenation is exactly
/// the completion's text.
///
/// Token `i`'s delta is the new text once its bytes are added, held back while they end
/// inside a UTF-8 character (a byte-fallback or byte-level piece of an emoji) and cut at
/// the completion's end (the text stops before a stop string, whose tokens were generated).
/// Whatever is held back at the end goes out with the last token.
pub struct Deltas<'a> {
    text: &'a str,
    bytes: Vec<u8>,
    sent: usize,
}

impl<'a> Deltas<'a> {
    pub fn new(text: &'a str) -> Self {
        Deltas {
            text,
            bytes: Vec::new(),
            sent: 0,
        }
    }

    /// The delta after a token with these bytes; `last` flushes the rest of the text.
    pub fn push(&mut self, token_bytes: &[u8], last: bool) -> &'a str {
        self.bytes.extend_from_slice(token_bytes);
        let end = if last {
            self.text.len()
        } else {
            let valid = match std::str::from_utf8(&self.bytes) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            // Only text the completion really has: bytes past a stop string never show.
            let agreed = common_prefix(&self.bytes[..valid], self.text.as_bytes());
            floor_char_boundary(self.text, agreed).max(self.sent)
        };
        let delta = &self.text[self.sent..end];
        self.sent = end;
        delta
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_hold_partial_characters_and_join_to_the_text() {
        let text = "a 😀!";
        let emoji = "😀".as_bytes();
        let mut d = Deltas::new(text);
        let parts = [
            d.push(b"a", false),
            d.push(b" ", false),
            d.push(&emoji[..2], false),
            d.push(&emoji[2..], false),
            d.push(b"!", true),
        ];
        assert_eq!(parts, ["a", " ", "", "😀", "!"]);
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn deltas_stop_where_the_text_stops() {
        // The completion was cut before the stop string "END", whose tokens were generated.
        let mut d = Deltas::new("yes ");
        let parts = [
            d.push(b"yes", false),
            d.push(b" EN", false),
            d.push(b"D", true),
        ];
        assert_eq!(parts, ["yes", " ", ""]);
    }
}
