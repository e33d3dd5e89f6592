//! `emflow run --executor slurm` against a real single-node Slurm cluster started by
//! `scripts/slurm-local.sh` (own state folder and port per test). Skips with a printed
//! reason when the cluster cannot be started, unless `EMFLOW_REQUIRE_TEST_ASSETS=1`.
//!
//! The time-limit and requeue cases are the slow ones (Slurm checks limits and `--signal`
//! every 30 s, so a one-minute job ends 60-95 s in); everything else finishes in seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{
    emflow_in, kill_when_started, scratch, succeed, text, wait_for, write_manifest, Scratch,
};

struct Cluster {
    state: PathBuf,
    conf: String,
    port: u16,
}

impl Cluster {
    /// Starts a cluster and makes a test folder holding only `cluster.yaml`: the tests'
    /// [`PROFILE`] and then `profile_extra`. Returns `None` (after saying why) when a cluster
    /// is impossible here.
    fn start(name: &str, slot: u16, profile_extra: &str) -> Option<(Cluster, Scratch)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let state =
            std::env::temp_dir().join(format!("emflow-slurm-test-{name}-{}", std::process::id()));
        let port = 21000 + (std::process::id() % 400) as u16 * 10 + slot * 2;
        let out = Command::new("bash")
            .arg(root.join("scripts/slurm-local.sh"))
            .arg("start")
            .arg(&state)
            .env("EMFLOW_SLURM_PORT", port.to_string())
            .output();
        let conf = match &out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("export SLURM_CONF=").map(str::to_string)),
            _ => None,
        };
        let Some(conf) = conf else {
            let why = match out {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            if std::env::var("EMFLOW_REQUIRE_TEST_ASSETS").as_deref() == Ok("1") {
                panic!("could not start a local Slurm cluster: {why}");
            }
            eprintln!("skipping: could not start a local Slurm cluster: {why}");
            return None;
        };
        let cluster = Cluster { state, conf, port };
        let dir = scratch(&format!("slurm-{name}"));
        std::fs::write(
            dir.join("cluster.yaml"),
            format!("{PROFILE}{profile_extra}"),
        )
        .unwrap();
        Some((cluster, dir))
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn emflow(&self, dir: &Path) -> Command {
        let mut c = emflow_in(dir);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// The sbatch lines `--dry-run` prints for the test folder's manifest; checks that it
    /// submitted nothing.
    fn dry_run(&self, dir: &Path) -> String {
        let jobs = self.jobs().len();
        let dry = succeed(self.emflow(dir).args(RUN_ON_SLURM).arg("--dry-run"));
        assert_eq!(self.jobs().len(), jobs, "a dry run submitted jobs");
        dry
    }

    /// Runs the test folder's manifest again after it completed: every one of its `stages`
    /// is cached and no job is submitted.
    fn assert_rerun_is_cached(&self, dir: &Path, stages: usize) {
        let jobs = self.jobs().len();
        let text_out = succeed(self.emflow(dir).args(RUN_ON_SLURM));
        assert!(
            text_out.contains(&format!("all {stages} stages cached")),
            "{text_out}"
        );
        assert_eq!(self.jobs().len(), jobs, "a cached rerun submitted jobs");
    }

    /// `(job id, comment = stage key, state)` of every job the cluster remembers.
    fn jobs(&self) -> Vec<(String, String, String)> {
        let out = self
            .cmd("squeue")
            .args(["--noheader", "-t", "all", "-o", "%i|%k|%T"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let p: Vec<&str> = l.trim().split('|').collect();
                (p.len() == 3).then(|| (p[0].into(), p[1].into(), p[2].into()))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let _ = Command::new("bash")
            .arg(root.join("scripts/slurm-local.sh"))
            .arg("stop")
            .arg(&self.state)
            .env("EMFLOW_SLURM_PORT", self.port.to_string())
            .env("SLURM_CONF", &self.conf)
            .output();
        // The cluster's state (logs, spool) stays after a failure for a look, like the
        // scratch folder.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.state);
        }
    }
}

const PROFILE: &str = "poll_interval_s: 1\ngrace_s: 5\nretries: 0\n";
/// `emflow` arguments that run the test folder's `m.yaml` on the cluster of `cluster.yaml`.
const RUN_ON_SLURM: [&str; 6] = [
    "run",
    "m.yaml",
    "--executor",
    "slurm",
    "--cluster-config",
    "cluster.yaml",
];

/// Three stages fail three ways; each is reported with its reason, and a rerun (after
/// the cause is fixed) completes them.
const FAILING: &str = r#"
emflow: 1
name: failing
stages:
  bad:
    kind: command
    params:
      run: 'test -e "$EMFLOW_PARAM_FIX" || exit 3; echo ok > "$EMFLOW_OUT_OUT"'
      outputs: {out: file}
      fix: '@FIX@'
  slow:
    kind: command
    resources: {time: 1m}
    params:
      run: 'test -e "$EMFLOW_PARAM_FIX" || sleep 300; echo ok > "$EMFLOW_OUT_OUT"'
      outputs: {out: file}
      fix: '@FIX@'
  victim:
    kind: command
    params:
      run: 'echo "$SLURM_JOB_ID" > "$EMFLOW_PARAM_JOBFILE"; test -e "$EMFLOW_PARAM_FIX" || sleep 300; echo ok > "$EMFLOW_OUT_OUT"'
      outputs: {out: file}
      fix: '@FIX@'
      jobfile: '@JOBFILE@'
"#;

#[test]
fn exit_code_time_limit_and_cancel_are_reported_then_reruns_complete() {
    let Some((cluster, dir)) = Cluster::start("fail", 0, "") else {
        return;
    };
    let (fix, jobfile) = (dir.join("fixed"), dir.join("victim-job"));
    let manifest = FAILING
        .replace("@FIX@", &fix.display().to_string())
        .replace("@JOBFILE@", &jobfile.display().to_string());
    write_manifest(&dir, &manifest);
    let args = [&RUN_ON_SLURM[..], &["--keep-going"]].concat();
    let driver = cluster
        .emflow(&dir)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the victim job to start", Duration::from_secs(60), || {
        std::fs::read_to_string(&jobfile).is_ok_and(|s| !s.trim().is_empty())
    });
    let victim = std::fs::read_to_string(&jobfile).unwrap();
    let status = cluster.cmd("scancel").arg(victim.trim()).status().unwrap();
    assert!(status.success());
    let out = driver.wait_with_output().unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let line = |stage: &str| {
        log.lines()
            .find(|l| l.trim_start().starts_with(&format!("FAILED  {stage}:")))
            .unwrap_or_else(|| panic!("no FAIL line for {stage} in:\n{log}"))
            .to_string()
    };
    assert!(line("bad").contains("failed with exit code"), "{log}");
    assert!(log.contains("command failed with exit code 3"), "{log}");
    assert!(line("slow").contains("time limit"), "{log}");
    assert!(line("victim").contains("cancelled"), "{log}");

    std::fs::write(&fix, "").unwrap();
    let log = succeed(cluster.emflow(&dir).args(&args));
    assert!(log.contains("3 ran, 0 cached, 0 failed"), "{log}");
}

/// A driver killed with SIGKILL while its jobs run, started again: it attaches to the
/// running job instead of submitting it again, and every stage runs exactly once. A
/// fully cached rerun submits nothing; `--dry-run` prints sbatch lines and submits nothing.
const CHAIN: &str = r#"
emflow: 1
name: chain
stages:
  first:
    kind: command
    resources: {cpus: 1, memory: 64MiB, time: 10m}
    params:
      run: 'echo first >> "$EMFLOW_PARAM_LOG"; sleep 6; echo one > "$EMFLOW_OUT_OUT"'
      outputs: {out: file}
      log: '@LOG@'
  second:
    kind: command
    inputs:
      files: [first.out]
    params:
      run: 'echo second >> "$EMFLOW_PARAM_LOG"; cat "$EMFLOW_IN_FILES" > "$EMFLOW_OUT_OUT"'
      outputs: {out: file}
      log: '@LOG@'
"#;

#[test]
fn killed_driver_reattaches_runs_nothing_twice_and_cached_rerun_submits_nothing() {
    let Some((cluster, dir)) = Cluster::start("attach", 1, "") else {
        return;
    };
    let log = dir.join("ran.log");
    write_manifest(&dir, &CHAIN.replace("@LOG@", &log.display().to_string()));
    let args = RUN_ON_SLURM;

    let dry = cluster.dry_run(&dir);
    let first_line = dry
        .lines()
        .find(|l| l.trim_start().starts_with("first: sbatch --parsable"))
        .unwrap_or_else(|| panic!("no sbatch line for `first` in:\n{dry}"));
    for option in [
        "--job-name=emflow-",
        "--cpus-per-task=1",
        "--mem=64M",
        "--time=00:10:00",
    ] {
        assert!(
            first_line.contains(option),
            "{option} missing: {first_line}"
        );
    }

    kill_when_started(cluster.emflow(&dir).args(args), "first", || log.exists());

    let text_out = succeed(cluster.emflow(&dir).args(args));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "first\nsecond\n",
        "a stage ran twice or not at all:\n{text_out}"
    );
    let jobs = cluster.jobs();
    assert_eq!(jobs.len(), 2, "one job per stage expected: {jobs:?}");
    assert_ne!(
        jobs[0].1, jobs[1].1,
        "one stage key submitted twice: {jobs:?}"
    );
    cluster.assert_rerun_is_cached(&dir, 2);
}

/// A long stage under a one-minute limit, warned by `--signal=B:USR2@30`: it saves its
/// progress under `$EMFLOW_CHECKPOINT_DIR` and exits 75; the executor resubmits it (same stage
/// key, a new job) and the next attempt resumes where the last one stopped, until the work is
/// done. 160 half-second steps (80 s of work) cannot fit in one attempt.
const LONG: &str = r#"
emflow: 1
name: long
stages:
  long:
    kind: command
    resources: {time: 1m}
    params:
      run: |
        state="$EMFLOW_CHECKPOINT_DIR/state"
        i=0
        sum=0
        if [ -e "$state" ]; then read -r i sum < "$state"; fi
        echo "start $i" >> "$EMFLOW_PARAM_LOG"
        trap 'echo "$i $sum" > "$state.tmp"; mv "$state.tmp" "$state"; echo "saved $i" >> "$EMFLOW_PARAM_LOG"; exit 75' USR2
        while [ "$i" -lt "$EMFLOW_PARAM_STEPS" ]; do
          sum=$((sum + i + 1)) i=$((i + 1))
          sleep 0.5
        done
        echo "$sum" > "$EMFLOW_OUT_SUM"
      outputs: {sum: file}
      steps: 160
      log: '@LOG@'
"#;

/// The content of the single output of the single record in the store at `dir/.emflow`.
fn only_output(dir: &Path) -> String {
    let store = dir.join(".emflow");
    let records: Vec<PathBuf> = std::fs::read_dir(store.join("records"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(records.len(), 1, "one record expected: {records:?}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&records[0]).unwrap()).unwrap();
    let digest = record["outputs"]["sum"]["digest"].as_str().unwrap();
    std::fs::read_to_string(store.join("objects").join(&digest[..2]).join(digest)).unwrap()
}

#[test]
fn checkpointing_stage_warned_before_its_time_limit_is_requeued_and_resumes() {
    let requeue = "signal_before_s: 30\nmax_requeue: 10\n";
    let Some((cluster, dir)) = Cluster::start("requeue", 2, requeue) else {
        return;
    };
    let log = dir.join("attempts.log");
    write_manifest(&dir, &LONG.replace("@LOG@", &log.display().to_string()));

    let dry = cluster.dry_run(&dir);
    assert!(dry.contains("--signal=B:USR2@30"), "{dry}");

    let run_log = succeed(cluster.emflow(&dir).args(RUN_ON_SLURM));
    assert!(run_log.contains("1 ran, 0 cached, 0 failed"), "{run_log}");
    assert_eq!(only_output(&dir), format!("{}\n", 160 * 161 / 2));

    // Attempts: "start 0", then for each requeue "saved K" followed by "start K".
    let attempts = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = attempts.lines().collect();
    assert_eq!(lines.first(), Some(&"start 0"), "{attempts}");
    assert!(lines.len() >= 3 && lines.len() % 2 == 1, "{attempts}");
    for pair in lines[1..].chunks(2) {
        let saved = pair[0].strip_prefix("saved ").expect(&attempts);
        let resumed = pair[1].strip_prefix("start ").expect(&attempts);
        assert_eq!(
            saved, resumed,
            "did not resume where it stopped:\n{attempts}"
        );
        assert!(saved.parse::<u32>().unwrap() > 0, "{attempts}");
    }

    // The driver is done once the last attempt wrote its exit file; slurmctld may still
    // show that job RUNNING or COMPLETING for a moment (seen on a loaded 2-core machine).
    let settled = |jobs: &[(String, String, String)]| {
        jobs.iter()
            .all(|(_, _, state)| !matches!(state.as_str(), "RUNNING" | "COMPLETING"))
    };
    wait_for(
        "Slurm to record the last job's end",
        Duration::from_secs(30),
        || settled(&cluster.jobs()),
    );
    let mut jobs = cluster.jobs();
    jobs.sort_by_key(|(id, _, _)| id.parse::<u64>().unwrap());
    assert_eq!(
        jobs.len(),
        lines.len().div_ceil(2),
        "one job per attempt expected: {jobs:?}\n{attempts}"
    );
    assert!(
        jobs.iter().all(|(_, key, _)| *key == jobs[0].1),
        "all attempts must be the same stage key: {jobs:?}"
    );
    // Every attempt but the last was warned (USR2) and asked to be run again (75); the
    // journal counts the requeues.
    let work = dir.join(".emflow/slurm/work");
    let key = &jobs[0].1;
    let attempts_dir = work.join(&key[..2]).join(key);
    for n in 1..=jobs.len() {
        let exit =
            std::fs::read_to_string(attempts_dir.join(format!("attempt-{n}/exit.json"))).unwrap();
        let expected = if n < jobs.len() {
            r#""exit_code":75,"signal":"USR2""#
        } else {
            r#""exit_code":0,"signal":"""#
        };
        assert!(exit.contains(expected), "attempt {n}: {exit}");
    }
    let journal: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!(".emflow/slurm/journal/{key}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(journal["requeues"], jobs.len() - 1, "{journal}");
    let (last, earlier) = jobs.split_last().unwrap();
    assert_eq!(last.2, "COMPLETED", "{jobs:?}");
    assert!(
        earlier.iter().all(|(_, _, state)| state != "TIMEOUT"),
        "an attempt hit the time limit instead of checkpointing: {jobs:?}"
    );
    cluster.assert_rerun_is_cached(&dir, 1);
}
