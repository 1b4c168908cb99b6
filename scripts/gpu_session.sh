#!/usr/bin/env bash
# The GPU measurements issue 9 owes, as one call on a lent single-GPU machine (H100/H200 with
# PyTorch and transformers, no network); results go to $OUT (default runs/gpu_session).
#
#   here:    make gpu-wheels    # megatron-core and torchtitan for the device's Python 3.12, into .whl/ (git-ignored)
#   device:  bash scripts/gpu_session.sh    (carry .whl; timeout 600 s: the parts run in order of value, so
#            the limit cuts the last, torchtitan part first)
#
# 1. the GPU tests (no host sync in a step, the padded bf16 grouped GEMM, flash SDPA);
# 2. bench/throughput.py on examples/bench_h100.toml in two parts, so that the first part's table
#    (this project vs Hugging Face grouped-GEMM Mixtral, MoE vs dense, top-K vs SparseMixer-v2,
#    grouped GEMM vs a per-expert loop, and the grouped GEMM's TFLOP/s against a dense GEMM of equal FLOPs)
#    is written even if the second (HF's eager experts, fp32,
#    torch.compile) runs out of time; then torchtitan's MoE layer against ours (third part).
# bench/dp_overlap.py needs two GPUs and is not run.
set -uo pipefail
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
python3 -c "import megatron.core" 2>/dev/null || { echo "megatron-core is missing: run 'make gpu-wheels' here first" >&2; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee "$OUT/versions.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 300 python3 bench/throughput.py --rows hf-grouped dense sparsemixer expert-loop \
    --out "$OUT/throughput_main.json" 2>&1 | tee "$OUT/bench_main.log"
timeout 150 python3 bench/throughput.py --rows hf-eager fp32 compile --warmup 1 --rounds 2 \
    --out "$OUT/throughput_more.json" 2>&1 | tee "$OUT/bench_more.log"
# Last, on its own: every row holds its model, gradients and AdamW state (about 23 GB each at this size),
# so the first part's four MoE rows already take about 100 GB; torchtitan's row runs beside "ours" only.
timeout 120 python3 bench/throughput.py --rows torchtitan --warmup 1 --rounds 2 \
    --out "$OUT/throughput_torchtitan.json" 2>&1 | tee "$OUT/bench_torchtitan.log"
