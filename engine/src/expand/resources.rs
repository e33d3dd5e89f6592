//! `resources:`: cpus, gpus, memory (`512MiB`, `4GiB`, bytes), gpu_memory (per GPU, same units;
//! what the plan's memory estimate is checked against) and time (`30m`, `2h`, `1:30:00`).

use crate::diagnostics::Problem;
use crate::manifest::raw::check_keys;
use crate::manifest::yaml::{Node, Value};
use crate::pipeline::Resources;

pub const RESOURCE_KEYS: &[&str] = &["cpus", "gpus", "memory", "gpu_memory", "time"];

/// The largest `memory` a stage may ask for. No single machine has more (the largest hold
/// a few tens of TiB), so a larger request is a typo; it is refused at plan time rather than
/// left to a scheduler that rejects the job, or to a local executor that never enforces it.
/// A fixed bound rather than this machine's memory, so that a manifest meant for a cluster
/// still plans (`--dry-run`, `emflow check`) on a laptop.
pub const MAX_MEMORY: u64 = 64 << 40;

/// Reads a substituted `resources:` node; every bad entry is reported.
pub fn parse(node: &Node, problems: &mut Vec<Problem>) -> Option<Resources> {
    let mut res = Resources::default();
    let Value::Map(map) = &node.value else {
        if matches!(node.value, Value::Null) {
            return Some(res);
        }
        problems.push(
            Problem::must_be("`resources`", "a mapping", node)
                .help("e.g. `resources: { cpus: 2, gpus: 1, memory: 8GiB, time: 2h }`"),
        );
        return None;
    };
    let before = problems.len();
    check_keys(map, RESOURCE_KEYS, "resources", problems);
    for e in &map.entries {
        let v = &e.value;
        match e.key.as_str() {
            "cpus" => match count(v) {
                Some(n) if n >= 1 => res.cpus = n,
                _ => problems.push(bad(v, "`cpus` must be a whole number of at least 1", "e.g. `cpus: 4`")),
            },
            "gpus" => match count(v) {
                Some(n) => res.gpus = n,
                None => problems.push(bad(v, "`gpus` must be a whole number", "e.g. `gpus: 1`, or `gpus: 0` for CPU only")),
            },
            "memory" => match memory(v) {
                Some(b) if b > MAX_MEMORY => problems.push(
                    Problem::new(format!(
                        "`memory` asks for {} GiB, more than any one machine has",
                        b >> 30
                    ))
                    .at(v.span, "a request above 64 TiB")
                    .help(
                        "`memory` is what one stage instance needs on one machine, e.g. `memory: 64GiB`; \
                         requests above 64 TiB are refused as typos (check the unit: `TiB` for `GiB`?)",
                    ),
                ),
                Some(b) => res.memory = b,
                None => problems.push(bad(
                    v,
                    "`memory` is not a size",
                    "write a number with a unit: `512MiB`, `4GiB`, `2GB`, or a number of bytes",
                )),
            },
            "gpu_memory" => match memory(v) {
                Some(b) if b > 0 && b <= MAX_MEMORY => res.gpu_memory = b,
                _ => problems.push(bad(
                    v,
                    "`gpu_memory` is not a size",
                    "the memory of each GPU, with a unit: `24GiB`, `80GB`",
                )),
            },
            "time" => match duration(v) {
                Some(s) => res.time_limit = s,
                None => problems.push(bad(
                    v,
                    "`time` is not a duration",
                    "write e.g. `30m`, `2h`, `1h30m`, `1d`, `1:30:00` (h:mm:ss), or a number of seconds",
                )),
            },
            _ => {}
        }
    }
    (problems.len() == before).then_some(res)
}

fn bad(v: &Node, message: &str, help: &str) -> Problem {
    let shown = match &v.value {
        Value::Str(s) => format!("`{s}`"),
        _ => v.type_name().to_string(),
    };
    Problem::new(message)
        .at(v.span, format!("{shown} is not valid here"))
        .help(help)
}

fn count(v: &Node) -> Option<u32> {
    match v.value {
        Value::Int(i) => u32::try_from(i).ok(),
        _ => None,
    }
}

/// Bytes from `512MiB`, `4GiB`, `2GB`, `1.5GiB` or a plain integer.
pub fn memory(v: &Node) -> Option<u64> {
    let s = match &v.value {
        Value::Int(i) => return u64::try_from(*i).ok(),
        Value::Str(s) => s.trim(),
        _ => return None,
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    let num: f64 = num.parse().ok()?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    let bytes = num * mult as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes.round() as u64)
}

/// Seconds from `30m`, `2h`, `1h30m`, `1d`, `45s`, `1:30:00`, `30:00` or a plain integer.
pub fn duration(v: &Node) -> Option<u64> {
    let s = match &v.value {
        Value::Int(i) => return u64::try_from(*i).ok(),
        Value::Str(s) => s.trim(),
        _ => return None,
    };
    if s.contains(':') {
        let parts: Vec<u64> = s
            .split(':')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        return match parts.as_slice() {
            [m, sec] if *sec < 60 => Some(m * 60 + sec),
            [h, m, sec] if *m < 60 && *sec < 60 => Some(h * 3600 + m * 60 + sec),
            _ => None,
        };
    }
    let mut total = 0u64;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        let n: u64 = std::mem::take(&mut digits).parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    if !digits.is_empty() {
        // A trailing bare number (`90`) in a string means seconds, but not after units (`1h30`).
        if total != 0 {
            return None;
        }
        total = digits.parse().ok()?;
    }
    (!s.is_empty()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::SourceSpan;

    fn s(text: &str) -> Node {
        Node::new(SourceSpan::default(), Value::Str(text.to_string()))
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(memory(&s("512MiB")), Some(512 << 20));
        assert_eq!(memory(&s("4GiB")), Some(4 << 30));
        assert_eq!(memory(&s("2GB")), Some(2_000_000_000));
        assert_eq!(memory(&s("4 gigs")), None);
        assert_eq!(duration(&s("30m")), Some(1800));
        assert_eq!(duration(&s("2h")), Some(7200));
        assert_eq!(duration(&s("1h30m")), Some(5400));
        assert_eq!(duration(&s("1:30:00")), Some(5400));
        assert_eq!(duration(&s("2 hours")), None);
        assert_eq!(duration(&s("1h30")), None);
    }
}
