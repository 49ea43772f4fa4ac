#!/usr/bin/env bash
# The CUDA checks of issue 4, as one script for a lent GPU machine (results under $OUT, or ./gpu-out).
#  1. the CUDA path end to end under torchrun (NCCL, FSDP2 on one rank, DCP checkpoints, bf16):
#     train, stop, resume, sample;
#  2. `pixelrun bench` of the 1.2B `small` preset at 512px (256 tokens) and 1024px, dense and routed,
#     blocks compiled, bf16, with MFU; then the same dense 512px step with Muon.
# Needs a tiny text encoder at $ENC (benchmarks/make_tiny_encoder.py writes one) because the GPU
# machine has no network and the MiniLM package; the bench uses random text embeddings.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
ENC=${ENC:-.devcarry/tiny-bert}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

run=/tmp/cuda-run
common="text.encoder=$ENC run.dir=$run train.log_every=5 train.checkpoint_every=20 eval.prompts=16 train.sample_every=0"
echo "== 1. CUDA path: torchrun, 1 rank, NCCL + FSDP2, stop at 20, resume to 40"
time torchrun --standalone --nproc_per_node=1 -m pixelrun train $common train.steps=20 2>&1 | grep -v '^train:' | tail -8
time torchrun --standalone --nproc_per_node=1 -m pixelrun train $common train.steps=40 2>&1 | grep -v '^train:' | tail -8
python3 -m pixelrun sample --checkpoint $run --prompt "a large red circle in the top left on a white background" --out "$OUT/sample" 2>&1 | tail -2
cp $run/metrics.jsonl "$OUT/cuda-run-metrics.jsonl"

echo "== 2. bench: small preset, compiled, bf16"
b="python3 -m pixelrun bench model.preset=small parallel.compile=true --text-dim 2304 --text-tokens 256"
timeout 200 $b data.resolution=512 train.batch_size=32 --variants dense,routed --steps 10 --warmup 3 --out "$OUT/bench-small-512.json" | tail -40
timeout 200 $b data.resolution=1024 train.batch_size=16 --variants dense,routed --steps 6 --warmup 3 --out "$OUT/bench-small-1024.json" | tail -40
timeout 120 $b data.resolution=512 train.batch_size=32 train.optimizer=muon --variants dense --steps 5 --warmup 3 --out "$OUT/bench-small-512-muon.json" | tail -20
