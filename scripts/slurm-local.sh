#!/usr/bin/env bash
# A real single-node Slurm cluster on loopback, for emflow's Slurm executor tests and CI.
#
#   eval "$(scripts/slurm-local.sh start [STATE_DIR])"   # installs if needed, starts, exports SLURM_CONF
#   scripts/slurm-local.sh stop [STATE_DIR]
#
# Debian's slurmctld/slurmd 22.05 with munge, configured for a machine without systemd or
# cgroups: process tracking by process group (cgroup tracking needs a freezer cgroup; linuxproc
# leaks a job's background children), no accounting daemon (jobs stay visible to `squeue -t all`
# for an hour via MinJobAge, and `sacct -c` reads the jobcomp file). Stops by pid file, never by
# process name, so two clusters (different STATE_DIR and ports) can run side by side.
set -euo pipefail

cmd="${1:-}"
state="$(realpath -m "${2:-${EMFLOW_SLURM_STATE:-/tmp/emflow-slurm}}")"
port="${EMFLOW_SLURM_PORT:-6817}"
conf="$state/slurm.conf"

installed() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null
}

install() {
  installed && return 0
  # The tests start several clusters at once on a fresh machine: one installs while the others
  # wait for it. (Concurrent apt-get runs failed on the dpkg and lists locks, and an install
  # whose `apt-get update` lost that race found no package sources.)
  exec 9>"${TMPDIR:-/tmp}/emflow-slurm-install.lock"
  flock 9
  if ! installed; then
    echo "slurm-local: installing slurmctld slurmd slurm-client munge" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 || true
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >&2
  fi
  flock -u 9
  exec 9>&-
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install
  mkdir -p "$state"/{munge,spool,ctld,log}
  chmod 0755 "$state" "$state/munge"
  if [ ! -f "$state/munge/munge.key" ]; then
    mungekey --create --keyfile="$state/munge/munge.key" >&2
    chmod 0600 "$state/munge/munge.key"
  fi
  if ! pid_alive "$state/munge/munged.pid"; then
    munged --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket" \
      --pid-file="$state/munge/munged.pid" --log-file="$state/log/munged.log" \
      --seed-file="$state/munge/munge.seed" >&2
  fi
  local host cpus mem
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
  cat > "$conf" <<CONF
ClusterName=emflow-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/jobcomp.txt
MinJobAge=3600
OverTimeLimit=0
KillWait=5
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=${mem:-1000} State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$conf"
  pid_alive "$state/slurmctld.pid" || slurmctld -f "$conf" >&2
  pid_alive "$state/slurmd.pid" || slurmd -f "$conf" >&2
  for _ in $(seq 1 100); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "export SLURM_CONF=$conf"
      echo "slurm-local: cluster up ($conf)" >&2
      return 0
    fi
    sleep 0.2
  done
  echo "slurm-local: the node did not come up; see $state/log/" >&2
  tail -5 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
  return 1
}

stop() {
  export SLURM_CONF="$conf"
  if [ -f "$conf" ] && pid_alive "$state/slurmctld.pid"; then
    scancel --user="$(id -un)" 2>/dev/null || true
  fi
  for p in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munge/munged.pid"; do
    if pid_alive "$p"; then
      kill "$(cat "$p")" 2>/dev/null || true
    fi
  done
  echo "slurm-local: stopped ($state)" >&2
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [STATE_DIR]" >&2; exit 2 ;;
esac
