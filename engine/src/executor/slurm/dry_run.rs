//! `emflow run --executor slurm --dry-run`: the `sbatch` command line each stage that
//! would run gets, so a user can check partition, account and resources before
//! submitting anything.

use std::collections::BTreeSet;
use std::path::Path;

use emflow_cache::Store;

use super::profile::{command_line, sbatch_args, ClusterProfile, Request, Submission};
use super::script;
use crate::kind::Registry;
use crate::pipeline::Pipeline;
use crate::plan::{Planner, State};

/// Prints one `sbatch` line per stage that is not cached. Stages whose key is not known
/// yet (their upstream has not run) show `<key>` where the key will go.
pub fn print_dry_run(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
    profile: &ClusterProfile,
    run_id: &str,
) -> anyhow::Result<()> {
    let mut planner = Planner::new(pipeline, registry, store)?;
    let statuses = planner.statuses(None, &BTreeSet::new())?;
    let root = store.root().join("slurm").join("work");
    let job_name = format!("emflow-{run_id}");
    println!("Slurm submissions (dry run; nothing submitted):");
    for (i, status) in statuses {
        if matches!(status.state, State::Cached) {
            continue;
        }
        let key = status.key.unwrap_or_else(|| "<key>".to_string());
        let dir = root
            .join(if key.starts_with('<') {
                "<k>"
            } else {
                &key[..2.min(key.len())]
            })
            .join(&key)
            .join("attempt-1");
        let script = dir.join(script::SCRIPT_FILE);
        let req = Request::from_resources(&pipeline.stages[i].resources, profile);
        let args = sbatch_args(
            profile,
            &req,
            &Submission {
                job_name: &job_name,
                stage_key: &key,
                attempt_dir: &dir,
                script: Path::new(&script),
            },
        );
        println!("  {}: {}", status.id, command_line("sbatch", &args));
    }
    Ok(())
}
