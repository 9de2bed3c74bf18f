#!/usr/bin/env bash
# Create/refresh .venv with the pinned CPU torch and the project (idempotent; fast when current).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.omniquant-installed"
extras="test,kernels,mlc,slurm,bench"   # slurm: hydra-submitit-launcher + submitit (81 kB), for the submitit_local sweep test
# bench: llama-cpp-python, compiled from its sdist (7.3 min measured on 2 busy cores) for x86-64-v3 (AVX2, FMA, F16C):
# its default native build uses AMX where the CPU lists it, which faults in VMs that do not enable AMX.
# Where the CPU lists AVX-512 (F, BW, VL, VNNI), llama.cpp gets those paths too, so that the side-by-side
# bench compares like with like (our kernels use AVX-512 where present); AMX stays off.
x86="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
if [[ " $flags " == *" avx512f "* && " $flags " == *" avx512bw "* && " $flags " == *" avx512vl "* && " $flags " == *" avx512_vnni "* ]]; then
  x86="$x86 -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON"
fi
export CMAKE_ARGS="${CMAKE_ARGS:-$x86}"
want=$({ sha256sum pyproject.toml; echo "$extras $CMAKE_ARGS"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # Pin torch first: an unpinned torch would pull the CUDA build (several GB).
  .venv/bin/python -m pip install --quiet torch==2.13.0
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  echo "$want" > "$stamp"
fi
