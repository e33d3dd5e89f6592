#!/usr/bin/env bash
# CI check of `--executor slurm` against a real single-node cluster: runs the datasets
# example and one small ML example (grpo_keyword, smoke profile) once with the local
# executor and once through Slurm, each into its own store, and requires the same keys and
# output digests (`emflow lock` of both must be identical). Then a rerun through Slurm must
# be fully cached and submit no job.
#
#   scripts/ci-slurm.sh [EMFLOW_BINARY]
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
emflow="${1:-$repo/target/debug/emflow}"
data="${EMFLOW_PAPER_DATA:-$repo/../shared/paper-data}"
if [ ! -d "$data" ]; then
  echo "ci-slurm: paper data not found at $data (set EMFLOW_PAPER_DATA)" >&2
  exit 1
fi
data="$(cd "$data" && pwd)"
work="$(mktemp -d /tmp/emflow-ci-slurm.XXXXXX)"
state="$work/cluster"
export EMFLOW_SLURM_PORT="${EMFLOW_SLURM_PORT:-6917}"

# Stops the cluster; the work folder (two stores, ~230 MB) goes too when the check passed, and
# stays for a look when it failed (every CI run used to leave one behind in /tmp).
cleanup() {
  local rc=$?
  "$repo/scripts/slurm-local.sh" stop "$state" >/dev/null 2>&1 || true
  if [ "$rc" = 0 ]; then
    rm -rf "$work"
  else
    echo "ci-slurm: failed; its stores and cluster logs are in $work" >&2
  fi
}
trap cleanup EXIT
chmod 0755 "$work" # munged refuses a socket below a folder others cannot traverse
cluster_env="$("$repo/scripts/slurm-local.sh" start "$state")"
eval "$cluster_env"
printf 'poll_interval_s: 2\ngrace_s: 30\n' > "$work/cluster.yaml"

# name manifest [manifest args (--profile, --set)...]
check() {
  local name="$1" manifest="$2"
  shift 2
  for executor in local slurm; do
    local dir="$work/$name-$executor"
    mkdir -p "$dir"
    cp "$repo/$manifest" "$dir/m.yaml"
    local extra=()
    [ "$executor" = slurm ] && extra=(--executor slurm --cluster-config "$work/cluster.yaml")
    echo "== $name: $executor executor"
    "$emflow" --store "$dir/store" run "$dir/m.yaml" --set "data_root=$data" "$@" "${extra[@]}"
    "$emflow" --store "$dir/store" lock "$dir/m.yaml" --set "data_root=$data" "$@"
  done
  if ! diff -u "$work/$name-local/emflow.lock" "$work/$name-slurm/emflow.lock"; then
    echo "ci-slurm: $name: the Slurm executor produced different keys or digests" >&2
    exit 1
  fi
  echo "== $name: same keys and output digests with both executors"
  local before after
  before="$(squeue --noheader -t all | wc -l)"
  "$emflow" --store "$work/$name-slurm/store" run "$work/$name-slurm/m.yaml" \
    --set "data_root=$data" "$@" --executor slurm --cluster-config "$work/cluster.yaml"
  after="$(squeue --noheader -t all | wc -l)"
  if [ "$before" != "$after" ]; then
    echo "ci-slurm: $name: a fully cached rerun submitted $((after - before)) job(s)" >&2
    exit 1
  fi
  echo "== $name: cached rerun submitted no job"
}

check datasets manifests/examples/datasets.yaml
check grpo manifests/examples/grpo_keyword.yaml --profile smoke --set steps=1
echo "ci-slurm: ok"
