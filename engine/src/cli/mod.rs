//! The `emflow` command line. Parsing and help text live here; each command's work lives
//! in [`crate::run`] and [`crate::commands`], so it can be tested without a process.

mod exec_stage;
mod tools;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use emflow_cache::Store;

use crate::commands::{self, GraphFormat};
use crate::executor::{
    ClusterProfile, Executor, InProcessExecutor, SlurmExecutor, SubprocessExecutor,
};
use crate::kind::Registry;
use crate::pipeline::Pipeline;
use crate::report::{ReportMode, Reporter};
use crate::run::{run_pipeline, RunEnv, RunOptions};

/// Exit code for "ran, but something failed or does not match".
const EXIT_FAILED: u8 = 1;
/// Exit code for a usage or manifest error.
const EXIT_USAGE: u8 = 2;
/// Exit code when Ctrl-C stopped a run.
const EXIT_STOPPED: u8 = 130;
/// Memo namespaces of judge calls start with this (see `emflow_stages::judge`).
const JUDGE_MEMO_PREFIX: &str = "judge";

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
struct Cli {
    /// Store folder (default: $EMFLOW_HOME, else `.emflow/` next to the manifest).
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ManifestArgs {
    /// The manifest (YAML).
    manifest: PathBuf,
    /// Apply a named profile from the manifest's `profiles:`.
    #[arg(long, value_name = "NAME")]
    profile: Option<String>,
    /// Override anything: `seed=3`, `params.seed=3`, `stages.sft.params.lr=2e-4`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

/// Judge prices and limits (`run`, `plan`).
#[derive(clap::Args, Clone)]
struct JudgeArgs {
    /// Price of a judge model: `MODEL=IN/OUT` in USD per million prompt / completion tokens,
    /// e.g. `gpt-4.1-mini=0.40/1.60`. Repeatable; also read from $EMFLOW_JUDGE_PRICES
    /// (comma-separated). emflow ships no prices.
    #[arg(long = "judge-price", value_name = "MODEL=IN/OUT")]
    prices: Vec<String>,
    /// Refuse to start a run whose plan makes more judge calls than this.
    #[arg(long, value_name = "N")]
    max_judge_calls: Option<u64>,
    /// Refuse to start a run whose judge calls would cost more than this many USD (needs a
    /// price for every API judge).
    #[arg(long, value_name = "USD")]
    max_judge_cost: Option<f64>,
}

impl JudgeArgs {
    fn budget(&self) -> anyhow::Result<crate::judge_cost::JudgeBudget> {
        crate::judge_cost::JudgeBudget::from_args(
            &self.prices,
            self.max_judge_calls,
            self.max_judge_cost,
        )
    }
}

#[derive(Subcommand)]
enum Command {
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
    Run {
        #[command(flatten)]
        manifest: ManifestArgs,
        #[command(flatten)]
        judge: JudgeArgs,
        /// Plan only: print each stage's state and reasons, run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Run only this stage (name or instance id) and its missing upstream. Repeatable.
        #[arg(long, value_name = "STAGE")]
        only: Vec<String>,
        /// Rerun this stage (name or instance id) even if cached. Repeatable.
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Stages that run ask their judges again instead of reading memoised verdicts; the
        /// fresh answers replace the memo entries. With `--force STAGE`: re-judge that stage.
        #[arg(long)]
        refresh_judge: bool,
        /// Stages running at once (default: number of cores).
        #[arg(long, short = 'j')]
        jobs: Option<usize>,
        /// After a failure, keep running the stages that do not depend on it.
        #[arg(long)]
        keep_going: bool,
        /// One JSON event per line on stdout instead of text.
        #[arg(long)]
        json: bool,
        /// Where stages run: `local` (a child process each), `in-process`, or `slurm` (one
        /// Slurm job each; the store must be on storage the compute nodes share).
        #[arg(long, default_value = "local", value_parser = ["local", "in-process", "slurm"])]
        executor: String,
        /// Cluster profile for `--executor slurm` (YAML: partition, account, qos,
        /// constraint, extra, gpu_flag, retries, growth, poll_interval_s, grace_s, ...).
        #[arg(long, value_name = "FILE")]
        cluster_config: Option<PathBuf>,
    },
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
    Plan {
        #[command(flatten)]
        manifest: ManifestArgs,
        #[command(flatten)]
        judge: JudgeArgs,
        /// Plan only this stage (name or instance id) and its upstream. Repeatable.
        #[arg(long, value_name = "STAGE")]
        only: Vec<String>,
        /// One JSON event per line on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
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
    Serve {
        /// A GGUF file or HF-format model folder.
        model: PathBuf,
        /// A LoRA adapter (PEFT folder) to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8000")]
        addr: String,
        /// The model id clients send (default: the model file name).
        #[arg(long)]
        name: Option<String>,
        /// Use this CUDA device (builds with the `cuda` feature).
        #[arg(long, value_name = "ORDINAL")]
        cuda: Option<usize>,
    },
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
    Verify {
        #[command(flatten)]
        manifest: ManifestArgs,
        /// Stage names or instance ids (default: all).
        stages: Vec<String>,
        #[arg(long, short = 'j')]
        jobs: Option<usize>,
        #[arg(long, default_value = "local", value_parser = ["local", "in-process"])]
        executor: String,
    },
    /// Free store space: keep what the lock files of MANIFESTS and the last runs reach.
    #[command(
        after_help = "Examples:\n  emflow gc manifests/*.yaml --keep-runs 5 --dry-run\n  emflow gc manifests/*.yaml --drop-judge-memo   also forget every memoised judge verdict"
    )]
    Gc {
        /// Manifests whose `emflow.lock` entries are kept.
        manifests: Vec<PathBuf>,
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Keep everything the last N runs used.
        #[arg(long, default_value_t = 10)]
        keep_runs: usize,
        /// Also remove every memoised judge call, so every judge is asked again.
        #[arg(long)]
        drop_judge_memo: bool,
    },
    /// Inspect the store.
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
enum CacheCommand {
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

/// The `emflow` binary's entry point.
pub fn main(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    if let Command::ExecStage { job, result } = &cli.command {
        return exec_stage::main(&registry, job, result);
    }
    match dispatch(cli, registry) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {}", commands::describe_error(&err));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn load(args: &ManifestArgs, registry: &Registry) -> anyhow::Result<Pipeline> {
    crate::loader::load(
        &args.manifest,
        args.profile.clone(),
        args.sets.clone(),
        registry,
    )
}

/// The reporter of a command with a `--json` flag.
fn reporter(json: bool) -> Arc<Reporter> {
    Reporter::new(if json {
        ReportMode::Json
    } else {
        ReportMode::Human
    })
}

fn open_store(flag: Option<&Path>, manifest: Option<&Path>) -> anyhow::Result<Arc<Store>> {
    let root = commands::store_location(flag, manifest);
    let store =
        Store::open(&root).with_context(|| format!("opening the store at {}", root.display()))?;
    Ok(Arc::new(store))
}

fn executor(
    name: &str,
    registry: &Registry,
    store: &Arc<Store>,
    run_dir: &str,
) -> anyhow::Result<Box<dyn Executor>> {
    Ok(match name {
        "in-process" => Box::new(InProcessExecutor::new(registry.clone(), store.clone())),
        _ => {
            let exe =
                std::env::current_exe().context("finding the emflow binary to run stages with")?;
            Box::new(
                SubprocessExecutor::new(exe, store.root().join("jobs").join(run_dir))
                    .with_driver_threads(registry.clone(), store.clone()),
            )
        }
    })
}

/// `emflow cache ...`: pure data on stdout (text or `--json`), messages on stderr.
fn cache(store_flag: Option<&Path>, command: CacheCommand) -> anyhow::Result<u8> {
    let store = open_store(store_flag, None)?;
    match command {
        CacheCommand::Ls { json } => {
            let records = commands::cache_ls(&store)?;
            if json {
                let all: Vec<_> = records
                    .iter()
                    .map(|(key, r)| commands::record_json(&store, key, r))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(0);
            }
            for (key, r) in records {
                let size: u64 = r.outputs.values().map(|o| o.size).sum();
                println!(
                    "{}  {:<32} {:<12} {:>10}  {}",
                    crate::keys::short(&key),
                    r.stage_id,
                    r.kind,
                    crate::host::human_bytes(size),
                    r.finished_at
                );
            }
            Ok(0)
        }
        CacheCommand::Show { stage, json } => {
            let (key, record) = commands::cache_lookup(&store, &stage)?;
            if json {
                let value = commands::record_json(&store, &key, &record);
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(0);
            }
            println!("{}", serde_json::to_string_pretty(&record)?);
            for (name, entry) in &record.outputs {
                println!("output {name}: {}", store.artifact_path(entry).display());
            }
            Ok(0)
        }
        CacheCommand::Path { stage, output } => {
            let (_, record) = commands::cache_lookup(&store, &stage)?;
            let entry = record.outputs.get(&output).ok_or_else(|| {
                anyhow::anyhow!(
                    "stage {} has no output `{output}`; its outputs: {}",
                    record.stage_id,
                    record
                        .outputs
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            println!("{}", store.artifact_path(entry).display());
            Ok(0)
        }
        CacheCommand::Verify { repair } => {
            let reporter = Reporter::new(ReportMode::Human);
            let audit = commands::cache_verify(&store, &reporter, repair)?;
            let size = crate::host::human_bytes(audit.bytes);
            match (audit.damaged.len(), repair) {
                (0, _) => {
                    println!("all {} blobs ({size}) match their digests", audit.blobs);
                    Ok(0)
                }
                (n, true) => {
                    println!("{n} of {} blobs ({size}) were damaged and are removed; `emflow run` rebuilds the stages named above", audit.blobs);
                    Ok(0)
                }
                (n, false) => {
                    println!("{n} of {} blobs ({size}) are damaged", audit.blobs);
                    Ok(EXIT_FAILED)
                }
            }
        }
    }
}

fn dispatch(cli: Cli, registry: Registry) -> anyhow::Result<u8> {
    let store_flag = cli.store.as_deref();
    match cli.command {
        Command::Run {
            manifest,
            judge,
            dry_run,
            only,
            force,
            refresh_judge,
            jobs,
            keep_going,
            json,
            executor: exec_name,
            cluster_config,
        } => {
            let budget = judge.budget()?;
            let pipeline = load(&manifest, &registry)?;
            let store = open_store(store_flag, Some(&manifest.manifest))?;
            let _pin = store.pin()?;
            let reporter = reporter(json);
            let stop = crate::signals::install_driver();
            let run_dir = crate::host::new_run_id();
            let slurm_profile = match (&cluster_config, exec_name.as_str()) {
                (Some(path), "slurm") => Some(ClusterProfile::load(path)?),
                (Some(_), other) => anyhow::bail!(
                    "--cluster-config is for `--executor slurm`, not `--executor {other}`"
                ),
                (None, "slurm") => Some(ClusterProfile::default()),
                (None, _) => None,
            };
            let exec: Box<dyn Executor> = match &slurm_profile {
                Some(profile) => Box::new(SlurmExecutor::new(
                    std::env::current_exe()
                        .context("finding the emflow binary the Slurm jobs run")?,
                    store.root(),
                    profile.clone(),
                )),
                None => executor(&exec_name, &registry, &store, &run_dir)?,
            };
            let mut opts = RunOptions {
                dry_run,
                only,
                force,
                keep_going,
                refresh_memo: refresh_judge,
                judge: budget,
                ..RunOptions::default()
            };
            if slurm_profile.is_some() {
                // The cluster, not this machine, bounds what runs at once: keep up to 100
                // jobs in the queue and let Slurm place them (GPUs are Slurm's to assign).
                opts.jobs = 100;
                opts.cpus = 1 << 20;
                opts.gpus = (0..1024).map(|g| g.to_string()).collect();
            }
            if let Some(j) = jobs {
                opts.jobs = j.max(1);
            }
            let env = RunEnv {
                registry: &registry,
                store: store.clone(),
                executor: exec.as_ref(),
                reporter,
                stop,
            };
            let summary = run_pipeline(&pipeline, &env, &opts)?;
            if let (true, Some(profile)) = (dry_run, &slurm_profile) {
                crate::executor::slurm::print_dry_run(
                    &pipeline,
                    &registry,
                    &store,
                    profile,
                    &summary.run_id,
                )?;
            }
            Ok(if summary.interrupted {
                EXIT_STOPPED
            } else if summary.ok() {
                0
            } else {
                EXIT_FAILED
            })
        }
        Command::Status { manifest, json } => {
            let pipeline = load(&manifest, &registry)?;
            let store = open_store(store_flag, Some(&manifest.manifest))?;
            let reporter = reporter(json);
            commands::status(&pipeline, &registry, &store, &reporter)?;
            Ok(0)
        }
        Command::Plan {
            manifest,
            judge,
            only,
            json,
        } => {
            let budget = judge.budget()?;
            let pipeline = load(&manifest, &registry)?;
            let store = open_store(store_flag, Some(&manifest.manifest))?;
            let reporter = reporter(json);
            let plan = commands::plan(&pipeline, &registry, &store, &reporter, &only, &budget)?;
            match plan.check(&budget) {
                Ok(()) => Ok(0),
                Err(e) => {
                    reporter.line(&format!("\n{e:#}"));
                    reporter.event("refused", serde_json::json!({ "reason": format!("{e:#}") }));
                    Ok(EXIT_FAILED)
                }
            }
        }
        Command::Graph { manifest, format } => {
            let pipeline = load(&manifest, &registry)?;
            let store = open_store(store_flag, Some(&manifest.manifest))?;
            print!("{}", commands::graph(&pipeline, &registry, &store, format)?);
            Ok(0)
        }
        Command::Lock { manifest } => {
            let pipeline = load(&manifest, &registry)?;
            let store = open_store(store_flag, Some(&manifest.manifest))?;
            let (path, section) = commands::lock(&pipeline, &registry, &store)?;
            println!(
                "locked {} stages and {} models of {} in {}",
                section.stages.len(),
                section.models.len(),
                manifest.manifest.display(),
                path.display()
            );
            Ok(0)
        }
        Command::Check { manifest } => {
            let pipeline = load(&manifest, &registry)?;
            let store = open_store(store_flag, Some(&manifest.manifest))?;
            let mismatches = commands::check(&pipeline, &registry, &store)?;
            if mismatches.is_empty() {
                println!(
                    "ok: all {} stages of {} match emflow.lock",
                    pipeline.stages.len(),
                    manifest.manifest.display()
                );
                return Ok(0);
            }
            println!("{} stage(s) no longer match emflow.lock:", mismatches.len());
            for m in &mismatches {
                println!("  {}", m.stage);
                for why in &m.why {
                    println!("      {why}");
                }
            }
            println!("if the change is intended, run `emflow run` and `emflow lock` and commit the new lock");
            Ok(EXIT_FAILED)
        }
        Command::Verify {
            manifest,
            stages,
            jobs,
            executor: exec_name,
        } => {
            let pipeline = load(&manifest, &registry)?;
            let store = open_store(store_flag, Some(&manifest.manifest))?;
            let _pin = store.pin()?;
            let reporter = Reporter::new(ReportMode::Human);
            let exec = executor(&exec_name, &registry, &store, &crate::host::new_run_id())?;
            let results = commands::verify(
                &pipeline,
                &registry,
                &store,
                exec.as_ref(),
                &reporter,
                &stages,
                jobs.unwrap_or_else(crate::host::cores),
            )?;
            let bad: Vec<&str> = results
                .iter()
                .filter(|v| v.verdict != "same")
                .map(|v| v.stage.as_str())
                .collect();
            if bad.is_empty() {
                println!(
                    "all {} verified stages reproduce their recorded outputs",
                    results.len()
                );
                Ok(0)
            } else {
                println!(
                    "{} of {} stages did not verify: {}",
                    bad.len(),
                    results.len(),
                    bad.join(", ")
                );
                Ok(EXIT_FAILED)
            }
        }
        Command::Gc {
            manifests,
            dry_run,
            keep_runs,
            drop_judge_memo,
        } => {
            let store = open_store(store_flag, manifests.first().map(PathBuf::as_path))?;
            let (report, runs) = commands::gc(&store, &manifests, keep_runs, dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            if drop_judge_memo {
                let (entries, bytes) = store.drop_memo_namespaces(JUDGE_MEMO_PREFIX, dry_run)?;
                println!(
                    "{verb} {entries} memoised judge calls: {}",
                    crate::host::human_bytes(bytes)
                );
            }
            println!(
                "{verb} {} records, {} files, {} folders, {} checkpoints, {} memo entries: {} (kept {} records reached by {} lock file(s) and the last {runs} runs)",
                report.records_removed.len(),
                report.blobs_removed,
                report.trees_removed,
                report.checkpoints_removed,
                report.memo_entries_removed,
                crate::host::human_bytes(report.bytes_freed),
                report.records_kept,
                manifests.len(),
            );
            Ok(0)
        }
        Command::Cache { command } => cache(store_flag, command),
        Command::Bench { name, args } => tools::bench(&registry, name.as_deref(), &args),
        Command::Serve {
            model,
            adapter,
            addr,
            name,
            cuda,
        } => tools::serve(
            &registry,
            &model,
            adapter.as_deref(),
            &addr,
            name.as_deref(),
            cuda,
        ),
        Command::Kinds { name } => {
            print!("{}", crate::kind::kinds_text(&registry, name.as_deref())?);
            Ok(0)
        }
        Command::ExecStage { .. } => Ok(0),
    }
}
