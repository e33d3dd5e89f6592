//! The cluster profile (`--cluster-config FILE`, YAML) and the `sbatch` command line it
//! yields for one attempt of one stage.
//!
//! Everything site-specific lives in the profile so a manifest stays portable: the stage
//! says how much it needs (`resources`), the profile says how this cluster is asked for it
//! (partition, account, `--gpus` versus `--gres`, extra options) and how patient the
//! driver is (poll interval, grace period, retries).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

use crate::pipeline::Resources;

/// How a cluster wants GPUs requested.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuFlag {
    /// `--gpus=[type:]N`
    #[default]
    Gpus,
    /// `--gres=gpu:[type:]N`
    Gres,
}

/// A cluster profile. Every field has a default that works on a plain Slurm install.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterProfile {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub constraint: Option<String>,
    /// Extra `sbatch` options, passed as given (e.g. `--exclusive`).
    pub extra: Vec<String>,
    pub gpu_flag: GpuFlag,
    /// GPU model for `--gpus=TYPE:N` / `--gres=gpu:TYPE:N`.
    pub gpu_type: Option<String>,
    /// Time limit for stages that declare none, in seconds.
    pub default_time_s: Option<u64>,
    /// Seconds between two queue queries (one `squeue` for all the run's jobs).
    pub poll_interval_s: f64,
    /// How long a job may be gone from the queue without an exit record before the
    /// driver believes it (slow shared file systems publish files late).
    pub grace_s: f64,
    /// Resubmissions after an out-of-memory or time-limit failure.
    pub retries: u32,
    /// Factor applied to memory (out of memory) or time (time limit) on each retry.
    pub growth: f64,
    /// `--signal=B:USR2@N`: seconds before the time limit a stage is asked to checkpoint.
    pub signal_before_s: u64,
    /// Resubmissions of a stage that checkpointed and asked to be run again.
    pub max_requeue: u32,
    /// The `emflow` binary as the compute nodes see it (default: this driver's binary).
    pub emflow: Option<PathBuf>,
}

impl Default for ClusterProfile {
    fn default() -> Self {
        ClusterProfile {
            partition: None,
            account: None,
            qos: None,
            constraint: None,
            extra: Vec::new(),
            gpu_flag: GpuFlag::Gpus,
            gpu_type: None,
            default_time_s: None,
            poll_interval_s: 10.0,
            grace_s: 60.0,
            retries: 1,
            growth: 2.0,
            signal_before_s: 120,
            max_requeue: 10,
            emflow: None,
        }
    }
}

impl ClusterProfile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the cluster config {}", path.display()))?;
        let profile: ClusterProfile = serde_yaml::from_str(&text).with_context(|| {
            format!(
                "cluster config {} is not valid (known keys: partition, account, qos, constraint, extra, gpu_flag: gpus|gres, gpu_type, default_time_s, poll_interval_s, grace_s, retries, growth, signal_before_s, max_requeue, emflow)",
                path.display()
            )
        })?;
        if profile.growth.is_nan() || profile.growth < 1.0 {
            anyhow::bail!(
                "cluster config {}: `growth` must be at least 1.0 (it multiplies memory or time on a retry)",
                path.display()
            );
        }
        Ok(profile)
    }
}

/// What one attempt asks the scheduler for.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub cpus: u32,
    pub gpus: u32,
    /// Bytes; 0 = the partition's default.
    pub memory: u64,
    /// Seconds; 0 = the partition's default.
    pub time_s: u64,
}

impl Request {
    pub fn from_resources(r: &Resources, profile: &ClusterProfile) -> Self {
        Request {
            cpus: r.cpus.max(1),
            gpus: r.gpus,
            memory: r.memory,
            time_s: if r.time_limit > 0 {
                r.time_limit
            } else {
                profile.default_time_s.unwrap_or(0)
            },
        }
    }
}

/// The identity of one submission.
pub struct Submission<'a> {
    pub job_name: &'a str,
    pub stage_key: &'a str,
    pub attempt_dir: &'a Path,
    pub script: &'a Path,
}

/// The `sbatch` arguments (without the program name) for one attempt.
pub fn sbatch_args(profile: &ClusterProfile, req: &Request, sub: &Submission) -> Vec<String> {
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name={}", sub.job_name),
        format!("--comment={}", sub.stage_key),
        format!("--chdir={}", sub.attempt_dir.display()),
        format!(
            "--output={}",
            sub.attempt_dir.join("slurm-%j.out").display()
        ),
        "--no-requeue".to_string(),
        format!("--cpus-per-task={}", req.cpus),
    ];
    if req.memory > 0 {
        args.push(format!("--mem={}M", req.memory.div_ceil(1024 * 1024)));
    }
    if req.time_s > 0 {
        args.push(format!("--time={}", slurm_time(req.time_s)));
        // A signal that would arrive before the stage has even started is useless: only
        // ask for it when the limit leaves room for work first.
        if req.time_s >= 2 * profile.signal_before_s && profile.signal_before_s > 0 {
            args.push(format!("--signal=B:USR2@{}", profile.signal_before_s));
        }
    }
    if req.gpus > 0 {
        let ty = profile
            .gpu_type
            .as_deref()
            .map(|t| format!("{t}:"))
            .unwrap_or_default();
        args.push(match profile.gpu_flag {
            GpuFlag::Gpus => format!("--gpus={ty}{}", req.gpus),
            GpuFlag::Gres => format!("--gres=gpu:{ty}{}", req.gpus),
        });
    }
    let named = [
        ("--partition", &profile.partition),
        ("--account", &profile.account),
        ("--qos", &profile.qos),
        ("--constraint", &profile.constraint),
    ];
    for (flag, value) in named {
        if let Some(v) = value {
            args.push(format!("{flag}={v}"));
        }
    }
    args.extend(profile.extra.iter().cloned());
    args.push(sub.script.display().to_string());
    args
}

/// Slurm's `[D-]HH:MM:SS`, rounded up to whole minutes (Slurm's granularity).
pub fn slurm_time(secs: u64) -> String {
    let mins = secs.div_ceil(60).max(1);
    let (d, h, m) = (mins / 1440, (mins % 1440) / 60, mins % 60);
    if d > 0 {
        format!("{d}-{h:02}:{m:02}:00")
    } else {
        format!("{h:02}:{m:02}:00")
    }
}

/// `args` as one shell-quoted command line (for `--dry-run` and error messages).
pub fn command_line(program: &str, args: &[String]) -> String {
    let mut out = program.to_string();
    for a in args {
        out.push(' ');
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=/.:@,%+".contains(c))
        {
            out.push_str(a);
        } else {
            out.push('\'');
            out.push_str(&a.replace('\'', "'\\''"));
            out.push('\'');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub() -> Submission<'static> {
        Submission {
            job_name: "emflow-r1",
            stage_key: "abc",
            attempt_dir: Path::new("/s/work/ab/abc/attempt-1"),
            script: Path::new("/s/work/ab/abc/attempt-1/job.sh"),
        }
    }

    #[test]
    fn resources_and_profile_become_sbatch_options() {
        let profile = ClusterProfile {
            partition: Some("gpu".into()),
            account: Some("safety".into()),
            qos: Some("high".into()),
            constraint: Some("a100".into()),
            extra: vec!["--exclusive".into()],
            gpu_flag: GpuFlag::Gres,
            gpu_type: Some("a100".into()),
            ..ClusterProfile::default()
        };
        let req = Request {
            cpus: 4,
            gpus: 2,
            memory: 3 * 1024 * 1024 * 1024,
            time_s: 3 * 3600 + 1,
        };
        let args = sbatch_args(&profile, &req, &sub());
        for want in [
            "--parsable",
            "--job-name=emflow-r1",
            "--comment=abc",
            "--cpus-per-task=4",
            "--mem=3072M",
            "--time=03:01:00",
            "--signal=B:USR2@120",
            "--gres=gpu:a100:2",
            "--partition=gpu",
            "--account=safety",
            "--qos=high",
            "--constraint=a100",
            "--exclusive",
            "--no-requeue",
        ] {
            assert!(
                args.iter().any(|a| a == want),
                "{want} missing from {args:?}"
            );
        }
        assert_eq!(args.last().unwrap(), "/s/work/ab/abc/attempt-1/job.sh");
    }

    #[test]
    fn gpus_flag_and_no_signal_for_short_limits() {
        let profile = ClusterProfile::default();
        let req = Request {
            cpus: 1,
            gpus: 1,
            memory: 0,
            time_s: 60,
        };
        let args = sbatch_args(&profile, &req, &sub());
        assert!(args.contains(&"--gpus=1".to_string()));
        assert!(args.contains(&"--time=00:01:00".to_string()));
        assert!(!args.iter().any(|a| a.starts_with("--signal")));
        assert!(!args.iter().any(|a| a.starts_with("--mem")));
    }

    #[test]
    fn times_round_up_to_minutes() {
        assert_eq!(slurm_time(1), "00:01:00");
        assert_eq!(slurm_time(90), "00:02:00");
        assert_eq!(slurm_time(26 * 3600), "1-02:00:00");
    }

    #[test]
    fn command_lines_quote_what_needs_it() {
        assert_eq!(
            command_line("sbatch", &["--comment=a b".into(), "--x=1".into()]),
            "sbatch '--comment=a b' --x=1"
        );
    }
}
