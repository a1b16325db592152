#!/usr/bin/env bash
# Wheels the GPU check needs on a machine that cannot reach PyPI (this project's lent H200: Python
# 3.12, torch, CuPy and the CUDA 13 toolkit already there), downloaded here into .whl/ (git
# ignores it), carried with the checkout and installed by benchmarks/gpu_check.sh:
#
#   benchmarks/gpu_wheels.sh            # then run gpu_check.sh there with .whl carried
#
# PY_VERSION (3.12) and KVIKIO_CUDA (13) choose the target. About 4 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${PY_VERSION:-3.12}"
CU="${KVIKIO_CUDA:-13}"
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" \
    -d .whl hydra-core==1.3.2 omegaconf==2.3.0 zfec pytest-timeout "kvikio-cu$CU" "libkvikio-cu$CU" "rapids-logger==0.3.*"
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # hydra's parser: an sdist only, pure Python
ls -la .whl
