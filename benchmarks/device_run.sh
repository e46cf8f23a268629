#!/usr/bin/env bash
# One device call: environment report, GPU tests, then the layer benchmark.
# Wheels for packages the device image may lack travel in .whl (see benchmarks/README.md).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
out=${OUT:-/tmp}
missing=()
for module in peft pytest; do python3 -c "import $module" 2>/dev/null || missing+=("$module"); done
if [ ${#missing[@]} -gt 0 ] && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/vlmoe-deps/site-packages .whl/*.whl
    export PYTHONPATH=src:/tmp/vlmoe-deps/site-packages  # under site-packages: see device_perf.sh
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
python3 -m pytest -p no:cacheprovider -q -m gpu tests/moe > "$out/gpu_tests.log" 2>&1
tail -3 "$out/gpu_tests.log"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    python3 benchmarks/moe_layer.py "$@" 2>&1 | tee "$out/moe_layer.log"
fi
