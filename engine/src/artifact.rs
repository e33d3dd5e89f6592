//! What flows along the DAG's edges and into a kind: the declared [`ArtifactType`] of an
//! input or output port, the [`Artifact`] a stage is handed (a read-only path with its
//! digest), and the [`Params`] it is configured with. Both the kind contract
//! ([`crate::kind`]) and the stage context ([`crate::context`]) build on these, so they live
//! here, below both.

use std::path::PathBuf;

use serde_json::Value;

/// The type of an artifact flowing along a DAG edge. Validation refuses an edge whose
/// producer and consumer disagree on it, so a typo'd wiring fails at plan time, not after
/// an hour of training.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactType {
    /// Chat conversations, JSONL: one `{"messages": [{"role", "content"}, ...], ...}` a line.
    Messages,
    /// Evaluation questions, JSONL: one question (id, paraphrases, system, judge prompts) a line.
    Questions,
    /// A model: a GGUF file or an HF-format directory (config.json, *.safetensors, tokenizer.json).
    Model,
    /// A LoRA adapter directory (PEFT layout: adapter_model.safetensors + adapter_config.json),
    /// or a full fine-tuned weight directory.
    Adapter,
    /// Generated samples or RL rollouts, JSONL.
    Samples,
    /// Judge scores, JSONL.
    Judgments,
    /// A JSON summary of an evaluation.
    Summary,
    /// Training metrics, JSONL: one object per step.
    Metrics,
    /// A human-facing report directory (HTML, Markdown).
    Report,
    /// Any single file; matches any file-typed artifact on the consuming side.
    File,
    /// Any directory.
    Dir,
}

impl ArtifactType {
    /// Whether an artifact of type `produced` may be fed into a port declared `self`.
    /// `File` and `Dir` ports accept anything of that shape; other types must match.
    pub fn accepts(self, produced: ArtifactType) -> bool {
        use ArtifactType::*;
        match self {
            File => !matches!(produced, Dir | Adapter | Report),
            Dir => matches!(produced, Dir | Adapter | Report | Model),
            wanted => wanted == produced,
        }
    }

    pub fn name(self) -> &'static str {
        use ArtifactType::*;
        match self {
            Messages => "messages",
            Questions => "questions",
            Model => "model",
            Adapter => "adapter",
            Samples => "samples",
            Judgments => "judgments",
            Summary => "summary",
            Metrics => "metrics",
            Report => "report",
            File => "file",
            Dir => "dir",
        }
    }

    /// Every artifact type, in declaration order.
    pub const ALL: [ArtifactType; 11] = {
        use ArtifactType::*;
        [
            Messages, Questions, Model, Adapter, Samples, Judgments, Summary, Metrics, Report,
            File, Dir,
        ]
    };

    /// The type [`ArtifactType::name`] calls `name`.
    pub fn from_name(name: &str) -> Option<ArtifactType> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Params after profile overlay, `--set`, reference substitution and defaults: a JSON object.
pub type Params = serde_json::Map<String, Value>;

/// One artifact handed to a stage as input.
#[derive(Clone, Debug)]
pub struct Artifact {
    /// Read-only file or directory. Never write here.
    pub path: PathBuf,
    /// blake3 content digest (hex) of the file, or of the canonical tree listing of a directory.
    pub digest: String,
    pub ty: ArtifactType,
    /// Where it came from, for messages: `stage[axis=value].output`, `models.NAME` or `file:PATH`.
    pub origin: String,
}
