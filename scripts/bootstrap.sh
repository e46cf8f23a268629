#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at $1 and install vlmoe into it.
# - A machine whose python3 already has torch >= 2.8 (e.g. a GPU box with its CUDA build)
#   keeps that torch: the venv sees the system site-packages.
# - Otherwise the venv is isolated and gets torch==2.13.0, which on a CPU-only machine with
#   a local wheel resolves in seconds and never pulls a CUDA build.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    if "$python" -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 8) else 1)' 2>/dev/null; then
        echo "bootstrap: keeping the machine's torch ($("$python" -c 'import torch; print(torch.__version__)'))"
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    "${pip[@]}" install "torch==2.13.0"
fi
"${pip[@]}" install -e ".[dev]"
