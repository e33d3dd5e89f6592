#!/usr/bin/env bash
# What checking stored bytes costs (issue 19): a stage with one large output, then
#   - the first run (the stage writes the blob; the commit hashes it once),
#   - a no-op rerun right away (inside the 2 s racy window: the blob is hashed again),
#   - a no-op rerun later (the file memo answers: one stat and one small read),
#   - `emflow cache verify` (every byte rehashed, no memo),
# and a no-op rerun of N trivial stages, where every reused output is checked.
# Usage: scripts/bench-store-verify.sh [EMFLOW_BINARY] [SIZE_MIB] [N_STAGES]
set -euo pipefail
emflow="$(realpath "${1:-target/release/emflow}")"
size_mib="${2:-1024}"
n="${3:-500}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# Wall time of a command in seconds, with millisecond resolution.
secs() {
  local t0 t1 ms
  t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

cat > big.yaml <<YAML
emflow: 1
name: big
stages:
  big:
    kind: command
    params:
      run: 'head -c ${size_mib}M /dev/urandom > "\$EMFLOW_OUT_OUT"'
      outputs: {out: file}
YAML
echo "blob of ${size_mib} MiB, emflow at $emflow"
echo "  first run (write + commit):      $(secs "$emflow" --store store run big.yaml) s"
echo "  no-op rerun at once (rehash):    $(secs "$emflow" --store store run big.yaml) s"
sleep 2.5
echo "  no-op rerun, memo written:       $(secs "$emflow" --store store run big.yaml) s"
echo "  no-op rerun, memo answers:       $(secs "$emflow" --store store run big.yaml) s"
echo "  emflow cache verify (all bytes): $(secs "$emflow" --store store cache verify) s"

{
  echo "emflow: 1"
  echo "name: many"
  echo "stages:"
  echo "  s0: { kind: command, params: { run: 'echo 0 > \"\$EMFLOW_OUT_OUT\"', outputs: {out: file} } }"
  for i in $(seq 1 $((n - 1))); do
    echo "  s$i: { kind: command, inputs: { files: [s$((i - 1)).out] }, params: { run: 'cat \"\$EMFLOW_IN_FILES\" > \"\$EMFLOW_OUT_OUT\"; echo $i >> \"\$EMFLOW_OUT_OUT\"', outputs: {out: file} } }"
  done
} > many.yaml
echo "$n trivial stages in a chain"
echo "  first run:   $(secs "$emflow" --store store2 run many.yaml -j 2) s"
echo "  no-op rerun: $(secs "$emflow" --store store2 run many.yaml) s"
echo "  no-op rerun: $(secs "$emflow" --store store2 run many.yaml) s"
