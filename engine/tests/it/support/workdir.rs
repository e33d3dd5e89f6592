//! A store in a temporary folder, a log the test kinds append their stage ids to (so a test
//! counts executions), the kinds that write it, and a quiet run on the in-process executor.
//! A test file wraps [`Workdir`] in its own `Fixture` (deref to it) to add its pipelines.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use emflow_cache::Store;
use emflow_engine::console::{ReportMode, Reporter};
use emflow_engine::executor::InProcessExecutor;
use emflow_engine::pipeline::Pipeline;
use emflow_engine::scheduler::{run_pipeline, RunEnv, RunOptions, RunSummary};
use emflow_engine::{KindInfo, KindSpec, ParamSpec, ParamType, Registry, StageContext, StageKind};
use serde_json::json;

pub struct Workdir {
    pub dir: tempfile::TempDir,
    pub store: Arc<Store>,
}

impl Workdir {
    /// A fresh folder holding a stand-in `emflow.yaml` and a store in `.emflow/`.
    pub fn new() -> Workdir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("emflow.yaml"), "# stand-in manifest\n").unwrap();
        let store = Arc::new(Store::open(&dir.path().join(".emflow")).unwrap());
        Workdir { dir, store }
    }

    /// The run log: the value test kinds take as their `log` param.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("runs.log")
    }

    /// Stage ids executed since the last call, sorted; clears the log.
    pub fn executed(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let _ = std::fs::remove_file(self.log());
        let mut ids: Vec<String> = text.lines().map(String::from).collect();
        ids.sort();
        ids
    }

    /// Entries left in the store's `tmp/`, apart from the empty spare folders this process
    /// keeps for reuse.
    pub fn tmp_leftovers(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.store.root().join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let spare = p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("spare-"));
                !(spare && std::fs::read_dir(p).unwrap().next().is_none())
            })
            .collect()
    }

    /// Runs `pipeline` on this store with the in-process executor, reporting nothing.
    pub fn run_quiet(
        &self,
        registry: &Registry,
        pipeline: &Pipeline,
        opts: &RunOptions,
    ) -> anyhow::Result<RunSummary> {
        let stop = Arc::new(AtomicBool::new(false));
        run_quiet(registry, self.store.clone(), pipeline, opts, stop)
    }
}

/// Runs `pipeline` on `store` with the in-process executor, reporting nothing; setting
/// `stop` asks the run to stop as Ctrl-C would.
pub fn run_quiet(
    registry: &Registry,
    store: Arc<Store>,
    pipeline: &Pipeline,
    opts: &RunOptions,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<RunSummary> {
    let executor = InProcessExecutor::new(registry.clone(), store.clone());
    let env = RunEnv {
        registry,
        store,
        executor: &executor,
        reporter: Reporter::new(ReportMode::Quiet),
        stop,
    };
    run_pipeline(pipeline, &env, opts)
}

/// Writes param `text` to output `out`; appends its stage id to the file named by param
/// `log` so tests can count executions. Param `note` does not affect the output.
pub struct Emit;
impl StageKind for Emit {
    fn spec(&self) -> KindSpec {
        let params = vec![
            ParamSpec::required("text", ParamType::String, ""),
            ParamSpec::optional("note", ParamType::String, json!(""), ""),
            ParamSpec::optional("lr", ParamType::Float, json!(0.1), ""),
            ParamSpec::required("log", ParamType::String, ""),
            ParamSpec::optional("sleep_ms", ParamType::Int, json!(0), ""),
        ];
        KindInfo::new("emit", 1, "writes a text")
            .ports("out out file")
            .into_spec(params, false)
    }
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        log_run(ctx)?;
        let ms: u64 = ctx.param("sleep_ms")?;
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let text: String = ctx.param("text")?;
        std::fs::write(ctx.output_path("out"), text)?;
        Ok(())
    }
}

/// Appends the stage id to the file named by param `log`.
pub fn log_run(ctx: &StageContext) -> anyhow::Result<()> {
    let log: String = ctx.param("log")?;
    append_line(Path::new(&log), &ctx.stage_id)
}

/// One `write` per line: `writeln!` on a `File` writes the text and the newline separately, and
/// stages running in parallel then interleaved them ("ca", "" instead of "c", "a"), which
/// failed a CI run.
pub fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    Ok(())
}
