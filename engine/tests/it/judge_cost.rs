//! Judge cost before a run, through the library with small test kinds: `emflow plan`'s
//! per-stage estimates and totals (counting rows of an upstream that has not run, through
//! its preview), memoised calls of cached stages, prices, and the `--max-judge-calls` /
//! `--max-judge-cost` guard that refuses before anything runs.

use std::path::Path;

use emflow_engine::commands;
use emflow_engine::console::{ReportMode, Reporter};
use emflow_engine::expand::{load_pipeline, LoadOptions};
use emflow_engine::judge_cost::{parse_price, JudgeBudget, JudgeCostPlan, Price};
use emflow_engine::kind::estimated_tokens;
use emflow_engine::pipeline::Pipeline;
use emflow_engine::scheduler::{RunOptions, RunSummary};
use emflow_engine::{
    JudgeEstimate, KindInfo, KindSpec, ParamSpec, ParamType, Params, PlanInputs, Registry,
    StageContext, StageKind,
};
use serde_json::json;

use crate::support::workdir::{log_run, Emit, Workdir};

/// Copies its input; can preview (the output is the input), like `dataset`.
struct Copy;
impl StageKind for Copy {
    fn spec(&self) -> KindSpec {
        let log = ParamSpec::required("log", ParamType::String, "");
        KindInfo::new("copy", 1, "copies a file")
            .ports("in in file \n out out file")
            .into_spec(vec![log], false)
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        log_run(ctx)?;
        std::fs::copy(&ctx.input("in")?.path, ctx.output_path("out"))?;
        Ok(())
    }
    fn preview(&self, _: &Params, inputs: &PlanInputs, dir: &Path) -> anyhow::Result<bool> {
        let Ok(input) = inputs.known("in") else {
            return Ok(false);
        };
        std::fs::copy(&input.path, dir.join("out"))?;
        Ok(true)
    }
}

/// "Judges" every line of `items` `samples` times: one call per line and sample, prompt =
/// the line, one completion token.
struct Judged;
impl StageKind for Judged {
    fn spec(&self) -> KindSpec {
        let params = vec![
            ParamSpec::required("log", ParamType::String, ""),
            ParamSpec::optional("samples", ParamType::Int, json!(1), ""),
            ParamSpec::optional("judge", ParamType::String, json!("api-model"), ""),
            ParamSpec::optional("local", ParamType::Bool, json!(false), ""),
        ];
        KindInfo::new("judged", 1, "calls a judge per line")
            .ports("in items file \n out out file")
            .into_spec(params, false)
    }
    fn judge_estimate(
        &self,
        params: &Params,
        inputs: &PlanInputs,
    ) -> anyhow::Result<Option<JudgeEstimate>> {
        let judge = params["judge"].as_str().unwrap_or("").to_string();
        let local = params["local"].as_bool().unwrap_or(false);
        let samples = params["samples"].as_u64().unwrap_or(1);
        let items = match inputs.known("items") {
            Ok(a) => std::fs::read_to_string(&a.path)?,
            Err(why) => return Ok(Some(JudgeEstimate::unknown(judge, local, why))),
        };
        let lines: Vec<&str> = items.lines().collect();
        let calls = lines.len() as u64 * samples;
        Ok(Some(JudgeEstimate {
            judge_model: judge,
            local,
            calls: Some(calls),
            upper_bound: false,
            prompt_tokens: lines.iter().map(|l| estimated_tokens(l.len())).sum::<u64>() * samples,
            completion_tokens: calls,
            notes: vec![format!("{} lines x {samples} samples", lines.len())],
        }))
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        log_run(ctx)?;
        std::fs::write(ctx.output_path("out"), "judged")?;
        Ok(())
    }
}

fn registry() -> Registry {
    Registry::new()
        .with_kind(Copy)
        .with_kind(Emit)
        .with_kind(Judged)
}

/// A [`Workdir`] holding `items.txt`.
fn fixture() -> Workdir {
    let work = Workdir::new();
    // 3 lines of 8, 8 and 16 characters: 2 + 2 + 4 = 8 tokens at 4 characters a token.
    std::fs::write(
        work.dir.path().join("items.txt"),
        "question\nanother!\nand a third one.\n",
    )
    .unwrap();
    work
}

/// The manifests these tests plan and run (names apart from `engine_run`'s methods).
impl Workdir {
    /// A manifest through the real front end; `log` is set to this fixture's run log.
    fn load(&self, yaml: &str) -> Pipeline {
        let path = self.dir.path().join("emflow.yaml");
        std::fs::write(&path, yaml).unwrap();
        let options = LoadOptions {
            profile: None,
            sets: vec![format!("log={}", self.log().display())],
        };
        load_pipeline(&path, &options, &registry())
            .unwrap_or_else(|e| panic!("{:?}", miette::Report::new(e)))
    }

    /// items.txt -> copy -> judged (4 samples: 12 calls); judged_file reads items.txt itself
    /// (1 sample, a local judge: 3 calls).
    fn judged_pipeline(&self) -> Pipeline {
        self.load(
            r#"
emflow: 1
name: judge-cost
params: { log: "" }
stages:
  copy:
    kind: copy
    inputs: { in: "file:items.txt" }
    params: { log: "${log}" }
  judged:
    kind: judged
    inputs: { items: copy.out }
    params: { log: "${log}", samples: 4 }
  judged_file:
    kind: judged
    inputs: { items: "file:items.txt" }
    params: { log: "${log}", judge: local-model.gguf, local: true }
"#,
        )
    }

    fn plan(&self, pipeline: &Pipeline, budget: &JudgeBudget) -> JudgeCostPlan {
        commands::plan(
            pipeline,
            &registry(),
            &self.store,
            &Reporter::new(ReportMode::Quiet),
            &[],
            budget,
        )
        .unwrap()
        .0
    }

    fn run_judged(&self, pipeline: &Pipeline, budget: JudgeBudget) -> anyhow::Result<RunSummary> {
        self.run_judged_with(pipeline, budget, false)
    }

    fn run_judged_with(
        &self,
        pipeline: &Pipeline,
        budget: JudgeBudget,
        dry_run: bool,
    ) -> anyhow::Result<RunSummary> {
        let opts = RunOptions {
            jobs: 2,
            cpus: 2,
            gpus: vec![],
            judge: budget,
            dry_run,
            ..RunOptions::default()
        };
        self.run_quiet(&registry(), pipeline, &opts)
    }
}

fn stage<'a>(plan: &'a JudgeCostPlan, id: &str) -> &'a emflow_engine::judge_cost::StageJudgeCost {
    plan.stages
        .iter()
        .find(|s| s.stage == id)
        .unwrap_or_else(|| panic!("no judge line for {id}: {plan:#?}"))
}

fn limit_calls(n: u64) -> JudgeBudget {
    JudgeBudget {
        max_calls: Some(n),
        ..JudgeBudget::default()
    }
}

#[test]
fn plan_counts_calls_through_a_preview_of_an_upstream_that_has_not_run() {
    let fx = fixture();
    let plan = fx.plan(&fx.judged_pipeline(), &JudgeBudget::default());
    let judged = stage(&plan, "judged");
    assert_eq!(judged.estimate.calls, Some(12), "3 lines x 4 samples");
    assert_eq!(judged.to_call, Some(12));
    assert_eq!(judged.estimate.prompt_tokens, 8 * 4);
    assert!(!judged.cached);
    let file = stage(&plan, "judged_file");
    assert_eq!(file.estimate.calls, Some(3));
    assert_eq!(plan.other_stages, 1, "copy calls no judge");
    assert_eq!(plan.totals.to_call, 15);
    assert_eq!(plan.totals.memoised, 0);
    assert_eq!(plan.totals.prompt_tokens, 8 * 4 + 8);
    assert!(plan.totals.unknown_stages.is_empty());
    // The API judge has no price; the local one is not billed.
    assert_eq!(plan.totals.unpriced_models, ["api-model"]);
    assert_eq!(file.cost_usd, Some(0.0));
    assert!(judged.cost_usd.is_none());
    // Planning ran nothing and left nothing behind.
    assert!(fx.executed().is_empty());
    let tmp = fx.tmp_leftovers();
    assert!(tmp.is_empty(), "preview folders must be removed: {tmp:?}");
}

#[test]
fn prices_turn_tokens_into_cost() {
    let fx = fixture();
    let budget = JudgeBudget::from_args(&["api-model=2/10".to_string()], None, None).unwrap();
    let plan = fx.plan(&fx.judged_pipeline(), &budget);
    let judged = stage(&plan, "judged");
    let want = (32.0 * 2.0 + 12.0 * 10.0) / 1e6;
    assert!((judged.cost_usd.unwrap() - want).abs() < 1e-12);
    assert!(plan.totals.unpriced_models.is_empty());
    assert!((plan.totals.cost_usd - want).abs() < 1e-12);
}

#[test]
fn cached_stages_make_no_calls_and_count_as_memoised() {
    let fx = fixture();
    let p = fx.judged_pipeline();
    assert!(fx.run_judged(&p, JudgeBudget::default()).unwrap().ok());
    fx.executed();
    let plan = fx.plan(&p, &JudgeBudget::default());
    let judged = stage(&plan, "judged");
    assert!(judged.cached);
    assert_eq!(judged.estimate.calls, Some(12));
    assert_eq!(judged.to_call, Some(0));
    assert_eq!(judged.cost_usd, Some(0.0));
    assert_eq!(plan.totals.to_call, 0);
    assert_eq!(plan.totals.memoised, 15);
    assert!(plan.totals.unpriced_models.is_empty(), "nothing to pay for");
    // A fully cached plan passes any limit.
    plan.check(&limit_calls(0)).unwrap();
}

#[test]
fn max_judge_calls_below_the_total_refuses_before_anything_runs() {
    let fx = fixture();
    let p = fx.judged_pipeline();
    let err = fx.run_judged(&p, limit_calls(14)).unwrap_err().to_string();
    assert!(err.contains("15 judge calls"), "{err}");
    assert!(err.contains("--max-judge-calls 14"), "{err}");
    assert!(err.contains("judged 12"), "names the largest stage: {err}");
    assert!(fx.executed().is_empty(), "nothing may run");
    assert!(fx.store.records().unwrap().is_empty());
    // At the total, it runs.
    let summary = fx.run_judged(&p, limit_calls(15)).unwrap();
    assert!(summary.ok(), "{:?}", summary.errors);
    assert_eq!(fx.executed().len(), 3);
}

#[test]
fn max_judge_cost_needs_a_price_and_refuses_over_it() {
    let fx = fixture();
    let p = fx.judged_pipeline();
    let no_price = JudgeBudget::from_args(&[], None, Some(1.0)).unwrap();
    let err = fx.run_judged(&p, no_price).unwrap_err().to_string();
    assert!(err.contains("no price for api-model"), "{err}");
    assert!(err.contains("--judge-price api-model=IN/OUT"), "{err}");
    // 32 prompt tokens at $1000/M and 12 completion tokens at $0: $0.032.
    let priced = |max: f64| {
        JudgeBudget::from_args(&["api-model=1000/0".to_string()], None, Some(max)).unwrap()
    };
    let err = fx.run_judged(&p, priced(0.02)).unwrap_err().to_string();
    assert!(
        err.contains("cost $0.03") && err.contains("--max-judge-cost $0.02"),
        "names the total and the limit: {err}"
    );
    assert!(fx.executed().is_empty());
    assert!(fx.run_judged(&p, priced(0.04)).unwrap().ok());
}

#[test]
fn calls_that_wait_on_an_upstream_are_unknown_and_a_limit_cannot_pass() {
    let fx = fixture();
    let p = fx.load(
        r#"
emflow: 1
name: judge-cost
params: { log: "" }
stages:
  emit:
    kind: emit
    params: { log: "${log}", text: "a\nb\n" }
  judged:
    kind: judged
    inputs: { items: emit.out }
    params: { log: "${log}" }
"#,
    );
    let plan = fx.plan(&p, &JudgeBudget::default());
    let judged = stage(&plan, "judged");
    assert_eq!(judged.estimate.calls, None);
    assert_eq!(judged.estimate.notes, ["unknown until emit runs"]);
    assert_eq!(plan.totals.unknown_stages, ["judged"]);
    let err = fx
        .run_judged(&p, limit_calls(1000))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot check") && err.contains("judged"),
        "{err}"
    );
    assert!(fx.executed().is_empty());
    // Once the upstream has run, the count is known and the limit passes.
    assert!(fx.run_judged(&p, JudgeBudget::default()).unwrap().ok());
    let plan = fx.plan(&p, &JudgeBudget::default());
    assert_eq!(stage(&plan, "judged").estimate.calls, Some(2));
}

#[test]
fn a_dry_run_reports_and_never_refuses() {
    let fx = fixture();
    let summary = fx
        .run_judged_with(&fx.judged_pipeline(), limit_calls(1), true)
        .unwrap();
    assert!(summary.ok());
    assert!(fx.executed().is_empty());
}

#[test]
fn prices_parse_and_bad_ones_say_the_syntax() {
    assert_eq!(
        parse_price("gpt-4.1-mini=0.4/1.6").unwrap(),
        (
            "gpt-4.1-mini".to_string(),
            Price {
                prompt_per_m: 0.4,
                completion_per_m: 1.6
            }
        )
    );
    // A model name may hold `=`; the price follows the last one.
    assert_eq!(parse_price("org/m=v2=1/2").unwrap().0, "org/m=v2");
    for bad in ["gpt", "gpt=1", "gpt=a/b", "=1/2", "gpt=-1/2", "gpt=1/inf"] {
        let err = parse_price(bad).unwrap_err().to_string();
        assert!(err.contains("MODEL=IN/OUT"), "{bad}: {err}");
    }
    assert!(JudgeBudget::from_args(&[], None, Some(-1.0)).is_err());
}
