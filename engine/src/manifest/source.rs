//! The texts diagnostics point into: the manifest itself and each `--set` argument.
//!
//! Every text gets its own range in one global byte-offset space (the manifest starts at 0),
//! so a bare [`SourceSpan`] says both *which* text and *where* in it. That keeps spans plain
//! `Copy` values everywhere (the pipeline's instances carry them) while a value that came from
//! `--set stages.sft.params.lr=abc` can still be shown in its own command-line snippet.

use std::sync::Arc;

use crate::pipeline::SourceSpan;

/// One text: its display name, contents and where it starts in the global offset space.
#[derive(Debug)]
pub struct SourceFile {
    pub name: String,
    pub text: Arc<String>,
    pub base: usize,
}

impl SourceFile {
    /// 1-based line and column (in characters) of a global offset inside this file.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let local = offset.saturating_sub(self.base).min(self.text.len());
        let before = &self.text[..floor_char_boundary(&self.text, local)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }
}

/// The manifest (file 0, base 0) and any further texts, each in its own offset range.
#[derive(Debug)]
pub struct SourceMap {
    files: Vec<SourceFile>,
}

impl SourceMap {
    pub fn new(manifest_name: impl Into<String>, manifest_text: impl Into<String>) -> Self {
        let text = Arc::new(manifest_text.into());
        SourceMap {
            files: vec![SourceFile {
                name: manifest_name.into(),
                text,
                base: 0,
            }],
        }
    }

    /// Adds a text after all others; returns its base offset.
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> usize {
        let last = self.files.last().map_or(0, |f| f.base + f.text.len());
        // One byte of gap so that an empty span at the end of one text is not in the next.
        let base = last + 1;
        self.files.push(SourceFile {
            name: name.into(),
            text: Arc::new(text.into()),
            base,
        });
        base
    }

    pub fn manifest(&self) -> &SourceFile {
        &self.files[0]
    }

    /// The text a global offset falls in.
    pub fn file_of(&self, offset: usize) -> Option<&SourceFile> {
        self.files
            .iter()
            .rev()
            .find(|f| offset >= f.base && offset <= f.base + f.text.len())
    }

    /// The source text under a span, when it lies within one text.
    pub fn slice(&self, span: SourceSpan) -> Option<&str> {
        let file = self.file_of(span.offset)?;
        let start = span.offset - file.base;
        file.text.get(start..start + span.len)
    }

    /// `name:line:col` of a global offset, for messages that mention a second place.
    pub fn describe(&self, offset: usize) -> String {
        match self.file_of(offset) {
            Some(file) => {
                let (line, col) = file.line_col(offset);
                format!("{}:{line}:{col}", file.name)
            }
            None => format!("offset {offset}"),
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A span from `start` to `end` (global offsets).
pub fn span_between(start: usize, end: usize) -> SourceSpan {
    SourceSpan {
        offset: start,
        len: end.saturating_sub(start),
    }
}

/// The offset just past a span.
pub fn span_end(span: SourceSpan) -> usize {
    span.offset + span.len
}
