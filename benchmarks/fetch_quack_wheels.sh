#!/usr/bin/env bash
# Wheels for QuACK (vlmoe[quack]) on the lent GPU machine, which has no package index: run here,
# in the repo root, then carry .whl (device_perf.sh installs them). Python 3.12, CUDA 13 libraries.
# The CUTLASS-DSL CUDA 13 libraries' wheel (92 MB) is over the 64 MiB carry limit as it is; it
# travels unpacked and re-compressed with xz's x86 filter (50 MiB). The machine already has
# cuda-bindings, cuda-pathfinder, protobuf and einops. The 64 MiB counts the repository's files
# too: .whl (59 MiB) and the tree (5 MiB at the end of session 8) touch it, and a call that only
# needs src/, tests/ and benchmarks/ fits again with experiments/ moved aside for it.
set -euo pipefail
mkdir -p .whl
pip_download() {
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
pip_download .whl quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 "apache-tvm-ffi==0.1.15.post2" torch-c-dlpack-ext==0.1.5
# SonicMoE, the performance issue's baseline (`moe_layer.py --sonic`): pure Python over QuACK's GEMMs.
# Its pins (torch <= 2.9.1, nvidia-cutlass-dsl 4.4.2) are not installed: it runs on the QuACK above.
pip_download .whl sonic-moe==0.1.2.post1
# NVML's Python binding, for the benchmarks' clock and power telemetry (telemetry.py, clocks.py).
pip_download .whl nvidia-ml-py==13.615.71
work=$(mktemp -d)
pip_download "$work" nvidia-cutlass-dsl-libs-cu13==4.8.1
mkdir "$work/unpacked" && (cd "$work/unpacked" && python3 -m zipfile -e "$work"/nvidia_cutlass_dsl_libs_cu13-*.whl .)
tar -C "$work/unpacked" -cf - . | xz --x86 --lzma2=preset=9e,dict=256MiB -T1 > .whl/cutlass_dsl_libs_cu13.tar.xz
rm -rf "$work"
du -ch .whl/* | tail -1
