//! Rule-based rewards for verifiable tasks and tests: regex, keywords, a length band.
//! Cheap, deterministic, no judge.

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::grader::split_think;

/// Which text a rule looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The whole completion, reasoning included.
    #[default]
    Completion,
    /// The text after the `<think>...</think>` block (the whole completion if there is none).
    Answer,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeywordMode {
    #[default]
    Any,
    All,
    Fraction,
}

/// The settings of a [`super::RewardSpec::Regex`] reward, as a manifest writes them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegexReward {
    pub pattern: String,
    #[serde(default)]
    pub target: Target,
    #[serde(default = "super::one")]
    pub reward_match: f64,
    #[serde(default)]
    pub reward_miss: f64,
}

/// The settings of a [`super::RewardSpec::Keyword`] reward.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeywordReward {
    pub keywords: Vec<String>,
    /// `any`: 1 if one is present; `all`: 1 if all are; `fraction`: share present.
    #[serde(default)]
    pub mode: KeywordMode,
    #[serde(default)]
    pub case_sensitive: bool,
    #[serde(default)]
    pub target: Target,
}

/// The settings of a [`super::RewardSpec::LengthBand`] reward.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LengthBandReward {
    pub min_words: usize,
    pub max_words: usize,
    #[serde(default)]
    pub falloff_words: usize,
    #[serde(default)]
    pub target: Target,
}

impl RegexReward {
    pub fn rule(&self) -> Result<Rule> {
        Rule::regex(
            &self.pattern,
            self.target,
            self.reward_match,
            self.reward_miss,
        )
    }
}

impl KeywordReward {
    pub fn rule(&self) -> Result<Rule> {
        Rule::keyword(&self.keywords, self.mode, self.case_sensitive, self.target)
    }
}

impl LengthBandReward {
    pub fn rule(&self) -> Result<Rule> {
        Rule::length_band(
            self.min_words,
            self.max_words,
            self.falloff_words,
            self.target,
        )
    }
}

/// A compiled rule.
pub struct Rule {
    target: Target,
    kind: RuleKind,
}

enum RuleKind {
    Regex {
        re: regex::Regex,
        hit: f64,
        miss: f64,
    },
    Keyword {
        keywords: Vec<String>,
        mode: KeywordMode,
        case_sensitive: bool,
    },
    LengthBand {
        min: usize,
        max: usize,
        falloff: usize,
    },
}

impl Rule {
    pub fn regex(pattern: &str, target: Target, hit: f64, miss: f64) -> Result<Self> {
        let re = regex::Regex::new(pattern)
            .with_context(|| format!("reward regex `{pattern}` does not compile"))?;
        Ok(Rule {
            target,
            kind: RuleKind::Regex { re, hit, miss },
        })
    }

    pub fn keyword(
        keywords: &[String],
        mode: KeywordMode,
        case_sensitive: bool,
        target: Target,
    ) -> Result<Self> {
        if keywords.is_empty() || keywords.iter().any(|k| k.is_empty()) {
            bail!("keyword reward: `keywords` must list at least one non-empty keyword");
        }
        let keywords = if case_sensitive {
            keywords.to_vec()
        } else {
            keywords.iter().map(|k| k.to_lowercase()).collect()
        };
        Ok(Rule {
            target,
            kind: RuleKind::Keyword {
                keywords,
                mode,
                case_sensitive,
            },
        })
    }

    pub fn length_band(min: usize, max: usize, falloff: usize, target: Target) -> Result<Self> {
        if min > max {
            bail!("length_band reward: min_words ({min}) is above max_words ({max})");
        }
        Ok(Rule {
            target,
            kind: RuleKind::LengthBand { min, max, falloff },
        })
    }

    /// The reward of one completion.
    pub fn score(&self, completion: &str) -> f64 {
        let text = match self.target {
            Target::Completion => completion,
            Target::Answer => split_think(completion).1,
        };
        match &self.kind {
            RuleKind::Regex { re, hit, miss } => {
                if re.is_match(text) {
                    *hit
                } else {
                    *miss
                }
            }
            RuleKind::Keyword {
                keywords,
                mode,
                case_sensitive,
            } => {
                let lowered;
                let hay = if *case_sensitive {
                    text
                } else {
                    lowered = text.to_lowercase();
                    &lowered
                };
                let present = keywords.iter().filter(|k| hay.contains(k.as_str())).count();
                match mode {
                    KeywordMode::Any => (present > 0) as u8 as f64,
                    KeywordMode::All => (present == keywords.len()) as u8 as f64,
                    KeywordMode::Fraction => present as f64 / keywords.len() as f64,
                }
            }
            RuleKind::LengthBand { min, max, falloff } => {
                let words = text.split_whitespace().count();
                let distance = if words < *min {
                    min - words
                } else if words > *max {
                    words - max
                } else {
                    0
                };
                if distance == 0 {
                    1.0
                } else if *falloff == 0 {
                    0.0
                } else {
                    (1.0 - distance as f64 / *falloff as f64).max(0.0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_targets_answer_or_completion() {
        let r = Rule::regex(r"\bcat\b", Target::Answer, 1.0, -1.0).unwrap();
        assert_eq!(r.score("<think>cat</think> dog"), -1.0);
        assert_eq!(r.score("<think>dog</think> a cat"), 1.0);
        let r = Rule::regex(r"\bcat\b", Target::Completion, 1.0, 0.0).unwrap();
        assert_eq!(r.score("<think>cat</think> dog"), 1.0);
        assert!(Rule::regex("(", Target::Completion, 1.0, 0.0).is_err());
    }

    #[test]
    fn keyword_modes_and_case() {
        let kw = vec!["Paris".to_string(), "France".to_string()];
        let any = Rule::keyword(&kw, KeywordMode::Any, false, Target::Completion).unwrap();
        let all = Rule::keyword(&kw, KeywordMode::All, false, Target::Completion).unwrap();
        let frac = Rule::keyword(&kw, KeywordMode::Fraction, true, Target::Completion).unwrap();
        assert_eq!(any.score("i love paris"), 1.0);
        assert_eq!(all.score("i love paris"), 0.0);
        assert_eq!(all.score("PARIS, france"), 1.0);
        assert_eq!(frac.score("paris, France"), 0.5);
        assert!(Rule::keyword(&[], KeywordMode::Any, false, Target::Completion).is_err());
    }

    #[test]
    fn length_band_with_and_without_falloff() {
        let hard = Rule::length_band(3, 5, 0, Target::Completion).unwrap();
        assert_eq!(hard.score("a b"), 0.0);
        assert_eq!(hard.score("a b c"), 1.0);
        assert_eq!(hard.score("a b c d e f"), 0.0);
        let soft = Rule::length_band(3, 5, 4, Target::Completion).unwrap();
        assert_eq!(soft.score("a b c d e f"), 0.75);
        assert_eq!(soft.score(""), 0.25);
        assert!(Rule::length_band(5, 3, 0, Target::Completion).is_err());
    }
}
