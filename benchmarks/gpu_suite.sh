#!/usr/bin/env bash
# Every GPU figure of the performance section in one command, on one CUDA device (about 30-40 minutes on an H100):
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]          # default benchmarks/results; files are prefixed by the GPU
# Needs torch + timm (+ PyYAML, tqdm for atscale's imports); no FFCV: the training-step figures use synthetic batches
# made on the GPU, as the CPU ones do. The FFCV data-path comparison runs on CPU cores (benchmarks/data_path.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
GPU=$(python3 -c "import re, torch; n = torch.cuda.get_device_name(0).lower().replace('nvidia', ''); \
print(re.sub('[^a-z0-9]+', '-', n).strip('-'))")
export PYTHONUNBUFFERED=1
run() { echo "== $*" >&2; python3 "$@"; }
# 1. images/s and MFU, ours vs the plain loop, PGD-1/3/10, 224 px (ResNet-50 at its usual 256 per GPU)
run benchmarks/mfu.py --models resnet50 --attack-steps 1,3,10 --batch 256 --iters 10 --warmup 3 \
    --save "$OUT/${GPU}_mfu_resnet50.json" >/dev/null
run benchmarks/mfu.py --models resnet152,resnet152_denoise,resnext101_32x8d,efficientnet_b0 --attack-steps 1,3,10 \
    --batch 128 --iters 5 --warmup 2 --save "$OUT/${GPU}_mfu_deep.json" >/dev/null
# 2. each switch flipped on the ResNet-50 PGD-3 step, with a profile of the step; then the compiled variants
run benchmarks/train_step.py --model resnet50 --batch 256 --attack-steps 3 --iters 10 --warmup 3 --ablate \
    --profile 25 --save "$OUT/${GPU}_resnet50_224px_pgd3_ablation.json" >/dev/null
for mode in default max-autotune-no-cudagraphs reduce-overhead; do
  run benchmarks/train_step.py --model resnet50 --batch 256 --attack-steps 3 --iters 10 --warmup 5 --which ours \
      --compile "$mode" --save "$OUT/${GPU}_resnet50_224px_pgd3_compile-${mode}.json" >/dev/null || true
done
# 3. peak memory and the largest batch per GPU, activation checkpointing off / update / all
run benchmarks/memory.py --batch 64 --save "$OUT/${GPU}_memory.json" >/dev/null
# 4. denoise ops vs the bottleneck at the res3/res4 shapes, fused vs explicit softmax
run benchmarks/denoise_ops.py --device cuda --batch 32 --save "$OUT/${GPU}_denoise_ops.json" >/dev/null
echo "results in $OUT/${GPU}_*.json" >&2
