#!/bin/bash
# The GPU checks in one run (about 6 minutes on one H200): the CUDA tests, the decode paths' sampling
# speed (bench/sampling.py, bf16 and fp32), then reinforce-lm against TRL on the GPU at each trainer's
# defaults and with activation checkpointing on in both, then the REINFORCE estimators against PPO. Needs a CUDA GPU, and TRL importable for the comparison
# (pip install -e ".[bench]"). Every part writes its log and table under OUT_DIR.
#
#     bash bench/gpu.sh [OUT_DIR]        # default: bench/results/gpu-run
set -u
OUT=${1:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
SIZES=(--prompts-per-step 16 --k 8 --max-new-tokens 128 --micro-batch 32 --steps 5)

echo "== CUDA tests"
timeout 300 "$PY" -m pytest -q tests/test_cuda.py -p no:cacheprovider -rfEs >"$OUT/cuda_tests.log" 2>&1
tail -3 "$OUT/cuda_tests.log"
for prec in bf16 fp32; do
  echo "== sampling, $prec"
  timeout 150 "$PY" bench/sampling.py --device cuda --precision "$prec" --out "$OUT/sampling_gpu_$prec.md" \
    >"$OUT/sampling_$prec.log" 2>&1
  tail -5 "$OUT/sampling_gpu_$prec.md"
done
for ckpt in defaults both; do
  echo "== vs TRL, checkpointing: $ckpt"
  timeout 300 "$PY" bench/vs_trl.py --device cuda --precision bf16 --pairs grpo --repeats 1 \
    --checkpointing "$ckpt" "${SIZES[@]}" --out "$OUT/vs_trl_gpu_$ckpt.md" >"$OUT/vs_trl_$ckpt.log" 2>&1
  grep -E "reinforce-lm|trl |phases|peaks" "$OUT/vs_trl_$ckpt.log"
done
echo "== estimators against PPO"
timeout 200 "$PY" bench/compare.py --device cuda --methods rloo grpo reinforce_pp ppo --seeds 1 --steps 20 \
  --hidden 256 --layers 4 --variance-estimates 32 --out "$OUT" >"$OUT/compare.log" 2>&1
grep -E "^\| " "$OUT/compare.md"
