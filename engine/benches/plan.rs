//! Manifest front-end speed: parse + expand + validate generated manifests of ~10,000
//! stage instances (a chain, a wide fan, a 100x100 matrix joined downstream) and of 50,000
//! top-level params (planning was once quadratic in them). Prints the figures; the target
//! is well under a second each on one core in a release build.
//!
//! `cargo bench -p emflow-engine --bench plan`
//! (Key computation and dry-run planning are measured by `benches/plan_keys.rs`.)

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use emflow_engine::expand::{load_pipeline_str, LoadOptions};
use emflow_engine::{
    ArtifactType, KindSpec, ParamSpec, ParamType, PortSpec, Registry, StageContext, StageKind,
};
use serde_json::json;

struct Step;
impl StageKind for Step {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "step",
            version: 1,
            summary: "bench kind",
            params: vec![
                ParamSpec::required("lr", ParamType::Float, "learning rate"),
                ParamSpec::optional("seed", ParamType::Int, json!(0), "seed"),
                ParamSpec::optional("label", ParamType::String, json!(""), "label"),
                ParamSpec::optional("ops", ParamType::List, json!([]), "ops"),
            ],
            open_params: false,
            precision: Default::default(),
            inputs: vec![PortSpec::many_input("in", ArtifactType::File, "inputs")],
            outputs: vec![PortSpec::output("out", ArtifactType::File, "output")],
        }
    }
    fn run(&self, _: &mut StageContext) -> anyhow::Result<()> {
        anyhow::bail!("the bench only plans")
    }
}

const HEADER: &str = "\
emflow: 1
name: bench
params:
  lr: 0.001
  seed: 0
  data_root: ./data
  tag: run-${seed}
stages:
  root:
    kind: step
    inputs: {in: 'file:${data_root}/train.jsonl'}
    params: {lr: '${lr}', label: '${tag}'}
";

/// `n` stages, each reading the previous one.
fn chain(n: usize) -> String {
    let mut s = HEADER.to_string();
    for i in 1..n {
        let prev = if i == 1 {
            "root".to_string()
        } else {
            format!("s{}", i - 1)
        };
        let _ = write!(
            s,
            "  s{i}:\n    kind: step\n    inputs: {{in: {prev}.out}}\n    params: {{lr: '${{lr}}', seed: {i}, ops: [{{take: {i}}}]}}\n"
        );
    }
    s
}

/// One root read by `n - 2` stages, all collected by a last stage (a 9,998-way fan-in).
fn fan(n: usize) -> String {
    let mut s = HEADER.to_string();
    let mut all = Vec::with_capacity(n);
    for i in 1..n - 1 {
        let _ = write!(s, "  f{i}:\n    kind: step\n    inputs: {{in: root.out}}\n    params: {{lr: 0.1, seed: {i}}}\n");
        all.push(format!("f{i}.out"));
    }
    let _ = write!(
        s,
        "  collect:\n    kind: step\n    inputs: {{in: [{}]}}\n    params: {{lr: 1}}\n",
        all.join(", ")
    );
    s
}

/// A 100x100 matrix stage, joined on `a` by a 100-cell stage (each fans in 100 cells).
fn matrix(side: usize) -> String {
    let values: Vec<String> = (0..side).map(|i| i.to_string()).collect();
    let values = values.join(", ");
    format!(
        "{HEADER}  sweep:\n    kind: step\n    matrix: {{a: [{values}], b: [{values}]}}\n    inputs: {{in: root.out}}\n    params: {{lr: '${{lr}}', seed: '${{matrix.a}}', label: 'b=${{matrix.b}}'}}\n  per_a:\n    kind: step\n    matrix: {{a: [{values}]}}\n    inputs: {{in: sweep.out}}\n    params: {{lr: 1, seed: '${{matrix.a}}'}}\n"
    )
}

/// `n` top-level params (a quarter referring to the one before), read by one stage.
fn params(n: usize) -> String {
    let mut s = String::from("emflow: 1\nname: bench\nparams:\n");
    for i in 0..n {
        if i % 4 == 3 {
            let _ = writeln!(s, "  p{i}: 'x-${{p{}}}'", i - 1);
        } else {
            let _ = writeln!(s, "  p{i}: {i}");
        }
    }
    let _ = write!(
        s,
        "stages:\n  root:\n    kind: step\n    params: {{lr: 0.1, label: '${{p{}}}'}}\n",
        n - 1
    );
    s
}

/// CPU time of this thread: on a busy machine it shows the work done, where wall time also
/// counts waiting for a core.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the OS knows.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn time_load(name: &str, src: &str, registry: &Registry) {
    let path = Path::new("bench.yaml");
    let opts = LoadOptions::default();
    let mut times: Vec<Duration> = Vec::new();
    let mut cpu: Vec<Duration> = Vec::new();
    let mut instances = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let cpu_start = thread_cpu();
        match load_pipeline_str(src, path, &opts, registry) {
            Ok(p) => instances = p.stages.len(),
            Err(e) => {
                eprintln!(
                    "{name}: the generated manifest does not load:\n{}",
                    e.render_plain()
                );
                std::process::exit(1);
            }
        }
        times.push(start.elapsed());
        cpu.push(thread_cpu() - cpu_start);
    }
    times.sort();
    cpu.sort();
    println!(
        "front end  {name:<26} {instances:>6} instances {:>7.1} KiB  load+expand wall: min {:>6.1} ms median {:>6.1} ms  cpu: min {:>6.1} ms",
        src.len() as f64 / 1024.0,
        times[0].as_secs_f64() * 1e3,
        times[times.len() / 2].as_secs_f64() * 1e3,
        cpu[0].as_secs_f64() * 1e3,
    );
}

/// The manifest front end's figures (parse, profiles, references, matrix, validation).
fn front_end_figures() {
    let registry = Registry::new().with_kind(Step);
    time_load("chain of 10,000", &chain(10_000), &registry);
    time_load("fan of 10,000 (+ fan-in)", &fan(10_000), &registry);
    time_load("matrix 100x100 (+ join)", &matrix(100), &registry);
    time_load("50,000 top-level params", &params(50_000), &registry);
}

fn main() {
    // Single-threaded by construction: the front end uses no thread pool.
    front_end_figures();
}
