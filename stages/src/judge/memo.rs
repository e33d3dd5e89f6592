//! The memo layer every judge goes through (see the module docs of [`crate::judge`]).

use std::sync::Arc;

use anyhow::{Context as _, Result};
use emflow_engine::Memo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Judge, Score};

/// Memo namespace for judge calls; bump the suffix if the stored value format changes. It
/// must start with `judge`: `emflow gc --drop-judge-memo` removes the namespaces that do.
const NAMESPACE: &str = "judge.v1";

/// A judge whose every call is looked up in, and stored into, a persistent memo keyed by
/// (judge identity, operation, params, full prompt). Only the misses reach the inner judge,
/// in one batch.
///
/// Only answers are memoised: a call that fails stores nothing (the inner judges turn every
/// fault into an error), an answer the inner judge does not [`Judge::accepts`] is an error
/// and is not stored, and a stored entry that does not parse or is not accepted is treated
/// as a miss and replaced by the fresh answer.
pub struct Memoized {
    inner: Arc<dyn Judge>,
    memo: Arc<dyn Memo>,
}

impl Memoized {
    pub fn new(inner: Arc<dyn Judge>, memo: Arc<dyn Memo>) -> Self {
        Memoized { inner, memo }
    }

    fn key(&self, op: &str, params: &serde_json::Value, prompt: &str) -> Vec<u8> {
        let canonical = serde_json::json!([self.inner.identity(), op, params, prompt]);
        blake3::hash(canonical.to_string().as_bytes())
            .as_bytes()
            .to_vec()
    }

    /// Answers what the memo knows, asks `call` for the rest (in input order), stores them.
    /// `accepts` tells an answer from a malformed value, for memo entries and fresh answers.
    fn cached<T: Serialize + DeserializeOwned + Clone>(
        &self,
        op: &str,
        params: serde_json::Value,
        prompts: &[String],
        accepts: impl Fn(&T) -> bool,
        call: impl FnOnce(&[String]) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let keys: Vec<Vec<u8>> = prompts.iter().map(|p| self.key(op, &params, p)).collect();
        let mut out: Vec<Option<T>> = keys
            .iter()
            .map(|k| {
                self.memo
                    .get(NAMESPACE, k)
                    .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                    .filter(|v| accepts(v))
            })
            .collect();
        let missing: Vec<usize> = (0..prompts.len()).filter(|&i| out[i].is_none()).collect();
        if !missing.is_empty() {
            let asked: Vec<String> = missing.iter().map(|&i| prompts[i].clone()).collect();
            let answers = call(&asked)?;
            anyhow::ensure!(
                answers.len() == asked.len(),
                "judge {} returned {} answers for {} prompts",
                self.inner.identity(),
                answers.len(),
                asked.len()
            );
            if let Some(pos) = answers.iter().position(|a| !accepts(a)) {
                anyhow::bail!(
                    "judge {} gave a malformed {op} answer for prompt {} of {}; nothing was memoised",
                    self.inner.identity(),
                    missing[pos] + 1,
                    prompts.len()
                );
            }
            for (&i, answer) in missing.iter().zip(answers) {
                let bytes = serde_json::to_vec(&answer)
                    .context("serialising a judge answer for the memo")?;
                self.memo
                    .put(NAMESPACE, &keys[i], &bytes)
                    .context("storing a judge answer in the memo")?;
                // Answer with the stored form, so a fresh answer and a memo hit are the same
                // bits (JSON float parsing is not guaranteed to round-trip the last ulp).
                out[i] =
                    Some(serde_json::from_slice(&bytes).context("reading back a judge answer")?);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

impl Judge for Memoized {
    fn identity(&self) -> &str {
        self.inner.identity()
    }

    fn score_0_100(&self, prompts: &[String]) -> Result<Vec<Score>> {
        self.cached::<Score>(
            "score_0_100",
            serde_json::Value::Null,
            prompts,
            |s| self.inner.accepts(s),
            |p| self.inner.score_0_100(p),
        )
    }

    fn accepts(&self, score: &Score) -> bool {
        self.inner.accepts(score)
    }

    fn complete(&self, prompts: &[String], max_tokens: usize) -> Result<Vec<String>> {
        let params = serde_json::json!({ "max_tokens": max_tokens, "temperature": 0 });
        self.cached::<String>(
            "complete",
            params,
            prompts,
            |_| true,
            |p| self.inner.complete(p, max_tokens),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use emflow_engine::context::MemoryMemo;

    use super::*;

    /// What the test judge answers to `score_0_100`.
    enum Answer {
        /// The prompt's length, so that each prompt gets its own score.
        Length,
        /// The same score for every prompt.
        Fixed(Score),
        /// An error: the judge is down.
        Down,
    }

    /// A judge that answers as told and counts its calls and the prompts it was asked.
    struct Scripted {
        answer: Answer,
        calls: AtomicUsize,
        prompts_seen: AtomicUsize,
    }

    fn scripted(answer: Answer) -> Arc<Scripted> {
        Arc::new(Scripted {
            answer,
            calls: AtomicUsize::new(0),
            prompts_seen: AtomicUsize::new(0),
        })
    }

    impl Scripted {
        fn count(&self, prompts: &[String]) {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.prompts_seen.fetch_add(prompts.len(), Ordering::SeqCst);
        }
    }

    impl Judge for Scripted {
        fn identity(&self) -> &str {
            "scripted"
        }
        fn score_0_100(&self, prompts: &[String]) -> Result<Vec<Score>> {
            self.count(prompts);
            let by_length = |p: &String| Score {
                value: Some(p.len() as f64),
                mass: 1.0,
                text: None,
            };
            match &self.answer {
                Answer::Length => Ok(prompts.iter().map(by_length).collect()),
                Answer::Fixed(s) => Ok(vec![s.clone(); prompts.len()]),
                Answer::Down => anyhow::bail!("the judge is down"),
            }
        }
        fn complete(&self, prompts: &[String], max_tokens: usize) -> Result<Vec<String>> {
            self.count(prompts);
            Ok(prompts
                .iter()
                .map(|p| format!("{p}:{max_tokens}"))
                .collect())
        }
    }

    #[test]
    fn second_pass_makes_no_inner_calls_and_only_misses_are_asked() {
        let inner = scripted(Answer::Length);
        let memo: Arc<dyn Memo> = Arc::new(MemoryMemo::default());
        let judge = Memoized::new(inner.clone(), memo.clone());
        let prompts: Vec<String> = vec!["a".into(), "bb".into()];
        let first = judge.score_0_100(&prompts).unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 1);

        // A fresh wrapper on the same memo: a rerun in another process.
        let judge2 = Memoized::new(inner.clone(), memo.clone());
        assert_eq!(judge2.score_0_100(&prompts).unwrap(), first);
        assert_eq!(
            inner.calls.load(Ordering::SeqCst),
            1,
            "a rerun must not call the judge"
        );

        let mixed: Vec<String> = vec!["bb".into(), "ccc".into()];
        let got = judge2.score_0_100(&mixed).unwrap();
        assert_eq!(got[0].value, Some(2.0));
        assert_eq!(got[1].value, Some(3.0));
        assert_eq!(
            inner.prompts_seen.load(Ordering::SeqCst),
            3,
            "only the miss is asked"
        );

        // Params are part of the key: another max_tokens is another call.
        judge2.complete(&prompts, 5).unwrap();
        judge2.complete(&prompts, 5).unwrap();
        judge2.complete(&prompts, 6).unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 4);
    }

    fn good() -> Score {
        Score {
            value: Some(70.0),
            mass: 0.9,
            text: None,
        }
    }

    #[test]
    fn failures_and_malformed_answers_are_never_memoised() {
        let memo: Arc<dyn Memo> = Arc::new(MemoryMemo::default());
        let prompts = vec!["q".to_string()];
        let down = Memoized::new(scripted(Answer::Down), memo.clone());
        let key = down.key("score_0_100", &serde_json::Value::Null, "q");
        assert!(down.score_0_100(&prompts).is_err());
        assert_eq!(memo.get(NAMESPACE, &key), None);

        // A value without mass is no judgement the formulas can give.
        let broken = Memoized::new(
            scripted(Answer::Fixed(Score {
                value: Some(50.0),
                mass: 0.0,
                text: None,
            })),
            memo.clone(),
        );
        let err = broken.score_0_100(&prompts).unwrap_err().to_string();
        assert!(
            err.contains("malformed") && err.contains("nothing was memoised"),
            "{err}"
        );
        assert_eq!(memo.get(NAMESPACE, &key), None);

        let up = scripted(Answer::Fixed(good()));
        let judge = Memoized::new(up.clone(), memo.clone());
        assert_eq!(judge.score_0_100(&prompts).unwrap(), vec![good()]);
        assert!(memo.get(NAMESPACE, &key).is_some());
    }

    #[test]
    fn a_malformed_memo_entry_is_a_miss_and_is_replaced() {
        let memo: Arc<dyn Memo> = Arc::new(MemoryMemo::default());
        let inner = scripted(Answer::Fixed(good()));
        let judge = Memoized::new(inner.clone(), memo.clone());
        let key = judge.key("score_0_100", &serde_json::Value::Null, "q");
        for planted in [
            br#"{"value":null,"mass":0.9}"#.as_slice(),
            b"not json",
            br#"{"value":70.0,"mass":0.9}"#,
        ] {
            memo.put(NAMESPACE, &key, planted).unwrap();
            let before = inner.calls.load(Ordering::SeqCst);
            assert_eq!(judge.score_0_100(&["q".to_string()]).unwrap(), vec![good()]);
            // The last plant parses and is well formed: it is served, the judge is not asked.
            let asked = inner.calls.load(Ordering::SeqCst) - before;
            let well_formed = planted.starts_with(br#"{"value":70"#);
            assert_eq!(
                asked,
                usize::from(!well_formed),
                "{}",
                String::from_utf8_lossy(planted)
            );
            if !well_formed {
                assert_eq!(
                    serde_json::from_slice::<Score>(&memo.get(NAMESPACE, &key).unwrap()).unwrap(),
                    good()
                );
            }
        }
    }
}
