#!/usr/bin/env bash
# The GPU checks of issues #11 and #19, for the first machine with a GPU: capped at 9.5 minutes (after a
# `make venv` when the repo has no environment yet); figures in $OUT.
#   bash scripts/gpu_check.sh [OUT_DIR]          (default: gpu_check/)
# 1. CONCH architecture (random weights, full size, 448 px) through the real encode path on one GPU:
#    pinned batches, bf16 autocast, batch halving on OOM; bit-exact preprocessing and CPU agreement.
# 2. The pipeline (`zeus run` code path, GPU encoder actor fed by CPU reader tasks) on the overhead
#    benchmark's cohort with a near-free encoder, against reading alone on every core.
# 3. The split shape on CPUs: CPU ms per tile of plan, read, encode (preprocessing + a near-free
#    model) and write, from which the reader cores a GPU needs follow.
# 4. Preprocessing per core, and PIL's resize as torch ops on the GPU (model.resize_on: device, the
#    default there): its time per tile, and that it equals PIL's pixels.
# Uses the repo's .venv (made with `make venv` when zeus_ray does not import in python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if python3 -c "import zeus_ray, ray, openslide, timm, torch" 2>/dev/null; then PY=python3
  else make venv >/dev/null && PY=.venv/bin/python; fi
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/gpu.txt" 2>&1
echo "== CONCH architecture throughput" | tee "$OUT/log.txt"
timeout 150 "$PY" benchmarks/bench_gpu_encoder.py --model conch --device cuda --tiles 4096 --batch-size 256 \
  --check --out "$OUT/conch.json" 2>&1 | tee -a "$OUT/log.txt"
echo "== CONCH batch halving under a memory cap" | tee -a "$OUT/log.txt"
timeout 60 "$PY" benchmarks/bench_gpu_encoder.py --model conch --device cuda --tiles 512 --batch-size 1024 \
  --memory-fraction 0.05 --out "$OUT/conch_oom.json" 2>&1 | tee -a "$OUT/log.txt"
echo "== pipeline overhead on the GPU path" | tee -a "$OUT/log.txt"
timeout 240 "$PY" benchmarks/bench_overhead.py --cohort large --slides 12 --device cuda --batch 256 \
  --out "$OUT/overhead.md" 2>&1 | tee -a "$OUT/log.txt"
echo "== the split shape's CPU cost per tile (reader tasks + encoder actors, near-free encoder on CPU)" | tee -a "$OUT/log.txt"
timeout 100 "$PY" benchmarks/bench_overhead.py --cohort large --slides 4 --set ray.fuse_read_encode=off \
  --out "$OUT/split_cpu.md" 2>&1 | tee -a "$OUT/log.txt"
echo "== preprocessing per core; PIL's resize on the GPU" | tee -a "$OUT/log.txt"
timeout 30 "$PY" benchmarks/bench_preprocess.py --slides 1 --device cuda > "$OUT/preprocess.md" 2>&1
tail -n 12 "$OUT/preprocess.md" | tee -a "$OUT/log.txt"
echo "figures in $OUT/: gpu.txt conch.json conch_oom.json overhead.md split_cpu.md preprocess.md log.txt"
