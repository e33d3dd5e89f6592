//! Manifest problems as miette diagnostics: message, labelled spans, and a hint.
//!
//! The front end collects *every* problem it finds (a user fixing a manifest wants the whole
//! list, not one error per run) as plain [`Problem`] values with global spans (see
//! [`crate::manifest::source`]). [`ManifestErrors`] turns them into miette diagnostics at the
//! end, choosing for each problem the text its first label points into, so a problem in a
//! `--set` value is shown in that argument and everything else in the manifest.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource};

use crate::manifest::source::SourceMap;
use crate::pipeline::SourceSpan;

/// A labelled place in a source text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub span: SourceSpan,
    pub text: String,
}

/// One manifest mistake. The first label is the primary location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub message: String,
    pub labels: Vec<Label>,
    pub help: Option<String>,
}

impl Problem {
    pub fn new(message: impl Into<String>) -> Self {
        Problem {
            message: message.into(),
            labels: Vec::new(),
            help: None,
        }
    }

    /// Adds a label; the first one added is where the problem is reported.
    pub fn at(mut self, span: SourceSpan, text: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            text: text.into(),
        });
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// The help for `word`, a name that is none of `known` (a typo'd port, stage, axis or
    /// param): "did you mean `x`?" for a close one, else `otherwise` (usually a list of
    /// `known`, see [`list_names`]). Every "no such name" problem says it this one way.
    pub fn suggest<'a>(
        self,
        word: &str,
        known: impl IntoIterator<Item = &'a str>,
        otherwise: impl FnOnce() -> String,
    ) -> Self {
        self.help(did_you_mean(word, known).unwrap_or_else(otherwise))
    }

    /// Sets the help only when there is one to give.
    pub fn maybe_help(mut self, help: Option<String>) -> Self {
        if help.is_some() {
            self.help = help;
        }
        self
    }

    /// The primary location, if any.
    pub fn span(&self) -> Option<SourceSpan> {
        self.labels.first().map(|l| l.span)
    }
}

/// The closest candidate to `word`, when one is close enough to be a plausible typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        // Jaro-Winkler alone misses one-letter slips in short names (`cj` for `ci`).
        .filter(|(score, c)| {
            *score >= 0.8 || (word.len() >= 2 && strsim::damerau_levenshtein(word, c) == 1)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// `did you mean `x`?` for the closest candidate, else `None`.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    closest(word, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// A comma-separated list of names in backticks, for hints.
pub fn list_names<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.into_iter().map(|n| format!("`{n}`")).collect();
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}

/// One problem made ready for miette: its text and labels relative to the text they are in.
struct Rendered {
    message: String,
    help: Option<String>,
    source: Option<NamedSource<Arc<String>>>,
    labels: Vec<LabeledSpan>,
}

impl Rendered {
    fn new(problem: Problem, sources: &SourceMap) -> Self {
        let file = problem.span().and_then(|s| sources.file_of(s.offset));
        let mut labels = Vec::new();
        let mut elsewhere = Vec::new();
        for (i, label) in problem.labels.iter().enumerate() {
            match file {
                Some(f) if sources.file_of(label.span.offset).map(|g| g.base) == Some(f.base) => {
                    let local = miette::SourceSpan::new(
                        (label.span.offset - f.base).into(),
                        label.span.len,
                    );
                    let text = (!label.text.is_empty()).then(|| label.text.clone());
                    // The first label is primary: miette's header shows its line and column.
                    labels.push(if i == 0 {
                        LabeledSpan::new_primary_with_span(text, local)
                    } else {
                        LabeledSpan::new_with_span(text, local)
                    });
                }
                _ => elsewhere.push(format!(
                    "{}: {}",
                    sources.describe(label.span.offset),
                    label.text
                )),
            }
        }
        let mut help = problem.help;
        if !elsewhere.is_empty() {
            let note = format!("see also {}", elsewhere.join("; "));
            help = Some(match help {
                Some(h) => format!("{h}\n{note}"),
                None => note,
            });
        }
        Rendered {
            message: problem.message,
            help,
            source: file.map(|f| NamedSource::new(&f.name, f.text.clone())),
            labels,
        }
    }
}

impl fmt::Debug for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Display for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rendered {}

impl Diagnostic for Rendered {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.source.as_ref().map(|s| s as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        (!self.labels.is_empty())
            .then(|| Box::new(self.labels.iter().cloned()) as Box<dyn Iterator<Item = LabeledSpan>>)
    }
}

/// Every problem found while loading a manifest. Shown by miette as a headline followed by
/// each problem with its file, line, column, snippet and hint.
pub struct ManifestErrors {
    path: PathBuf,
    problems: Vec<Problem>,
    sources: Arc<SourceMap>,
    rendered: Vec<Rendered>,
}

impl ManifestErrors {
    /// Problems are kept in the order found, without exact duplicates (a mistake in a matrix
    /// stage is found once per cell but reported once).
    pub fn new(path: &Path, problems: Vec<Problem>, sources: Arc<SourceMap>) -> Self {
        let mut unique: Vec<Problem> = Vec::with_capacity(problems.len());
        let mut seen = std::collections::HashSet::new();
        for p in problems {
            if seen.insert((p.message.clone(), p.span().map(|s| (s.offset, s.len)))) {
                unique.push(p);
            }
        }
        let rendered = unique
            .iter()
            .cloned()
            .map(|p| Rendered::new(p, &sources))
            .collect();
        ManifestErrors {
            path: path.to_path_buf(),
            problems: unique,
            sources,
            rendered,
        }
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    pub fn sources(&self) -> &SourceMap {
        &self.sources
    }

    /// `file:line:col` of a problem's primary location, for tests and plain-text output.
    pub fn location(&self, problem: &Problem) -> Option<String> {
        problem.span().map(|s| self.sources.describe(s.offset))
    }

    /// Renders everything as miette would on a terminal without colour.
    pub fn render_plain(&self) -> String {
        let mut out = String::new();
        let handler =
            miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
                .with_width(120);
        if handler.render_report(&mut out, self).is_err() {
            return self.to_string();
        }
        out
    }
}

impl fmt::Debug for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{self}")?;
        for p in &self.problems {
            let at = self.location(p).unwrap_or_default();
            writeln!(f, "  {at}: {}", p.message)?;
        }
        Ok(())
    }
}

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        let noun = if n == 1 { "problem" } else { "problems" };
        write!(f, "manifest {} has {n} {noun}", self.path.display())
    }
}

impl std::error::Error for ManifestErrors {}

impl Diagnostic for ManifestErrors {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(
            "fix the problems below; each shows where it is and what to do",
        ))
    }
    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        Some(Box::new(self.rendered.iter().map(|r| r as &dyn Diagnostic)))
    }
}

/// A single located diagnostic outside a load (a cycle found by the DAG, a run-time error
/// traced back to a param): rendered against the given sources.
pub fn report_at(
    sources: Option<&SourceMap>,
    span: SourceSpan,
    message: impl Into<String>,
    label: impl Into<String>,
    help: Option<String>,
) -> miette::Report {
    let problem = Problem {
        message: message.into(),
        labels: vec![Label {
            span,
            text: label.into(),
        }],
        help,
    };
    match sources {
        Some(s) => miette::Report::new(Rendered::new(problem, s)),
        None => miette::Report::new(Rendered {
            message: problem.message,
            help: problem.help,
            source: None,
            labels: Vec::new(),
        }),
    }
}
