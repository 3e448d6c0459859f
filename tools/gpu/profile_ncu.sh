#!/usr/bin/env bash
# Nsight Compute profile of the CNTK pair kernel on a GPU machine.  Output into $OUT.
#
#   OUT=/tmp/out bash tools/gpu/profile_ncu.sh [--tag v3] [--depth 21] [--n 16] [--dtype float32]
#                                          [--size 32] [--python python3]
#
# Profiles ONE launch of the pair kernel (`pair_sums_kernel<...>`, the first one of a
# symmetric Gram of N random size x size x 3 images, GAP, arora, NTK + NNGP) with `--set full`
# (speed of light, occupancy, warp-state stall reasons, instruction statistics and pipe
# utilisation, scheduler statistics, source counters), with the GPU's clocks left as they are
# (`--clock-control none`).  The package must already be installed; build it with
# -lineinfo so the source counters map stalls to lines of csrc/cntk_kernels.cu:
#
#   CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_FLAGS=-lineinfo" \
#       python3 -m pip install --no-build-isolation --no-deps .
#
# Writes: ncu_<tag>.ncu-rep (open with `ncu-ui` or `ncu --import`), ncu_<tag>_details.txt
# (every section as text), ncu_<tag>_raw.csv (every metric), ncu_<tag>_source.csv (per-line
# SASS counters, if the build had -lineinfo).  One launch of N=16 at depth 21 takes ~7 ms;
# `--set full` replays it ~40 times: the whole script takes well under a minute.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
TAG=v3; DEPTH=21; N=16; DTYPE=float32; SIZE=32; PY=python3
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=$2; shift 2 ;;
    --depth) DEPTH=$2; shift 2 ;;
    --n) N=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    *) echo "unknown option $1 (see the header of tools/gpu/profile_ncu.sh)"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
if ! command -v ncu >/dev/null; then
  echo "ncu (Nsight Compute) is not on the PATH: nothing profiled"; exit 3
fi
TARGET=$(mktemp /tmp/ncu_target.XXXXXX.py)
cat > "$TARGET" <<'PY'
import sys
import cupy as cp
import numpy as np
import cntk_engine as ce
depth, n, dtype, size = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
x = cp.asarray(np.random.default_rng(0).standard_normal((n, 3, size, size)), dtype=dtype)
ntk, nngp = ce.gram(x, depth=depth, backend="cuda", kernel="both", dtype=dtype)
cp.cuda.Device().synchronize()
print(f"profiled gram: N={n} depth={depth} {dtype} {size}x{size}; ntk[0, :3] = {cp.asnumpy(ntk[0, :3])}")
PY
REP="$OUT/ncu_${TAG}"
echo "== ncu: $TAG depth $DEPTH N $N $DTYPE ${SIZE}x${SIZE} ($(ncu --version | tail -1))"
# -P: import the INSTALLED cntk_engine (with its compiled extension), not the source tree in cwd
ncu --clock-control none --kernel-name regex:pair_sums --launch-count 1 --set full \
    --import-source yes -f -o "$REP" "$PY" -P "$TARGET" "$DEPTH" "$N" "$DTYPE" "$SIZE"
rc=$?
rm -f "$TARGET"
if [ $rc -ne 0 ] || [ ! -f "$REP.ncu-rep" ]; then echo "ncu failed (rc=$rc)"; exit 4; fi
ncu --import "$REP.ncu-rep" --page details > "${REP}_details.txt"
ncu --import "$REP.ncu-rep" --page raw --csv > "${REP}_raw.csv"
ncu --import "$REP.ncu-rep" --page source --csv --print-source sass > "${REP}_source.csv" 2>/dev/null \
  || echo "(no source page: build without -lineinfo?)"
# the headline rows, for the log
grep -E "Duration|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Issued Ipc Active|Executed Ipc Active|No Eligible|Compute \(SM\) Throughput|Warp Cycles Per Issued Instruction" \
  "${REP}_details.txt" | sed 's/^ */  /'
ls -la "$REP"*
