//! The `emflow` command line. Arguments and help text are in `args.rs`; here [`main`]
//! dispatches to one function per command, which loads what the command needs, calls its
//! work in [`crate::scheduler`] or [`crate::commands`] (so it can be tested without a
//! process), prints the result and picks the exit code.

mod args;
mod cache;
mod exec_stage;
mod tools;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use emflow_cache::Store;

use args::{Cli, Command, GcArgs, ManifestArgs, PlanArgs, RunArgs, ServeArgs, VerifyArgs};

use crate::commands::{self, GraphFormat};
use crate::console::{ReportMode, Reporter};
use crate::executor::{
    ClusterProfile, Executor, InProcessExecutor, SlurmExecutor, SubprocessExecutor,
};
use crate::kind::Registry;
use crate::pipeline::Pipeline;
use crate::scheduler::{run_pipeline, RunEnv, RunOptions};

/// Exit code for "ran, but something failed or does not match".
const EXIT_FAILED: u8 = 1;
/// Exit code for a usage or manifest error.
const EXIT_USAGE: u8 = 2;
/// Exit code when Ctrl-C stopped a run.
const EXIT_STOPPED: u8 = 130;
/// Memo namespaces of judge calls start with this (see `emflow_stages::judge`).
const JUDGE_MEMO_PREFIX: &str = "judge";

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

/// What a command on one manifest works with: its pipeline, the store its commands use, and
/// the kinds. Loaded once in one place, so each command function starts from it.
struct Loaded<'a> {
    registry: &'a Registry,
    /// The manifest's path and its `--profile`/`--set` flags.
    args: &'a ManifestArgs,
    pipeline: Pipeline,
    store: Arc<Store>,
}

impl<'a> Loaded<'a> {
    fn new(
        store_flag: Option<&Path>,
        args: &'a ManifestArgs,
        registry: &'a Registry,
    ) -> anyhow::Result<Self> {
        let pipeline = load(args, registry)?;
        let store = open_store(store_flag, Some(&args.manifest))?;
        Ok(Loaded {
            registry,
            args,
            pipeline,
            store,
        })
    }
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
    open_store_at(&commands::store_location(flag, manifest))
}

/// Opens (creating it if need be) the store at `root`.
fn open_store_at(root: &Path) -> anyhow::Result<Arc<Store>> {
    let store =
        Store::open(root).with_context(|| format!("opening the store at {}", root.display()))?;
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

fn dispatch(cli: Cli, registry: Registry) -> anyhow::Result<u8> {
    let store = cli.store.as_deref();
    match cli.command {
        Command::Run(args) => cmd_run(store, &registry, args),
        Command::Status { manifest, json } => {
            cmd_status(&Loaded::new(store, &manifest, &registry)?, json)
        }
        Command::Plan(args) => cmd_plan(store, &registry, args),
        Command::Graph { manifest, format } => {
            cmd_graph(&Loaded::new(store, &manifest, &registry)?, format)
        }
        Command::Lock { manifest } => cmd_lock(&Loaded::new(store, &manifest, &registry)?),
        Command::Check { manifest } => cmd_check(&Loaded::new(store, &manifest, &registry)?),
        Command::Verify(args) => cmd_verify(store, &registry, args),
        Command::Export { selection, to } => cmd_export(
            &Loaded::new(store, &selection.manifest, &registry)?,
            &selection.stages,
            to,
        ),
        Command::Gc(args) => cmd_gc(store, args),
        Command::Cache { command } => cache::cache(store, command),
        Command::Bench { name, args } => tools::bench(&registry, name.as_deref(), &args),
        Command::Serve(args) => cmd_serve(&registry, args),
        Command::Kinds { name } => {
            print!("{}", crate::kind::kinds_text(&registry, name.as_deref())?);
            Ok(0)
        }
        Command::ExecStage { .. } => Ok(0),
    }
}

/// `emflow run`.
fn cmd_run(store_flag: Option<&Path>, registry: &Registry, args: RunArgs) -> anyhow::Result<u8> {
    let budget = args.judge.budget()?;
    let Loaded {
        pipeline, store, ..
    } = Loaded::new(store_flag, &args.manifest, registry)?;
    let _pin = store.pin()?;
    let slurm_profile = match (&args.cluster_config, args.executor.as_str()) {
        (Some(path), "slurm") => Some(ClusterProfile::load(path)?),
        (Some(_), other) => {
            anyhow::bail!("--cluster-config is for `--executor slurm`, not `--executor {other}`")
        }
        (None, "slurm") => Some(ClusterProfile::default()),
        (None, _) => None,
    };
    let exec: Box<dyn Executor> = match &slurm_profile {
        Some(profile) => Box::new(SlurmExecutor::new(
            std::env::current_exe().context("finding the emflow binary the Slurm jobs run")?,
            store.root(),
            profile.clone(),
        )),
        None => executor(&args.executor, registry, &store, &crate::host::new_run_id())?,
    };
    let mut opts = RunOptions {
        dry_run: args.dry_run,
        only: args.only,
        force: args.force,
        keep_going: args.keep_going,
        refresh_memo: args.refresh_judge,
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
    if let Some(j) = args.jobs {
        opts.jobs = j.max(1);
    }
    let env = RunEnv {
        registry,
        store: store.clone(),
        executor: exec.as_ref(),
        reporter: reporter(args.json),
        stop: crate::signals::install_driver(),
    };
    let summary = run_pipeline(&pipeline, &env, &opts)?;
    if let (true, Some(profile)) = (args.dry_run, &slurm_profile) {
        let run_id = &summary.run_id;
        crate::executor::slurm::print_dry_run(&pipeline, registry, &store, profile, run_id)?;
    }
    Ok(if summary.interrupted {
        EXIT_STOPPED
    } else if summary.ok() {
        0
    } else {
        EXIT_FAILED
    })
}

/// `emflow status`.
fn cmd_status(m: &Loaded, json: bool) -> anyhow::Result<u8> {
    commands::status(&m.pipeline, m.registry, &m.store, &reporter(json))?;
    Ok(0)
}

/// `emflow plan`: exit 1 when a run would refuse the plan (its judge calls, or its GPU memory).
fn cmd_plan(store_flag: Option<&Path>, registry: &Registry, args: PlanArgs) -> anyhow::Result<u8> {
    let budget = args.judge.budget()?;
    let m = Loaded::new(store_flag, &args.manifest, registry)?;
    let reporter = reporter(args.json);
    let (plan, memory) = commands::plan(
        &m.pipeline,
        registry,
        &m.store,
        &reporter,
        &args.only,
        &budget,
    )?;
    match plan.check(&budget).and_then(|()| memory.check()) {
        Ok(()) => Ok(0),
        Err(e) => {
            reporter.line(&format!("\n{e:#}"));
            reporter.event("refused", serde_json::json!({ "reason": format!("{e:#}") }));
            Ok(EXIT_FAILED)
        }
    }
}

/// `emflow graph`.
fn cmd_graph(m: &Loaded, format: GraphFormat) -> anyhow::Result<u8> {
    print!(
        "{}",
        commands::graph(&m.pipeline, m.registry, &m.store, format)?
    );
    Ok(0)
}

/// `emflow lock`.
fn cmd_lock(m: &Loaded) -> anyhow::Result<u8> {
    let (path, section) = commands::lock(&m.pipeline, m.registry, &m.store)?;
    println!(
        "locked {} stages and {} models of {} in {}",
        section.stages.len(),
        section.models.len(),
        m.args.manifest.display(),
        path.display()
    );
    Ok(0)
}

/// `emflow check`: exit 1 when a key no longer matches the lock.
fn cmd_check(m: &Loaded) -> anyhow::Result<u8> {
    let mismatches = commands::check(&m.pipeline, m.registry, &m.store)?;
    if mismatches.is_empty() {
        println!(
            "ok: all {} stages of {} match emflow.lock",
            m.pipeline.stages.len(),
            m.args.manifest.display()
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
    println!(
        "if the change is intended, run `emflow run` and `emflow lock` and commit the new lock"
    );
    Ok(EXIT_FAILED)
}

/// `emflow verify`: exit 1 when a stage does not reproduce its recorded outputs.
fn cmd_verify(
    store_flag: Option<&Path>,
    registry: &Registry,
    args: VerifyArgs,
) -> anyhow::Result<u8> {
    let Loaded {
        pipeline, store, ..
    } = Loaded::new(store_flag, &args.selection.manifest, registry)?;
    let _pin = store.pin()?;
    let reporter = Reporter::new(ReportMode::Human);
    let exec = executor(&args.executor, registry, &store, &crate::host::new_run_id())?;
    let results = commands::verify(
        &pipeline,
        registry,
        &store,
        exec.as_ref(),
        &reporter,
        &args.selection.stages,
        args.jobs.unwrap_or_else(crate::host::cores),
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
        return Ok(0);
    }
    println!(
        "{} of {} stages did not verify: {}",
        bad.len(),
        results.len(),
        bad.join(", ")
    );
    Ok(EXIT_FAILED)
}

/// `emflow export`: exit 1 when a selected stage is not cached (the others are exported).
fn cmd_export(m: &Loaded, stages: &[String], to: Option<PathBuf>) -> anyhow::Result<u8> {
    let to = to.unwrap_or_else(|| commands::results_dir(&m.pipeline));
    let (written, missing) = commands::export(&m.pipeline, m.registry, &m.store, stages, &to)?;
    for e in &written {
        let (stage, output, path) = (&e.stage, &e.output, e.path.display());
        println!("{:>8}  {stage}.{output} -> {path}", "Exported");
        if let Some(note) = &e.note {
            eprintln!("    note  {}.{}: {note}", e.stage, e.output);
        }
    }
    if missing.is_empty() {
        return Ok(0);
    }
    eprintln!(
        "not cached, not exported ({}): {}\n  run them first: emflow run {}",
        missing.len(),
        missing.join(", "),
        m.args.manifest.display()
    );
    Ok(EXIT_FAILED)
}

/// `emflow gc`.
fn cmd_gc(store_flag: Option<&Path>, args: GcArgs) -> anyhow::Result<u8> {
    let manifests = &args.manifests;
    let store = open_store(store_flag, manifests.first().map(PathBuf::as_path))?;
    let (report, runs) = commands::gc(&store, manifests, args.keep_runs, args.dry_run)?;
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    if args.drop_judge_memo {
        let (entries, bytes) = store.drop_memo_namespaces(JUDGE_MEMO_PREFIX, args.dry_run)?;
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

/// `emflow serve`.
fn cmd_serve(registry: &Registry, args: ServeArgs) -> anyhow::Result<u8> {
    tools::serve(
        registry,
        &args.model,
        args.adapter.as_deref(),
        &args.addr,
        args.name.as_deref(),
        args.cuda,
    )
}
