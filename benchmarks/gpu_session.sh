#!/usr/bin/env bash
# The open GPU runs, each mode sized for one device call (< 10 min) on an H100/H200.
# Usage on the GPU machine (repo root): OUT=/some/dir bash benchmarks/gpu_session.sh MODE
#   tests:   the GPU tests of ops, models and training, with tracebacks (gputest.log).
#   kernels: GPU tests, dK/dV launch configs and phase order on/off, then the kernel table with the fastest.
#   table:   the full kernel table (docs/benchmarks.md), one process per sequence length.
#   eval:    issue 5's GPU runs: the demo model and two longer-trained models, trained and evaluated at several
#            lengths (eval_runs.tgz).
#   train:   training throughput with the current kernels.
#   pending: what session 7 (2026-12-01) could not run (docs/benchmarks.md, sections "session 7"): the new
#            fused ops' GPU tests, the 1.5B training step against dense HF with and without the same fused
#            elementwise kernels and the 1.5B-shape TTFT with them (~7 minutes).
#   recipe8b: the Qwen3-8B recipe's first two steps (the second: steady-state tokens/s; ~2.5 minutes).
#   infer128 / infer64: issue 11's decode and TTFT table at 128K / 64K (Qwen2.5-7B shape, dense / L2A /
#            local-only, batch 1 and 8, eager / graph / compiled, the GPU exactness check first; ~6 minutes each;
#            PROFILE=1: kernel profiles of the first batch size; TESTS=1: then the decode GPU tests).
#   decode:  the decode-step kernels first on a GPU (session 9's, untested there): their GPU tests, the
#            projection kernels against cuBLAS per tile configuration (bench_decode_ops.py), then L2A and
#            local-only at 128K batch 1, graph and compiled, with the exactness check and kernel profiles
#            (~5 minutes). Run it before infer128 / infer64.
#   entry:   session 10's one-kernel global decode entry: L2A and local-only at 128K batch 1 and 8, graph
#            and compiled, with the exactness check and kernel profiles; the entry against the launches it
#            replaces (bench_decode_ops.py); the decode GPU tests (~8 minutes; carry .whl for xdist).
#   entry-final: the entry kernel's launches swept at one row, the fastest used for 128K L2A / local-only
#            at batch 1 and 8 (graph, compiled, --check, profiles), then the entry's GPU tests (~7 minutes).
#   entry-sweep: the entry kernel's num_warps / num_stages at 1 and 8 rows, 128K batch 1 L2A and
#            local-only (graph, compiled, --check, profiles), the entry's GPU tests (~5 minutes).
#   merge:   session 11: L2A and local-only at 128K batch 1 and 8 (graph, compiled, --check, profiles), the
#            decode attention alone at several split sizes (bench_decode_ops.py --attention), the decode GPU
#            tests (~8 minutes).
#   multigpu (on a machine with >= 2 GPUs): 2-GPU DDP / FSDP2 training against 1 GPU with gradient accumulation.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
# liger-kernel (the fused LM loss) from a carried wheel, where one is carried: `carry: [".whl"]`
if ls .whl/liger_kernel-*.whl > /dev/null 2>&1 && ! python -c "import liger_kernel" 2> /dev/null; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/liger_kernel-*.whl && export PYTHONPATH=src:/tmp/site
fi
# pytest-xdist from carried wheels, where carried (GPU tests in parallel processes on the one GPU)
if ls .whl/pytest_xdist-*.whl > /dev/null 2>&1 && ! python -c "import xdist" 2> /dev/null; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/pytest_xdist-*.whl .whl/execnet-*.whl \
    && export PYTHONPATH=src:/tmp/site
fi
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
date -u

gpu_tests() {  # the GPU tests of ops, models and training, with tracebacks of failures
  timeout "$1" python -m pytest -q -rf --tb=short -p no:cacheprovider tests/models/test_l2a_gpu.py \
    tests/training/test_gpu.py tests/ops -k "gpu or cuda or no_host" > "$OUT/gputest.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gputest.log" | tail -15
}

kernel_table() {  # one process per N, so that a slow or failing size leaves the others' rows (table_N.log)
  local check="${TABLE_CHECK:-}" n
  for n in ${TABLE_NS:-32768 131072 16384}; do
    timeout "${TABLE_TIMEOUT:-240}" python benchmarks/bench_attention.py --ns $n $check --out "${TABLE_DIR:-$OUT}/table_$n" > "$OUT/table_$n.log" 2>&1
    check="--skip-check"
    grep -E "^\|" "$OUT/table_$n.log" | tail -n +3 || tail -3 "$OUT/table_$n.log"
  done
}

case "${1:-kernels}" in
pending)
  timeout 150 python -m pytest -q -rf --tb=short -p no:cacheprovider tests/ops/test_rms_norm.py \
    tests/ops/test_rotary.py tests/ops/test_swiglu.py tests/models/test_l2a_gpu.py > "$OUT/gputest.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gputest.log" | tail -15
  timeout 200 python benchmarks/bench_training.py --mode dense --models dense,dense-fused,l2a \
    --seq-lens 65536,131072 --steps 2 --vocab 151936 --window 4096 --out "$OUT/train" > "$OUT/train.log" 2>&1
  grep -E "^\|" "$OUT/train.log" | tail -8 || tail -5 "$OUT/train.log"
  timeout 90 python benchmarks/bench_inference.py --shape 1.5b --ttft-only --prompts 65536,131072 \
    --variants dense,l2a --out "$OUT/ttft" > "$OUT/ttft.log" 2>&1
  grep -E "^\|" "$OUT/ttft.log" | tail -6 || tail -5 "$OUT/ttft.log"
  ;;
recipe8b)
  # the Qwen3-8B recipe, two steps (the second: steady-state tokens/s); needs liger-kernel (carry its wheel)
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 240 python benchmarks/bench_training.py \
    --mode recipe --config configs/qwen3-8b-128k.yaml --steps 2 --set grad_accum_steps=1 \
    --out "$OUT/recipe" > "$OUT/recipe.log" 2>&1
  grep -E "^\||peak|tokens/s" "$OUT/recipe.log" | tail -6 || tail -5 "$OUT/recipe.log"
  ;;
infer128 | infer64)
  n=131072
  [ "$1" = infer64 ] && n=65536
  timeout 500 python benchmarks/bench_inference.py --check --shape 7b --prompts $n --batches 1,8 \
    --modes eager,graph,compiled --steps 10 --warmup 2 --host-profile ${PROFILE:+--profile} --budget-s 400 \
    --out "$OUT/$1" > "$OUT/$1.log" 2>&1
  grep -E "^\||check:" "$OUT/$1.log" | tail -5 || tail -5 "$OUT/$1.log"
  if [ -n "${TESTS:-}" ]; then  # the decode GPU tests after the timings (carry .whl for xdist)
    python -c "import xdist" 2> /dev/null && par="-n 8" || par=""
    timeout 150 python -m pytest -q -rf --tb=short -p no:cacheprovider $par tests/ops/test_decode.py \
      tests/ops/test_decode_kvcache.py tests/ops/test_norm_route_qkv.py tests/models/test_l2a_decode_fusion.py \
      tests/models/test_l2a_gpu.py > "$OUT/gputest.log" 2>&1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gputest.log" | tail -12
  fi
  ;;
entry)
  # session 10: the global branch's one-kernel decode entry (norm_route_qkv). Timings first (a quiet GPU),
  # then the entry against the three launches it replaces, then the decode GPU tests (in 8 processes)
  timeout 330 python benchmarks/bench_inference.py --check --shape 7b --prompts 131072 --batches 1,8 \
    --modes graph,compiled --variants l2a,local_only --steps 20 --warmup 2 --profile --budget-s 260 \
    --out "$OUT/entry" > "$OUT/entry.log" 2>&1
  grep -E "^\||check:" "$OUT/entry.log" | tail -8 || tail -5 "$OUT/entry.log"
  timeout 60 python benchmarks/bench_decode_ops.py --out "$OUT/decode_ops.json" > "$OUT/decode_ops.log" 2>&1
  grep -E "^\|" "$OUT/decode_ops.log" | grep -v "\[BN" || tail -5 "$OUT/decode_ops.log"
  python -c "import xdist" 2> /dev/null && par="-n 8" || par=""
  timeout 170 python -m pytest -q -rf --tb=short -p no:cacheprovider $par tests/ops/test_norm_route_qkv.py \
    tests/models/test_l2a_decode_fusion.py tests/ops/test_routed_linear.py tests/ops/test_decode.py \
    tests/ops/test_decode_kvcache.py tests/ops/test_rms_norm.py tests/models/test_l2a_gpu.py \
    > "$OUT/gputest.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gputest.log" | tail -12
  ;;
entry-final)
  # the entry kernel's launches at one row (bench_decode_ops --entry-only), the fastest at ~12 % routed
  # steps taken for L2A / local-only at 128K batch 1 and 8 (graph, compiled, --check, profiles), then the
  # entry's GPU tests (~7 minutes)
  timeout 60 python benchmarks/bench_decode_ops.py --entry-only --out "$OUT/entry_ops_1.json" \
    > "$OUT/entry_ops_1.log" 2>&1
  grep -E "^\|" "$OUT/entry_ops_1.log" | tail -n +3 || tail -5 "$OUT/entry_ops_1.log"
  best=$(python -c "
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if 'one kernel' in r['op']]
cost = {}
for r in rows:
    cost.setdefault(tuple(r['launch']), 0.0)
    cost[tuple(r['launch'])] += (0.12 if ', routed' in r['op'] else 0.88) * r['us']
print(','.join(str(int(v)) for v in min(cost, key=cost.get)))" "$OUT/entry_ops_1.json" 2> /dev/null || echo 512,4,3)
  echo "entry launch: $best"
  timeout 300 python benchmarks/bench_inference.py --check --shape 7b --prompts 131072 --batches 1,8 \
    --modes graph,compiled --variants l2a,local_only --steps 20 --warmup 2 --profile --budget-s 230 \
    --entry-launch "$best" --out "$OUT/entry" > "$OUT/entry.log" 2>&1
  grep -E "^\||check:" "$OUT/entry.log" | tail -5 || tail -5 "$OUT/entry.log"
  python -c "import xdist" 2> /dev/null && par="-n 8" || par=""
  timeout 110 python -m pytest -q -rf --tb=short -p no:cacheprovider $par tests/ops/test_norm_route_qkv.py \
    tests/models/test_l2a_decode_fusion.py > "$OUT/gputest.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gputest.log" | tail -12
  ;;
entry-sweep)
  # the entry kernel's launch configurations at 1 and 8 rows, then L2A / local-only 128K batch 1 with the
  # exactness check and kernel profiles, then the entry's GPU tests (~5 minutes)
  for rows in 1 8; do
    timeout 90 python benchmarks/bench_decode_ops.py --entry-only --rows $rows \
      --out "$OUT/entry_ops_$rows.json" > "$OUT/entry_ops_$rows.log" 2>&1
    grep -E "^\|" "$OUT/entry_ops_$rows.log" | tail -n +3 || tail -5 "$OUT/entry_ops_$rows.log"
  done
  timeout 270 python benchmarks/bench_inference.py --check --shape 7b --prompts 131072 --batches 1 \
    --modes graph,compiled --variants l2a,local_only --steps 20 --warmup 2 --profile --budget-s 200 \
    --out "$OUT/entry" > "$OUT/entry.log" 2>&1
  grep -E "^\||check:" "$OUT/entry.log" | tail -4 || tail -5 "$OUT/entry.log"
  python -c "import xdist" 2> /dev/null && par="-n 8" || par=""
  timeout 190 python -m pytest -q -rf --tb=short -p no:cacheprovider $par tests/ops/test_norm_route_qkv.py \
    tests/models/test_l2a_decode_fusion.py tests/models/test_l2a_gpu.py > "$OUT/gputest.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gputest.log" | tail -12
  ;;
merge)
  # session 11: L2A and local-only at 128K batch 1 and 8 (graph, compiled, --check, profiles), then the decode
  # attention alone at several split sizes at batch 1 and 8, then the decode GPU tests (~8 minutes; carry .whl
  # for xdist). Call 1 of session 11 ran it with the merge fused into the split kernel (64ec183).
  timeout 300 python benchmarks/bench_inference.py --check --shape 7b --prompts 131072 --batches 1,8 \
    --modes graph,compiled --variants l2a,local_only --steps 20 --warmup 2 --profile --budget-s 230 \
    --out "$OUT/merge" > "$OUT/merge.log" 2>&1
  grep -E "^\||check:" "$OUT/merge.log" | tail -5 || tail -5 "$OUT/merge.log"
  for rows in 1 8; do
    timeout 60 python benchmarks/bench_decode_ops.py --attention --rows $rows \
      --out "$OUT/attention_$rows.json" > "$OUT/attention_$rows.log" 2>&1
    grep -E "^\|" "$OUT/attention_$rows.log" | tail -n +3 || tail -5 "$OUT/attention_$rows.log"
  done
  python -c "import xdist" 2> /dev/null && par="-n 8" || par=""
  timeout 120 python -m pytest -q -rf --tb=short -p no:cacheprovider $par tests/ops/test_decode.py \
    tests/ops/test_decode_kvcache.py tests/models/test_l2a_decode_fusion.py tests/models/test_l2a_gpu.py \
    > "$OUT/gputest.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gputest.log" | tail -12
  ;;
decode)
  timeout 200 python -m pytest -q -rf --tb=short -p no:cacheprovider tests/ops/test_routed_linear.py \
    tests/ops/test_decode.py tests/ops/test_decode_kvcache.py tests/ops/test_rms_norm.py \
    tests/models/test_l2a_decode_fusion.py tests/models/test_l2a_gpu.py > "$OUT/gputest.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gputest.log" | tail -12
  timeout 120 python benchmarks/bench_decode_ops.py --out "$OUT/decode_ops.json" > "$OUT/decode_ops.log" 2>&1
  grep -E "^\|" "$OUT/decode_ops.log" || tail -5 "$OUT/decode_ops.log"
  timeout 330 python benchmarks/bench_inference.py --check --shape 7b --prompts 131072 --batches 1 \
    --modes graph,compiled --variants l2a,local_only --steps 20 --warmup 2 --profile --out "$OUT/decode" \
    > "$OUT/decode.log" 2>&1
  grep -E "^\||check:" "$OUT/decode.log" | tail -5 || tail -5 "$OUT/decode.log"
  for f in "$OUT"/decode/profile_*.txt; do head -1 "$f"; done
  ;;
tests)
  gpu_tests "${TESTS_TIMEOUT:-400}"
  ;;
kernels)
  gpu_tests 300
  timeout 180 python benchmarks/bench_backward.py --ns 32768,131072 --dq "128,64,8,3" \
    --dkdv "64,128,8,2;64,128,8,3" --phases 0,1 --exports "$OUT/best.sh" --out "$OUT/bwd" > "$OUT/bwd.log" 2>&1
  grep -v '^{' "$OUT/bwd.log" | grep -v '^ *_' | tail -20
  cat "$OUT/best.sh" && . "$OUT/best.sh"
  kernel_table
  ;;
table)
  kernel_table
  ;;
eval)
  # Three demo models trained at the same time (each is launch-bound): the demo's default sizes, 256-token
  # rows (the CPU-tuned longer run) and 1024-token rows. Every step is time-limited, so a slow one leaves
  # the others' results; $OUT/eval_runs.tgz holds whatever finished (models and logs stay in $W).
  W=${EVAL_DIR:-/tmp/l2a_eval}
  mkdir -p "$W"
  kv() {  # the --task-arg flags of a demo run's report.json
    python -c "import json,sys; a=json.load(open(sys.argv[1]))['eval_task_args']['kv_retrieval']; \
print(' '.join(f'--task-arg kv_retrieval.{k}={v}' for k, v in a.items()))" "$1"
  }
  timeout 330 python -m l2a demo --out "$W/demo_gpu" --device cuda > "$W/demo_gpu.log" 2>&1 &
  timeout 330 python -m l2a demo --out "$W/long256" --device cuda --set seq_len=256 --set pretrain_steps=3000 \
    --set routed_steps=300 --set regularizer_weight=5e-4 > "$W/long256.log" 2>&1 &
  timeout 330 python -m l2a demo --out "$W/long" --device cuda --set seq_len=1024 --set window=128 \
    --set hidden_size=256 --set num_layers=4 --set num_heads=4 --set num_kv_heads=2 --set pretrain_steps=3000 \
    --set routed_steps=600 --set regularizer_weight=1.25e-4 > "$W/long.log" 2>&1 &
  wait
  for run in demo_gpu long256 long; do echo "== $run"; tail -6 "$W/$run.log"; done
  common="--samples 50 --variants l2a,local_only,all_global --perplexity --speed --no-progress"
  timeout 150 python -m l2a eval "$W/demo_gpu/model" "$W/demo_gpu/base" --tasks kv_retrieval \
    $(kv "$W/demo_gpu/report.json") --lengths 128,192,256 --ppl-seq-len 256 --speed-lengths 128,256 $common \
    --out "$W/demo_gpu/eval" > "$W/demo_gpu_eval.log" 2>&1 &
  timeout 150 python -m l2a eval "$W/long256/model" "$W/long256/base" --tasks kv_retrieval \
    $(kv "$W/long256/report.json") --lengths 128,256,512 --ppl-seq-len 512 --speed-lengths 256,512 $common \
    --out "$W/long256/eval" > "$W/long256_eval.log" 2>&1 &
  timeout 150 python -m l2a eval "$W/long/model" "$W/long/base" --tasks kv_retrieval,niah_single_1,vt \
    $(kv "$W/long/report.json") --lengths 512,1k,2k --ppl-seq-len 2048 --speed-lengths 1k,2k $common \
    --out "$W/long/eval" > "$W/long_eval.log" 2>&1 &
  wait
  for run in demo_gpu long256 long; do cat "$W/$run/eval/results.md" 2>/dev/null || tail -5 "$W/${run}_eval.log"; done
  tar czf "$OUT/eval_runs.tgz" --exclude='*.safetensors' -C "$W" demo_gpu long256 long \
    demo_gpu.log long256.log long.log demo_gpu_eval.log long256_eval.log long_eval.log
  ;;
train)
  timeout 400 python benchmarks/bench_training.py --seq-lens 16384,32768 --out "$OUT/train" > "$OUT/train.log" 2>&1
  tail -8 "$OUT/train.log"
  ;;
multigpu)
  timeout 500 python benchmarks/check_multi_gpu.py --world 2 --out "$OUT/multi_gpu" 2>&1 | grep -v "shards"
  ;;
*)
  echo "usage: OUT=DIR bash benchmarks/gpu_session.sh tests|kernels|table|eval|train|pending|recipe8b|decode|entry|entry-sweep|entry-final|merge|infer128|infer64|multigpu" >&2
  exit 2
  ;;
esac
date -u
