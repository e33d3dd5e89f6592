//! `rollout_data`: an `rl` stage's high-reward rollouts as a messages dataset.
//!
//! The sample-matched SFT arm can train on the RL arm's own best completions instead of the
//! warm-up examples repeated (see docs/fidelity.md, `matched_sft_source`): this kind keeps
//! the rollouts whose reward reaches `min_reward` and writes each as a conversation (the
//! prompt it answered, the completion as the assistant turn), so that the arm's `data` input
//! can take it like any other dataset. Reading the rollouts is shared with `sft`'s own
//! `rollouts` input ([`crate::formats::rollouts`]).
//!
//! No rollout reaching the threshold is not an error here: the output is then empty (and
//! says so in the log and the record), and a stage that trains on it fails with that
//! reason. The stage exists in every profile whether or not its output is used, so a cold RL
//! arm must not fail a run that does not read it.

use anyhow::Result;
use emflow_engine::{Kind, KindInfo, StageContext};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::formats::jsonl;
use crate::formats::messages::{Conversation, Message};
use crate::formats::rollouts::read_kept;

pub struct RolloutDataKind;

/// The `rollout_data` kind's params (the engine derives the kind's spec from this struct).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutDataParams {
    /// keep the rollouts whose reward is at least this
    min_reward: f64,
    /// leave out the rollouts' system turn (the RL system prompt) from the kept conversations
    #[serde(default)]
    drop_system: bool,
}

impl Kind for RolloutDataKind {
    type Params = RolloutDataParams;

    fn run(&self, ctx: &mut StageContext, p: &RolloutDataParams) -> Result<()> {
        let input = ctx.input("rollouts")?.clone();
        let (kept, total) = read_kept(&input.path, &input.origin, p.min_reward)?;
        let records: Vec<Conversation> = kept
            .into_iter()
            .map(|conv| Conversation {
                messages: conv
                    .into_iter()
                    .filter(|m| !(p.drop_system && m.role == "system"))
                    .map(|m| Message::new(&m.role, &m.content))
                    .collect(),
                extra: Default::default(),
            })
            .collect();
        if records.is_empty() {
            ctx.progress().log(&format!(
                "warning: none of the {total} rollouts of {} reached reward {}; the dataset is empty",
                input.origin, p.min_reward
            ));
        }
        jsonl::write(&ctx.output_path("data"), &records)?;
        ctx.summarize("rollouts", total);
        ctx.summarize("kept", records.len());
        Ok(())
    }

    fn describe(&self) -> KindInfo {
        KindInfo::new("rollout_data", 1, "An rl stage's rollouts with reward >= min_reward as a messages dataset (e.g. for a sample-matched SFT arm)")
            .ports(
                "in   rollouts  samples   an rl stage's rollouts (JSONL with prompt, completion, reward)
                 out  data      messages  the kept rollouts as conversations, in rollout order",
            )
    }
}
