//! `stream: true`: one writer thread per streamed request, sending server-sent events as the
//! worker's decode loop samples each token.
//!
//! The worker posts [`Event`]s down an unbounded channel and never waits on a socket; the
//! writer turns them into OpenAI's chunks: a role chunk per choice (chat), one chunk per
//! generated token carrying its text delta, a finish chunk per choice with its
//! `finish_reason` as that choice ends, then the usage chunk when asked for, and
//! `data: [DONE]`. A client that goes away ends only its writer (one log line); its rows
//! finish generating and their tokens are dropped.
//!
//! The text deltas ([`TextDeltas`]) join to exactly the text a non-streamed answer has: a
//! token's text is the difference of two decodes of a short window of tokens (so decoders
//! that drop a leading space, or join words with one, come out as in the whole text), held
//! back while it ends inside a UTF-8 character, and held back where the text's tail could
//! still grow into a stop string: a stop string never reaches the client, even in part.
//!
//! tiny_http's own chunked encoder buffers 8 KiB before it sends anything, so a stream
//! would arrive in one piece at the end; the response is therefore written by hand on the
//! raw connection: a header, then one HTTP chunk per event, flushed as it is written.

use std::io::Write;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use anyhow::{bail, Result};
use emflow_model::{Generation, Tokenizer};
use serde_json::Value;

use super::api::{ApiError, Ask};
use super::reply::{usage, Reply};
use super::worker::Job;
use super::Shared;

/// What the worker tells a streamed request's writer, in the order it happens.
pub enum Event {
    /// Choice `choice` was given the token `id` by the decode step that just ran.
    Token { choice: usize, id: u32 },
    /// Choice `choice` has ended; `logprobs` holds one entry per token when asked for.
    Done {
        choice: usize,
        generation: Generation,
        logprobs: Option<Vec<Value>>,
    },
    /// Generation failed: the request ends with this message.
    Failed(String),
}

/// Starts the writer thread of a streamed request and returns where to post its events.
pub fn start(shared: Arc<Shared>, job: Job) -> Sender<Event> {
    let (events, inbox) = channel();
    let spawned = std::thread::Builder::new()
        .name("emflow-serve-stream".into())
        .spawn(move || write_stream(&shared, job, &inbox));
    if let Err(e) = spawned {
        // The job (and its connection) went down with the closure: the client sees the
        // connection close, and the events posted for it are dropped.
        eprintln!("emflow serve: cannot start a thread to stream an answer: {e}");
    }
    events
}

/// The writer thread: relays `inbox` to the client, then logs the request's one line.
fn write_stream(shared: &Shared, job: Job, inbox: &Receiver<Event>) {
    let (method, url) = (job.req.method().to_string(), job.req.url().to_string());
    let (started, prompt_tokens) = (job.started, job.prompt.len());
    let mut writer = Writer::new(shared, job);
    match writer.relay(inbox) {
        Ok(None) => {
            let tokens = Some((prompt_tokens, writer.completion_tokens));
            super::log_line(&method, &url, 200, tokens, started);
        }
        Ok(Some(failure)) => match writer.req.take() {
            Some(req) => shared.fail(req, started, &ApiError::status(500, failure)),
            None => eprintln!("emflow serve: {method} {url}: the stream ended early: {failure}"),
        },
        Err(e) => eprintln!(
            "emflow serve: {method} {url}: streaming stopped after {} chunks: {e:#}; the rest of the answer is dropped",
            writer.chunks
        ),
    }
}

/// One streamed request's state on its writer thread.
struct Writer<'a> {
    reply: Reply<'a>,
    ask: Ask,
    /// The connection, until the stream's header is written.
    req: Option<tiny_http::Request>,
    out: Option<EventStream>,
    texts: Vec<TextDeltas<'a>>,
    open_choices: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    chunks: usize,
}

impl<'a> Writer<'a> {
    fn new(shared: &'a Shared, job: Job) -> Self {
        let texts = (0..job.ask.n)
            .map(|_| TextDeltas::new(&shared.lm.tokenizer, job.ask.sampling.stop.clone()))
            .collect();
        Writer {
            reply: Reply::new(shared, job.endpoint),
            open_choices: job.ask.n,
            prompt_tokens: job.prompt.len(),
            ask: job.ask,
            req: Some(job.req),
            out: None,
            texts,
            completion_tokens: 0,
            chunks: 0,
        }
    }

    /// Relays events until every choice has ended (`Ok(None)`) or generation failed
    /// (`Ok(Some(message))`); an error is a write the client did not take.
    fn relay(&mut self, inbox: &Receiver<Event>) -> Result<Option<String>> {
        for event in inbox.iter() {
            match event {
                Event::Token { choice, id } => self.token(choice, id)?,
                Event::Done {
                    choice,
                    generation,
                    logprobs,
                } => {
                    self.done(choice, &generation, logprobs)?;
                    if self.open_choices == 0 {
                        self.end()?;
                        return Ok(None);
                    }
                }
                Event::Failed(message) => return self.fail(message),
            }
        }
        self.fail("generation stopped before every choice ended".into())
    }

    /// Writes the header and the role chunks the first time anything is sent.
    fn open(&mut self) -> Result<&mut EventStream> {
        if let Some(req) = self.req.take() {
            let mut out = EventStream::open(req.into_writer())?;
            for index in 0..self.texts.len() {
                if let Some(chunk) = self.reply.role_chunk(index) {
                    out.send(&chunk)?;
                    self.chunks += 1;
                }
            }
            self.out = Some(out);
        }
        match self.out.as_mut() {
            Some(out) => Ok(out),
            None => bail!("the stream's connection is gone"),
        }
    }

    fn send(&mut self, chunk: &Value) -> Result<()> {
        self.open()?.send(chunk)?;
        self.chunks += 1;
        Ok(())
    }

    /// A token's chunk, at once; with log-probabilities asked for, the choice's chunks wait
    /// for its entries, which are read from the model once the choice has ended.
    fn token(&mut self, choice: usize, id: u32) -> Result<()> {
        if self.ask.logprobs.is_some() {
            return Ok(());
        }
        let text = self.texts[choice].push(id)?;
        let chunk = self.reply.token_chunk(choice, &text, None);
        self.send(&chunk)
    }

    fn done(&mut self, choice: usize, g: &Generation, logprobs: Option<Vec<Value>>) -> Result<()> {
        if let Some(entries) = logprobs {
            for (&id, entry) in g.tokens.iter().zip(entries) {
                let text = self.texts[choice].push(id)?;
                let chunk = self.reply.token_chunk(choice, &text, Some(entry));
                self.send(&chunk)?;
            }
        }
        let rest = self.texts[choice].finish(&g.text);
        let chunk = self.reply.finish_chunk(choice, &rest, g.finish);
        self.send(&chunk)?;
        self.completion_tokens += g.tokens.len();
        self.open_choices -= 1;
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        if self.ask.stream_usage {
            let chunk = self
                .reply
                .usage_chunk(usage(self.prompt_tokens, self.completion_tokens));
            self.send(&chunk)?;
        }
        self.open()?;
        match self.out.take() {
            Some(out) => out.finish(),
            None => Ok(()),
        }
    }

    /// Before the header: the failure is the response (a 500). After: an error event in
    /// OpenAI's shape (its client raises it), then `[DONE]`.
    fn fail(&mut self, message: String) -> Result<Option<String>> {
        if let Some(out) = self.out.take() {
            out.fail(&ApiError::status(500, message.clone()).body())?;
        }
        Ok(Some(message))
    }
}

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

    /// An error event, then the end as [`EventStream::finish`].
    fn fail(mut self, error: &Value) -> Result<()> {
        self.send(error)?;
        self.finish()
    }

    fn chunk(&mut self, data: &[u8]) -> Result<()> {
        write!(self.out, "{:x}\r\n", data.len())?;
        self.out.write_all(data)?;
        self.out.write_all(b"\r\n")?;
        self.out.flush()?;
        Ok(())
    }
}

/// Turns one choice's tokens, as they come, into text deltas that join to exactly the text
/// of its finished generation.
///
/// A token's text is `decode(window + token) - decode(window)` over a window that starts at
/// the token before the last emitted one (the way vLLM and TGI detokenise incrementally), so
/// a decoder that treats a sequence's first token apart (SentencePiece dropping its leading
/// space) or joins tokens with spaces gives the same text as decoding everything. While the
/// decode ends in U+FFFD (a character whose bytes are not all generated yet) the window grows
/// instead. The decoded text is then sent up to the first stop string, less any tail that is
/// the beginning of a stop string: the generator ends the row when a stop string completes,
/// and the finished text is cut before it, so what was sent is always a prefix of the final
/// text and [`TextDeltas::finish`] sends the rest.
pub struct TextDeltas<'a> {
    tok: &'a Tokenizer,
    stop: Vec<String>,
    tokens: Vec<u32>,
    /// `tokens[window..read]` were decoded last time, as the context of the next token.
    window: usize,
    read: usize,
    /// Everything decoded so far, and how much of it has been sent.
    text: String,
    sent: usize,
}

impl<'a> TextDeltas<'a> {
    pub fn new(tok: &'a Tokenizer, stop: Vec<String>) -> Self {
        TextDeltas {
            tok,
            stop,
            tokens: Vec::new(),
            window: 0,
            read: 0,
            text: String::new(),
            sent: 0,
        }
    }

    /// The text that can be sent once the token `id` is added (often empty while held back).
    pub fn push(&mut self, id: u32) -> Result<String> {
        // An EOS token ends the row and is never part of its text.
        if self.tok.eos_ids().contains(&id) {
            return Ok(String::new());
        }
        self.tokens.push(id);
        let before = self.tok.decode(&self.tokens[self.window..self.read])?;
        let now = self.tok.decode(&self.tokens[self.window..])?;
        if let Some(new) = now.get(before.len()..) {
            if !new.is_empty() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
                self.text.push_str(new);
                self.window = self.read;
                self.read = self.tokens.len();
            }
        }
        let end = sendable_end(&self.text, self.sent, &self.stop).max(self.sent);
        let delta = self.text[self.sent..end].to_string();
        self.sent = end;
        Ok(delta)
    }

    /// What the finished text `text` has beyond what was sent (the tail held back for a stop
    /// string that never came, or a partial character at the very end).
    pub fn finish(&mut self, text: &str) -> String {
        let rest = match text.get(self.sent..) {
            Some(rest) if text.starts_with(&self.text[..self.sent]) => rest.to_string(),
            // Not reached with the `tokenizers` decoders: decoding more tokens never changes
            // the text of the earlier ones.
            _ => String::new(),
        };
        self.sent = self.text.len().max(text.len());
        rest
    }
}

/// How much of `text` may be sent, given that `text[..sent]` already was: up to the first
/// whole stop string, and short of the earliest tail that a stop string begins with.
fn sendable_end(text: &str, sent: usize, stop: &[String]) -> usize {
    let longest = stop.iter().map(String::len).max().unwrap_or(0);
    // A stop string found now lies after what was sent (its beginning was held back).
    let from = floor_char_boundary(text, sent.saturating_sub(longest));
    let mut end = stop
        .iter()
        .filter_map(|s| text[from..].find(s.as_str()).map(|at| from + at))
        .min()
        .unwrap_or(text.len());
    let tail_from = floor_char_boundary(text, end.saturating_sub(longest));
    let held = (tail_from..end)
        .filter(|&p| text.is_char_boundary(p))
        .find(|&p| stop.iter().any(|s| s.starts_with(&text[p..end])));
    if let Some(p) = held {
        end = p;
    }
    end
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
    use serde_json::json;
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpStream;

    use crate::serve::worker::test_gate;
    use crate::serve::Server;

    /// Sends `body` to `path` on a raw connection; returns it after the response header.
    fn post(server: &Server, path: &str, body: &Value) -> BufReader<TcpStream> {
        let mut conn = TcpStream::connect(server.addr()).unwrap();
        // A server that held its chunks back would leave the test waiting while the decode
        // loop is held: fail instead.
        conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let body = body.to_string();
        write!(
            conn,
            "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut r = BufReader::new(conn);
        let mut line = String::new();
        while line != "\r\n" {
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "the connection closed in the header");
        }
        r
    }

    /// The next event of an open stream (one HTTP chunk each), without its `data: ` framing.
    fn next_event(r: &mut BufReader<TcpStream>) -> String {
        let mut size = String::new();
        r.read_line(&mut size).unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        let mut data = vec![0u8; size + 2];
        r.read_exact(&mut data).unwrap();
        let event = String::from_utf8(data).unwrap();
        event
            .strip_prefix("data: ")
            .and_then(|e| e.strip_suffix("\n\n\r\n"))
            .unwrap_or_else(|| panic!("not an event: {event:?}"))
            .to_string()
    }

    /// Opens the gate however the test ends, so the server's worker can stop.
    struct Opened(Arc<test_gate::Gate>);

    impl Drop for Opened {
        fn drop(&mut self) {
            self.0.open();
        }
    }

    /// The first token's chunk reaches the client while the decode loop is held before its
    /// second token: chunks are sent as tokens are sampled, not once the answer is done.
    #[test]
    fn the_first_chunk_arrives_while_generation_is_held() {
        let dir = tempfile::tempdir().unwrap();
        emflow_model::testing::tiny_model_dir(dir.path(), 11).unwrap();
        let lm = emflow_model::load(dir.path(), &emflow_model::DeviceSetup::cpu()).unwrap();
        let server = Server::start(lm, "gated-stream", "127.0.0.1:0").unwrap();
        let gate = Opened(test_gate::install("gated-stream", 1));
        let body = json!({ "model": "gated-stream", "messages": [{"role": "user", "content": "t5 t6"}],
                           "max_tokens": 24, "temperature": 1.0, "seed": 5, "stream": true });
        let mut stream = post(&server, "/v1/chat/completions", &body);
        let role: Value = serde_json::from_str(&next_event(&mut stream)).unwrap();
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        let first: Value = serde_json::from_str(&next_event(&mut stream)).unwrap();
        let first = first["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!first.is_empty(), "the first token's text was held back");
        // The decode loop is held at (or before) the call of the second token.
        gate.0.wait_for(2);
        assert_eq!(gate.0.seen(), 2);
        gate.0.open();
        let mut text = first;
        let mut chunks = 1;
        loop {
            let event = next_event(&mut stream);
            let v: Value = serde_json::from_str(&event).unwrap();
            let choice = &v["choices"][0];
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if !choice["finish_reason"].is_null() {
                break;
            }
            chunks += 1;
        }
        assert_eq!(next_event(&mut stream), "[DONE]");
        assert!(
            chunks > 2,
            "test premise: a longer answer, got {chunks} tokens"
        );
        let mut whole = body.clone();
        whole["stream"] = json!(false);
        let mut answer = post(&server, "/v1/chat/completions", &whole);
        let mut raw = String::new();
        answer.read_to_string(&mut raw).unwrap();
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
        assert_eq!(v["usage"]["completion_tokens"], chunks);
    }

    #[test]
    fn stop_string_beginnings_are_held_back() {
        let stop = ["END".to_string(), "\n\n".to_string()];
        assert_eq!(sendable_end("yes ", 0, &stop), 4);
        assert_eq!(sendable_end("yes E", 0, &stop), 4);
        assert_eq!(sendable_end("yes EN", 4, &stop), 4);
        assert_eq!(sendable_end("yes ENDING", 4, &stop), 4);
        assert_eq!(sendable_end("yes ENs", 4, &stop), 7);
        assert_eq!(sendable_end("a\n", 0, &stop), 1);
        assert_eq!(sendable_end("a\nb", 1, &stop), 3);
        assert_eq!(sendable_end("😀 E", 0, &stop), "😀 ".len());
        assert_eq!(sendable_end("anything", 0, &[]), 8);
    }
}
