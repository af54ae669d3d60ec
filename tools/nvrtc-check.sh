#!/usr/bin/env bash
# The NVRTC compile check (spec section 7, layer 4), no GPU needed: every kernels/*.cu is
# compiled by NVRTC for sm_80 and sm_90a straight to a cubin (NVRTC's own ptxas assembles it and
# reports), and the per-kernel registers, shared memory and spills go to docs/kernels.md.
# Fetches NVRTC (and ptxas) from PyPI first (tools/fetch-cuda-tools.sh, into the git-ignored
# tools/.cuda-venv).
# Extra arguments go to kernels-check (e.g. --arch sm_90a, --nvrtc-option -lineinfo, --source
# attention.cu: that source only, docs/kernels.md left alone).
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash tools/fetch-cuda-tools.sh)"

# docs/kernels.md is written only by a check of every source (not with --source FILE).
markdown=(--markdown docs/kernels.md)
for a in "$@"; do [ "$a" = --source ] && markdown=(); done

echo "==> kernels-check (NVRTC from $NVRTC_LIB_DIR)"
LD_LIBRARY_PATH="$NVRTC_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo run --release --quiet --bin kernels-check -- \
  "${markdown[@]}" "$@"
