//! Where every random stream in emflow comes from: one rule, one function ([`key`]).
//!
//! # The rule
//!
//! A random stream is ChaCha keyed by 32 bytes,
//!
//! ```text
//! key = blake3(tag || part_1 || ... || part_n)
//! ```
//!
//! where `tag` names the stream's purpose and the parts are that purpose's fixed list of
//! inputs (the stage's seed first, then what the stream is for: a prompt key, a sample index,
//! ...). An integer part is its 8 little-endian bytes; a string part is its length (8 bytes,
//! little-endian) followed by its UTF-8 bytes. No tag is a prefix of another (a test checks),
//! and every part has a known length, so two different (purpose, parts) never hash the same
//! text. Where an API carries a `u64` seed rather than a stream (a `GenerationRequest` does),
//! the seed is the key's first 8 bytes, little-endian.
//!
//! Why this rule: a stream is then a pure function of the stage's seed and of *what* is drawn,
//! never of batch size, thread count or the order of calls, which is what lets a resumed or
//! re-batched run reproduce every byte; and distinct purposes never share a stream by accident.
//! It is the rule the token sampler's seeds always followed, so generation (every `eval`,
//! `rl` and `safety_data` sample) keeps its exact bytes.
//!
//! # Streams older than the rule
//!
//! Five streams were keyed otherwise before the rule was written down. Each feeds outputs that
//! users hold in their caches under stage keys that do not see code, so moving one onto the
//! rule would change output bytes under an unchanged key unless the kinds' versions were
//! bumped, and that would rerun the expensive part of every study for no gain in the results:
//!
//! | purpose | derivation kept | a move would change |
//! |---|---|---|
//! | [`Purpose::LoraInit`], [`Purpose::LoraDropout`] | the rule, but the parameter name is written bare (no length) as the last part | every `sft` and `rl` adapter |
//! | [`Purpose::LoadedAdapterDropout`] | `seed_from_u64(0)` | `sft`/`rl` continuing a loaded adapter with dropout |
//! | [`Purpose::EpochOrder`] | blake3 of the text `"{seed}:{stream}:{epoch}"` | `sft` and `rl` data order, so their adapters |
//! | [`Purpose::DatasetPermutation`] | the seed's 8 little-endian bytes, zero-padded | `dataset` shuffle/sample/split, so every stage downstream |
//! | [`Purpose::Bootstrap`] | rand's `seed_from_u64` expansion of the seed | `eval` summaries and `report` intervals |
//!
//! So the decision is: these keep their bytes, each spelled out once, in [`key`], as a named
//! exception; every new stream follows the rule, and a kind that bumps its version for some
//! other reason should move its legacy stream onto the rule in the same change.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// What a random stream is for, with the inputs it is a function of.
#[derive(Clone, Copy, Debug)]
pub enum Purpose<'a> {
    /// The seed of one generated sample: the stage's seed, the prompt's key, the sample's index.
    Sample {
        stage_seed: u64,
        prompt: &'a str,
        index: u64,
    },
    /// The token-sampling stream of one sequence, from its request's seed.
    TokenSampler { seed: u64 },
    /// Random weights of a test or benchmark model (no stage kind uses them).
    RandomWeights { seed: u64 },
    /// LoRA's A initialisation of one parameter, named as PEFT names it. Legacy: the name is
    /// the last part and written without its length.
    LoraInit { seed: u64, param: &'a str },
    /// Dropout masks of an adapter attached fresh. Legacy: [`Purpose::LoraInit`]'s derivation
    /// with the parameter name `dropout` (no PEFT parameter has that name).
    LoraDropout { seed: u64 },
    /// Dropout masks of a model no fresh adapter was attached to (an adapter loaded from a
    /// file). Legacy: `seed_from_u64(0)`.
    LoadedAdapterDropout,
    /// The data order of one epoch of one training data stream (`data`, `prompts`, `safety`).
    /// Legacy: blake3 of the text `"{seed}:{stream}:{epoch}"`.
    EpochOrder {
        seed: u64,
        stream: &'a str,
        epoch: u64,
    },
    /// A `dataset` permutation (shuffle, sample, split). Legacy: the seed's little-endian bytes
    /// padded with zeros, used as the key itself.
    DatasetPermutation { seed: u64 },
    /// One bootstrap's resampling stream. Legacy: rand's `seed_from_u64` (PCG32 expansion) of
    /// the seed; callers still mix their salts into the seed arithmetically (`eval`: the
    /// statistic by xor and the question by `(seed + 1 + i) * 0x9E3779B9`; `report`: the
    /// condition by addition).
    Bootstrap { seed: u64 },
    /// Which of several fixed texts (e.g. a refusal template) a `dataset` row gets: the
    /// stage's seed and the row's text, so the choice follows the text, not its position.
    TemplateChoice { seed: u64, text: &'a str },
    /// One bootstrap of the judge-free log-probability margin (`eval`'s contrast set, and
    /// `report` pooling it over seeds): the stage's seed and what is resampled (`eval`: `""`
    /// for all pairs, else the question id; `report`: the condition).
    MarginBootstrap { seed: u64, scope: &'a str },
}

/// Tags of the purposes that follow the rule (and of LoRA's, which follows it up to the bare
/// name). Kept in one list so a test can check that none is a prefix of another.
const SAMPLE_TAG: &str = "emflow-sample-seed-v1";
const TOKEN_SAMPLER_TAG: &str = "emflow-sampler-v1";
const RANDOM_WEIGHTS_TAG: &str = "emflow-random-weights-v1";
const LORA_TAG: &str = "emflow-lora-init";
const TEMPLATE_CHOICE_TAG: &str = "emflow-template-choice-v1";
const MARGIN_BOOTSTRAP_TAG: &str = "emflow-margin-bootstrap-v1";
#[cfg(test)]
const TAGS: [&str; 6] = [
    SAMPLE_TAG,
    TOKEN_SAMPLER_TAG,
    RANDOM_WEIGHTS_TAG,
    LORA_TAG,
    TEMPLATE_CHOICE_TAG,
    MARGIN_BOOTSTRAP_TAG,
];

/// One input of a derivation under the rule.
enum Part<'a> {
    Int(u64),
    Str(&'a str),
    /// A string written without its length; only LoRA's legacy derivation has one, as the last
    /// part, where it stays unambiguous because it runs to the end of the hashed text.
    BareLast(&'a str),
}

/// The 32-byte key of the stream for `purpose`: the one place a seed becomes randomness.
pub fn key(purpose: Purpose<'_>) -> [u8; 32] {
    use Part::{BareLast, Int, Str};
    match purpose {
        Purpose::Sample {
            stage_seed,
            prompt,
            index,
        } => hash(SAMPLE_TAG, &[Int(stage_seed), Str(prompt), Int(index)]),
        Purpose::TokenSampler { seed } => hash(TOKEN_SAMPLER_TAG, &[Int(seed)]),
        Purpose::RandomWeights { seed } => hash(RANDOM_WEIGHTS_TAG, &[Int(seed)]),
        Purpose::LoraInit { seed, param } => hash(LORA_TAG, &[Int(seed), BareLast(param)]),
        Purpose::LoraDropout { seed } => hash(LORA_TAG, &[Int(seed), BareLast("dropout")]),
        Purpose::LoadedAdapterDropout => ChaCha8Rng::seed_from_u64(0).get_seed(),
        Purpose::EpochOrder {
            seed,
            stream,
            epoch,
        } => *blake3::hash(format!("{seed}:{stream}:{epoch}").as_bytes()).as_bytes(),
        Purpose::DatasetPermutation { seed } => {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&seed.to_le_bytes());
            key
        }
        // `get_seed` returns exactly the key `seed_from_u64` expanded the seed to.
        Purpose::Bootstrap { seed } => ChaCha8Rng::seed_from_u64(seed).get_seed(),
        Purpose::TemplateChoice { seed, text } => {
            hash(TEMPLATE_CHOICE_TAG, &[Int(seed), Str(text)])
        }
        Purpose::MarginBootstrap { seed, scope } => {
            hash(MARGIN_BOOTSTRAP_TAG, &[Int(seed), Str(scope)])
        }
    }
}

/// The stream for `purpose` as a ChaCha generator (`ChaCha8Rng`, or `ChaCha20Rng` for token
/// sampling, whose stream predates this module).
pub fn stream<R: SeedableRng<Seed = [u8; 32]>>(purpose: Purpose<'_>) -> R {
    R::from_seed(key(purpose))
}

/// A `u64` seed for `purpose`, where an API carries a seed rather than a stream.
pub fn seed_u64(purpose: Purpose<'_>) -> u64 {
    let key = key(purpose);
    let mut first = [0u8; 8];
    first.copy_from_slice(&key[..8]);
    u64::from_le_bytes(first)
}

fn hash(tag: &str, parts: &[Part<'_>]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(tag.as_bytes());
    for (i, part) in parts.iter().enumerate() {
        match part {
            Part::Int(x) => h.update(&x.to_le_bytes()),
            Part::Str(s) => h
                .update(&(s.len() as u64).to_le_bytes())
                .update(s.as_bytes()),
            Part::BareLast(s) => {
                debug_assert_eq!(i + 1, parts.len(), "a bare string must be the last part");
                h.update(s.as_bytes())
            }
        };
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn no_tag_is_a_prefix_of_another() {
        for a in TAGS {
            for b in TAGS {
                assert!(a == b || !b.starts_with(a), "{a:?} is a prefix of {b:?}");
            }
        }
    }

    #[test]
    fn sample_seeds_depend_on_every_part() {
        let seed = |s, p, i| {
            seed_u64(Purpose::Sample {
                stage_seed: s,
                prompt: p,
                index: i,
            })
        };
        let a = seed(1, "p", 0);
        assert_eq!(a, seed(1, "p", 0));
        assert_ne!(a, seed(2, "p", 0));
        assert_ne!(a, seed(1, "q", 0));
        assert_ne!(a, seed(1, "p", 1));
    }

    /// Pinned first draws of every stream, taken from the derivations as they were before this
    /// module gathered them. A change here changes the outputs the module doc's table lists:
    /// it must come with the version bumps of those kinds.
    #[test]
    fn golden_first_draws() {
        let first8 = |p| stream::<ChaCha8Rng>(p).next_u64();
        let sample = |stage_seed, prompt, index| {
            seed_u64(Purpose::Sample {
                stage_seed,
                prompt,
                index,
            })
        };
        let param = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        let got = [
            sample(1, "p", 0),
            sample(42, "prompt-3", 5),
            stream::<ChaCha20Rng>(Purpose::TokenSampler { seed: 7 }).next_u64(),
            first8(Purpose::LoraInit { seed: 3, param }),
            first8(Purpose::LoraDropout { seed: 3 }),
            first8(Purpose::LoadedAdapterDropout),
            first8(Purpose::Bootstrap { seed: 5 }),
        ];
        assert_eq!(
            got,
            [
                5009660304443953014,
                16633675536651299551,
                15613518949828364912,
                7523092092579852350,
                8211809855000411669,
                13080132717333068652,
                3712401772566903643,
            ]
        );
    }
}
