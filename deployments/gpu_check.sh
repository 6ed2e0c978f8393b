#!/usr/bin/env bash
# The sparse step's Triton kernels on one GPU: step time against one bf16 encoder GEMM at
# n = 16,384 / 65,536 / 262,144 (d = 576 and 2048, k = 32), tokens/s, peak memory, extraction
# tokens/s through SmolLM2-135M's architecture, and sparsify's step where it imports; JSON on
# stdout. Needs only a Python with torch (CUDA) and triton (+ transformers for extraction); no
# network, no model files, no saeflow install. Under 8 minutes on one H100 (the timeout says so).
#   deployments/gpu_check.sh > gpu.json          PYTHON=/path/to/python deployments/gpu_check.sh
#   deployments/gpu_check.sh --dry-run          the same code paths on CPU, tiny, interpreted
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export HF_HUB_OFFLINE=1
exec timeout 480 "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
