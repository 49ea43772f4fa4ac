#!/usr/bin/env bash
# Issue 3's comparison: on the shapes data at equal CPU training time, the plain baseline against
# each accelerator alone and against all together, with the shapes score of each (EMA weights,
# 64 prompts, classic CFG 4; routed runs also scored with self-guidance). Results are kept in
# benchmarks/results/accelerators-shapes/<variant>/ with their config, metrics and eval.
# Usage: benchmarks/accelerators_shapes.sh MINUTES [variant ...]
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-8}; shift || true
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(baseline tread repa muon lpips pdino all)
out=benchmarks/results/accelerators-shapes
mkdir -p "$out"
declare -A extra=(
  [baseline]=""
  [tread]="routing.ratio=0.5"
  [repa]="repa.weight=0.5"
  [lpips]="perceptual.lpips_weight=0.1"
  [pdino]="perceptual.dino_weight=0.01"
  [muon]="train.optimizer=muon"
  [all]="routing.ratio=0.5 repa.weight=0.5 perceptual.lpips_weight=0.1 perceptual.dino_weight=0.01 train.optimizer=muon"
)
for v in "${variants[@]}"; do
  run=$(mktemp -d)/$v
  # steps is a ceiling: the time budget ends each run.
  pixelrun train run.dir="$run" train.steps=100000 train.max_minutes="$minutes" train.sample_every=0 \
    train.checkpoint_every=0 ${extra[$v]} > "$run.log" 2>&1
  mkdir -p "$out/$v"
  cp "$run/config.yaml" "$run/metrics.jsonl" "$run/eval.json" "$out/$v/"
  cp "$run/samples/final.png" "$out/$v/final_grid.png"
  grep -v '^train:' "$run.log" | tr '\r' '\n' | grep -E "done:|reached|optimizer|REPA|LPIPS|P-DINO" > "$out/$v/stdout.log"
  if [[ "$v" == tread || "$v" == all ]]; then
    pixelrun eval --checkpoint "$run" --guidance-mode self --guidance 3.5 --out "$out/$v/eval-self-guidance.json" > /dev/null 2>&1
  fi
  echo "$v: $(grep done: "$out/$v/stdout.log")"
done
python - "$out" <<'PY'
import json, sys, pathlib
root = pathlib.Path(sys.argv[1])
rows = []
for d in sorted(p for p in root.iterdir() if p.is_dir()):
    m = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in m)
    e = json.loads((d / "eval.json").read_text())["score"]
    sg = d / "eval-self-guidance.json"
    sgs = json.loads(sg.read_text())["score"]["placed"] if sg.exists() else None
    rows.append((d.name, steps, e["placed"], e["exact_set"], sgs))
lines = ["| variant | steps in the budget | score (placed, CFG 4) | exact set | score with self-guidance 3.5 |", "|---|---|---|---|---|"]
lines += [f"| {n} | {s} | {p:.3f} | {x:.3f} | {'' if g is None else f'{g:.3f}'} |" for n, s, p, x, g in rows]
(root / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
