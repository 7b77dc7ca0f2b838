#!/usr/bin/env bash
# GPU in minutes: run whenever a machine with CUDA is lent.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after the README's setup
#   PYTHON=python3 bash benchmarks/gpu_check.sh   # another interpreter (e.g. PYTHONPATH=$PWD, no install)
#
# 1. the CUDA tests (marked `cuda`; skipped on CPU-only machines), with their output kept;
# 2. the speed benchmark on CUDA: the Mistral-7B-shaped set (32 layers x 7 projections, N = 10,
#    r = 16; the default cp at R = 160 and the sum-like cp at R = 16) and the comparison with the
#    authors' dense CP and PEFT svd;
# 3. when the quality benchmark's real adapters are cached, the real-adapter speed part on CUDA.
# A failing CUDA test does not stop the benchmarks; the script's exit status reports it at the end.
# Results: benchmarks/results/gpu_check_*.{txt,json} (machine, versions and date inside each JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
py=${PYTHON:-python}
"$py" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no CUDA device (torch %s); nothing to check" % torch.__version__)
print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
tests=0
"$py" -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$out/gpu_check_tests.txt" || tests=$?
"$py" benchmarks/speed.py --device cuda --parts mistral compare --repeats 5 --skip-tensorly \
    --out "$out/gpu_check_speed.json"
"$py" benchmarks/real_adapters.py --device cuda --threads 1 --out "$out/gpu_check_real_adapters.json" \
    || echo "gpu_check: real adapters not cached (benchmarks/quality/cache/adapters); skipped"
echo "gpu_check: done; results in $out/gpu_check_*"
if [ "$tests" -ne 0 ]; then echo "gpu_check: the CUDA tests FAILED (status $tests)"; fi
exit "$tests"
