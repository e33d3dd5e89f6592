//! What a user sees while emflow works, in the spirit of cargo-nextest: a header, one line
//! per stage as it settles (`CACHED`, `PASS`, `FAIL`, `SKIP`), progress bars for running
//! stages on a terminal, plain lines otherwise, and a `--json` stream of one object per
//! line for tools. The engine's [`Progress`] implementation for stages lives here too, so
//! a stage's phases and messages reach whichever of these the user asked for.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::context::Progress;

/// How to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportMode {
    /// Lines for people; bars when stderr is a terminal.
    Human,
    /// One JSON object per line on stdout.
    Json,
    /// Nothing (library use, tests).
    Quiet,
}

/// Status words, right-aligned like nextest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Word {
    Cached,
    Pass,
    Fail,
    Skip,
    Start,
    Fetch,
    Stop,
    Verify,
    Differ,
    Stale,
    Missing,
    Pending,
    Damaged,
}

impl Word {
    fn text(self) -> &'static str {
        match self {
            Word::Cached => "CACHED",
            Word::Pass => "PASS",
            Word::Fail => "FAIL",
            Word::Skip => "SKIP",
            Word::Start => "START",
            Word::Fetch => "FETCH",
            Word::Stop => "STOPPED",
            Word::Verify => "SAME",
            Word::Differ => "DIFFERS",
            Word::Stale => "STALE",
            Word::Missing => "MISSING",
            Word::Pending => "PENDING",
            Word::Damaged => "DAMAGED",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Word::Cached | Word::Pass | Word::Verify => "32",
            Word::Fail | Word::Differ | Word::Damaged => "31",
            Word::Skip | Word::Stop | Word::Stale | Word::Pending => "33",
            Word::Start | Word::Fetch | Word::Missing => "36",
        }
    }
}

/// The sink for everything a command reports.
pub struct Reporter {
    mode: ReportMode,
    color: bool,
    bars: Option<MultiProgress>,
}

impl Reporter {
    pub fn new(mode: ReportMode) -> Arc<Self> {
        let color = mode == ReportMode::Human
            && std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none();
        let bars = (mode == ReportMode::Human && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)));
        Arc::new(Reporter { mode, color, bars })
    }

    pub fn mode(&self) -> ReportMode {
        self.mode
    }

    pub fn is_json(&self) -> bool {
        self.mode == ReportMode::Json
    }

    /// A line for people (ignored in JSON and quiet modes).
    pub fn line(&self, text: &str) {
        if self.mode == ReportMode::Human {
            self.print(text);
        }
    }

    /// Bold text when colour is on.
    pub fn bold(&self, text: &str) -> String {
        if self.color {
            format!("\x1b[1m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// `    PASS  id  rest`, and `detail` lines indented below it.
    pub fn status(&self, word: Word, id: &str, rest: &str, detail: &str) {
        if self.mode != ReportMode::Human {
            return;
        }
        let padded = format!("{:>8}", word.text());
        let word = if self.color {
            format!("\x1b[1;{}m{padded}\x1b[0m", word.color())
        } else {
            padded
        };
        let mut text = if rest.is_empty() {
            format!("{word}  {id}")
        } else {
            format!("{word}  {id}  {rest}")
        };
        for l in detail.lines() {
            text.push_str("\n          ");
            text.push_str(l);
        }
        self.print(&text);
    }

    /// A JSON event (ignored unless in JSON mode).
    pub fn event(&self, event: &str, mut fields: Value) {
        if self.mode != ReportMode::Json {
            return;
        }
        if let Value::Object(map) = &mut fields {
            map.insert("event".into(), Value::String(event.into()));
            let mut ordered = serde_json::Map::new();
            ordered.insert("event".into(), Value::String(event.into()));
            for (k, v) in map.iter() {
                if k != "event" {
                    ordered.insert(k.clone(), v.clone());
                }
            }
            fields = Value::Object(ordered);
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{fields}");
        let _ = out.flush();
    }

    fn print(&self, text: &str) {
        match &self.bars {
            Some(bars) => bars.suspend(|| println!("{text}")),
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }

    /// The progress sink for a stage that starts now.
    pub fn stage_progress(self: &Arc<Self>, id: &str) -> Arc<StageProgress> {
        let bar = self.bars.as_ref().map(|bars| {
            let bar = bars.add(ProgressBar::new_spinner());
            bar.set_style(spinner_style(self.color));
            bar.set_prefix("RUNNING");
            bar.set_message(id.to_string());
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        if bar.is_none() {
            self.status(Word::Start, id, "", "");
        }
        self.event("start", json!({ "stage": id }));
        Arc::new(StageProgress {
            id: id.to_string(),
            reporter: self.clone(),
            bar,
            state: Mutex::new(PhaseState {
                name: String::new(),
                unit: String::new(),
                pos: 0,
                total: 0,
                last_event: None,
            }),
        })
    }
}

fn spinner_style(color: bool) -> ProgressStyle {
    let template = if color {
        "{prefix:>8.cyan.bold}  {msg} {elapsed:.dim}"
    } else {
        "{prefix:>8}  {msg} {elapsed}"
    };
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style(color: bool, unit: &str) -> ProgressStyle {
    let template = if color {
        format!("{{prefix:>8.cyan.bold}}  {{msg}} [{{bar:25.cyan/blue}}] {{pos}}/{{len}} {unit} {{elapsed:.dim}} (eta {{eta}})")
    } else {
        format!(
            "{{prefix:>8}}  {{msg}} [{{bar:25}}] {{pos}}/{{len}} {unit} {{elapsed}} (eta {{eta}})"
        )
    };
    ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

struct PhaseState {
    name: String,
    unit: String,
    pos: u64,
    total: u64,
    last_event: Option<Instant>,
}

/// A running stage's progress, shown as a bar, as plain log lines, or as JSON events.
pub struct StageProgress {
    id: String,
    reporter: Arc<Reporter>,
    bar: Option<ProgressBar>,
    state: Mutex<PhaseState>,
}

impl StageProgress {
    /// Removes the bar (the stage's final line is printed by the scheduler).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for StageProgress {
    fn phase(&self, name: &str, total: u64, unit: &str) {
        if let Ok(mut s) = self.state.lock() {
            *s = PhaseState {
                name: name.into(),
                unit: unit.into(),
                pos: 0,
                total,
                last_event: None,
            };
        }
        if let Some(bar) = &self.bar {
            bar.set_position(0);
            if total > 0 {
                bar.set_length(total);
                bar.set_style(bar_style(self.reporter.color, unit));
            } else {
                bar.set_style(spinner_style(self.reporter.color));
            }
            bar.set_message(format!("{} {name}", self.id));
        }
        self.reporter.event(
            "phase",
            json!({ "stage": self.id, "phase": name, "total": total, "unit": unit }),
        );
    }

    fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
        if self.reporter.is_json() {
            let due = self.state.lock().ok().and_then(|mut s| {
                s.pos += n;
                let due = s
                    .last_event
                    .is_none_or(|t| t.elapsed() >= Duration::from_millis(500))
                    || s.pos == s.total;
                if due {
                    s.last_event = Some(Instant::now());
                }
                due.then(|| (s.name.clone(), s.pos, s.total, s.unit.clone()))
            });
            if let Some((phase, pos, total, unit)) = due {
                self.reporter.event("progress", json!({ "stage": self.id, "phase": phase, "pos": pos, "total": total, "unit": unit }));
            }
        } else if let Ok(mut s) = self.state.lock() {
            s.pos += n;
        }
    }

    fn message(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            let phase = self
                .state
                .lock()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            bar.set_message(format!("{} {phase} {msg}", self.id));
        }
        self.reporter
            .event("message", json!({ "stage": self.id, "message": msg }));
    }

    fn log(&self, line: &str) {
        self.reporter
            .line(&format!("          {}: {line}", self.id));
        self.reporter
            .event("log", json!({ "stage": self.id, "line": line }));
    }
}

/// `1.2s`, `3m04s`, `1h02m`.
pub fn duration(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        format!("{}m{:02}s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (secs / 3600.0) as u64,
            ((secs % 3600.0) / 60.0) as u64
        )
    }
}
