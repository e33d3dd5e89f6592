//! The batch script of one attempt: runs `emflow exec-stage` and always leaves an exit
//! record.
//!
//! The script, not the stage, writes `exit.json`, so a record appears even when the stage
//! is killed: the shell runs `exec-stage` in the background and waits, so that Slurm's
//! signals (USR2 before the time limit, TERM on `scancel` or at the limit) reach the shell
//! at once; it forwards them to the stage, waits for it, and writes the record atomically
//! (temporary file + `mv`). Only SIGKILL leaves no record; the driver then takes the
//! reason from the scheduler after its grace period.

use std::path::Path;

/// Names of the files in an attempt folder.
pub const JOB_FILE: &str = "job.json";
pub const RESULT_FILE: &str = "result.json";
pub const EXIT_FILE: &str = "exit.json";
pub const STARTED_FILE: &str = "started";
pub const STDERR_FILE: &str = "stderr.log";
pub const SCRIPT_FILE: &str = "job.sh";

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The script text for an attempt folder and an `emflow` binary.
pub fn job_script(emflow: &Path, attempt_dir: &Path) -> String {
    let dir = quote(&attempt_dir.display().to_string());
    let exe = quote(&emflow.display().to_string());
    format!(
        r#"#!/usr/bin/env bash
# Written by emflow's Slurm executor: runs one stage attempt and leaves {EXIT_FILE}.
set -u
dir={dir}
signal=""
child=""
written=0
write_exit() {{
  [ "$written" = 1 ] && return
  written=1
  printf '{{"exit_code":%d,"signal":"%s","job_id":"%s","host":"%s"}}\n' \
    "$1" "$signal" "${{SLURM_JOB_ID:-}}" "$(hostname)" > "$dir/{EXIT_FILE}.tmp.$$"
  mv -f "$dir/{EXIT_FILE}.tmp.$$" "$dir/{EXIT_FILE}"
}}
forward() {{
  signal="$1"
  [ -n "$child" ] && kill -s "$1" "$child" 2>/dev/null
}}
trap 'forward USR2' USR2
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'write_exit 1' EXIT
printf 'host=%s\njob_id=%s\nstarted=%s\ncuda_visible_devices=%s\n' "$(hostname)" \
  "${{SLURM_JOB_ID:-}}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${{CUDA_VISIBLE_DEVICES:-}}" \
  > "$dir/{STARTED_FILE}"
# As many compute threads as CPUs granted, not the submitting machine's count (sbatch copies
# its environment, RAYON_NUM_THREADS included).
[ -n "${{SLURM_CPUS_PER_TASK:-}}" ] && export RAYON_NUM_THREADS="$SLURM_CPUS_PER_TASK"
{exe} exec-stage "$dir/{JOB_FILE}" --result "$dir/{RESULT_FILE}" \
  > /dev/null 2> "$dir/{STDERR_FILE}" &
child=$!
# `wait` returns early when a trapped signal arrives; wait again until the stage is gone,
# then once more for its status (bash keeps it).
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
done
wait "$child"
code=$?
write_exit "$code"
exit "$code"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::PathBuf;
    use std::process::Command;

    /// A fresh attempt folder `emflow-slurm-<name>-<pid>` in the temporary folder, holding a
    /// stand-in for the `emflow` binary (a bash script with `body`) and the job script that
    /// runs it: returns the folder and the job script.
    fn attempt_with_stand_in(name: &str, body: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("emflow-slurm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let stand_in = dir.join("emflow-stand-in");
        std::fs::write(&stand_in, format!("#!/usr/bin/env bash\n{body}")).unwrap();
        std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = dir.join(SCRIPT_FILE);
        std::fs::write(&script, job_script(&stand_in, &dir)).unwrap();
        (dir, script)
    }

    /// The script leaves an exit record with the stage's code, and with the signal when
    /// one arrived; a fake `emflow` stands in for the real binary.
    #[test]
    fn exit_record_is_written_on_exit_and_on_signal() {
        let (dir, script) = attempt_with_stand_in(
            "script",
            "trap 'exit 75' USR2\nif [ -e \"$(dirname \"$2\")/slow\" ]; then sleep 30 & wait; fi\nexit 3\n",
        );

        let status = Command::new("bash").arg(&script).status().unwrap();
        assert_eq!(status.code(), Some(3));
        let record = std::fs::read_to_string(dir.join(EXIT_FILE)).unwrap();
        assert!(record.contains(r#""exit_code":3,"signal":"""#), "{record}");

        std::fs::write(dir.join("slow"), "").unwrap();
        std::fs::remove_file(dir.join(EXIT_FILE)).unwrap();
        let mut child = Command::new("bash").arg(&script).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        unsafe { libc::kill(child.id() as i32, libc::SIGUSR2) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(75));
        let record = std::fs::read_to_string(dir.join(EXIT_FILE)).unwrap();
        assert!(
            record.contains(r#""exit_code":75,"signal":"USR2""#),
            "{record}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The stage computes with as many threads as the job was granted CPUs, whatever the
    /// submitting shell had set.
    #[test]
    fn threads_follow_the_cpus_granted() {
        let (dir, script) = attempt_with_stand_in(
            "threads",
            "echo \"$RAYON_NUM_THREADS\" > \"$(dirname \"$2\")/threads\"\n",
        );
        let threads = |cpus: Option<&str>| {
            let mut cmd = Command::new("bash");
            cmd.arg(&script).env("RAYON_NUM_THREADS", "16");
            match cpus {
                Some(n) => cmd.env("SLURM_CPUS_PER_TASK", n),
                None => cmd.env_remove("SLURM_CPUS_PER_TASK"),
            };
            assert!(cmd.status().unwrap().success());
            std::fs::read_to_string(dir.join("threads"))
                .unwrap()
                .trim()
                .to_string()
        };
        assert_eq!(threads(Some("3")), "3");
        assert_eq!(threads(None), "16");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
