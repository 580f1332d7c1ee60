#!/usr/bin/env bash
# The open GPU runs, each mode sized for one device call (< 10 min) on an H100/H200.
# Usage on the GPU machine (repo root): OUT=/some/dir bash benchmarks/gpu_session.sh kernels|eval|train
#   kernels: GPU tests of the ops and models, dK/dV phase order on/off, then the full kernel table with the faster.
#   eval:    issue 5's GPU runs: the demo model and a longer-trained model, trained and evaluated at several lengths.
#   train:   training throughput with the current kernels.
#   multigpu (on a machine with >= 2 GPUs): 2-GPU DDP / FSDP2 training against 1 GPU with gradient accumulation.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
date -u

case "${1:-kernels}" in
kernels)
  timeout 150 python -m pytest -q -p no:cacheprovider tests/models/test_l2a_gpu.py tests/training/test_gpu.py \
    tests/ops -k "gpu or cuda or no_host" > "$OUT/gputest.log" 2>&1; tail -2 "$OUT/gputest.log"
  timeout 180 python benchmarks/bench_backward.py --ns 32768,131072 --dq "128,64,8,3" \
    --dkdv "64,128,8,2;64,128,8,3" --phases 0,1 --exports "$OUT/best.sh" --out "$OUT/bwd" > "$OUT/bwd.log" 2>&1
  grep -v '^{' "$OUT/bwd.log" | grep -v '^ *_' | tail -20
  cat "$OUT/best.sh" && . "$OUT/best.sh"
  timeout 360 python benchmarks/bench_attention.py --out "$OUT/table" > "$OUT/table.log" 2>&1
  grep -E "^\|" "$OUT/table.log"; tail -2 "$OUT/table.log"
  ;;
eval)
  # The demo model (default sizes) and a longer-trained one, trained at the same time (both are launch-bound).
  l2a() { python -m l2a "$@"; }
  l2a demo --out "$OUT/demo_gpu" --device cuda > "$OUT/demo_gpu.log" 2>&1 &
  l2a demo --out "$OUT/long" --device cuda --set seq_len=1024 --set window=128 --set hidden_size=256 \
    --set num_layers=4 --set num_heads=4 --set num_kv_heads=2 --set pretrain_steps=3000 --set routed_steps=600 \
    --set regularizer_weight=1.25e-4 > "$OUT/long.log" 2>&1
  wait
  tail -12 "$OUT/demo_gpu.log"; tail -12 "$OUT/long.log"
  kv() {  # the --task-arg flags of a demo run's report.json
    python -c "import json,sys; a=json.load(open(sys.argv[1]))['eval_task_args']['kv_retrieval']; \
print(' '.join(f'--task-arg kv_retrieval.{k}={v}' for k, v in a.items()))" "$1"
  }
  l2a eval "$OUT/demo_gpu/model" "$OUT/demo_gpu/base" --tasks kv_retrieval $(kv "$OUT/demo_gpu/report.json") \
    --lengths 128,192,256 --samples 50 --variants l2a,local_only,all_global --perplexity --ppl-seq-len 256 \
    --speed --speed-lengths 128,256 --out "$OUT/demo_gpu/eval" --no-progress > "$OUT/demo_eval.log" 2>&1
  l2a eval "$OUT/long/model" "$OUT/long/base" --tasks kv_retrieval,niah_single_1,vt $(kv "$OUT/long/report.json") \
    --lengths 512,1k,2k --samples 50 --variants l2a,local_only,all_global --perplexity --ppl-seq-len 2048 \
    --speed --speed-lengths 1k,2k --out "$OUT/long/eval" --no-progress > "$OUT/long_eval.log" 2>&1
  cat "$OUT/demo_gpu/eval/results.md" "$OUT/long/eval/results.md"
  tar czf "$OUT/eval_runs.tgz" --exclude='*.safetensors' -C "$OUT" demo_gpu long
  ;;
train)
  timeout 400 python benchmarks/bench_training.py --seq-lens 16384,32768 --out "$OUT/train" > "$OUT/train.log" 2>&1
  tail -8 "$OUT/train.log"
  ;;
multigpu)
  timeout 500 python benchmarks/check_multi_gpu.py --world 2 --out "$OUT/multi_gpu" 2>&1 | grep -v "shards"
  ;;
*)
  echo "usage: OUT=DIR bash benchmarks/gpu_session.sh kernels|eval|train|multigpu" >&2
  exit 2
  ;;
esac
date -u
