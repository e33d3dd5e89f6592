//! `emflow run --executor slurm` against a real single-node Slurm cluster started by
//! `scripts/slurm-local.sh` (own state folder and port per test). Skips with a printed
//! reason when the cluster cannot be started, unless `EMFLOW_REQUIRE_TEST_ASSETS=1`.
//!
//! The time-limit case is the only slow one (Slurm checks limits every 30 s, so a
//! one-minute job ends 60-95 s in); everything else finishes in seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Cluster {
    state: PathBuf,
    conf: String,
    port: u16,
}

impl Cluster {
    /// Starts a cluster, or returns `None` (after saying why) when that is impossible here.
    fn start(name: &str, slot: u16) -> Option<Cluster> {
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
        Some(Cluster { state, conf, port })
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn emflow(&self, dir: &Path) -> Command {
        let mut c = self.cmd(env!("CARGO_BIN_EXE_emflow"));
        c.current_dir(dir).env_remove("EMFLOW_HOME");
        c
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
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("emflow-slurm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let clock = Instant::now();
    while !ready() {
        assert!(clock.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

const PROFILE: &str = "poll_interval_s: 1\ngrace_s: 5\nretries: 0\n";

/// Three stages fail three ways; each is reported with its reason, and a rerun (after
/// the cause is fixed) completes them.
const FAILING: &str = r#"
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
    let Some(cluster) = Cluster::start("fail", 0) else {
        return;
    };
    let dir = scratch("fail");
    let fix = dir.join("fixed");
    let jobfile = dir.join("victim-job");
    std::fs::write(
        dir.join("m.yaml"),
        FAILING
            .replace("@FIX@", &fix.display().to_string())
            .replace("@JOBFILE@", &jobfile.display().to_string()),
    )
    .unwrap();
    std::fs::write(dir.join("cluster.yaml"), PROFILE).unwrap();
    let args = [
        "run",
        "m.yaml",
        "--executor",
        "slurm",
        "--cluster-config",
        "cluster.yaml",
        "--keep-going",
    ];
    let driver = cluster
        .emflow(&dir)
        .args(args)
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
    let out = cluster.emflow(&dir).args(args).output().unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("3 ran, 0 cached, 0 failed"), "{log}");
}

/// A driver killed with SIGKILL while its jobs run, started again: it attaches to the
/// running job instead of submitting it again, and every stage runs exactly once. A
/// fully cached rerun submits nothing; `--dry-run` prints sbatch lines and submits nothing.
const CHAIN: &str = r#"
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
    let Some(cluster) = Cluster::start("attach", 1) else {
        return;
    };
    let dir = scratch("attach");
    let log = dir.join("ran.log");
    std::fs::write(
        dir.join("m.yaml"),
        CHAIN.replace("@LOG@", &log.display().to_string()),
    )
    .unwrap();
    std::fs::write(dir.join("cluster.yaml"), PROFILE).unwrap();
    let args = [
        "run",
        "m.yaml",
        "--executor",
        "slurm",
        "--cluster-config",
        "cluster.yaml",
    ];

    let out = cluster
        .emflow(&dir)
        .args(args)
        .arg("--dry-run")
        .output()
        .unwrap();
    let dry = text(&out);
    assert!(out.status.success(), "{dry}");
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
    assert!(cluster.jobs().is_empty(), "a dry run submitted jobs");

    let mut driver = cluster
        .emflow(&dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the first stage to start", Duration::from_secs(60), || {
        log.exists()
    });
    driver.kill().unwrap();
    driver.wait().unwrap();

    let out = cluster.emflow(&dir).args(args).output().unwrap();
    let text_out = text(&out);
    assert!(out.status.success(), "{text_out}");
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

    let out = cluster.emflow(&dir).args(args).output().unwrap();
    let text_out = text(&out);
    assert!(out.status.success(), "{text_out}");
    assert!(text_out.contains("all 2 stages cached"), "{text_out}");
    assert_eq!(cluster.jobs().len(), 2, "a cached rerun submitted jobs");
}
