#!/usr/bin/env bash
# GPU in minutes: run whenever a machine with CUDA is lent.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after the README's setup
#
# 1. the CUDA tests (marked `cuda`; skipped on CPU-only machines), with their output kept;
# 2. the speed benchmark on CUDA: the Mistral-7B-shaped set (32 layers x 7 projections, N = 10,
#    r = 16, R = 16) and the comparison with the authors' dense CP and PEFT svd;
# 3. when the quality benchmark's real adapters are cached, the real-adapter speed part on CUDA.
# Results: benchmarks/results/gpu_check_*.{txt,json} (machine, versions and date inside each JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no CUDA device (torch %s); nothing to check" % torch.__version__)
print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
python -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$out/gpu_check_tests.txt"
python benchmarks/speed.py --device cuda --parts mistral compare --repeats 5 --skip-tensorly \
    --out "$out/gpu_check_speed.json"
if [ -f benchmarks/real_adapters.py ] && python benchmarks/real_adapters.py --help >/dev/null 2>&1; then
    python benchmarks/real_adapters.py --device cuda --out "$out/gpu_check_real_adapters.json" \
        || echo "gpu_check: real adapters not cached or no --device option; skipped"
fi
echo "gpu_check: done; results in $out/gpu_check_*"
