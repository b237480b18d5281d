#!/usr/bin/env bash
# The two GPU figures benchmarks/RESULTS.md records, in one go (about 6-7 minutes on one H100 or H200): apply's
# scoring step at 512 tokens with a BERT-base-sized classifier (random weights: speed does not depend on them), then
# smollm-135m pretraining throughput and MFU; again at micro_batch_size=16 if the card runs out of memory.
#   bash benchmarks/gpu_benchmarks.sh [OUT]     # logs in OUT (default ./gpu-benchmarks); PYTHON=... to choose one
# The scoring step tokenizes in a thread on the machine's cores: TOKENIZERS_PARALLELISM=false would leave it one.
set -uo pipefail
out=${1:-gpu-benchmarks}
mkdir -p "$out"
unset TOKENIZERS_PARALLELISM RAYON_NUM_THREADS
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$python" "$here/bench_apply.py" --device cuda --docs 10000 --model bert-base-random --window-size 2048 \
  --batch-size 256,1024 2>&1 | grep -v "Loading weights\|Writing model" | tee "$out/apply.log"
"$python" "$here/bench_pretrain.py" --preset smollm-135m 2>&1 | tee "$out/pretrain.log"
if grep -qi "out of memory" "$out/pretrain.log"; then
  "$python" "$here/bench_pretrain.py" --preset smollm-135m --override micro_batch_size=16 2>&1 \
    | tee "$out/pretrain_micro_batch_16.log"
fi
