//! Behaviour of the engine back end a user relies on, driven through the library with the
//! in-process executor and small test kinds: caching, exact invalidation, early cutoff,
//! explanations, lock/check, concurrency, and the pinned key scheme.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use emflow_cache::Store;
use emflow_engine::commands;
use emflow_engine::console::{ReportMode, Reporter};
use emflow_engine::executor::InProcessExecutor;
use emflow_engine::keys::{EnvParts, KeyParts};
use emflow_engine::pipeline::{InputRef, Pipeline, Resources, SourceSpan, StageInstance};
use emflow_engine::plan::State;
use emflow_engine::scheduler::{RunOptions, StageResult};
use emflow_engine::{
    KindInfo, KindSpec, ModelFetcher, ParamSpec, ParamType, Progress, Registry, StageContext,
    StageKind,
};
use serde_json::{json, Value};

use crate::support::workdir::{append_line, log_run, run_quiet, Emit, Workdir};

/// Upper-cases its input `in` into `out`; fails when param `fail` is true.
struct Upper;
impl StageKind for Upper {
    fn spec(&self) -> KindSpec {
        let params = vec![
            ParamSpec::required("log", ParamType::String, ""),
            ParamSpec::optional("fail", ParamType::Bool, json!(false), ""),
        ];
        KindInfo::new("upper", 1, "upper-cases a file")
            .ports("in in file \n out out file")
            .into_spec(params, false)
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        log_run(ctx)?;
        if ctx.param::<bool>("fail")? {
            anyhow::bail!("asked to fail");
        }
        let text = std::fs::read_to_string(&ctx.input("in")?.path)?;
        std::fs::write(ctx.output_path("out"), text.to_uppercase())?;
        ctx.summarize("chars", text.len());
        Ok(())
    }
}

/// Fetches `fake:TEXT` by writing TEXT; counts fetches in a file next to it.
struct FakeFetcher(PathBuf);
impl ModelFetcher for FakeFetcher {
    fn schemes(&self) -> &'static [&'static str] {
        &["fake"]
    }
    fn fetch(&self, source: &str, dest: &std::path::Path, _: &dyn Progress) -> anyhow::Result<()> {
        append_line(&self.0, source)?;
        std::fs::write(dest, source.trim_start_matches("fake:"))?;
        Ok(())
    }
}

/// Saves a checkpoint, then waits for a stop request and asks to be rerun; on the rerun it
/// finds its checkpoint and finishes.
struct Resumable;
impl StageKind for Resumable {
    fn spec(&self) -> KindSpec {
        let log = ParamSpec::required("log", ParamType::String, "");
        KindInfo::new("resumable", 1, "checkpoints and stops")
            .ports("out out file")
            .into_spec(vec![log], false)
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        log_run(ctx)?;
        let state = ctx.checkpoint_dir().join("state");
        if state.exists() {
            std::fs::write(ctx.output_path("out"), "resumed")?;
            return Ok(());
        }
        std::fs::write(&state, "half done")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !ctx.interrupt_requested() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        ctx.check_interrupt()?;
        anyhow::bail!("never asked to stop")
    }
}

fn registry() -> Registry {
    Registry::new()
        .with_kind(Emit)
        .with_kind(Upper)
        .with_kind(Resumable)
}

/// These tests build their pipelines by hand, without the manifest front end.
type Fixture = Workdir;

impl Workdir {
    fn instance(
        &self,
        id: &str,
        kind: &str,
        params: Value,
        inputs: &[(&str, InputRef)],
    ) -> StageInstance {
        let mut params = params.as_object().cloned().unwrap();
        params.insert("log".into(), json!(self.log().display().to_string()));
        let spec = registry().kind(kind).unwrap().spec();
        for p in &spec.params {
            if let (false, Some(d)) = (params.contains_key(&p.name), &p.default) {
                params.insert(p.name.clone(), d.clone());
            }
        }
        let mut ins: BTreeMap<String, Vec<InputRef>> = BTreeMap::new();
        for (port, r) in inputs {
            ins.entry(port.to_string()).or_default().push(r.clone());
        }
        StageInstance {
            id: id.into(),
            stage: id.split('[').next().unwrap().into(),
            matrix: Vec::new(),
            kind: kind.into(),
            params,
            inputs: ins,
            outputs: spec
                .outputs
                .iter()
                .map(|p| (p.name.clone(), p.ty))
                .collect(),
            resources: Resources::default(),
            span: SourceSpan::default(),
        }
    }

    fn pipeline(&self, stages: Vec<StageInstance>) -> Pipeline {
        Pipeline {
            name: "test".into(),
            manifest_path: self.dir.path().join("emflow.yaml"),
            manifest_dir: self.dir.path().to_path_buf(),
            profile: None,
            models: BTreeMap::new(),
            stages,
        }
    }

    /// a -> b, c -> d (b reads a, d reads c), plus an input file for c.
    fn chain(&self, a_text: &str, a_note: &str, c_lr: Value) -> Pipeline {
        let data = self.dir.path().join("data.txt");
        if !data.exists() {
            std::fs::write(&data, "hello file").unwrap();
        }
        self.pipeline(vec![
            self.instance("a", "emit", json!({"text": a_text, "note": a_note}), &[]),
            self.instance(
                "b",
                "upper",
                json!({}),
                &[(
                    "in",
                    InputRef::Stage {
                        stage: "a".into(),
                        output: "out".into(),
                    },
                )],
            ),
            self.instance("c", "emit", json!({"text": "c", "lr": c_lr}), &[]),
            self.instance(
                "d",
                "upper",
                json!({}),
                &[(
                    "in",
                    InputRef::Stage {
                        stage: "c".into(),
                        output: "out".into(),
                    },
                )],
            ),
            self.instance(
                "e",
                "upper",
                json!({}),
                &[("in", InputRef::File { path: data })],
            ),
        ])
    }

    fn run(&self, pipeline: &Pipeline, opts: RunOptions) -> emflow_engine::scheduler::RunSummary {
        self.run_with(registry(), pipeline, opts)
    }

    /// Runs `pipeline` with [`opts`]: the stages that executed (see [`Workdir::executed`]).
    fn executed_by(&self, pipeline: &Pipeline) -> Vec<String> {
        self.run(pipeline, opts());
        self.executed()
    }

    /// The chain with its usual values (text `x`, no note, lr 0.1), run once and the run log
    /// cleared: the start of the tests that edit it or look at its results.
    fn ran_chain(&self) -> Pipeline {
        let p = self.chain("x", "", json!(0.1));
        self.executed_by(&p);
        p
    }

    /// Runs `first`, then `second` on the same store: the stages the second run executed.
    fn executed_by_rerun(&self, first: &Pipeline, second: &Pipeline) -> Vec<String> {
        self.executed_by(first);
        self.executed_by(second)
    }

    fn run_with(
        &self,
        registry: Registry,
        pipeline: &Pipeline,
        opts: RunOptions,
    ) -> emflow_engine::scheduler::RunSummary {
        let opts = RunOptions {
            gpus: vec![],
            ..opts
        };
        self.run_quiet(&registry, pipeline, &opts).unwrap()
    }
}

fn opts() -> RunOptions {
    RunOptions {
        jobs: 4,
        cpus: 4,
        gpus: vec![],
        ..RunOptions::default()
    }
}

fn results(summary: &emflow_engine::scheduler::RunSummary) -> Vec<(String, StageResult)> {
    summary.stages.clone()
}

#[test]
fn second_run_does_no_work_and_says_so_for_every_stage() {
    let fx = Fixture::new();
    let p = fx.chain("x", "", json!(0.1));
    let first = fx.run(&p, opts());
    assert!(first.ok(), "{:?}", first.errors);
    assert_eq!(fx.executed(), ["a", "b", "c", "d", "e"]);
    let second = fx.run(&p, opts());
    assert!(
        fx.executed().is_empty(),
        "nothing may execute on a fully cached rerun"
    );
    assert!(
        results(&second)
            .iter()
            .all(|(_, r)| *r == StageResult::Cached),
        "{:?}",
        second.stages
    );
    assert_eq!(second.stages.len(), 5);
}

#[test]
fn a_param_change_reruns_exactly_the_affected_stages_and_status_names_it() {
    let fx = Fixture::new();
    fx.ran_chain();
    let edited = fx.chain("x", "", json!(0.2));
    let statuses = commands::status(
        &edited,
        &registry(),
        &fx.store,
        &Reporter::new(ReportMode::Quiet),
    )
    .unwrap();
    let c = statuses.iter().find(|s| s.id == "c").unwrap();
    match &c.state {
        State::Stale { changes } => assert_eq!(changes[0].detail, "lr: 0.1 -> 0.2"),
        other => panic!("c should be stale, is {other:?}"),
    }
    let d = statuses.iter().find(|s| s.id == "d").unwrap();
    assert!(
        matches!(d.state, State::Pending { .. }),
        "d waits on c's new output: {:?}",
        d.state
    );
    assert!(statuses
        .iter()
        .filter(|s| ["a", "b", "e"].contains(&s.id.as_str()))
        .all(|s| matches!(s.state, State::Cached)));

    let summary = fx.run(&edited, opts());
    // c reruns; its bytes are the same text, so d stays cached (early cutoff).
    assert_eq!(fx.executed(), ["c"]);
    assert_eq!(summary.result_of("d"), Some(&StageResult::Cached));
}

#[test]
fn an_upstream_rerun_with_identical_bytes_leaves_downstream_cached() {
    let fx = Fixture::new();
    let first = fx.chain("x", "first", json!(0.1));
    let renoted = fx.chain("x", "second", json!(0.1));
    assert_eq!(
        fx.executed_by_rerun(&first, &renoted),
        ["a"],
        "only a's key changed; b sees the same bytes"
    );
    let retexted = fx.chain("y", "second", json!(0.1));
    assert_eq!(
        fx.executed_by(&retexted),
        ["a", "b"],
        "different bytes do invalidate b"
    );
}

#[test]
fn one_and_one_point_zero_key_the_same_for_float_params() {
    let fx = Fixture::new();
    let int = fx.chain("x", "", json!(1));
    let float = fx.chain("x", "", json!(1.0));
    assert!(fx.executed_by_rerun(&int, &float).is_empty());
}

#[test]
fn an_input_file_edit_reruns_its_reader() {
    let fx = Fixture::new();
    let p = fx.ran_chain();
    std::fs::write(fx.dir.path().join("data.txt"), "changed").unwrap();
    assert_eq!(fx.executed_by(&p), ["e"]);
}

#[test]
fn a_failure_stops_dependents_and_keep_going_runs_the_rest() {
    let fx = Fixture::new();
    let failing = |fx: &Fixture| {
        fx.pipeline(vec![
            fx.instance("a", "emit", json!({"text": "a"}), &[]),
            fx.instance(
                "b",
                "upper",
                json!({"fail": true}),
                &[(
                    "in",
                    InputRef::Stage {
                        stage: "a".into(),
                        output: "out".into(),
                    },
                )],
            ),
            fx.instance(
                "c",
                "upper",
                json!({}),
                &[(
                    "in",
                    InputRef::Stage {
                        stage: "b".into(),
                        output: "out".into(),
                    },
                )],
            ),
            fx.instance("z", "emit", json!({"text": "z", "sleep_ms": 50}), &[]),
        ])
    };
    let summary = fx.run(
        &failing(&fx),
        RunOptions {
            keep_going: true,
            jobs: 1,
            ..opts()
        },
    );
    assert!(!summary.ok());
    assert_eq!(summary.result_of("b"), Some(&StageResult::Failed));
    assert_eq!(summary.result_of("c"), Some(&StageResult::Skipped));
    assert_eq!(summary.result_of("z"), Some(&StageResult::Ran));
    assert!(
        summary.errors["b"].contains("asked to fail"),
        "{}",
        summary.errors["b"]
    );
    // Nothing of the failed stage is visible in the store.
    let statuses = commands::status(
        &failing(&fx),
        &registry(),
        &fx.store,
        &Reporter::new(ReportMode::Quiet),
    )
    .unwrap();
    assert!(matches!(
        statuses.iter().find(|s| s.id == "b").unwrap().state,
        State::Missing { .. }
    ));
}

#[test]
fn only_runs_the_stage_and_its_missing_upstream_and_force_reruns() {
    let fx = Fixture::new();
    let p = fx.chain("x", "", json!(0.1));
    fx.run(
        &p,
        RunOptions {
            only: vec!["b".into()],
            ..opts()
        },
    );
    assert_eq!(fx.executed(), ["a", "b"]);
    fx.run(
        &p,
        RunOptions {
            force: vec!["a".into()],
            ..opts()
        },
    );
    assert_eq!(
        fx.executed(),
        ["a", "c", "d", "e"],
        "a forced; b cached (same bytes); the rest were missing"
    );
}

#[test]
fn check_fails_after_a_key_changing_edit_and_passes_after_lock() {
    let fx = Fixture::new();
    let reg = registry();
    let p = fx.ran_chain();
    commands::lock(&p, &reg, &fx.store).unwrap();
    let lock_text = std::fs::read_to_string(fx.dir.path().join("emflow.lock")).unwrap();
    commands::lock(&p, &reg, &fx.store).unwrap();
    assert_eq!(
        lock_text,
        std::fs::read_to_string(fx.dir.path().join("emflow.lock")).unwrap(),
        "re-locking is byte-stable"
    );
    assert!(commands::check(&p, &reg, &fx.store).unwrap().is_empty());

    let edited = fx.chain("x", "", json!(0.3));
    let mismatches = commands::check(&edited, &reg, &fx.store).unwrap();
    assert_eq!(mismatches.len(), 2, "{mismatches:?}");
    assert_eq!(mismatches[0].stage, "c");
    assert_eq!(mismatches[0].why, ["lr: 0.1 -> 0.3"]);
    assert!(
        commands::lock(&edited, &reg, &fx.store).is_err(),
        "cannot lock what has not run"
    );
    fx.run(&edited, opts());
    commands::lock(&edited, &reg, &fx.store).unwrap();
    assert!(commands::check(&edited, &reg, &fx.store)
        .unwrap()
        .is_empty());
}

#[test]
fn verify_reports_reproducible_stages() {
    let fx = Fixture::new();
    let reg = registry();
    let p = fx.ran_chain();
    let executor = InProcessExecutor::new(reg.clone(), fx.store.clone());
    let results = commands::verify(
        &p,
        &reg,
        &fx.store,
        &executor,
        &Reporter::new(ReportMode::Quiet),
        &["b".into()],
        2,
    )
    .unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].verdict, "same");
}

#[test]
fn two_concurrent_runs_never_run_the_same_key_twice() {
    let fx = Fixture::new();
    let p = fx.pipeline(vec![
        fx.instance("slow", "emit", json!({"text": "s", "sleep_ms": 300}), &[]),
        fx.instance(
            "next",
            "upper",
            json!({}),
            &[(
                "in",
                InputRef::Stage {
                    stage: "slow".into(),
                    output: "out".into(),
                },
            )],
        ),
    ]);
    let (fx_ref, p_ref) = (&fx, &p);
    let summaries: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(move || {
                    // A separate Store handle per "process".
                    let store = Arc::new(Store::open(fx_ref.store.root()).unwrap());
                    let stop = Arc::new(AtomicBool::new(false));
                    run_quiet(&registry(), store, p_ref, &opts(), stop).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        fx.executed(),
        ["next", "slow"],
        "each key executed exactly once"
    );
    assert!(summaries.iter().all(|s| s.ok()));
    let reused: usize = summaries
        .iter()
        .map(|s| s.count(StageResult::Reused) + s.count(StageResult::Cached))
        .sum();
    assert_eq!(reused, 2);
}

#[test]
fn a_fetched_model_is_fetched_once_and_keyed_by_content() {
    let fx = Fixture::new();
    let fetch_log = fx.dir.path().join("fetches.log");
    let reg = || registry().with_fetcher(FakeFetcher(fetch_log.clone()));
    let mut p = fx.pipeline(vec![fx.instance(
        "shout",
        "upper",
        json!({}),
        &[("in", InputRef::Model { name: "m".into() })],
    )]);
    p.models.insert(
        "m".into(),
        emflow_engine::pipeline::ModelDecl {
            name: "m".into(),
            source: "fake:weights".into(),
            span: SourceSpan::default(),
            shape: None,
        },
    );
    let statuses =
        commands::status(&p, &reg(), &fx.store, &Reporter::new(ReportMode::Quiet)).unwrap();
    assert!(
        matches!(&statuses[0].state, State::Pending { waiting_on, .. } if waiting_on == &["models.m".to_string()])
    );
    assert!(fx.run_with(reg(), &p, opts()).ok());
    assert!(fx.run_with(reg(), &p, opts()).ok());
    assert_eq!(
        std::fs::read_to_string(&fetch_log).unwrap(),
        "fake:weights\n",
        "fetched exactly once"
    );
    assert_eq!(fx.executed(), ["shout"]);
}

#[test]
fn a_stop_request_checkpoints_and_the_next_run_resumes() {
    let fx = Fixture::new();
    let p = fx.pipeline(vec![
        fx.instance("long", "resumable", json!({}), &[]),
        fx.instance(
            "after",
            "upper",
            json!({}),
            &[(
                "in",
                InputRef::Stage {
                    stage: "long".into(),
                    output: "out".into(),
                },
            )],
        ),
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let summary = std::thread::scope(|s| {
        let run = s
            .spawn(|| run_quiet(&registry(), fx.store.clone(), &p, &opts(), stop.clone()).unwrap());
        while !fx.log().exists() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        run.join().unwrap()
    });
    assert!(summary.interrupted);
    assert_eq!(summary.result_of("long"), Some(&StageResult::Interrupted));
    assert_eq!(summary.result_of("after"), Some(&StageResult::Skipped));
    fx.executed();
    let again = fx.run(&p, opts());
    assert!(again.ok(), "{:?}", again.errors);
    assert_eq!(fx.executed(), ["after", "long"]);
    let record = fx
        .store
        .records()
        .unwrap()
        .into_iter()
        .find(|(_, r)| r.stage_id == "long")
        .unwrap()
        .1;
    assert_eq!(
        std::fs::read_to_string(fx.store.artifact_path(&record.outputs["out"])).unwrap(),
        "resumed"
    );
}

#[test]
fn golden_stage_key_is_pinned() {
    // If this fails, the key scheme changed: every user's cache is invalidated. Bump
    // KEY_SCHEMA deliberately and update this digest, never silently.
    let spec = Emit.spec();
    let params = json!({"text": "hello", "note": "", "lr": 1, "log": "/x", "sleep_ms": 0})
        .as_object()
        .cloned()
        .unwrap();
    let inputs = BTreeMap::from([("data".to_string(), vec!["ab".repeat(32)])]);
    let env = EnvParts {
        emflow: "0.1.0".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
    };
    let parts = KeyParts::new(&spec, &params, inputs, env);
    let mut text = String::new();
    emflow_engine::keys::write_canonical(&parts.to_value(), &mut text);
    assert_eq!(
        text,
        format!(
            r#"{{"env":{{"device":"cpu","dtype":"f32","emflow":"0.1.0"}},"inputs":{{"data":["{}"]}},"kind":"emit","kind_version":1,"params":{{"log":"/x","lr":1.0,"note":"","sleep_ms":0,"text":"hello"}},"schema":1}}"#,
            "ab".repeat(32)
        )
    );
    assert_eq!(parts.key(), GOLDEN_KEY);
}

const GOLDEN_KEY: &str = "b625174a60481791b0ae03509c7105785d75f511807d9534df84c45e7bfd6d4a";
