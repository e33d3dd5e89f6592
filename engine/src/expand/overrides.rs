//! Profiles and `--set`: edits to the YAML tree before it is read as a manifest.
//!
//! Both work on located [`Node`]s, so a value that came from a profile still points at the
//! profile, and a value given with `--set` points into that command-line argument (each
//! argument is its own text in the [`SourceMap`]). Precedence is manifest params < profile <
//! `--set`, and `--set` may reach anything (`stages.sft.params.lr=2e-4`); a bare path is
//! short for `params.<path>`.

use std::collections::{HashMap, HashSet};

use crate::diagnostics::{did_you_mean, list_names, Problem};
use crate::manifest::raw::TOP_LEVEL_KEYS;
use crate::manifest::source::{span_between, SourceMap};
use crate::manifest::yaml::{self, Map, Node, Value};
use crate::pipeline::SourceSpan;

/// Checks every profile and merges the chosen one into `params`.
pub fn apply_profile(root: &mut Node, profile: Option<&str>, problems: &mut Vec<Problem>) {
    let Value::Map(top) = &mut root.value else {
        return;
    };
    let profiles: Option<Map> = top.get("profiles").and_then(|p| match &p.value {
        Value::Map(m) => Some(m.clone()),
        Value::Null => Some(Map::default()),
        _ => {
            problems.push(Problem::must_be(
                "`profiles`",
                "a mapping of profile name -> param overrides",
                p,
            ));
            None
        }
    });
    let params_keys: Vec<&str> = match top.get("params").map(|p| &p.value) {
        Some(Value::Map(m)) => m.keys().collect(),
        _ => Vec::new(),
    };
    let declared: HashSet<&str> = params_keys.iter().copied().collect();
    // Every profile is checked, used or not: a typo in `ci` should not wait for CI to show.
    for e in profiles.iter().flat_map(|m| m.entries.iter()) {
        match &e.value.value {
            Value::Map(overlay) => {
                for o in &overlay.entries {
                    if !declared.contains(o.key.as_str()) {
                        let message =
                            format!("profile `{}` sets `{}`, which is not a param", e.key, o.key);
                        problems.push(
                            Problem::new(message)
                                .at(o.key_span, "not declared under `params:`")
                                .suggest(&o.key, params_keys.iter().copied(), || {
                                    "a profile overrides params declared under the top-level `params:`; declare it there first"
                                        .to_string()
                                }),
                        );
                    }
                }
            }
            Value::Null => {}
            _ => problems.push(Problem::must_be(
                format!("profile `{}`", e.key),
                "a mapping of param overrides",
                &e.value,
            )),
        }
    }
    let Some(name) = profile else { return };
    let profiles = profiles.unwrap_or_default();
    let Some(overlay) = profiles.get(name) else {
        let names: Vec<&str> = profiles.keys().collect();
        let help = if names.is_empty() {
            "this manifest defines no profiles; add them under `profiles:`".to_string()
        } else {
            let mut h = format!(
                "profiles in this manifest: {}",
                list_names(names.iter().copied())
            );
            if let Some(d) = did_you_mean(name, names.iter().copied()) {
                h = format!("{d}\n{h}");
            }
            h
        };
        let mut p = Problem::new(format!("unknown profile `{name}` (given with --profile)"));
        if let Some(e) = top.entry("profiles") {
            p = p.at(e.key_span, "profiles are defined here");
        }
        problems.push(p.help(help));
        return;
    };
    let overlay = overlay.clone();
    if let Some(params) = top.entry_mut("params") {
        deep_merge(&mut params.value, overlay);
    }
}

/// Merges `overlay` into `base`: mappings key by key, anything else replaced.
pub fn deep_merge(base: &mut Node, overlay: Node) {
    match (&mut base.value, overlay.value) {
        (Value::Map(b), Value::Map(o)) => {
            // By index, not by scanning `b` for each key: a profile may override many params.
            let mut index: HashMap<String, usize> = b
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.key.clone(), i))
                .collect();
            for e in o.entries {
                match index.get(&e.key) {
                    Some(&i) => deep_merge(&mut b.entries[i].value, e.value),
                    None => {
                        index.insert(e.key.clone(), b.entries.len());
                        b.entries.push(e);
                    }
                }
            }
        }
        (_, value) => *base = Node { value, ..overlay },
    }
}

/// One parsed `--set PATH=VALUE`: path segments with their spans in the argument's text.
struct SetArg {
    segments: Vec<(String, SourceSpan)>,
    value: Node,
    whole: SourceSpan,
}

/// Applies `--set` arguments in order. Paths under `profiles.` are applied before the profile
/// is merged (so they affect it); everything else after. Returns the (profiles-first) split.
pub fn apply_sets(
    root: &mut Node,
    sets: &[String],
    sources: &mut SourceMap,
    profiles_phase: bool,
    problems: &mut Vec<Problem>,
) {
    for (i, arg) in sets.iter().enumerate() {
        let targets_profiles = arg.starts_with("profiles.");
        if targets_profiles != profiles_phase {
            continue;
        }
        let base = sources.add(format!("--set #{}", i + 1), arg.clone());
        let Some(set) = parse_set(arg, base, problems) else {
            continue;
        };
        apply_one(root, set, problems);
    }
}

fn parse_set(arg: &str, base: usize, problems: &mut Vec<Problem>) -> Option<SetArg> {
    let whole = span_between(base, base + arg.len());
    let Some(eq) = arg.find('=') else {
        problems.push(
            Problem::new(format!("`--set {arg}` has no value"))
                .at(whole, "expected PATH=VALUE")
                .help("write e.g. `--set seed=3` or `--set stages.sft.params.lr=2e-4`"),
        );
        return None;
    };
    let path = &arg[..eq];
    let mut segments = Vec::new();
    let mut offset = 0;
    for part in path.split('.') {
        let span = span_between(base + offset, base + offset + part.len());
        if part.is_empty() {
            problems.push(
                Problem::new(format!("`--set {arg}`: empty path segment"))
                    .at(span, "empty")
                    .help("paths look like `stages.sft.params.lr`"),
            );
            return None;
        }
        segments.push((part.to_string(), span));
        offset += part.len() + 1;
    }
    if !TOP_LEVEL_KEYS.contains(&segments[0].0.as_str()) {
        segments.insert(0, ("params".to_string(), span_between(base, base)));
    }
    let value = match yaml::parse(&arg[eq + 1..], base + eq + 1) {
        Ok(v) => v,
        Err(mut errs) => {
            for p in &mut errs {
                p.message = format!("in `--set {arg}`: {}", p.message);
            }
            problems.extend(errs);
            return None;
        }
    };
    Some(SetArg {
        segments,
        value,
        whole,
    })
}

fn apply_one(root: &mut Node, set: SetArg, problems: &mut Vec<Problem>) {
    let n = set.segments.len();
    let mut node = root;
    let mut walked = String::new();
    for (depth, (seg, seg_span)) in set.segments.iter().enumerate() {
        let last = depth + 1 == n;
        let here = if walked.is_empty() {
            "the manifest".to_string()
        } else {
            format!("`{walked}`")
        };
        let shape = node.type_name();
        match &mut node.value {
            Value::Map(map) => {
                if map.entry(seg).is_none() && may_create(&set.segments, depth) {
                    if last {
                        map.entries.push(yaml::Entry {
                            key: seg.clone(),
                            key_span: *seg_span,
                            value: set.value,
                        });
                        return;
                    }
                    // `stages.sft.params.lr=...` on a stage without `params:` yet.
                    let empty = Node::new(*seg_span, Value::Map(Map::default()));
                    map.set(seg, *seg_span, empty);
                }
                if map.entry(seg).is_none() {
                    let listed = || format!("{here} has: {}", list_names(map.keys().take(20)));
                    problems.push(
                        Problem::new(format!("--set: {here} has no `{seg}`"))
                            .at(*seg_span, "does not exist")
                            .suggest(seg, map.keys(), listed),
                    );
                    return;
                }
                let Some(entry) = map.entry_mut(seg) else {
                    return;
                };
                if last {
                    entry.value = set.value;
                    return;
                }
                node = &mut entry.value;
            }
            Value::Seq(items) => {
                let len = items.len();
                let Some(item) = seg.parse::<usize>().ok().and_then(|i| items.get_mut(i)) else {
                    problems.push(
                        Problem::new(format!("--set: {here} is a list of {len} items; `{seg}` is not an index into it"))
                            .at(*seg_span, "no such item")
                            .help(format!("use an index from 0 to {}", len.saturating_sub(1))),
                    );
                    return;
                };
                if last {
                    *item = set.value;
                    return;
                }
                node = item;
            }
            _ => {
                problems.push(
                    Problem::new(format!("--set: {here} is {shape}, so it has no `{seg}`"))
                        .at(*seg_span, "cannot go below a plain value")
                        .help(format!("set {here} itself instead")),
                );
                return;
            }
        }
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(seg);
    }
    let _ = set.whole;
}

/// A missing segment may be created inside a stage or model (a param left to its default, a
/// `params:` or `resources:` not written), inside a param's own mapping, or at the top level
/// (`name`); top-level params and stage/model names must exist, so typos are caught.
fn may_create(segments: &[(String, SourceSpan)], depth: usize) -> bool {
    match segments[0].0.as_str() {
        "stages" | "models" | "params" => depth >= 2,
        "profiles" => depth >= 2,
        _ => depth == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest's tree and its sources, which `--set` values are added to.
    struct Overlaid {
        root: Node,
        sources: SourceMap,
    }

    impl Overlaid {
        fn new(text: &str) -> Self {
            Overlaid {
                root: yaml::parse(text, 0).unwrap(),
                sources: SourceMap::new("m.yaml", text),
            }
        }

        /// Applies `profile` (when given), then `sets`: the problems found.
        fn apply(&mut self, profile: Option<&str>, sets: &[&str]) -> Vec<Problem> {
            let mut problems = Vec::new();
            if profile.is_some() {
                apply_profile(&mut self.root, profile, &mut problems);
            }
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            apply_sets(
                &mut self.root,
                &sets,
                &mut self.sources,
                false,
                &mut problems,
            );
            problems
        }
    }

    #[test]
    fn profile_deep_merges_and_set_overrides_it() {
        let text = "params:\n  opt: {lr: 1, beta: 2}\n  seed: 0\nprofiles:\n  ci: {opt: {lr: 5}}\nstages: {}\n";
        let mut m = Overlaid::new(text);
        let problems = m.apply(Some("ci"), &["seed=3"]);
        assert!(problems.is_empty(), "{problems:?}");
        let params = m.root.as_map().unwrap().get("params").unwrap();
        assert_eq!(params.walk("opt.lr").0.value, Value::Int(5));
        assert_eq!(params.walk("opt.beta").0.value, Value::Int(2));
        assert_eq!(params.walk("seed").0.value, Value::Int(3));
        // The --set value is located in its own text, after the manifest.
        assert!(params.walk("seed").0.span.offset > text.len());
    }

    #[test]
    fn set_on_a_missing_path_names_the_missing_part() {
        let text = "params: {seed: 0}\nstages:\n  sft: {kind: k}\n";
        let mut m = Overlaid::new(text);
        let problems = m.apply(None, &["stages.sfft.params.lr=1", "sede=1"]);
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].message, "--set: `stages` has no `sfft`");
        assert_eq!(problems[0].help.as_deref(), Some("did you mean `sft`?"));
        assert_eq!(problems[1].message, "--set: `params` has no `sede`");
        // A param left to its default may be set.
        let problems = m.apply(None, &["stages.sft.params.lr=2e-4"]);
        assert!(problems.is_empty());
    }
}
