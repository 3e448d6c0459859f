#!/usr/bin/env bash
# One script for the GPU machine: install, harness, Table 1 reproduction, small-data protocol.
#
#   OUT=/path/to/out CNTK_ENGINE_DATA=/path/to/data bash tools/gpu/gpu_bench_all.sh [options]
#
# Run from the repository root.  Writes at most 7 files into $OUT:
#   gpu_bench_all.log, harness_gpu_<date>.{json,png}, table1_gpu_<date>.{json,md},
#   small_data_gpu_<date>.{json,png}
# Options (defaults in brackets):
#   --phases LIST        comma list of install,harness,table1,small [all four]; a warm machine keeps
#                        the install, so phases can be split across calls of <= 10 minutes
#   --backend B          cuda [cuda]; numba with --tiny tests this script on a CPU machine
#   --tiny               tiny sizes everywhere (a smoke test of the whole script, ~1-2 min on CPU)
#   --no-install         use the package importable as is (PYTHONPATH / an earlier install)
#   --harness-n LIST     N for the project's GPU backend [64,256]
#   --harness-depths L   [3,6,11,21]
#   --gap-budget S       seconds for the CNTK-GAP kernel pass of Table 1 (the subset is sized
#                        from a measured pairs/s probe to fit) [180]
#   --flatten-budget S   same for CNTK-V [60]
#   --n-train N --n-test N   largest Table 1 subset [5000 / 2000, the whole shipped subset]
#   --sd-draws N         small-data draws per size [10]
#   --python PY          [python3]
# Device time: install ~1-3 min (CUDA compile), harness ~2 min, table1 ~ gap + flatten budgets
# + LOO solves (~1 min), small ~1 min.  Everything is logged to $OUT/gpu_bench_all.log.
set -uo pipefail

REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_out}
PY=python3
PHASES=install,harness,table1,small
BACKEND=cuda
TINY=0
INSTALL=1
H_N=64,256
H_DEPTHS=3,6,11,21
GAP_BUDGET=180
FLAT_BUDGET=60
N_TRAIN=5000
N_TEST=2000
SD_DRAWS=10
while [ $# -gt 0 ]; do
  case "$1" in
    --phases) PHASES=$2; shift 2 ;;
    --backend) BACKEND=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --harness-n) H_N=$2; shift 2 ;;
    --harness-depths) H_DEPTHS=$2; shift 2 ;;
    --gap-budget) GAP_BUDGET=$2; shift 2 ;;
    --flatten-budget) FLAT_BUDGET=$2; shift 2 ;;
    --n-train) N_TRAIN=$2; shift 2 ;;
    --n-test) N_TEST=$2; shift 2 ;;
    --sd-draws) SD_DRAWS=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    *) echo "unknown option $1 (see the header of tools/gpu/gpu_bench_all.sh)"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
LOG="$OUT/gpu_bench_all.log"
WORK=$(mktemp -d /tmp/cntk_bench.XXXXXX)
exec > >(tee -a "$LOG") 2>&1
has() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
FAILED=""

step "gpu_bench_all.sh phases=$PHASES backend=$BACKEND tiny=$TINY repo=$REPO commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"
$PY --version
lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)" || true

# The bench package is imported through a symlink on PYTHONPATH and Python runs with -P (no
# current directory on sys.path), so `import cntk_engine` finds the INSTALLED package (with the
# compiled CUDA extension), not the source tree in the current directory.
mkdir -p "$WORK/pp"
ln -s "$REPO/bench" "$WORK/pp/bench"
if [ "$INSTALL" = 1 ]; then
  RUNPY=("$PY" -P)
  export PYTHONPATH="$WORK/pp"
else
  RUNPY=("$PY" -P)
  export PYTHONPATH="$WORK/pp:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

if has install && [ "$INSTALL" = 1 ]; then
  step "install: pip install --no-build-isolation --no-deps . (CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90)"
  t0=$(date +%s)
  CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90}" $PY -m pip install --no-build-isolation --no-deps . \
    || { echo "INSTALL FAILED"; FAILED="$FAILED install"; }
  echo "install took $(( $(date +%s) - t0 )) s"
fi
step "what will run"
"${RUNPY[@]}" -c "import cntk_engine as ce, sys; print('cntk_engine from', ce.__file__); print('backends', ce.available_backends())"

if [ "$TINY" = 1 ]; then
  H_N=4,8; H_DEPTHS=3,6; SIZES=8; NFOR="per_layer_cuda=2,per_layer_cpu=2,numba=4,neural_tangents=2"
  T1="--n-train 120 --n-test 50 --downsample 4 --depths 3,4,6"; SD="--sizes 10,20,40 --depths 3,6"
  METHODS="$BACKEND,per_layer_cpu"; [ "$BACKEND" = cuda ] && METHODS="cuda,per_layer_cuda,numba"
else
  SIZES=32; NFOR="per_layer_cuda=16,numba=8,per_layer_cpu=2,neural_tangents=4"
  T1="--n-train $N_TRAIN --n-test $N_TEST"; SD="--depths 3,6,11,21"
  METHODS="$BACKEND,per_layer_cuda,numba,neural_tangents"
  [ "$BACKEND" != cuda ] && METHODS="$BACKEND,per_layer_cpu"
fi

if has harness; then
  step "harness: $METHODS, depths $H_DEPTHS, float32/float64, N $H_N"
  "${RUNPY[@]}" -m bench --methods "$METHODS" --depths "$H_DEPTHS" --sizes $SIZES --dtypes float32,float64 \
    --n "$H_N" --n-for "$NFOR" --repeats 3 --warmup 1 --out-dir "$OUT" --name harness_gpu \
    || { echo "HARNESS FAILED"; FAILED="$FAILED harness"; }
fi

if has table1; then
  step "Table 1: CNTK-GAP (budget ${GAP_BUDGET} s) and CNTK-V (budget ${FLAT_BUDGET} s), depths from one pass"
  # Two invocations so each pooling gets its own budget; the second appends its column by
  # writing a separate tag, then both are merged into one JSON + one markdown.
  "${RUNPY[@]}" -m bench.reproduce_table1 $T1 --pooling gap --backend "$BACKEND" --time-budget "$GAP_BUDGET" \
    --per-depth-timing 64 --save-kernels "$WORK/k" --out-dir "$WORK" --tag gap \
    || { echo "TABLE1 GAP FAILED"; FAILED="$FAILED table1_gap"; }
  "${RUNPY[@]}" -m bench.reproduce_table1 $T1 --pooling flatten --backend "$BACKEND" --time-budget "$FLAT_BUDGET" \
    --per-depth-timing 256 --out-dir "$WORK" --tag flatten \
    || { echo "TABLE1 FLATTEN FAILED"; FAILED="$FAILED table1_flatten"; }
  "${RUNPY[@]}" -m bench.reproduce_table1 --merge "$WORK"/table1_gap_*.json "$WORK"/table1_flatten_*.json \
    --out-dir "$OUT" --tag gpu || { echo "TABLE1 MERGE FAILED"; FAILED="$FAILED table1_merge"; }
fi

if has small; then
  step "small-data protocol from the CNTK-GAP kernel of Table 1"
  if [ -f "$WORK/k_gap.npz" ]; then
    "${RUNPY[@]}" -m bench.small_data --kernels "$WORK/k_gap.npz" $SD --draws "$SD_DRAWS" --out-dir "$OUT" --tag gpu \
      || { echo "SMALL DATA FAILED"; FAILED="$FAILED small"; }
  else
    echo "no Table 1 GAP kernel in this call (table1 phase not run or failed): computing one"
    "${RUNPY[@]}" -m bench.small_data $SD --pooling gap --pool 1280 --n-test 1000 --backend "$BACKEND" \
      --draws "$SD_DRAWS" --out-dir "$OUT" --tag gpu $([ "$TINY" = 1 ] && echo "--pool 120 --n-test 50 --downsample 4") \
      || { echo "SMALL DATA FAILED"; FAILED="$FAILED small"; }
  fi
fi

rm -rf "$WORK"
step "done; files in $OUT:"
ls -la "$OUT"
if [ -n "$FAILED" ]; then echo "FAILED PHASES:$FAILED"; exit 1; fi
echo "ALL PHASES OK"
