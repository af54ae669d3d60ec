#!/usr/bin/env bash
# Fetches the CUDA pieces that work without a GPU from PyPI into a git-ignored virtual
# environment (tools/.cuda-venv): NVRTC (libnvrtc.so.13) and ptxas, both CUDA 13.5.
# Safe to rerun: installed packages are kept. CUDA_VERSION=13.0.88 fetches that release instead,
# into a virtual environment of its own (tools/.cuda-venv-13.0.88): the NVRTC of the lent GPU
# machine when last seen, which tools/gpu-prepare.sh compiles every source with first.
#
# Progress goes to stderr; stdout is exactly two shell assignments, for
#   eval "$(bash tools/fetch-cuda-tools.sh)"
# NVRTC_LIB_DIR (the directory to put on LD_LIBRARY_PATH so cudarc finds libnvrtc.so.13) and
# PTXAS (the ptxas binary).
# Environment: CUDA_VERSION (default 13.5.37), CUDA_TOOLS_VENV (default tools/.cuda-venv, or
# tools/.cuda-venv-$CUDA_VERSION for another version), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_CUDA_VERSION=13.5.37
CUDA_VERSION=${CUDA_VERSION:-$DEFAULT_CUDA_VERSION}
if [ "$CUDA_VERSION" = "$DEFAULT_CUDA_VERSION" ]; then
  VENV=${CUDA_TOOLS_VENV:-tools/.cuda-venv}
else
  VENV=${CUDA_TOOLS_VENV:-tools/.cuda-venv-$CUDA_VERSION}
fi
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
lib_dir="$site/nvidia/cu13/lib"
ptxas="$site/nvidia/cu13/bin/ptxas"

if [ ! -e "$lib_dir/libnvrtc.so.13" ] || [ ! -x "$ptxas" ]; then
  echo "==> installing nvidia-cuda-nvrtc==$CUDA_VERSION nvidia-cuda-nvcc==$CUDA_VERSION into $VENV" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
    "nvidia-cuda-nvrtc==$CUDA_VERSION" "nvidia-cuda-nvcc==$CUDA_VERSION" >&2
fi

if [ ! -e "$lib_dir/libnvrtc.so.13" ]; then
  echo "error: $lib_dir/libnvrtc.so.13 is missing after installing nvidia-cuda-nvrtc" >&2
  exit 1
fi
if [ ! -x "$ptxas" ]; then
  # Some wheels lose the executable bit; the file is still the real binary.
  if [ -f "$ptxas" ]; then
    chmod +x "$ptxas"
  else
    echo "error: $ptxas is missing after installing nvidia-cuda-nvcc" >&2
    exit 1
  fi
fi

lib_dir=$(cd "$lib_dir" && pwd -P)
ptxas=$(cd "$(dirname "$ptxas")" && pwd -P)/ptxas
echo "==> NVRTC: $lib_dir/libnvrtc.so.13 (add $lib_dir to LD_LIBRARY_PATH)" >&2
echo "==> ptxas: $ptxas ($("$ptxas" --version | tail -n 1))" >&2
printf 'NVRTC_LIB_DIR=%q\nPTXAS=%q\n' "$lib_dir" "$ptxas"
