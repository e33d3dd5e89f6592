//! An `rl` stage's `rollouts` read back as training conversations: one JSON line per
//! completion in TRL's conversational prompt-completion form (`prompt`: the messages it
//! answered, `completion`: the answer as messages, `[{"role": "assistant", "content": ...}]`;
//! then `reward`, ...), kept when its reward reaches a threshold. `sft` trains on them directly (input `rollouts` with
//! `min_reward`); the `rollout_data` kind writes them as a messages dataset, so that any
//! stage reading messages (a sample-matched SFT arm among them) can take them.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use emflow_model::Message;
use serde_json::Value;

/// The conversations of the rollouts in `path` whose `reward` is at least `min_reward`
/// (prompt messages, then the completion's messages), in file order, and how many
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
        conv.extend(completion_messages(&row["completion"]).with_context(|| {
            format!("{origin}:{}: `completion` is not a list of messages", i + 1)
        })?);
        kept.push(conv);
    }
    Ok((kept, total))
}

/// A rollout's `completion` messages. A string is what `rl` wrote before version 4; it is
/// refused with the way out rather than read as a guess.
fn completion_messages(completion: &Value) -> Result<Vec<Message>> {
    if completion.is_string() {
        bail!(
            "it is a string, as `rl` wrote rollouts before kind version 4; re-run the rl stage \
             (its outputs are now stored under a new key) to get `completion` as messages, \
             [{{\"role\": \"assistant\", \"content\": ...}}]"
        );
    }
    let messages: Vec<Message> = serde_json::from_value(completion.clone())?;
    if messages.is_empty() {
        bail!("the list is empty");
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn completions_are_messages_and_old_strings_are_refused_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollouts.jsonl");
        let row = |completion: Value, reward: f64| {
            json!({"prompt": [{"role": "user", "content": "Q?"}], "completion": completion, "reward": reward})
                .to_string()
        };
        let answer = json!([{"role": "assistant", "content": "A."}]);
        let lines = [row(answer.clone(), 1.0), row(answer, 0.0)];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let (kept, total) = read_kept(&path, "r", 0.5).unwrap();
        assert_eq!(total, 2);
        assert_eq!(kept, [vec![Message::user("Q?"), Message::assistant("A.")]]);

        std::fs::write(&path, row(json!("A."), 1.0)).unwrap();
        let err = format!("{:#}", read_kept(&path, "r", 0.5).unwrap_err());
        assert!(
            err.contains("r:1: `completion` is not a list of messages"),
            "{err}"
        );
        assert!(
            err.contains("before kind version 4; re-run the rl stage"),
            "{err}"
        );
        std::fs::write(&path, row(json!([]), 1.0)).unwrap();
        assert!(read_kept(&path, "r", 0.5).is_err());
    }
}
