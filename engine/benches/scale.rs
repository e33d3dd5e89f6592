//! The engine at sweep scale (issue 22): a source stage fanned out by a two-axis matrix to
//! 1,000, 10,000 and 100,000 instances. For each size, in a child process of its own (so
//! that its peak memory is its own): load + expand the manifest, a dry run (plan every
//! stage, keys where known), and up to 10,000 stages a first run and a no-op rerun on the
//! in-process executor with a kind that writes one small file (the engine's and the store's
//! own cost per stage, without process starts). Prints each figure, the growth exponent
//! between sizes (1.0 = linear) and the child's peak RSS.
//!
//! `cargo bench -p emflow-engine --bench scale`

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use emflow_cache::Store;
use emflow_engine::executor::InProcessExecutor;
use emflow_engine::expand::{load_pipeline_str, LoadOptions};
use emflow_engine::report::{ReportMode, Reporter};
use emflow_engine::run::{run_pipeline, RunEnv, RunOptions};
use emflow_engine::{
    ArtifactType, KindSpec, ParamSpec, ParamType, PortSpec, Registry, StageContext, StageKind,
};

/// Writes its `cell` param to `out`; reads nothing of its optional input but its path.
struct Touch;
impl StageKind for Touch {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "touch",
            version: 1,
            summary: "writes one small file",
            params: vec![ParamSpec::required("cell", ParamType::String, "")],
            open_params: false,
            precision: Default::default(),
            inputs: vec![PortSpec::many_input("in", ArtifactType::File, "")],
            outputs: vec![PortSpec::output("out", ArtifactType::File, "")],
        }
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let cell: String = ctx.param("cell")?;
        std::fs::write(ctx.output_path("out"), cell)?;
        Ok(())
    }
}

const SIZES: [usize; 3] = [1_001, 10_001, 100_001];
/// Largest size that is also run for real (a first run of 100,000 stages takes minutes).
const MAX_EXECUTED: usize = 10_001;

/// `src` plus a `side_a x side_b` matrix stage reading it: `n` instances in all.
fn manifest(n: usize) -> String {
    let side_a = 100.min(n / 10);
    let side_b = (n - 1) / side_a;
    let list = |k: usize| (0..k).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    format!(
        "emflow: 1\nname: scale\nstages:\n  src:\n    kind: touch\n    params: {{cell: src}}\n  cell:\n    kind: touch\n    matrix: {{a: [{}], b: [{}]}}\n    inputs: {{in: src.out}}\n    params: {{cell: '${{matrix.a}}-${{matrix.b}}'}}\n",
        list(side_a),
        list(side_b)
    )
}

fn registry() -> Registry {
    Registry::new().with_kind(Touch)
}

/// One size, in this (child) process: prints `figure <name> <value>` lines.
fn child(n: usize) -> anyhow::Result<()> {
    let registry = registry();
    let src = manifest(n);
    let clock = Instant::now();
    let pipeline = load_pipeline_str(
        &src,
        Path::new("scale.yaml"),
        &LoadOptions::default(),
        &registry,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "the generated manifest does not load:\n{}",
            e.render_plain()
        )
    })?;
    println!("figure load_s {}", clock.elapsed().as_secs_f64());
    println!("figure stages {}", pipeline.stages.len());
    println!(
        "figure load_rss_mib {}",
        peak_rss_bytes() as f64 / 1048576.0
    );

    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(&dir.path().join("store"))?);
    let executor = InProcessExecutor::new(registry.clone(), store.clone());
    let env = RunEnv {
        registry: &registry,
        store: store.clone(),
        executor: &executor,
        reporter: Reporter::new(ReportMode::Quiet),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let mut opts = RunOptions {
        dry_run: true,
        gpus: Vec::new(),
        ..RunOptions::default()
    };
    let clock = Instant::now();
    run_pipeline(&pipeline, &env, &opts)?;
    println!("figure dry_run_s {}", clock.elapsed().as_secs_f64());

    if n <= MAX_EXECUTED {
        opts.dry_run = false;
        let clock = Instant::now();
        let first = run_pipeline(&pipeline, &env, &opts)?;
        anyhow::ensure!(first.ok(), "the first run failed: {:?}", first.errors);
        println!("figure first_run_s {}", clock.elapsed().as_secs_f64());
        let clock = Instant::now();
        run_pipeline(&pipeline, &env, &opts)?;
        println!("figure noop_rerun_s {}", clock.elapsed().as_secs_f64());
    }
    println!(
        "figure peak_rss_mib {}",
        peak_rss_bytes() as f64 / 1048576.0
    );
    Ok(())
}

fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    (usage.ru_maxrss.max(0) as u64) * 1024
}

/// Runs each size in a child process and prints the table.
fn parent() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let names = [
        ("load_s", "load + expand"),
        ("dry_run_s", "dry run (plan)"),
        ("first_run_s", "first run, in-process"),
        ("noop_rerun_s", "no-op rerun"),
        ("load_rss_mib", "peak RSS after load (MiB)"),
        ("peak_rss_mib", "peak RSS (MiB)"),
    ];
    let mut rows: Vec<Vec<Option<f64>>> = Vec::new();
    for n in SIZES {
        let out = Command::new(&exe)
            .env("EMFLOW_BENCH_SCALE_N", n.to_string())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "size {n} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let value = |name: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix("figure "))
                .filter_map(|l| l.split_once(' '))
                .find(|(k, _)| *k == name)
                .and_then(|(_, v)| v.parse::<f64>().ok())
        };
        rows.push(names.iter().map(|(k, _)| value(k)).collect());
    }
    print!("{:<26}", "stages");
    for n in SIZES {
        print!("{n:>12}");
    }
    println!("   growth exponent per step (1.0 = linear)");
    for (j, (key, label)) in names.iter().enumerate() {
        print!("{label:<26}");
        for row in &rows {
            match row[j] {
                Some(v) if key.ends_with("_s") => print!("{:>11.3}s", v),
                Some(v) => print!("{v:>12.1}"),
                None => print!("{:>12}", "-"),
            }
        }
        let exps: Vec<String> = rows
            .windows(2)
            .zip(SIZES.windows(2))
            .filter_map(|(r, s)| {
                let (a, b) = (r[0][j]?, r[1][j]?);
                (a > 0.0).then(|| format!("{:.2}", (b / a).ln() / (s[1] as f64 / s[0] as f64).ln()))
            })
            .collect();
        println!("   {}", exps.join(", "));
    }
    Ok(())
}

fn main() {
    let result = match std::env::var("EMFLOW_BENCH_SCALE_N") {
        Ok(n) => match n.parse() {
            Ok(n) => child(n),
            Err(e) => Err(anyhow::anyhow!("EMFLOW_BENCH_SCALE_N={n}: {e}")),
        },
        Err(_) => parent(),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
