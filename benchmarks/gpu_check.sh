#!/usr/bin/env bash
# Issue 10's GPU measurements, as one script for a lent H200 (results under $OUT, or ./gpu-out):
#  0. grouped bf16 Newton-Schulz of the `small` preset's 112 block matrices: bitwise equal to one
#     matrix at a time on CUDA?, and the time of each;
#  1. Muon step / AdamW step, `small`, 512px, batch 32 (goal <= 1.8; 10.1 with fp32 Newton-Schulz);
#  2. dense 512px MFU at per-GPU batch 64 (goal 45%) and TREAD / dense (goal <= 0.72);
#  3. the projection of configs/speedrun/speedrun.yaml onto 32 GPUs (teachers and T5Gemma with
#     random weights of their architectures: the machine has no network).
# Every bench compiles the blocks (parallel.compile=true, warm-up 3) and runs bf16, as the speedrun.
# About 8 minutes; each part has its own timeout so one failure leaves the others' JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

echo "== 0. Newton-Schulz, small preset, bf16: grouped vs one by one"
timeout 120 python3 - "$OUT/newton-schulz-small.json" <<'EOF'
import json, sys, time, torch
from pixelrun.model import build_model
from pixelrun.optim import newton_schulz_flops, orthogonalize, orthogonalize_many, split_parameters
with torch.device("meta"):
    shapes = [tuple(p.shape) for p in split_parameters(build_model("small", 2304))[0]]
mats = [torch.randn(s, device="cuda") for s in shapes]
def timed(fn):
    fn(); torch.cuda.synchronize(); ts = []
    for _ in range(5):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return sorted(ts)[2]
grouped, single = orthogonalize_many(mats), [orthogonalize(m) for m in mats]
r = {"matrices": len(mats), "tflop": sum(map(newton_schulz_flops, shapes)) / 1e12,
     "bitwise_equal": all(torch.equal(a, b) for a, b in zip(grouped, single)),
     "max_abs_difference": max((a.float() - b.float()).abs().max().item() for a, b in zip(grouped, single)),
     "grouped_seconds": timed(lambda: orthogonalize_many(mats)),
     "one_by_one_seconds": timed(lambda: [orthogonalize(m) for m in mats]),
     "grouped_fp32_seconds": timed(lambda: orthogonalize_many(mats, dtype=torch.float32))}
print(json.dumps(r, indent=2)); open(sys.argv[1], "w").write(json.dumps(r, indent=2))
EOF

b="python3 -m pixelrun bench model.preset=small parallel.compile=true data.resolution=512 --text-dim 2304 --text-tokens 256"
echo "== 1. Muon vs AdamW step, small, 512px, batch 32"
timeout 150 $b train.batch_size=32 train.optimizer=adamw --variants dense --steps 8 --warmup 3 --out "$OUT/step-adamw.json"
timeout 150 $b train.batch_size=32 train.optimizer=muon --variants dense --steps 8 --warmup 3 --out "$OUT/step-muon.json"
python3 - "$OUT" <<'EOF'
import json, sys
a, m = (json.load(open(f"{sys.argv[1]}/step-{k}.json"))["results"]["dense"] for k in ("adamw", "muon"))
print(f"Muon / AdamW step: {m['step_seconds_median'] / a['step_seconds_median']:.2f} "
      f"({m['step_seconds_median'] * 1e3:.1f} ms / {a['step_seconds_median'] * 1e3:.1f} ms; optimizer "
      f"{m['optimizer_seconds_median'] * 1e3:.1f} ms / {a['optimizer_seconds_median'] * 1e3:.1f} ms)")
EOF

echo "== 2. dense and TREAD at 512px, batch 64"
timeout 200 $b train.batch_size=64 --variants dense,routed --steps 8 --warmup 3 --out "$OUT/mfu-512-b64.json"

echo "== 3. projection of the speedrun onto 32 GPUs"
timeout 330 python3 -m pixelrun bench --config configs/speedrun/speedrun.yaml --gpus 32 --steps 5 --warmup 3 \
  --out "$OUT/projection-speedrun-32.json"
