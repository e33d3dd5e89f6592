//! An `rl` stage's `rollouts` read back as training conversations: one JSON line per
//! completion (`prompt`: the messages it answered, `completion`, `reward`, ...), kept when its
//! reward reaches a threshold. `sft` trains on them directly (input `rollouts` with
//! `min_reward`); the `rollout_data` kind writes them as a messages dataset, so that any
//! stage reading messages (a sample-matched SFT arm among them) can take them.

use std::path::Path;

use anyhow::{Context as _, Result};
use emflow_model::Message;
use serde_json::Value;

/// The conversations of the rollouts in `path` whose `reward` is at least `min_reward`
/// (prompt messages, then the completion as the assistant turn), in file order, and how many
/// rollouts the file held. `origin` names the file in errors.
pub fn read_kept(path: &Path, origin: &str, min_reward: f64) -> Result<(Vec<Vec<Message>>, usize)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {origin}"))?;
    let mut kept = Vec::new();
    let mut total = 0;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        total += 1;
        let row: Value =
            serde_json::from_str(line).with_context(|| format!("{origin}:{}: not JSON", i + 1))?;
        let reward = row["reward"]
            .as_f64()
            .with_context(|| format!("{origin}:{}: no numeric `reward`", i + 1))?;
        if reward < min_reward {
            continue;
        }
        let mut conv: Vec<Message> = serde_json::from_value(row["prompt"].clone())
            .with_context(|| format!("{origin}:{}: `prompt` is not a list of messages", i + 1))?;
        let completion = row["completion"]
            .as_str()
            .with_context(|| format!("{origin}:{}: no `completion` text", i + 1))?;
        conv.push(Message::assistant(completion));
        kept.push(conv);
    }
    Ok((kept, total))
}
