//! Which conditions answer which claim of the study, derived from condition labels alone
//! (stage name and matrix values), so the page draws one figure per claim:
//!
//! - *RL vs sample-matched SFT*: for every domain that has an SFT arm (a stage whose name
//!   mentions `sft`), its warm-up, RL and SFT arms side by side;
//! - *harmless rewards vs base*: RL arms of domains without a matched SFT arm (in the paper's
//!   design only the overtly misaligned rewards get one), with the base model;
//! - *defences*: conditions with a `defence` axis, beside the undefended RL arms of the
//!   overtly misaligned domains and the base model.
//!
//! Conditions evaluated on other questions (in-domain evals) get a figure of their own, and
//! whatever no claim covers lands in "Other conditions", so every arm is drawn. A manifest
//! with none of these names gets one figure of all its arms.

/// A condition label split into its stage name and matrix axes.
pub struct Parsed<'a> {
    pub stage: &'a str,
    pub axes: Vec<(&'a str, &'a str)>,
}

impl<'a> Parsed<'a> {
    pub fn of(label: &'a str) -> Self {
        let Some(open) = label.find('[') else {
            return Parsed {
                stage: label,
                axes: Vec::new(),
            };
        };
        let close = label
            .rfind(']')
            .filter(|c| *c > open)
            .unwrap_or(label.len());
        let inner = &label[open + 1..close];
        let axes = inner.split(',').filter_map(|a| a.split_once('=')).collect();
        Parsed {
            stage: &label[..open],
            axes,
        }
    }

    pub fn axis(&self, name: &str) -> Option<&'a str> {
        self.axes.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }

    fn is_sft(&self) -> bool {
        self.stage.contains("sft")
    }

    fn is_warmup(&self) -> bool {
        self.stage.contains("warmup") || self.stage.contains("warm_up")
    }

    fn is_rl(&self) -> bool {
        !self.is_sft()
            && !self.is_warmup()
            && self.axis("defence").is_none()
            && ["grpo", "rl", "ppo"]
                .iter()
                .any(|w| self.stage.split('_').any(|part| part == *w))
    }

    /// The base model: no matrix axes and `base` in the stage name.
    pub fn is_base(&self) -> bool {
        self.axes.is_empty() && self.stage.split('_').any(|p| p == "base")
    }
}

/// One figure: its title and the conditions it draws, grouped under optional headings.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figure {
    pub title: String,
    pub groups: Vec<(Option<String>, Vec<String>)>,
}

/// The figures for `labels` (all on the same questions), in claim order.
pub fn figures(labels: &[String]) -> Vec<Figure> {
    let parsed: Vec<Parsed> = labels.iter().map(|l| Parsed::of(l)).collect();
    let base: Vec<String> = pick(labels, &parsed, |p| p.is_base());
    let in_domain = |d: &str, f: &dyn Fn(&Parsed) -> bool| {
        pick(labels, &parsed, |p| f(p) && p.axis("domain") == Some(d))
    };
    let mut sft_domains: Vec<&str> = Vec::new();
    let mut rl_domains: Vec<&str> = Vec::new();
    for p in &parsed {
        let list = if p.is_sft() {
            &mut sft_domains
        } else if p.is_rl() {
            &mut rl_domains
        } else {
            continue;
        };
        if let Some(d) = p.axis("domain").filter(|d| !list.contains(d)) {
            list.push(d);
        }
    }
    let mut out = Vec::new();
    let with_base = |mut groups: Vec<(Option<String>, Vec<String>)>| {
        if !base.is_empty() {
            groups.insert(0, (Some("base model".into()), base.clone()));
        }
        groups
    };
    let arms = |d: &str| -> Vec<String> {
        let mut v = in_domain(d, &|p| p.is_warmup());
        v.extend(in_domain(d, &|p| p.is_rl()));
        v.extend(in_domain(d, &|p| p.is_sft()));
        v
    };
    if !sft_domains.is_empty() {
        let groups = sft_domains.iter().map(|d| (Some(d.to_string()), arms(d)));
        out.push(Figure {
            title: "RL vs sample-matched SFT, per domain".into(),
            groups: with_base(groups.collect()),
        });
    }
    let harmless: Vec<&&str> = rl_domains
        .iter()
        .filter(|d| !sft_domains.contains(d))
        .collect();
    if !harmless.is_empty() {
        let groups = harmless.iter().map(|d| (Some(d.to_string()), arms(d)));
        out.push(Figure {
            title: "Harmless rewards vs the base model".into(),
            groups: with_base(groups.collect()),
        });
    }
    let defences = pick(labels, &parsed, |p| p.axis("defence").is_some());
    if !defences.is_empty() {
        let undefended: Vec<String> = sft_domains
            .iter()
            .flat_map(|d| in_domain(d, &|p| p.is_rl()))
            .collect();
        let mut groups = vec![(Some("defences".to_string()), defences)];
        if !undefended.is_empty() {
            groups.insert(0, (Some("no defence".to_string()), undefended));
        }
        out.push(Figure {
            title: "Defences against emergent misalignment".into(),
            groups: with_base(groups),
        });
    }
    out
}

fn pick(labels: &[String], parsed: &[Parsed], f: impl Fn(&Parsed) -> bool) -> Vec<String> {
    labels
        .iter()
        .zip(parsed)
        .filter(|(_, p)| f(p))
        .map(|(l, _)| l.clone())
        .collect()
}

/// The conditions no figure in `figs` draws, in `labels` order.
pub fn uncovered(labels: &[String], figs: &[Figure]) -> Vec<String> {
    labels
        .iter()
        .filter(|l| {
            !figs
                .iter()
                .flat_map(|f| f.groups.iter().flat_map(|(_, g)| g))
                .any(|x| x == *l)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper manifest's conditions give the three claim figures, each with the base.
    #[test]
    fn paper_conditions_make_three_claim_figures() {
        let mut labels = vec!["eval_base".to_string()];
        for d in ["medical", "legal", "security", "aesthetic"] {
            labels.push(format!("eval_warmup[domain={d}]"));
            labels.push(format!("eval_grpo[domain={d}]"));
        }
        labels.push("eval_grpo_rhetoric[domain=argumentation]".into());
        for d in ["medical", "legal", "security"] {
            labels.push(format!("eval_sft_matched[domain={d}]"));
        }
        for d in ["kl", "ldifs"] {
            labels.push(format!("eval_defences[defence={d}]"));
        }
        let figs = figures(&labels);
        let titles: Vec<&str> = figs.iter().map(|f| f.title.as_str()).collect();
        assert_eq!(titles.len(), 3, "{titles:?}");
        let rl_sft = &figs[0].groups;
        assert_eq!(rl_sft[1].0.as_deref(), Some("medical"));
        assert_eq!(
            rl_sft[1].1,
            [
                "eval_warmup[domain=medical]",
                "eval_grpo[domain=medical]",
                "eval_sft_matched[domain=medical]"
            ]
        );
        let harmless: Vec<&str> = figs[1]
            .groups
            .iter()
            .filter_map(|g| g.0.as_deref())
            .collect();
        assert_eq!(harmless, ["base model", "aesthetic", "argumentation"]);
        assert_eq!(figs[2].groups.last().unwrap().1.len(), 2);
        assert!(uncovered(&labels, &figs).is_empty());
    }

    #[test]
    fn other_manifests_get_no_claim_figures() {
        let labels = vec!["eval[model=a]".to_string(), "eval[model=b]".to_string()];
        assert!(figures(&labels).is_empty());
        assert_eq!(uncovered(&labels, &[]).len(), 2);
    }
}
