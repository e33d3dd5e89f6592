//! Minimal inline-SVG charts (bars with interval whiskers, line charts) so a report is one
//! self-contained HTML file: no JavaScript, no external CSS or fonts, viewable offline and
//! archivable next to the results.

use std::fmt::Write as _;

const W: f64 = 760.0;
const H: f64 = 340.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 96.0;
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

/// One bar: label, value, optional interval.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
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

fn frame(out: &mut String, title: &str, y_label: &str, y0: f64, y1: f64) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="12" role="img"><title>{t}</title><rect width="{W}" height="{H}" fill="white"/><text x="{cx}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{t}</text><text transform="translate(14,{cy}) rotate(-90)" text-anchor="middle">{yl}</text>"#,
        t = esc(title),
        cx = W / 2.0,
        cy = TOP + (H - TOP - BOTTOM) / 2.0,
        yl = esc(y_label)
    );
    let step = tick_step(y1 - y0);
    let mut v = (y0 / step).ceil() * step;
    while v <= y1 + 1e-9 {
        let y = ypos(v, y0, y1);
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{label}</text>"##,
            x2 = W - RIGHT,
            tx = LEFT - 6.0,
            ty = y + 4.0,
            label = fmt_tick(v)
        );
        v += step;
    }
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{b}" stroke="#333"/><line x1="{LEFT}" x2="{r}" y1="{b}" y2="{b}" stroke="#333"/>"##,
        b = H - BOTTOM,
        r = W - RIGHT
    );
}

fn ypos(v: f64, y0: f64, y1: f64) -> f64 {
    let span = if y1 > y0 { y1 - y0 } else { 1.0 };
    H - BOTTOM - (v - y0) / span * (H - TOP - BOTTOM)
}

/// A bar chart on `[0, y_max]` with interval whiskers; values are printed above the bars.
pub fn bar_chart(title: &str, y_label: &str, bars: &[Bar], y_max: f64) -> String {
    let mut out = String::new();
    frame(&mut out, title, y_label, 0.0, y_max);
    let n = bars.len().max(1) as f64;
    let slot = (W - LEFT - RIGHT) / n;
    let bw = (slot * 0.6).min(80.0);
    for (i, b) in bars.iter().enumerate() {
        let cx = LEFT + slot * (i as f64 + 0.5);
        let y = ypos(b.value.clamp(0.0, y_max), 0.0, y_max);
        let _ = write!(
            out,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="{h:.1}" fill="{c}"><title>{t}: {v:.3}</title></rect>"#,
            x = cx - bw / 2.0,
            h = H - BOTTOM - y,
            c = PALETTE[i % PALETTE.len()],
            t = esc(&b.label),
            v = b.value
        );
        if let (Some(lo), Some(hi)) = (b.lo, b.hi) {
            let (ylo, yhi) = (
                ypos(lo.clamp(0.0, y_max), 0.0, y_max),
                ypos(hi.clamp(0.0, y_max), 0.0, y_max),
            );
            let _ = write!(
                out,
                r##"<line x1="{cx:.1}" x2="{cx:.1}" y1="{ylo:.1}" y2="{yhi:.1}" stroke="#222" stroke-width="1.5"/><line x1="{a:.1}" x2="{b:.1}" y1="{ylo:.1}" y2="{ylo:.1}" stroke="#222"/><line x1="{a:.1}" x2="{b:.1}" y1="{yhi:.1}" y2="{yhi:.1}" stroke="#222"/>"##,
                a = cx - 6.0,
                b = cx + 6.0
            );
        }
        let top =
            b.hi.map_or(y, |hi| ypos(hi.clamp(0.0, y_max), 0.0, y_max).min(y));
        let _ = write!(
            out,
            r#"<text x="{cx:.1}" y="{ty:.1}" text-anchor="middle">{v}</text>"#,
            ty = top - 4.0,
            v = fmt_tick(b.value)
        );
        let _ = write!(
            out,
            r#"<text transform="translate({cx:.1},{ly:.1}) rotate(30)" text-anchor="start">{t}</text>"#,
            ly = H - BOTTOM + 14.0,
            t = esc(&b.label)
        );
    }
    out.push_str("</svg>");
    out
}

/// A line chart of several (x, y) series with a legend below the plot.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let pts = series
        .iter()
        .flat_map(|(_, s)| s.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if y1 - y0 < 1e-12 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let xspan = if x1 > x0 { x1 - x0 } else { 1.0 };
    let xpos = |x: f64| LEFT + (x - x0) / xspan * (W - LEFT - RIGHT);
    let mut out = String::new();
    frame(&mut out, title, y_label, y0, y1);
    let step = tick_step(xspan);
    let mut v = (x0 / step).ceil() * step;
    while v <= x1 + 1e-9 {
        let _ = write!(
            out,
            r#"<text x="{x:.1}" y="{y}" text-anchor="middle">{l}</text>"#,
            x = xpos(v),
            y = H - BOTTOM + 16.0,
            l = fmt_tick(v)
        );
        v += step;
    }
    let _ = write!(
        out,
        r#"<text x="{x}" y="{y}" text-anchor="middle">{l}</text>"#,
        x = LEFT + (W - LEFT - RIGHT) / 2.0,
        y = H - BOTTOM + 32.0,
        l = esc(x_label)
    );
    for (i, (label, s)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = s
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", xpos(x), ypos(y, y0, y1)))
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
        let (lx, ly) = (
            LEFT + (i % 3) as f64 * 230.0,
            H - BOTTOM + 50.0 + (i / 3) as f64 * 16.0,
        );
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
    use super::fmt_tick;

    #[test]
    fn tick_labels_are_short_and_never_negative_zero() {
        assert_eq!(fmt_tick(-1e-13), "0");
        assert_eq!(fmt_tick(-0.0004), "-0.0004");
        assert_eq!(fmt_tick(0.005), "0.005");
        assert_eq!(fmt_tick(0.25), "0.25");
        assert_eq!(fmt_tick(2500.0), "2.5e3");
        assert_eq!(fmt_tick(0.00002), "2.0e-5");
    }
}
