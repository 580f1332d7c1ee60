#!/usr/bin/env bash
# One device call: GPU-only tests, kernel dK/dV loop variants against cuDNN, training throughput.
# Usage on the GPU machine (repo root): OUT=/some/dir bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python -m pytest -q -p no:cacheprovider tests/ops -k "no_host" 2>&1 | tail -3
for loop in branch masked split; do
  L2A_DKDV_LOOP=$loop python benchmarks/bench_attention.py --methods cudnn,ours --sparsities 0.9 \
    --ns 32768,131072 --out /tmp/attn_$loop > "$OUT/attn_$loop.log" 2>&1 || echo "attn $loop failed"
done
python benchmarks/bench_training.py --seq-lens 16384,32768 --out /tmp/train > "$OUT/train.log" 2>&1 || echo "train bench failed"
for loop in branch masked split; do echo "== dK/dV loop: $loop"; grep -E "^\|" "$OUT/attn_$loop.log" | grep -vE "^\|---" ; tail -2 "$OUT/attn_$loop.log"; done
tail -8 "$OUT/train.log"
