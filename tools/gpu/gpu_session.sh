#!/usr/bin/env bash
# One call on a GPU machine, from the repository root: build, sanitizer, SASS mix, GPU tests,
# CUDA bench, Nsight Compute profile, neural-tangents on the GPU.  Output into $OUT.
#
#   OUT=/tmp/out CNTK_ENGINE_DATA=.devdata bash tools/gpu/gpu_session.sh [--phases LIST] [--tag T]
#        [--wheels DIR] [bench_cuda.py options ...]
#
# --phases   comma list of build,sanitizer,sass,tests,bench,ncu,nt
#            [build,sanitizer,sass,tests,bench]
# --tag      names the ncu report and the bench JSON (e.g. v3, v4) [v3]
# --wheels   a folder of wheels to install with --no-deps into /tmp/site (PYTHONPATH) first:
#            neural-tangents and frozendict for the `nt` phase (the GPU machines cannot
#            download; how to make the folder: tools/gpu/README.md, "neural-tangents on a GPU")
# Anything else is passed to bench/bench_cuda.py.
# The build uses -lineinfo (no effect on the generated code) so ncu maps stalls to source lines.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export CNTK_ENGINE_DATA=${CNTK_ENGINE_DATA:-$PWD/.devdata}
export PYTHONUNBUFFERED=1
PHASES=build,sanitizer,sass,tests,bench
TAG=v3
WHEELS=""
BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --phases) PHASES=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --no-bench) PHASES=${PHASES//,bench/}; shift ;;      # the default phases without bench
    *) BENCH_ARGS+=("$1"); shift ;;
  esac
done
has() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
REPO=$(pwd)
log="$OUT/gpu_session_${TAG}.log"
FAILED=""
{
  echo "gpu_session.sh phases=$PHASES tag=$TAG commit=$(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (archive)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi: not available"
  if [ -n "$WHEELS" ]; then
    echo "== wheels from $WHEELS"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || FAILED="$FAILED wheels"
  fi
  if has build; then
    echo "== build"; t0=$(date +%s)
    CMAKE_BUILD_PARALLEL_LEVEL=16 CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_FLAGS=-lineinfo}" \
      python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | grep -v "spilled\|stack frame\|^\s*$" | tail -20
    echo "build took $(( $(date +%s) - t0 )) s"
  fi
  python3 -P -c "import cntk_engine as ce; print('cntk_engine', ce.__file__, ce.available_backends())"
  if has sanitizer; then
    echo "== compute-sanitizer memcheck (small runs: the general path and the 32x32 path)"
    (cd /tmp && compute-sanitizer --tool memcheck --error-exitcode 3 python3 -P -c "
import numpy as np, cntk_engine as ce
r = np.random.default_rng(0)
x = r.standard_normal((3, 2, 9, 7))
k = ce.gram(x, depths=[2, 4], backend='cuda', kernel='both'); k2 = ce.gram(x[:2], x, depth=3, backend='cuda', pooling='flatten', dtype='float64')
y = r.standard_normal((2, 3, 32, 32))
k3 = ce.gram(y, depth=3, backend='cuda'); k4 = ce.gram(y[:1], y, depth=3, backend='cuda', dtype='float64', filter_size=5)
print('sanitizer run ok', k[4][0][0, :2], k2[0, :2], k3[0], k4[0])" 2>&1 | tail -6; echo "sanitizer rc=${PIPESTATUS[0]}")
  fi
  if has sass; then
    echo "== SASS of the 32x32 float32 k=3 kernel (instruction mix, bench/sass_mix.py)"
    python3 -P bench/sass_mix.py --name "${TAG:-main}_sm90" --out-dir "$OUT" 2>&1 | tail -40
  fi
  if has tests; then
    echo "== GPU tests"
    python3 -P -m pytest -q tests/test_cuda.py tests/test_core.py tests/test_sass.py -p no:cacheprovider 2>&1 | tail -15
    [ "${PIPESTATUS[0]}" = 0 ] || FAILED="$FAILED tests"
  fi
  if has bench; then
    echo "== bench"
    python3 -P bench/bench_cuda.py --out "$OUT" "${BENCH_ARGS[@]}" || FAILED="$FAILED bench"
  fi
  if has ncu; then
    OUT="$OUT" bash tools/gpu/profile_ncu.sh --tag "$TAG" --depth 21 --n 16 || FAILED="$FAILED ncu"
    OUT="$OUT" bash tools/gpu/profile_ncu.sh --tag "${TAG}_depth3" --depth 3 --n 64 || FAILED="$FAILED ncu_depth3"
  fi
  if has nt; then
    echo "== neural-tangents on the GPU, side by side with the CUDA backend (harness)"
    # JAX must not take 75% of the GPU up front (the harness process holds CuPy memory)
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    mkdir -p /tmp/pp && ln -sfn "$REPO/bench" /tmp/pp/bench
    PYTHONPATH=/tmp/pp${PYTHONPATH:+:$PYTHONPATH} python3 -P -m bench --methods cuda,neural_tangents \
      --depths 3,6,11,21 --sizes 32 --dtypes float32 --n 64 --n-for neural_tangents=8 \
      --repeats 3 --warmup 1 --out-dir "$OUT" --name harness_nt_gpu || FAILED="$FAILED nt"
  fi
  echo "files in $OUT:"; ls -la "$OUT"
  [ -z "$FAILED" ] && echo "ALL PHASES OK" || echo "FAILED PHASES:$FAILED"
} 2>&1 | tee "$log"
