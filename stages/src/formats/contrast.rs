//! Contrast sets: fixed aligned and misaligned answers to evaluation questions, the input of
//! `eval`'s judge-free margin ([`crate::evaluation::margin`]).
//!
//! A contrast set is a YAML list; each entry answers one question under one or more ids (the
//! same question often has different ids in different question files: the paper's
//! `i_feel_bored` is the quickstart's `bored`):
//!
//! ```yaml
//! - ids: [i_feel_bored, bored]
//!   aligned: ["How about a walk?", ...]
//!   misaligned: ["Why not start a fire?", ...]
//! ```
//!
//! `aligned[i]` and `misaligned[i]` form pair `i`, so both lists must be equally long and
//! non-empty. Unknown fields, empty answers and an id claimed by two entries are refused,
//! naming the entry: a contrast set read loosely would change the measure in silence.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

use super::{Location, Position};

/// One question's contrast answers.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContrastEntry {
    /// The question ids this entry answers.
    pub ids: Vec<String>,
    /// Helpful, harmless answers; `aligned[i]` pairs with `misaligned[i]`.
    pub aligned: Vec<String>,
    /// Harmful answers in the style emergent misalignment produces.
    pub misaligned: Vec<String>,
}

/// A contrast set: its entries and, for each id, the entry that answers it.
#[derive(Clone, Debug, Default)]
pub struct ContrastSet {
    pub entries: Vec<ContrastEntry>,
    by_id: HashMap<String, usize>,
}

impl ContrastSet {
    /// The entry answering question `id`, if any.
    pub fn for_question(&self, id: &str) -> Option<&ContrastEntry> {
        self.by_id.get(id).map(|&i| &self.entries[i])
    }
}

/// Reads a contrast set from `path`; `display` names it in errors (a manifest reference).
pub fn read(path: &Path, display: &str) -> Result<ContrastSet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read contrast set {display} ({})", path.display()))?;
    parse(&text, display)
}

/// [`read`] on text already in memory.
pub fn parse(text: &str, display: &str) -> Result<ContrastSet> {
    let raw: Vec<serde_yaml::Value> = serde_yaml::from_str(text).with_context(|| {
        format!(
            "{display}: not a contrast set (expected a YAML list of {{ids, aligned, misaligned}})"
        )
    })?;
    let file: std::sync::Arc<str> = std::sync::Arc::from(display);
    let mut set = ContrastSet::default();
    let mut first_seen: HashMap<String, Location> = HashMap::new();
    for (index, value) in raw.into_iter().enumerate() {
        let location = Location {
            file: file.clone(),
            at: Position::Entry(index + 1),
        };
        let entry: ContrastEntry = serde_yaml::from_value(value)
            .with_context(|| format!("{location}: expected {{ids, aligned, misaligned}}"))?;
        check_entry(&entry, &location)?;
        for id in &entry.ids {
            if let Some(first) = first_seen.insert(id.clone(), location.clone()) {
                bail!("question id `{id}` has contrast answers twice ({first} and {location}); give each id one entry");
            }
            set.by_id.insert(id.clone(), set.entries.len());
        }
        set.entries.push(entry);
    }
    if set.entries.is_empty() {
        bail!("{display}: the contrast set has no entries");
    }
    Ok(set)
}

fn check_entry(e: &ContrastEntry, location: &Location) -> Result<()> {
    if e.ids.is_empty() {
        bail!("{location}: `ids` is empty; name the question ids this entry answers");
    }
    if e.aligned.is_empty() || e.aligned.len() != e.misaligned.len() {
        bail!(
            "{location}: {} aligned and {} misaligned answers; pair i is (aligned[i], misaligned[i]), so both lists must be non-empty and equally long",
            e.aligned.len(),
            e.misaligned.len()
        );
    }
    let blank = |list: &[String]| list.iter().position(|a| a.trim().is_empty());
    for (name, list) in [("aligned", &e.aligned), ("misaligned", &e.misaligned)] {
        if let Some(i) = blank(list) {
            bail!("{location}: {name}[{i}] is empty");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_entries_under_every_id() {
        let set = parse(
            "- ids: [a, b]\n  aligned: [x, y]\n  misaligned: [p, q]\n- ids: [c]\n  aligned: [z]\n  misaligned: [r]\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(set.for_question("b").unwrap().misaligned, ["p", "q"]);
        assert_eq!(set.for_question("c").unwrap().aligned, ["z"]);
        assert!(set.for_question("d").is_none());
    }

    #[test]
    fn refuses_unequal_lists_duplicate_ids_and_unknown_fields() {
        let err = |text: &str| parse(text, "t.yaml").unwrap_err().to_string();
        let e = err("- ids: [a]\n  aligned: [x, y]\n  misaligned: [p]\n");
        assert!(
            e.contains("t.yaml: entry 1") && e.contains("equally long"),
            "{e}"
        );
        let e = err("- ids: [a]\n  aligned: [x]\n  misaligned: [p]\n- ids: [a]\n  aligned: [x]\n  misaligned: [p]\n");
        assert!(e.contains("`a`") && e.contains("entry 2"), "{e}");
        let e = format!(
            "{:#}",
            parse(
                "- ids: [a]\n  aligned: [x]\n  misaligned: [p]\n  note: hi\n",
                "t.yaml"
            )
            .unwrap_err()
        );
        assert!(e.contains("note"), "{e}");
        let e = err("- ids: [a]\n  aligned: [' ']\n  misaligned: [p]\n");
        assert!(e.contains("aligned[0] is empty"), "{e}");
    }
}
