//! The `emflow` command line's arguments and help text (clap). What each command does with
//! them is in `cli/mod.rs`, one function per command.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::commands::GraphFormat;

#[derive(Parser)]
#[command(
    name = "emflow",
    version,
    about = "Run ML-safety experiments from YAML manifests: content-addressed, cached, parallel.",
    after_help = "Examples:
  emflow run manifests/examples/datasets.yaml              run what is not cached
  emflow run m.yaml --set seed=3 --profile ci              override a param, use a profile
  emflow status m.yaml                                     what is stale, and why
  emflow plan m.yaml --profile paper                       judge calls, tokens and cost before a run
  emflow lock m.yaml && emflow check m.yaml                pin keys; CI fails if they move
  emflow graph m.yaml --format mermaid                     the DAG, coloured by status

The store is `.emflow/` next to the manifest; move it with EMFLOW_HOME or --store."
)]
pub(super) struct Cli {
    /// Store folder (default: $EMFLOW_HOME, else `.emflow/` next to the manifest).
    #[arg(long, global = true, value_name = "DIR")]
    pub(super) store: Option<PathBuf>,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(clap::Args, Clone)]
pub(super) struct ManifestArgs {
    /// The manifest (YAML).
    pub(super) manifest: PathBuf,
    /// Apply a named profile from the manifest's `profiles:`.
    #[arg(long, value_name = "NAME")]
    pub(super) profile: Option<String>,
    /// Override anything: `seed=3`, `params.seed=3`, `stages.sft.params.lr=2e-4`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(super) sets: Vec<String>,
}

/// Judge prices and limits (`run`, `plan`).
#[derive(clap::Args, Clone)]
pub(super) struct JudgeArgs {
    /// Price of a judge model: `MODEL=IN/OUT` in USD per million prompt / completion tokens,
    /// e.g. `gpt-4.1-mini=0.40/1.60`. Repeatable; also read from $EMFLOW_JUDGE_PRICES
    /// (comma-separated). emflow ships no prices.
    #[arg(long = "judge-price", value_name = "MODEL=IN/OUT")]
    pub(super) prices: Vec<String>,
    /// Refuse to start a run whose plan makes more judge calls than this.
    #[arg(long, value_name = "N")]
    pub(super) max_judge_calls: Option<u64>,
    /// Refuse to start a run whose judge calls would cost more than this many USD (needs a
    /// price for every API judge).
    #[arg(long, value_name = "USD")]
    pub(super) max_judge_cost: Option<f64>,
}

impl JudgeArgs {
    pub(super) fn budget(&self) -> anyhow::Result<crate::judge_cost::JudgeBudget> {
        crate::judge_cost::JudgeBudget::from_args(
            &self.prices,
            self.max_judge_calls,
            self.max_judge_cost,
        )
    }
}

#[derive(Subcommand)]
pub(super) enum Command {
    /// Run every stage that is not cached (and what it needs).
    #[command(after_help = "Examples:
  emflow run m.yaml                       run what is missing; a second run does nothing
  emflow run m.yaml --dry-run             show what would run and why
  emflow run m.yaml --only eval           just `eval` (all its cells) and its missing upstream
  emflow run m.yaml --only 'sft[seed=0]'  one matrix cell
  emflow run m.yaml --force report        rerun `report` even though it is cached
  emflow run m.yaml --force eval --refresh-judge   rerun `eval` asking its judge afresh
  emflow run m.yaml --jobs 4 --keep-going --json
  emflow run m.yaml --max-judge-calls 20000     refuse to start if the plan makes more judge calls
  emflow run m.yaml --max-judge-cost 50 --judge-price gpt-4.1-mini=0.40/1.60")]
    Run(RunArgs),
    /// The plan (each stage's state, as `run --dry-run`) and the judge calls it makes: per
    /// stage and in total, calls, memoised calls, estimated prompt and completion tokens, and
    /// the cost at the prices given.
    #[command(after_help = "Examples:
  emflow plan manifests/paper.yaml --profile paper --set data_root=/data
  emflow plan m.yaml --judge-price gpt-4.1-mini=0.40/1.60      price a judge model (USD per 1M tokens)
  EMFLOW_JUDGE_PRICES=gpt-4.1-mini=0.40/1.60 emflow plan m.yaml
  emflow plan m.yaml --max-judge-calls 20000                   exit 1 if a run would refuse
  emflow plan m.yaml --only eval --json

How the numbers are made: each stage kind counts its calls from its params and the inputs
known now (files, cached upstream outputs, and plan-time previews of `dataset` stages):
eval = questions x samples_per_question x judge prompts (aligned, coherent); safety_data =
prompts x samples_per_prompt x 2; rl with a grader reward = steps x prompts_per_step x
num_generations (an upper bound: short answers get no grader call and early stopping can
end sooner). Tokens are estimates: characters / 4, answers at their token limit. A cached
stage makes no call (all memoised); for the others, which calls the memo answers is known
only once answers are sampled, so costs count every call. Prices: --judge-price or
$EMFLOW_JUDGE_PRICES; none are built in (\"price not set\"); a local judge is not billed.")]
    Plan(PlanArgs),
    /// Print speed figures of a component (model, rl, judge): `emflow bench` lists them.
    #[command(after_help = "Examples:
  emflow bench                     list the benchmarks
  emflow bench model               SmolLM2 on this machine: prefill, decode, train tokens/s
  emflow bench rl                  seconds per GRPO step, split by phase
  emflow bench judge               local judge scores per second")]
    Bench {
        /// The benchmark to run; none lists them.
        name: Option<String>,
        /// Passed to the benchmark.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Serve a local model over an OpenAI-compatible HTTP API (`/v1/chat/completions` with
    /// logprobs, `/v1/models`), so one loaded judge serves many stages, runs or cluster jobs.
    #[command(after_help = "Example:
  emflow serve model.gguf --addr 127.0.0.1:8000
  # then in a manifest: judge: { backend: openai, base_url: \"http://127.0.0.1:8000/v1\", model: model.gguf }")]
    Serve(ServeArgs),
    /// Each stage instance: cached / stale / missing / pending, and why (changed key parts first).
    #[command(after_help = "Example:\n  emflow status m.yaml --set stages.sft.params.lr=2e-4")]
    Status {
        #[command(flatten)]
        manifest: ManifestArgs,
        #[arg(long)]
        json: bool,
    },
    /// The stage graph, coloured by status.
    #[command(
        after_help = "Examples:\n  emflow graph m.yaml | dot -Tsvg > dag.svg\n  emflow graph m.yaml --format mermaid"
    )]
    Graph {
        #[command(flatten)]
        manifest: ManifestArgs,
        #[arg(long, value_enum, default_value = "dot")]
        format: GraphFormat,
    },
    /// Write `emflow.lock` next to the manifest: each stage's key and output digests.
    Lock {
        #[command(flatten)]
        manifest: ManifestArgs,
    },
    /// Exit 1 if the manifest no longer yields the keys in `emflow.lock` (CI's reproducibility check).
    Check {
        #[command(flatten)]
        manifest: ManifestArgs,
    },
    /// Re-execute cached stages without the cache and compare output digests.
    #[command(
        after_help = "Examples:\n  emflow verify m.yaml              every cached stage\n  emflow verify m.yaml sft eval     just these"
    )]
    Verify(VerifyArgs),
    /// Copy cached outputs out of the store, with natural names (`data.jsonl`,
    /// `summary.json`, `adapter/`, `report/index.html`), into `results/<manifest>-<profile>/`.
    /// Exported adapters name their base model as transformers and PEFT load it.
    #[command(
        after_help = "Examples:\n  emflow export m.yaml                       every cached stage\n  emflow export m.yaml --profile ci sft      one stage's outputs, into results/m-ci/sft/\n  emflow export m.yaml --to /tmp/out 'grpo[seed=0]'\n\nEach output is written whole (copied beside its place, then renamed), replacing the\nprevious export of that output. Stages not cached are listed and skipped: `emflow run` them first."
    )]
    Export {
        #[command(flatten)]
        selection: ManifestStages,
        /// The folder to write into (default: `results/<manifest>[-<profile>]`).
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
    },
    /// Free store space: keep what the lock files of MANIFESTS and the last runs reach.
    #[command(
        after_help = "Examples:\n  emflow gc manifests/*.yaml --keep-runs 5 --dry-run\n  emflow gc manifests/*.yaml --drop-judge-memo   also forget every memoised judge verdict"
    )]
    Gc(GcArgs),
    /// Inspect the store.
    #[command(
        after_help = "With no manifest to find it by, these read `./.emflow` (or EMFLOW_HOME); the store of\n`emflow run manifests/paper.yaml` is `manifests/.emflow`:\n  emflow --store manifests/.emflow cache ls"
    )]
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// List the stage kinds this binary has, with their params and ports.
    Kinds {
        /// Only this kind, with each param's whole doc.
        name: Option<String>,
    },
    /// Run one job file (used by executors; not for people).
    #[command(hide = true)]
    ExecStage {
        job: PathBuf,
        #[arg(long)]
        result: PathBuf,
    },
}

#[derive(Subcommand)]
pub(super) enum CacheCommand {
    /// Every record: key, stage, kind, size, when (newest last).
    #[command(
        after_help = "Example:\n  emflow cache ls --json | python -c 'import json,sys; print(len(json.load(sys.stdin)))'"
    )]
    Ls {
        /// One JSON array on stdout (each record with its outputs' paths) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One record in full, with its outputs' paths.
    #[command(
        after_help = "STAGE is a stage instance id, a stage name with one recorded instance, or a key prefix:\n  emflow cache show 'grpo[domain=medical,seed=0]'\n  emflow cache show report --json\n  emflow cache show 3fa2c1"
    )]
    Show {
        stage: String,
        /// The record as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The path of one output of a stage in the store, for a shell (`cat "$(emflow cache path report report)/index.html"`).
    Path {
        /// A stage instance id, a stage name with one recorded instance, or a key prefix.
        stage: String,
        output: String,
    },
    /// Rehash every blob in the store and report those whose bytes no longer match their
    /// digest, with the stages that made them (exit 1 if any). `emflow run` already checks
    /// the outputs it reuses; this checks everything, every byte, without the file memo.
    #[command(
        after_help = "Examples:\n  emflow cache verify            report damaged blobs\n  emflow cache verify --repair   also remove them, so that `emflow run` rebuilds their stages"
    )]
    Verify {
        /// Move damaged blobs out of the store (the stages that made them run again).
        #[arg(long)]
        repair: bool,
    },
}

// The fields of `emflow run` (its help text is on the `Command` variant).
#[derive(clap::Args)]
pub(super) struct RunArgs {
    #[command(flatten)]
    pub(super) manifest: ManifestArgs,
    #[command(flatten)]
    pub(super) judge: JudgeArgs,
    /// Plan only: print each stage's state and reasons, run nothing.
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Run only this stage (name or instance id) and its missing upstream. Repeatable.
    #[arg(long, value_name = "STAGE")]
    pub(super) only: Vec<String>,
    /// Rerun this stage (name or instance id) even if cached. Repeatable.
    #[arg(long, value_name = "STAGE")]
    pub(super) force: Vec<String>,
    /// Stages that run ask their judges again instead of reading memoised verdicts; the
    /// fresh answers replace the memo entries. With `--force STAGE`: re-judge that stage.
    #[arg(long)]
    pub(super) refresh_judge: bool,
    /// Stages running at once (default: number of cores).
    #[arg(long, short = 'j')]
    pub(super) jobs: Option<usize>,
    /// After a failure, keep running the stages that do not depend on it.
    #[arg(long)]
    pub(super) keep_going: bool,
    /// One JSON event per line on stdout instead of text.
    #[arg(long)]
    pub(super) json: bool,
    /// Where stages run: `local` (a child process each), `in-process`, or `slurm` (one
    /// Slurm job each; the store must be on storage the compute nodes share).
    #[arg(long, default_value = "local", value_parser = ["local", "in-process", "slurm"])]
    pub(super) executor: String,
    /// Cluster profile for `--executor slurm` (YAML: partition, account, qos,
    /// constraint, extra, gpu_flag, retries, growth, poll_interval_s, grace_s, ...).
    #[arg(long, value_name = "FILE")]
    pub(super) cluster_config: Option<PathBuf>,
}

// The fields of `emflow plan` (its help text is on the `Command` variant).
#[derive(clap::Args)]
pub(super) struct PlanArgs {
    #[command(flatten)]
    pub(super) manifest: ManifestArgs,
    #[command(flatten)]
    pub(super) judge: JudgeArgs,
    /// Plan only this stage (name or instance id) and its upstream. Repeatable.
    #[arg(long, value_name = "STAGE")]
    pub(super) only: Vec<String>,
    /// One JSON event per line on stdout instead of text.
    #[arg(long)]
    pub(super) json: bool,
}

/// A manifest and some of its stages (`verify`, `export`).
#[derive(clap::Args)]
pub(super) struct ManifestStages {
    #[command(flatten)]
    pub(super) manifest: ManifestArgs,
    /// Stage names or instance ids (default: every stage).
    pub(super) stages: Vec<String>,
}

// The fields of `emflow verify` (its help text is on the `Command` variant).
#[derive(clap::Args)]
pub(super) struct VerifyArgs {
    #[command(flatten)]
    pub(super) selection: ManifestStages,
    #[arg(long, short = 'j')]
    pub(super) jobs: Option<usize>,
    #[arg(long, default_value = "local", value_parser = ["local", "in-process"])]
    pub(super) executor: String,
}

// The fields of `emflow gc` (its help text is on the `Command` variant).
#[derive(clap::Args)]
pub(super) struct GcArgs {
    /// Manifests whose `emflow.lock` entries are kept.
    pub(super) manifests: Vec<PathBuf>,
    /// Only report what would be removed.
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Keep everything the last N runs used.
    #[arg(long, default_value_t = 10)]
    pub(super) keep_runs: usize,
    /// Also remove every memoised judge call, so every judge is asked again.
    #[arg(long)]
    pub(super) drop_judge_memo: bool,
}

// The fields of `emflow serve` (its help text is on the `Command` variant).
#[derive(clap::Args)]
pub(super) struct ServeArgs {
    /// A GGUF file or HF-format model folder.
    pub(super) model: PathBuf,
    /// A LoRA adapter (PEFT folder) to apply.
    #[arg(long)]
    pub(super) adapter: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub(super) addr: String,
    /// The model id clients send (default: the model file name).
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Use this CUDA device (builds with the `cuda` feature).
    #[arg(long, value_name = "ORDINAL")]
    pub(super) cuda: Option<usize>,
}
