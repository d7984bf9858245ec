#!/usr/bin/env bash
# One GPU session's checks on a machine that already has CUDA PyTorch (the device machine:
# Python 3.12, torch 2.11+cu130, nvcc 13). Builds stema_kernels in place for sm_90 with the
# CUDA kernels forced on, then runs the stages named on the command line:
#
#   bash benchmarks/gpu_session.sh tests                 # pytest -m cuda (every CUDA kernel test)
#   bash benchmarks/gpu_session.sh bench-kernels         # logprobs, gae, refit, scheduler on cuda
#   bash benchmarks/gpu_session.sh bench-training        # sft, dpo, rollout (and ppo) on cuda
#
# Wheels for packages that machine lacks (trl, datasets, dill, multiprocess) are read from .whl/
# when present (see /work/.library/device/README.md on carrying wheels). Logs go to $OUT when set.
set -uo pipefail
OUT="${OUT:-/tmp/stema-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTEMA_CUDA=ON -DSTEMA_CUDA_ARCHS=90 \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >"$OUT/cmake.log" 2>&1 \
  && cmake --build build/gpu -j 16 >>"$OUT/cmake.log" 2>&1 || { tail -40 "$OUT/cmake.log"; exit 1; }
"$PY" -c "import stema_kernels, torch; print(stema_kernels.build_info(), torch.__version__, torch.cuda.get_device_name())" || exit 1

status=0
for stage in "$@"; do
  case "$stage" in
    tests)
      "$PY" -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.log" | tail -25 || status=1 ;;
    bench-kernels)
      "$PY" benchmarks/run_all.py --device cuda --only logprobs gae refit scheduler 2>&1 | tee "$OUT/bench_kernels.log" || status=1 ;;
    bench-training)
      "$PY" benchmarks/run_all.py --device cuda --only sft dpo rollout ppo 2>&1 | tee "$OUT/bench_training.log" || status=1 ;;
    *)
      echo "unknown stage $stage" >&2; status=2 ;;
  esac
done
exit $status
