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
            state: Mutex::new(PhaseState::new("", "", 0)),
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
        format!("{{prefix:>8.cyan.bold}}  {{msg}} [{{bar:25.cyan/blue}}] {{pos}}/{{len}} {unit} {{elapsed:.dim}} (eta {{remaining}})")
    } else {
        format!(
            "{{prefix:>8}}  {{msg}} [{{bar:25}}] {{pos}}/{{len}} {unit} {{elapsed}} (eta {{remaining}})"
        )
    };
    ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "remaining",
            |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
                let left = remaining(state.elapsed(), state.pos(), state.len().unwrap_or(0));
                let _ = out.write_str(&left);
            },
        )
        .progress_chars("=> ")
}

/// The time left in a phase, from the average pace so far: `?` before the first unit is done
/// (indicatif's own estimate says `0s` then), rounded up to whole seconds, so it never reads
/// `0s` while work remains.
pub fn remaining(elapsed: Duration, pos: u64, total: u64) -> String {
    if pos >= total {
        return "0s".to_string();
    }
    if pos == 0 {
        return "?".to_string();
    }
    let left = elapsed.as_secs_f64() * (total - pos) as f64 / pos as f64;
    duration(left.ceil().max(1.0))
}

/// Progress lines when stderr is not a terminal (piped, a CI log, a Slurm job's output): one
/// at each further tenth of a phase, at least [`PIPED_QUIET`] apart, and one at least every
/// [`PIPED_LINE_EVERY`]; a phase over within [`PIPED_QUIET`] prints none.
const PIPED_LINE_EVERY: Duration = Duration::from_secs(60);
const PIPED_QUIET: Duration = Duration::from_secs(5);

struct PhaseState {
    name: String,
    unit: String,
    pos: u64,
    total: u64,
    started: Instant,
    last_event: Option<Instant>,
    /// When the last piped progress line was printed, and at which tenth of the phase.
    last_line: Option<(Instant, u64)>,
}

impl PhaseState {
    fn new(name: &str, unit: &str, total: u64) -> Self {
        PhaseState {
            name: name.into(),
            unit: unit.into(),
            pos: 0,
            total,
            started: Instant::now(),
            last_event: None,
            last_line: None,
        }
    }

    /// The piped progress line due at `now`, if one is (see [`PIPED_LINE_EVERY`]).
    fn piped_line(&mut self, id: &str, now: Instant) -> Option<String> {
        if self.total == 0 {
            return None;
        }
        let tenth = self.pos * 10 / self.total;
        let done = self.pos >= self.total;
        let (since, last_tenth) = match self.last_line {
            Some((at, t)) => (now.duration_since(at), Some(t)),
            None => (now.duration_since(self.started), None),
        };
        let due = since >= PIPED_LINE_EVERY
            || (since >= PIPED_QUIET && last_tenth.is_none_or(|t| tenth > t))
            || (done && last_tenth.is_some());
        if !due {
            return None;
        }
        self.last_line = Some((now, tenth));
        let elapsed = now.duration_since(self.started);
        Some(format!(
            "{:>8}  {id} {} {}/{} {}  {} elapsed, eta {}",
            "Progress",
            self.name,
            self.pos,
            self.total,
            self.unit,
            duration(elapsed.as_secs_f64()),
            remaining(elapsed, self.pos, self.total)
        ))
    }
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
            *s = PhaseState::new(name, unit, total);
        }
        if let Some(bar) = &self.bar {
            bar.reset();
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
            let line = if self.bar.is_none() {
                s.piped_line(&self.id, Instant::now())
            } else {
                None
            };
            drop(s);
            if let Some(line) = line {
                self.reporter.line(&line);
            }
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

#[cfg(test)]
mod remaining_tests {
    use super::*;

    #[test]
    fn the_eta_is_unknown_before_the_first_unit_and_never_zero_while_work_remains() {
        let s = Duration::from_secs;
        assert_eq!(remaining(s(5), 0, 10), "?");
        assert_eq!(remaining(s(10), 5, 10), "10.0s");
        // 1 ms per unit, one unit left: 1 ms rounds up to a whole second, not down to 0.
        assert_eq!(remaining(Duration::from_millis(999), 999, 1000), "1.0s");
        assert_eq!(remaining(s(600), 1, 3), "20m00s");
        assert_eq!(remaining(s(7), 10, 10), "0s");
    }

    #[test]
    fn piped_lines_come_each_tenth_but_not_for_a_short_phase() {
        let start = Instant::now();
        // 100 steps of 2 s: the first line after the quiet time, then one per tenth, the last.
        let mut phase = PhaseState::new("train", "steps", 100);
        phase.started = start;
        let mut printed = Vec::new();
        for step in 1..=100u64 {
            phase.pos = step;
            let now = start + Duration::from_secs(2 * step);
            printed.extend(phase.piped_line("sft", now));
        }
        assert_eq!(printed.len(), 11, "{printed:#?}");
        assert!(
            printed[0].contains("sft train 3/100 steps  6.0s elapsed, eta 3m14s"),
            "{}",
            printed[0]
        );
        assert!(printed[10].contains("100/100 steps") && printed[10].ends_with("eta 0s"));
        // A phase over in a second says nothing.
        let mut quick = PhaseState::new("extract", "bytes", 1000);
        quick.started = start;
        let lines: Vec<String> = (1..=10u64)
            .filter_map(|i| {
                quick.pos = i * 100;
                quick.piped_line("m", start + Duration::from_millis(100 * i))
            })
            .collect();
        assert!(lines.is_empty(), "{lines:#?}");
    }
}
