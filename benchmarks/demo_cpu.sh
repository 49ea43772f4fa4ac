#!/usr/bin/env bash
# The bar of issue 2: `pixelrun train` with no arguments, timed end to end (start-up, training,
# sample grids, final evaluation), on this 2-core CPU. Keeps the evidence, small, in
# benchmarks/results/demo-cpu/: the resolved config, metrics.jsonl, eval.json, the final grid, the
# wall time and the machine it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/demo-cpu
run=$(mktemp -d)/demo
mkdir -p "$out"
start=$(date +%s)
pixelrun train run.dir="$run" "$@" 2>"$out/stderr.log" | tee "$out/stdout.log"
end=$(date +%s)
cp "$run/config.yaml" "$run/metrics.jsonl" "$run/eval.json" "$out/"
cp "$run/samples/final.png" "$out/final_grid.png"
{
  echo "command: pixelrun train $*"
  echo "wall_seconds: $((end - start))"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') x $(nproc) cores"
  echo "torch: $(python -c 'import torch; print(torch.__version__)')"
} > "$out/run.txt"
tr '\r' '\n' < "$out/stderr.log" | grep -v '^train: ' > "$out/stderr.tmp" || true
mv "$out/stderr.tmp" "$out/stderr.log"
cat "$out/run.txt"
