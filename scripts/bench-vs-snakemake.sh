#!/usr/bin/env bash
# The same N trivial stages for emflow and, when installed, Snakemake, run one after the
# other in the same minutes, so the ratio is measured, not remembered (issue 22).
#
# The DAG: a source writes one line; every other stage copies its upstream file and
# appends its own index, in chains of 10 fanned out from the source: s_i reads s_(i-1),
# except when i % 10 == 1, then it reads s0.
# Both engines get 2 cores; both commit every output to disk (Snakemake to its output
# folder and .snakemake/ metadata, emflow to its store).
#
# Usage: scripts/bench-vs-snakemake.sh [EMFLOW_BINARY] [N ...]     (default N: 500 5000)
# Snakemake: `pip install snakemake` (the figures say which version ran).
set -euo pipefail
emflow="$(realpath "${1:-target/release/emflow}")"
shift || true
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(500 5000)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Wall time of a command in seconds, with millisecond resolution.
secs() {
  local t0 t1 ms
  t0=$(date +%s%N); "$@" >/dev/null 2>&1; t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

upstream() { local i=$1; if [ $((i % 10)) -eq 1 ]; then echo 0; else echo $((i - 1)); fi; }

emflow_manifest() {
  local n=$1
  echo "emflow: 1"
  echo "name: bench$n"
  echo "stages:"
  echo "  s0: { kind: command, params: { run: 'echo 0 > \"\$EMFLOW_OUT_OUT\"', outputs: {out: file} } }"
  for i in $(seq 1 $((n - 1))); do
    echo "  s$i: { kind: command, inputs: { files: [s$(upstream "$i").out] }, params: { run: 'cat \"\$EMFLOW_IN_FILES\" > \"\$EMFLOW_OUT_OUT\"; echo $i >> \"\$EMFLOW_OUT_OUT\"', outputs: {out: file} } }"
  done
}

snakefile() {
  local n=$1
  cat <<EOF
N = $n
def up(i):
    i = int(i)
    return 0 if i % 10 == 1 else i - 1
wildcard_constraints:
    i = "[1-9][0-9]*"
rule all:
    input: expand("out/s{i}.txt", i=range(N))
rule source:
    output: "out/s0.txt"
    shell: "echo 0 > {output}"
rule step:
    input: lambda wc: f"out/s{up(wc.i)}.txt"
    output: "out/s{i}.txt"
    shell: "cat {input} > {output}; echo {wildcards.i} >> {output}"
EOF
}

echo "machine: $(nproc) cores, $(uname -r); emflow at $emflow"
if command -v snakemake >/dev/null; then
  echo "snakemake $(snakemake --version)"
fi
printf '%8s  %14s %14s  %14s %14s  %s\n' stages "emflow first" "emflow no-op" "snake first" "snake no-op" "emflow/snake"
for n in "${sizes[@]}"; do
  d="$work/$n"
  mkdir -p "$d/emflow" "$d/snake"
  emflow_manifest "$n" > "$d/emflow/m.yaml"
  e1=$(cd "$d/emflow" && secs "$emflow" --store store run m.yaml --jobs 2)
  e2=$(cd "$d/emflow" && secs "$emflow" --store store run m.yaml --jobs 2)
  s1=- s2=- ratio=-
  if command -v snakemake >/dev/null; then
    snakefile "$n" > "$d/snake/Snakefile"
    s1=$(cd "$d/snake" && secs snakemake --cores 2 --quiet all)
    s2=$(cd "$d/snake" && secs snakemake --cores 2 --quiet all)
    ratio=$(awk -v a="$e1" -v b="$s1" 'BEGIN { printf "%.2f", a / b }')
  fi
  printf '%8s  %13ss %13ss  %13ss %13ss  %s\n' "$n" "$e1" "$e2" "$s1" "$s2" "$ratio"
done
