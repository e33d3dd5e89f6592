//! Tokens per second over a stage's steps, for the progress log and the stage record's
//! summary (`StageContext::summarize`, shown by `emflow cache show` and `status`) only. A
//! stage's outputs must be the same bytes on every run (`emflow verify`), and wall-clock
//! figures are not, so no rate is ever written into an output (`metrics`, `summary`).

use emflow_engine::context::StageContext;

/// Tokens and the seconds they took, summed over steps.
#[derive(Default)]
pub struct Throughput {
    tokens: u64,
    secs: f64,
}

impl Throughput {
    /// Adds one step's `tokens` done in `secs`; returns that step's rate.
    pub fn add(&mut self, tokens: u64, secs: f64) -> f64 {
        self.tokens += tokens;
        self.secs += secs;
        rate(tokens, secs)
    }

    /// The rate over every step added; `None` before any token (a resumed run that had no
    /// step left to take).
    pub fn per_s(&self) -> Option<f64> {
        (self.tokens > 0).then(|| rate(self.tokens, self.secs))
    }

    /// Puts the rate into the stage record's summary as `key`, rounded to 0.1 token/s
    /// (nothing when no step ran). A resumed run counts from its resume.
    pub fn summarize(&self, ctx: &mut StageContext, key: &str) {
        if let Some(r) = self.per_s() {
            ctx.summarize(key, (r * 10.0).round() / 10.0);
        }
    }
}

/// `tokens / secs`, with a floor on the time so a step too fast to measure is not infinite.
fn rate(tokens: u64, secs: f64) -> f64 {
    tokens as f64 / secs.max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_over_all_steps_and_absent_without_tokens() {
        let mut t = Throughput::default();
        assert_eq!(t.per_s(), None);
        assert_eq!(t.add(100, 1.0), 100.0);
        assert_eq!(t.add(300, 1.0), 300.0);
        assert_eq!(t.per_s(), Some(200.0));
    }
}
