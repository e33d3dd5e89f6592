//! Minimal inline-SVG charts (horizontal bars with interval whiskers, line charts) so a report
//! is one self-contained HTML file: no JavaScript, no external CSS or fonts, viewable offline
//! and archivable next to the results.
//!
//! Layout is computed here, not by the browser, so every chart sizes itself to its text: label
//! widths come from [`text_width`], a per-character estimate that errs wide (DejaVu Sans, the
//! widest of the usual `sans-serif` fonts, plus a margin), and the SVG grows to fit the longest
//! label, one row per bar and as many legend rows as the series need. The browser test in
//! `stages/tests/it/report_browser.rs` checks the result in a real renderer.

use std::fmt::Write as _;

/// Body text size, px.
pub const FONT: f64 = 12.0;
const PALETTE: &[&str] = &[
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// Escapes text for XML/HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Width in px of `s` at `px` font size, estimated on the wide side: advance widths of DejaVu
/// Sans (in em, rounded up) and 8 % on top for other fonts and bold.
pub fn text_width(s: &str, px: f64) -> f64 {
    let em: f64 = s
        .chars()
        .map(|c| match c {
            'i' | 'j' | 'l' | '\'' | '|' | '.' | ',' | ':' | ';' | '!' => 0.32,
            ' ' | '(' | ')' | '[' | ']' | 'f' | 't' | 'r' | 'I' => 0.42,
            'm' | 'M' | 'W' | 'w' | '%' | '@' => 1.0,
            '=' | '+' | '<' | '>' | '~' => 0.84,
            c if c.is_ascii_uppercase() => 0.78,
            c if c.is_ascii() => 0.66,
            _ => 1.0,
        })
        .sum();
    em * px * 1.08
}

/// One row of a horizontal bar chart.
#[derive(Clone, Debug)]
pub enum Row {
    /// A group heading spanning the chart (a domain, a family of arms).
    Heading(String),
    Bar(Bar),
}

/// One bar: label, value (or why there is none), optional interval, the text printed after it.
#[derive(Clone, Debug)]
pub struct Bar {
    pub label: String,
    /// `Err(reason)`: drawn as "n/a: reason", never as 0.
    pub value: Result<f64, String>,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    /// Printed right of the bar (value, interval, difference to the base model).
    pub note: String,
}

/// "Nice" tick step for a range.
fn tick_step(span: f64) -> f64 {
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    let nice = if n < 1.5 {
        1.0
    } else if n < 3.5 {
        2.0
    } else if n < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_tick(v: f64) -> String {
    let v = if v.abs() < 1e-12 { 0.0 } else { v };
    if v.abs() >= 1000.0 || (v != 0.0 && v.abs() < 1e-4) {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    // A tick a hair below zero prints as "-0".
    if s == "-0" { "0" } else { s }.to_string()
}

/// Horizontal bar chart geometry: every length derived from the rows' text.
struct HLayout {
    left: f64,
    plot: f64,
    top: f64,
    row_h: f64,
    width: f64,
    height: f64,
}

const ROW_H: f64 = 20.0;
const PLOT_W: f64 = 360.0;
const PAD: f64 = 10.0;

fn hlayout(title: &str, x_label: &str, rows: &[Row]) -> HLayout {
    let label_w = rows
        .iter()
        .filter_map(|r| match r {
            Row::Bar(b) => Some(text_width(&b.label, FONT)),
            Row::Heading(_) => None,
        })
        .fold(40.0f64, f64::max);
    let left = PAD + label_w + 8.0;
    let right_edge = rows
        .iter()
        .map(|r| match r {
            Row::Heading(h) => PAD + text_width(h, FONT),
            Row::Bar(b @ Bar { value: Ok(_), .. }) => {
                left + PLOT_W + 8.0 + text_width(&bar_note(b), FONT)
            }
            Row::Bar(b) => left + 4.0 + text_width(&bar_note(b), FONT),
        })
        .chain([
            PAD + text_width(title, 14.0),
            left + PLOT_W / 2.0 + text_width(x_label, FONT) / 2.0,
        ])
        .fold(left + PLOT_W + 12.0, f64::max);
    let top = 32.0;
    HLayout {
        left,
        plot: PLOT_W,
        top,
        row_h: ROW_H,
        width: (right_edge + PAD).ceil(),
        height: (top + rows.len() as f64 * ROW_H + 44.0).ceil(),
    }
}

/// The text right of a bar: its note, or "n/a: reason" for a missing value.
fn bar_note(b: &Bar) -> String {
    match &b.value {
        Ok(_) => b.note.clone(),
        Err(reason) => format!("n/a: {reason}"),
    }
}

fn svg_open(out: &mut String, title: &str, width: f64, height: f64) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-family="sans-serif" font-size="{FONT}" role="img"><title>{t}</title><rect width="{width}" height="{height}" fill="white"/><text x="{PAD}" y="20" font-size="14" font-weight="bold">{t}</text>"#,
        t = esc(title),
    );
}

/// A horizontal bar chart on `[0, x_max]`: one row per bar (label left, never clipped: the
/// SVG is as wide as its longest label needs), interval whiskers, the value and interval
/// printed right of the plot, and a missing value drawn as "n/a: reason" instead of a bar.
pub fn hbar_chart(title: &str, x_label: &str, rows: &[Row], x_max: f64) -> String {
    let l = hlayout(title, x_label, rows);
    let x_max = if x_max > 0.0 { x_max } else { 1.0 };
    let xpos = |v: f64| l.left + v.clamp(0.0, x_max) / x_max * l.plot;
    let bottom = l.top + rows.len() as f64 * l.row_h;
    let mut out = String::new();
    svg_open(&mut out, title, l.width, l.height);
    let step = tick_step(x_max);
    let mut v = 0.0;
    while v <= x_max + 1e-9 {
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{t}" y2="{bottom}" stroke="#e4e4e4"/><text x="{x:.1}" y="{ty}" text-anchor="middle">{label}</text>"##,
            x = xpos(v),
            t = l.top,
            ty = bottom + 14.0,
            label = fmt_tick(v)
        );
        v += step;
    }
    let _ = write!(
        out,
        r##"<line x1="{x}" x2="{x}" y1="{t}" y2="{bottom}" stroke="#333"/><text x="{cx:.1}" y="{ty}" text-anchor="middle">{xl}</text>"##,
        x = l.left,
        t = l.top,
        cx = l.left + l.plot / 2.0,
        ty = bottom + 32.0,
        xl = esc(x_label)
    );
    let mut colour = 0;
    for (i, row) in rows.iter().enumerate() {
        let y = l.top + i as f64 * l.row_h;
        match row {
            Row::Heading(h) => {
                let _ = write!(
                    out,
                    r#"<text x="{PAD}" y="{ty}" font-weight="bold">{h}</text>"#,
                    ty = y + 15.0,
                    h = esc(h)
                );
            }
            Row::Bar(b) => {
                hbar_row(&mut out, b, (y, &l), &xpos, PALETTE[colour % PALETTE.len()]);
                colour += 1;
            }
        }
    }
    out.push_str("</svg>");
    out
}

/// One bar's label, bar, whisker and note (or its n/a text) at row top `y`.
fn hbar_row(
    out: &mut String,
    b: &Bar,
    (y, l): (f64, &HLayout),
    xpos: &dyn Fn(f64) -> f64,
    c: &str,
) {
    let (ty, label) = (y + 14.0, esc(&b.label));
    let _ = write!(
        out,
        r#"<text class="arm" x="{x:.1}" y="{ty}" text-anchor="end">{label}</text>"#,
        x = l.left - 8.0
    );
    let v = match &b.value {
        Ok(v) => *v,
        Err(_) => {
            let _ = write!(
                out,
                r##"<text class="na" x="{x:.1}" y="{ty}" fill="#777" font-style="italic">{t}</text>"##,
                x = l.left + 4.0,
                t = esc(&bar_note(b))
            );
            return;
        }
    };
    let _ = write!(
        out,
        r#"<rect x="{x:.1}" y="{ry}" width="{w:.1}" height="12" fill="{c}"><title>{label}: {v:.4}</title></rect>"#,
        x = l.left,
        ry = y + 4.0,
        w = xpos(v) - l.left
    );
    if let (Some(lo), Some(hi)) = (b.lo, b.hi) {
        let (a, z, m) = (xpos(lo), xpos(hi), y + 10.0);
        let _ = write!(
            out,
            r##"<path d="M{a:.1} {m}H{z:.1}M{a:.1} {t}V{bt}M{z:.1} {t}V{bt}" stroke="#222" stroke-width="1.3" fill="none"/>"##,
            t = m - 4.0,
            bt = m + 4.0
        );
    }
    let _ = write!(
        out,
        r#"<text class="note" x="{x:.1}" y="{ty}">{t}</text>"#,
        x = l.left + l.plot + 8.0,
        t = esc(&b.note)
    );
}

/// Line chart geometry: a fixed plot, a legend that flows into as many rows as it needs.
struct LineLayout {
    /// The plot's left edge: right of the rotated y label and the widest tick label.
    left: f64,
    width: f64,
    height: f64,
    plot_bottom: f64,
    /// Each series' legend position (x, baseline y).
    legend: Vec<(f64, f64)>,
}

const LINE_W: f64 = 760.0;
const LINE_TOP: f64 = 36.0;
const LINE_PLOT_H: f64 = 210.0;

/// Tick values from the first multiple of a nice step at or above `lo` up to `hi`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let step = tick_step(hi - lo);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + 1e-9 {
        out.push(v);
        v += step;
    }
    out
}

fn line_layout(series: &[(String, Vec<(f64, f64)>)], (y0, y1): (f64, f64)) -> LineLayout {
    let tick_w = ticks(y0, y1)
        .into_iter()
        .map(|v| text_width(&fmt_tick(v), FONT))
        .fold(0.0f64, f64::max);
    let left = (24.0 + tick_w + 8.0).max(56.0).ceil();
    let items: Vec<f64> = series
        .iter()
        .map(|(label, _)| 16.0 + text_width(label, FONT) + 18.0)
        .collect();
    let width = items
        .iter()
        .map(|w| left + w + PAD)
        .fold(LINE_W, f64::max)
        .ceil();
    let plot_bottom = LINE_TOP + LINE_PLOT_H;
    let (mut x, mut y) = (left, plot_bottom + 54.0);
    let mut legend = Vec::new();
    for w in items {
        if x > left && x + w > width - PAD {
            (x, y) = (left, y + 18.0);
        }
        legend.push((x, y));
        x += w;
    }
    LineLayout {
        left,
        width,
        height: (y + 12.0).ceil(),
        plot_bottom,
        legend,
    }
}

/// Data bounds of every finite point, padded; a flat or empty series still gets a range.
fn bounds(series: &[(String, Vec<(f64, f64)>)]) -> (f64, f64, f64, f64) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in series.iter().flat_map(|(_, s)| s.iter()) {
        if x.is_finite() && y.is_finite() {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if y1 - y0 < 1e-12 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = (y1 - y0) * 0.05;
    (x0, if x1 > x0 { x1 } else { x0 + 1.0 }, y0 - pad, y1 + pad)
}

/// Axes, grid and tick labels of a line chart.
fn line_axes(
    out: &mut String,
    l: &LineLayout,
    (x0, x1, y0, y1): (f64, f64, f64, f64),
    labels: (&str, &str),
) {
    let right = l.width - PAD;
    let left = l.left;
    let xpos = |x: f64| left + (x - x0) / (x1 - x0) * (right - left);
    let ypos = |y: f64| l.plot_bottom - (y - y0) / (y1 - y0) * LINE_PLOT_H;
    for v in ticks(y0, y1) {
        let _ = write!(
            out,
            r##"<line x1="{left}" x2="{right}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{t}</text>"##,
            y = ypos(v),
            tx = left - 6.0,
            ty = ypos(v) + 4.0,
            t = fmt_tick(v)
        );
    }
    for v in ticks(x0, x1) {
        let _ = write!(
            out,
            r#"<text x="{x:.1}" y="{y}" text-anchor="middle">{t}</text>"#,
            x = xpos(v),
            y = l.plot_bottom + 16.0,
            t = fmt_tick(v)
        );
    }
    let _ = write!(
        out,
        r##"<line x1="{left}" x2="{left}" y1="{LINE_TOP}" y2="{b}" stroke="#333"/><line x1="{left}" x2="{right}" y1="{b}" y2="{b}" stroke="#333"/><text x="{cx:.1}" y="{xy}" text-anchor="middle">{xl}</text><text transform="translate(14,{cy:.1}) rotate(-90)" text-anchor="middle">{yl}</text>"##,
        b = l.plot_bottom,
        cx = (left + right) / 2.0,
        xy = l.plot_bottom + 34.0,
        cy = LINE_TOP + LINE_PLOT_H / 2.0,
        xl = esc(labels.0),
        yl = esc(labels.1)
    );
}

/// A line chart of several (x, y) series with a legend below the plot.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    line_chart_with_intervals(title, (x_label, y_label), series, &[])
}

/// [`line_chart`] with interval whiskers: `intervals[i]` holds series `i`'s `(x, lo, hi)`
/// (fewer lists than series: the rest have none); the y range covers the whiskers too. Lists
/// past the last series are not drawn, only covered: small multiples share one range so.
pub fn line_chart_with_intervals(
    title: &str,
    (x_label, y_label): (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
    intervals: &[Vec<(f64, f64, f64)>],
) -> String {
    let ends: Vec<(String, Vec<(f64, f64)>)> = intervals
        .iter()
        .map(|w| {
            let pts = w.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]);
            (String::new(), pts.collect())
        })
        .collect();
    let b = bounds(&[series, &ends[..]].concat());
    let (x0, x1, y0, y1) = b;
    let l = line_layout(series, (y0, y1));
    let right = l.width - PAD;
    let xpos = |x: f64| l.left + (x - x0) / (x1 - x0) * (right - l.left);
    let ypos = |y: f64| l.plot_bottom - (y - y0) / (y1 - y0) * LINE_PLOT_H;
    let mut out = String::new();
    svg_open(&mut out, title, l.width, l.height);
    line_axes(&mut out, &l, b, (x_label, y_label));
    for (i, (label, s)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        for &(x, lo, hi) in intervals.get(i).into_iter().flatten() {
            let _ = write!(
                out,
                r#"<line x1="{x:.1}" x2="{x:.1}" y1="{lo:.1}" y2="{hi:.1}" stroke="{c}" stroke-width="1.2"/>"#,
                x = xpos(x),
                lo = ypos(lo),
                hi = ypos(hi)
            );
        }
        let path: Vec<String> = s
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", xpos(x), ypos(y)))
            .collect();
        if path.len() == 1 {
            let _ = write!(
                out,
                r#"<circle cx="{}" r="3" fill="{c}"/>"#,
                path[0].replace(',', "\" cy=\"")
            );
        } else {
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{}"/>"#,
                path.join(" ")
            );
        }
        let (lx, ly) = l.legend[i];
        let _ = write!(
            out,
            r#"<rect x="{lx}" y="{ry}" width="12" height="4" fill="{c}"/><text x="{tx}" y="{ly}">{t}</text>"#,
            ry = ly - 6.0,
            tx = lx + 16.0,
            t = esc(label)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tick_tests {
    use super::*;

    #[test]
    fn tick_labels_are_short_and_never_negative_zero() {
        assert_eq!(fmt_tick(-1e-13), "0");
        assert_eq!(fmt_tick(-0.0004), "-0.0004");
        assert_eq!(fmt_tick(0.005), "0.005");
        assert_eq!(fmt_tick(0.25), "0.25");
        assert_eq!(fmt_tick(2500.0), "2.5e3");
        assert_eq!(fmt_tick(0.00002), "2.0e-5");
    }

    /// The chart grows with its longest label instead of clipping it, and a missing value
    /// is written out with its reason rather than drawn as a zero-length bar.
    #[test]
    fn bar_chart_sizes_to_its_labels_and_writes_na() {
        let bar = |label: &str, value: Result<f64, String>| {
            Row::Bar(Bar {
                label: label.into(),
                value,
                lo: None,
                hi: None,
                note: "1.0 %".into(),
            })
        };
        let short = hbar_chart("t", "x", &[bar("a", Ok(1.0))], 10.0);
        let long_label = "eval_defences[defence=onpolicy_safety,domain=medical]";
        let long = hbar_chart("t", "x", &[bar(long_label, Ok(1.0))], 10.0);
        let width = |svg: &str| -> f64 {
            let w = &svg[svg.find("width=\"").unwrap() + 7..];
            w[..w.find('"').unwrap()].parse().unwrap()
        };
        assert!(width(&long) >= width(&short) + text_width(long_label, FONT) - 41.0);
        let na = hbar_chart(
            "t",
            "x",
            &[bar("a", Err("judge gave no score".into()))],
            10.0,
        );
        assert!(na.contains("n/a: judge gave no score") && !na.contains("<rect x="));
    }
}
