//! Planning speed: `run --dry-run` over a generated 10,000-stage pipeline (DAG build,
//! topological order, key computation for every stage whose inputs exist, store lookups).
//! Prints the figures; the target is under a second on one core.
//!
//! `cargo bench -p emflow-engine --bench plan_keys`

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use emflow_cache::Store;
use emflow_engine::executor::InProcessExecutor;
use emflow_engine::pipeline::{InputRef, Pipeline, Resources, SourceSpan, StageInstance};
use emflow_engine::report::{ReportMode, Reporter};
use emflow_engine::run::{run_pipeline, RunEnv, RunOptions};
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
                ParamSpec::required("lr", ParamType::Float, ""),
                ParamSpec::required("seed", ParamType::Int, ""),
            ],
            open_params: false,
            precision: Default::default(),
            inputs: vec![PortSpec::many_input("in", ArtifactType::File, "")],
            outputs: vec![PortSpec::output("out", ArtifactType::File, "")],
        }
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let seed: i64 = ctx.param("seed")?;
        std::fs::write(ctx.output_path("out"), seed.to_string())?;
        Ok(())
    }
}

/// `n` stages; every `fan`-th stage is a root reading a data file, the others read the
/// output of an earlier stage (a wide, deep DAG like a sweep).
fn pipeline(dir: &std::path::Path, n: usize, fan: usize, lr: f64) -> Pipeline {
    let data = dir.join("data.jsonl");
    std::fs::write(&data, "{\"messages\": []}\n".repeat(1000)).unwrap();
    let stages = (0..n)
        .map(|i| {
            let input = if i % fan == 0 {
                InputRef::File { path: data.clone() }
            } else {
                InputRef::Stage {
                    stage: format!("s{}", i - 1 - (i % 7).min(i - 1)),
                    output: "out".into(),
                }
            };
            StageInstance {
                id: format!("s{i}"),
                stage: format!("s{i}"),
                matrix: Vec::new(),
                kind: "step".into(),
                params: json!({"lr": lr, "seed": i}).as_object().cloned().unwrap(),
                inputs: BTreeMap::from([("in".to_string(), vec![input])]),
                outputs: BTreeMap::from([("out".to_string(), ArtifactType::File)]),
                resources: Resources::default(),
                span: SourceSpan::default(),
            }
        })
        .collect();
    Pipeline {
        name: "bench".into(),
        manifest_path: dir.join("emflow.yaml"),
        manifest_dir: dir.to_path_buf(),
        profile: None,
        models: BTreeMap::new(),
        stages,
    }
}

fn main() {
    let registry = Registry::new().with_kind(Step);
    let scenarios: [(&str, usize, usize); 3] = [
        (
            "empty store, all 10,000 keys computable (independent stages)",
            1,
            0,
        ),
        (
            "empty store, 1 root in 10, the rest downstream (pending)",
            10,
            0,
        ),
        (
            "store holding 2,000 older records of these stages (stale: explained)",
            1,
            2_000,
        ),
    ];
    for (label, fan, populate) in scenarios {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join(".emflow")).unwrap());
        let executor = InProcessExecutor::new(registry.clone(), store.clone());
        let env = RunEnv {
            registry: &registry,
            store: store.clone(),
            executor: &executor,
            reporter: Reporter::new(ReportMode::Quiet),
            stop: Arc::new(AtomicBool::new(false)),
        };
        if populate > 0 {
            let mut old = pipeline(dir.path(), 10_000, fan, 1e-3);
            old.stages.truncate(populate);
            let opts = RunOptions {
                jobs: 2,
                cpus: 2,
                gpus: vec![],
                ..RunOptions::default()
            };
            assert!(run_pipeline(&old, &env, &opts).unwrap().ok());
        }
        let p = pipeline(dir.path(), 10_000, fan, 1e-4);
        let opts = RunOptions {
            dry_run: true,
            jobs: 1,
            cpus: 1,
            gpus: vec![],
            ..RunOptions::default()
        };
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let summary = run_pipeline(&p, &env, &opts).unwrap();
            assert_eq!(summary.stages.len(), 10_000);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("plan (run --dry-run), 10,000 stages, {label}: {best:.3} s (best of 3)");
    }
}
