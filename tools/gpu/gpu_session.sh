#!/usr/bin/env bash
# One call on a GPU machine, from the repository root, everything into $OUT: install, the
# harness bench of every kernel variant (CNN depths 3/6/11/21, Myrtle-5/10) beside the per-layer
# baseline, the GPU tests of every kernel variant, compute-sanitizer, neural-tangents on the
# same GPU, the stack kernel's two register budgets, the paper's own code (timed on the
# H200 already), the SASS counts of the binary that ran (last: they can also be read without a
# GPU), and a summary against the targets of issue #16.  Phases run in that order, so a deadline
# cuts the least needed ones; the bench comes first because its figures are what only a GPU
# gives, and it checks every float32 result against the same kernel's float64 one.
# tools/gpu/README.md gives the device tool's exact call.
#
#   OUT=/tmp/out bash tools/gpu/gpu_session.sh [options]
#   OUT=/tmp/o bash tools/gpu/gpu_session.sh --cpu-dry-run [--nt-python PY] [--paper-code F]
#
# Options [defaults]:
#   --phases LIST     comma list of install,bench,tests,sanitizer,nt,stack_blocks,paper,sass,
#                     summary and the optional ncu (Nsight Compute profiles), bench_cuda
#                     (bench/bench_cuda.py) [install,bench,tests,sanitizer,nt,stack_blocks,
#                     paper,sass,summary]; stack_blocks: bench/bench_stack_blocks.py
#   --deadline S      seconds for the whole script [540; 1200 with --cpu-dry-run].  Each phase
#                     runs under `timeout` with its own limit, cut to what is left before the
#                     deadline less 25 s kept for the summary; a phase that would get less than
#                     its minimum is skipped.  A stopped harness keeps what it measured (its JSON
#                     is rewritten after every configuration).
#   --wheels DIR      wheels installed with --no-deps into $WORK/site, which is on PYTHONPATH
#                     (neural-tangents and frozendict: the GPU machine cannot download)
#                     [.whl if it exists]
#   --prebuilt DIR    the package's wheel built on the CPU side with its stamp
#                     (tools/gpu/prebuilt.py): installed in place of the build when its stamp
#                     matches this tree and it runs here, else the build runs [.prebuilt if it
#                     exists]; a dry run only checks the stamp
#   --paper-code F    a local copy of CNTK.py of github.com/ruosongwang/CNTK [.paper/CNTK.py if
#                     it exists]; without it the paper phase records "unavailable" with the reason
#   --nt-python PY    the Python that runs neural-tangents [the --python]
#   --kernels LIST    CUDA kernel variants timed, sanitized and counted, in this order
#                     [v3,v8,v6,v7,v5: the float32 default, the three variants never run on a
#                     GPU (v8: v3 with the row-seam mask; v6; v7: v6 with a barrier per layer),
#                     then v5, timed on the H200 already; a bench phase stopped at its limit
#                     cuts the last].  The GPU tests run every compiled variant.
#   --tag T           names the files [gpu; cpu_dry_run with --cpu-dry-run]
#   --state DIR       where the harness file and the phase records are kept between calls on
#                     one machine [.gpu_state (ignored by git, so only a warm machine still holds
#                     it); none with --cpu-dry-run]: a call continues the file of an earlier call
#                     on the same host, so figures of two calls (our bench in one, neural-tangents
#                     in the next) are compared as one run's; "none" starts afresh
#   --python PY       [python3]
#   --cpu-dry-run     the same phases on a CPU machine, to test this script before a GPU call:
#                     numba in place of cuda (cuda is still in the matrix and recorded as
#                     unavailable), per_layer_cpu in place of per_layer_cuda, the paper's two
#                     RawKernels emulated in NumPy (values checked, no timing), tiny sizes; the
#                     package build is skipped (the installed package is used); phases that need
#                     a GPU or the CUDA extension record why they were skipped
#
# Files in $OUT (at most 8 come back from the device tool; the summary counts them):
#   gpu_session_<tag>.log          everything printed, with each phase's start, limit and time
#   gpu_session_<tag>_summary.json the phases (status, seconds, limit, reason), every harness
#                                  result, the paper-code comparison, the targets
#   harness_<tag>.json / .png      the harness results of the bench, paper and nt phases (one file:
#                                  each phase continues it with --resume) and their plot
#   sass_sm90.json                 the instruction mix of each variant's 32x32 float32 kernel
#                                  (not when the prebuilt wheel ran: read it on the CPU side)
# Optional phases add ncu_<variant>_depth21.tar.gz (one per variant: profile_ncu.sh's report and
# exports) and cuda_<GPU>_<date>.json/.png.
#
# Device time, measured on an H200 (2026-12-04, two variants, no stacks on cuda yet, 418 s in
# all): install 84 s (the build; the prebuilt wheel took 2 s on the CPU side), tests crashed
# after 3 s (fixed since), sanitizer 10 s, sass 58 s, bench 122 s (two harness processes, about
# 25 s of each outside its timed calls), paper 12 s, nt 127 s.  With five variants and the
# Myrtle benches the default phases do not all fit the 540 s deadline: the limits of bench,
# tests, sanitizer and nt (190 + 120 + 90 + 100 = 500 s, with install's ~10 s from the prebuilt
# wheel within the 515 s before the summary's reserve) share it, a phase's work is ordered so
# that a limit cuts what is least needed (the last variants' benches; neural-tangents'
# Myrtle-5 and CNN depths 6, 11 and 3), and stack_blocks, paper (timed on the H200 already) and
# sass (skipped anyway with the prebuilt wheel) come after them.
set -uo pipefail

REPO=$(pwd)
PY=python3
PHASES=install,bench,tests,sanitizer,nt,stack_blocks,paper,sass,summary
DEADLINE=""
WHEELS=""
PREBUILT=""
PAPER=""
NT_PY=""
KERNELS=v3,v8,v6,v7,v5
TAG=""
STATE=""
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --phases) PHASES=$2; shift 2 ;;
    --deadline) DEADLINE=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --prebuilt) PREBUILT=$2; shift 2 ;;
    --paper-code) PAPER=$2; shift 2 ;;
    --nt-python) NT_PY=$2; shift 2 ;;
    --kernels) KERNELS=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --state) STATE=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --cpu-dry-run) DRY=1; shift ;;
    *) echo "gpu_session.sh: unknown option $1 (the header of tools/gpu/gpu_session.sh lists them)"; exit 2 ;;
  esac
done
for p in ${PHASES//,/ }; do
  case "$p" in
    install|tests|sanitizer|sass|bench|stack_blocks|paper|nt|summary|ncu|bench_cuda) ;;
    *) echo "gpu_session.sh: unknown phase $p in --phases (install,bench,tests,sanitizer,nt,stack_blocks,paper,sass,summary,ncu,bench_cuda)"; exit 2 ;;
  esac
done
case "$DEADLINE" in
  "") DEADLINE=$([ "$DRY" = 1 ] && echo 1200 || echo 540) ;;
  *[!0-9]*) echo "gpu_session.sh: --deadline $DEADLINE is not a number of seconds"; exit 2 ;;
esac
[ -z "$TAG" ] && TAG=$([ "$DRY" = 1 ] && echo cpu_dry_run || echo gpu)
[ -z "$WHEELS" ] && [ -d "$REPO/.whl" ] && [ "$DRY" = 0 ] && WHEELS="$REPO/.whl"
[ -z "$PAPER" ] && [ -f "$REPO/.paper/CNTK.py" ] && PAPER="$REPO/.paper/CNTK.py"
[ -z "$PREBUILT" ] && [ -d "$REPO/.prebuilt" ] && PREBUILT="$REPO/.prebuilt"
[ -z "$NT_PY" ] && NT_PY=$PY
[ -z "$STATE" ] && STATE=$([ "$DRY" = 1 ] && echo none || echo "$REPO/.gpu_state")
[ "$STATE" = none ] && STATE=""
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/cntk_session.XXXXXX)
LOG="$OUT/gpu_session_${TAG}.log"
HARNESS="$OUT/harness_${TAG}.json"
PHASE_TSV="$WORK/phases.tsv"
: > "$PHASE_TSV"
T0=$(date +%s)
RESERVE=25
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

# Python runs with -P (no current directory on sys.path) and finds bench/ and tools/ through
# symlinks on PYTHONPATH, so `import cntk_engine` is the INSTALLED package (with the compiled
# extension), never the source tree; $WORK/site holds the carried wheels.
mkdir -p "$WORK/pp" "$WORK/site"
ln -s "$REPO/bench" "$WORK/pp/bench"
ln -s "$REPO/tools" "$WORK/pp/tools"
export PYTHONPATH="$WORK/pp:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CNTK_ENGINE_DATA=${CNTK_ENGINE_DATA:-$REPO/.devdata}
export XLA_PYTHON_CLIENT_PREALLOCATE=false      # JAX beside CuPy in one GPU: no 75% grab
export REPO PY OUT WORK HARNESS KERNELS DRY WHEELS PREBUILT PAPER NT_PY TAG

# An earlier call's harness file and phase records, kept in $STATE on this very host by a call
# of this very tree (the package, kernels, bench and scripts: the device's copy may have no .git
# to name a commit): this call continues them (its phases resume the file), and its phase
# records follow theirs.
TREE_ID=$(cd "$REPO" && find cntk_engine csrc bench tools CMakeLists.txt pyproject.toml -type f \
  \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' -o -name '*.sh' \
  -o -name '*.txt' -o -name '*.toml' \) -not -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort \
  | xargs sha256sum | sha256sum | cut -c1-16)
if [ -n "$STATE" ] && [ -f "$STATE/harness_${TAG}.json" ]; then
  if [ "$(cat "$STATE/tree" 2>/dev/null)" != "$TREE_ID" ]; then
    echo "$STATE holds the files of another tree: starting afresh"
  elif [ "$(cat "$STATE/host" 2>/dev/null)" = "$(hostname)" ]; then
    cp "$STATE/harness_${TAG}.json" "$HARNESS"
    awk -F'\t' 'BEGIN {OFS = "\t"} $1 != "summary" {$5 = "earlier call" ($5 == "" ? "" : ": " $5); print}' \
      "$STATE/phases_${TAG}.tsv" >> "$PHASE_TSV" 2>/dev/null
    echo "continuing the harness file and phase records of an earlier call on this host ($STATE)"
  else
    echo "$STATE holds another host's files ($(cat "$STATE/host" 2>/dev/null)): starting afresh"
  fi
fi
keep_state() {   # after every phase: the harness file and phase records, for a later call
  [ -n "$STATE" ] || return 0
  mkdir -p "$STATE" && hostname > "$STATE/host" && echo "$TREE_ID" > "$STATE/tree"
  if [ -f "$HARNESS" ]; then cp "$HARNESS" "$STATE/.harness.tmp" && mv "$STATE/.harness.tmp" "$STATE/harness_${TAG}.json"; fi
  cp "$PHASE_TSV" "$STATE/.phases.tmp" && mv "$STATE/.phases.tmp" "$STATE/phases_${TAG}.tsv"
}

has() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
step() { echo; echo "=== $(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s $*"; }
skip() { echo "SKIP: $*"; echo "$*" > "$WORK/skip_reason"; exit 99; }
# A step's limit inside a phase: its own OWN seconds, cut so that the step (and its 5 s of
# --kill-after) ends 10 s before the phase's end.  GNU timeout puts itself in a process group of
# its own, so the phase's timeout never reaches a step under an inner timeout: a step left
# running would outlive its phase (a bench process timing under the next phase's load).  Prints
# nothing and fails when fewer than MIN seconds are left.
inner_limit() {   # OWN MIN
  local left=$(( PHASE_END - $(date +%s) - 15 ))
  [ "$left" -ge "$2" ] || return 1
  echo $(( left < $1 ? left : $1 ))
}
record() {   # one line per phase; a reason's tabs and newlines would break the fields
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(printf '%s' "$5" | tr '\t\n' '  ')" >> "$PHASE_TSV"
}

# harness options every phase shares (--resume continues one file; it refuses other settings);
# SASS counts made once (the prebuilt wheel's, or the install phase's of the extension it built:
# bound to the binary) spare each bench process the disassembly of its kernels
harness() {
  local mixes=()
  if [ -f "$WORK/prebuilt_installed" ] && [ -f "$PREBUILT/sass_mixes.json" ]; then
    mixes=(--sass-mixes "$PREBUILT/sass_mixes.json")
  elif [ -f "$WORK/sass_mixes.json" ]; then
    mixes=(--sass-mixes "$WORK/sass_mixes.json")
  fi
  "$PY" -P -m bench --output "$HARNESS" --resume --repeats "$REPEATS" --warmup 1 --seed 0 --no-plots "${mixes[@]}" "$@"
}
if [ "$DRY" = 1 ]; then
  REPEATS=1
else
  REPEATS=3
fi
export REPEATS
# numba's kernel, both dtypes, into its on-disk cache (the tests phase's xdist workers load it)
NUMBA_WARMUP="
import numpy as np, cntk_engine as ce
for d in ('float32', 'float64'):
    ce.gram(np.random.default_rng(0).standard_normal((2, 1, 4, 4)), depth=2, backend='numba', dtype=d)"
export NUMBA_WARMUP
export -f harness skip inner_limit

# ------------------------------------------------------------------------------ the phases
# Each runs as `bash -c phase_<name>` under timeout; `skip REASON` ends one as skipped.
phase_install() {
  if [ -n "$WHEELS" ]; then
    echo "wheels from $WHEELS into $WORK/site:"; ls "$WHEELS"
    # the nt phase needs neural-tangents, the tests phase zarr (the solve's GPU test): a failure
    # here is said, and the package install goes on (those phases say what is missing)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "$WHEELS"/*.whl || echo "WARNING: the wheels of $WHEELS did not install: the nt and tests phases will say what is missing"
  else
    echo "no wheels folder (--wheels / .whl): neural-tangents and zarr must already be importable for the nt and tests phases"
  fi
  if [ "$DRY" = 1 ]; then
    if [ -n "$PREBUILT" ]; then
      "$PY" -P tools/gpu/prebuilt.py check "$PREBUILT" --repo "$REPO" && echo "the prebuilt wheel matches this tree"
    fi
    skip "package build: --cpu-dry-run uses the package installed in $PY (the GPU run installs the prebuilt wheel or builds with pip install --no-build-isolation --no-deps .)"
  fi
  # the wheel built on the CPU side saves the build's device time; any mismatch or failure to
  # run here (another image's system libraries) falls back to the build
  if [ -n "$PREBUILT" ]; then
    "$PY" -P tools/gpu/prebuilt.py install "$PREBUILT" --repo "$REPO"
    case $? in
      0) echo "the prebuilt wheel, no build" > "$WORK/phase_note"; touch "$WORK/prebuilt_installed"; return 0 ;;
      # installed and loads, a check after failed: kept (a build would compile the same code),
      # and said in the phase's record
      3) echo "the prebuilt wheel, no build; its smoke check failed on this machine (the log says which)" \
           > "$WORK/phase_note"; touch "$WORK/prebuilt_installed"; return 0 ;;
    esac
    echo "the prebuilt wheel is not used (above); building from source"
    echo "built from source: the prebuilt wheel was not used (the log says why)" > "$WORK/phase_note"
  fi
  # -lineinfo: source lines in an ncu profile; the generated code does not change (the same
  # arguments as tools/gpu/prebuilt.py's CMAKE_ARGS, so either install runs the same kernels)
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} \
    CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_FLAGS=-lineinfo}" \
    "$PY" -m pip install --no-build-isolation --no-deps . 2>&1 | grep --line-buffered -v "spilled\|stack frame\|^\s*$"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || return "$rc"
  # the built extension's SASS counts once, for every bench process (harness, above)
  "$PY" -P -c "
import json, sys
from tools import sass_mix
json.dump(sass_mix.count_mixes(sass_mix.find_extension()), open(sys.argv[1], 'w'))
print('SASS counts of the built extension in', sys.argv[1])" "$WORK/sass_mixes.json" \
    || { rm -f "$WORK/sass_mixes.json"; echo "no SASS counts here: each bench process counts its own"; }
  return 0
}

phase_tests() {
  # the GPU tests beyond tests/test_cuda.py's: the solver on the GPU (CuPy, cuSOLVER), from
  # Python and from `cntk-engine solve --device cuda` (zarr from .whl)
  local elsewhere=(tests/test_solver.py::test_cupy_matches_numpy
                   tests/test_solver.py::test_gpu_solve_workspace_holds)
  local rc=0
  # without zarr the solve's GPU test would skip with its module, and a test ID named in a
  # module that skips whole makes pytest collect nothing of the whole run: it is left out
  if "$PY" -P -c "import zarr" 2>/dev/null; then
    elsewhere+=(tests/test_cli_solve.py::test_device_cuda_gives_the_cpus_figures)
  else
    echo "zarr cannot be imported (.whl from tools/gpu/prepare_carry.py carries it): the solve's GPU test is left out$([ "$DRY" = 1 ] || echo " and the phase fails"); the others run"
    [ "$DRY" = 1 ] || rc=1
  fi
  if [ "$DRY" = 1 ]; then
    # the GPU tests skip here with their reason; this runs their collection and skip logic (a
    # test named above that no longer exists fails the phase here, not on the GPU)
    "$PY" -P -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_cuda.py "${elsewhere[@]}" 2>&1 | tail -8
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  else
    # every variant: tests/test_cuda.py parametrises its GPU tests over the compiled variants.
    # With pytest-xdist each test runs in a worker process, so a test that crashes its process
    # (a segfault ends a plain pytest run with no report) is named, and the others still run.
    # The whole output goes to the log: a tail loses the name of the test that crashed.  -v
    # writes each test's outcome as it ends, so a phase stopped at its limit still says which
    # tests passed (-q writes dots, and the failures only at the end); --durations says where
    # the phase's time went (most of it is the CPU side's reference and numba Grams, and numba's
    # first compilation on a fresh machine); pytest-timeout, where installed, ends a hung test
    # instead of the phase.
    # tests/test_sass.py reads the installed binary's SASS: when that is the prebuilt wheel's,
    # its tests ran where the wheel was built, and here they would only spend device time.
    xdist=() ptimeout=() sass=(tests/test_sass.py)
    # 8 workers of 2 numba threads each on the 16 cores (numba's default, a thread per core in
    # every worker, would run 128 threads on them)
    if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 8); export NUMBA_NUM_THREADS=2; fi
    # pytest-timeout's thread method: its default (SIGALRM) cannot stop a test hung inside a CUDA
    # call (the Python handler waits for the call to return); the thread method dumps the stacks
    # and ends the worker, which xdist names and replaces
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then ptimeout=(--timeout 60 -o timeout_method=thread); fi
    if [ -f "$WORK/prebuilt_installed" ]; then
      sass=(); echo "tests/test_sass.py not run: the extension is the prebuilt wheel's (its SASS reads the same on the CPU side)"
    fi
    # numba's kernel (the CPU side of the tests) in its on-disk cache first, both dtypes: the
    # xdist workers then load it.  It compiles in the background from the end of the install on
    # (while the bench runs on the GPU; a minute of one core here, as the cache is always cold):
    # wait for it, or compile it now where it was not started
    local t=$SECONDS wait_s
    if [ -f "$WORK/numba_warmup.log" ]; then
      # at most until 30 s before the phase's end: the workers would then wait for the compile
      # themselves (the package's compile lock), and the phase still names what ran
      wait_s=$(( PHASE_END - $(date +%s) - 30 ))
      while [ ! -f "$WORK/numba_warmup.rc" ] && [ $(( SECONDS - t )) -lt "$wait_s" ]; do sleep 1; done
      cat "$WORK/numba_warmup.log"
      if [ -f "$WORK/numba_warmup.rc" ]; then
        echo "numba's kernel compiled in the background (exit status $(cat "$WORK/numba_warmup.rc")); waited $(( SECONDS - t ))s for it"
      else
        echo "numba's kernel still compiling in the background after $(( SECONDS - t ))s: the tests start, their workers wait for it"
      fi
    else
      "$PY" -P -c "$NUMBA_WARMUP"
      echo "numba's kernel in its cache after $(( SECONDS - t ))s"
    fi
    # (-p no:zarr: zarr's pytest plugin, which the tests do not use, imports CuPy and counts the
    # GPUs in every pytest process, each xdist worker too.)
    # A CUDA error is sticky: it fails every later test of its worker, which is not restarted.
    # So the stack kernel's tests (Myrtle, pooled stacks: the kernel that has not run on a GPU)
    # run in a pytest of their own, first: the CNN kernels' tests of v3 and v5 passed on the
    # H200 (2026-12-04) and follow in a second one.
    # without the data sets the real-image tests (CIFAR-10, MNIST's zero windows) would skip:
    # the phase would pass without them
    local f
    for f in cifar10_jpeg_small.npz mnist_test.npz; do
      if [ ! -f "$CNTK_ENGINE_DATA/$f" ]; then
        echo "$CNTK_ENGINE_DATA/$f is missing (.devdata from tools/gpu/prepare_carry.py carries it): its tests skip, the phase fails, the others still run"
        rc=1
      fi
    done
    echo "--- the stack kernel's tests"
    "$PY" -P -X faulthandler -m pytest -v -rfEs --durations 10 -p no:cacheprovider -p no:zarr "${xdist[@]}" \
      "${ptimeout[@]}" tests/test_cuda.py "${sass[@]}" -k "stack or myrtle" 2>&1 || rc=1
    echo "--- the CNN kernels' tests"
    # -rP: the output of the tests that passed, where they print a measurement (the solver's
    # GPU workspace, test_gpu_solve_workspace_holds); xdist relays it, not a plain print
    "$PY" -P -X faulthandler -m pytest -v -rfEsP --durations 20 -p no:cacheprovider -p no:zarr "${xdist[@]}" \
      "${ptimeout[@]}" tests/test_cuda.py "${sass[@]}" "${elsewhere[@]}" \
      -k "not (stack or myrtle)" 2>&1 || rc=1
  fi
  return $rc
}

phase_sanitizer() {
  command -v compute-sanitizer >/dev/null || skip "compute-sanitizer is not on the PATH"
  local why
  why=$("$PY" -P -c "import cntk_engine as ce; print(ce.available_backends()['cuda'] or '')") || return 1
  [ -n "$why" ] && skip "the cuda backend cannot run here: $why"
  # tools/gpu/sanitizer_runs.py: small Grams of every variant's CNN and stack kernels (its
  # docstring lists them; their diagonals computed on the host, so that the sanitizer's time goes
  # to our kernels, not to CuPy's), with CuPy's memory pool off so that memcheck sees each
  # array's bounds: memcheck over the stack kernel first (it has not run on a GPU), in a call of
  # its own (an error there cannot stop the CNN runs), then over the CNN kernels; then the
  # --small runs under racecheck and synccheck (shared-memory hazards and barriers, which the
  # host emulation cannot see) for the first variant and v7 (the one with a barrier per layer),
  # and initcheck over the first variant's stack kernel (its global scratch, zeroed by the kernel
  # itself: a read of what was never written).  Each run under a limit of its own within the
  # phase's; the output goes to the log unfiltered (a tail would print nothing for a run stopped
  # at its limit), the reports bounded by --print-limit.
  local rc=0 tool own lim r small run args
  small=${KERNELS%%,*}
  case ",$KERNELS," in *",v7,"*) [ "$small" = v7 ] || small="$small,v7" ;; esac
  for run in "memcheck|--kernels $KERNELS --part stack|25" "memcheck|--kernels $KERNELS --part cnn|25" \
             "racecheck|--kernels $small --small|10" "synccheck|--kernels $small --small|8" \
             "initcheck|--kernels ${KERNELS%%,*} --small --part stack|8"; do
    IFS='|' read -r tool args own <<< "$run"
    if ! lim=$(inner_limit "$own" 6); then      # a note, not a failure: nothing was found
      echo "--- $tool $args: not run, too little of the phase is left"
      echo "$tool $args: not run, too little of the phase was left" >> "$WORK/phase_note"; continue
    fi
    echo "--- $tool $args (limit ${lim}s)"
    (cd /tmp && timeout --kill-after=3 "$lim" compute-sanitizer --tool "$tool" --print-limit 20 --error-exitcode 3 \
      "$PY" -P "$REPO/tools/gpu/sanitizer_runs.py" $args)
    r=$?
    case "$r" in
      0) echo "--- $tool $args: no errors" ;;
      3) echo "--- $tool $args: reported errors (above)"; rc=1 ;;
      124|137) echo "--- $tool $args: stopped at its limit of ${lim}s (no error reported before)"
               echo "$tool $args: stopped at its limit of ${lim}s, no error reported before" \
                 >> "$WORK/phase_note" ;;
      *) echo "--- $tool $args: exit status $r"; rc=1 ;;
    esac
  done
  return $rc
}

phase_sass() {
  "$PY" -P -c "import cntk_engine._cuda" 2>/dev/null || skip "the CUDA extension cntk_engine._cuda is not installed"
  # the binary that ran was built on the CPU side, where its SASS reads the same with no device time
  [ -f "$WORK/prebuilt_installed" ] && skip "the extension that ran is the prebuilt wheel's: read its SASS \
on the CPU side (unzip its cntk_engine/_cuda*.so; python tools/sass_mix.py --so SO --kernel $KERNELS)"
  # one process for every variant (only the counted kernels are disassembled: about a second
  # each); one file for all variants in $OUT (the device tool brings back 8 files)
  mkdir -p "$WORK/sass"
  "$PY" -P tools/sass_mix.py --kernel "$KERNELS" --name "{kernel}_sm90" --out-dir "$WORK/sass" 2>&1 \
    | grep -v '^  *"by_opcode\|^   *"[A-Z0-9]*": [0-9.]*,\?$' | tail -90
  local rc=${PIPESTATUS[0]}
  "$PY" -c "
import json, pathlib, sys
mixes = [json.loads(f.read_text()) for f in sorted(pathlib.Path(sys.argv[1]).glob('sass_*.json'))]
if not mixes:      # no empty file in \$OUT: the device tool brings back 8
    sys.exit('sass_mix.py counted no variant')
json.dump({m['variant']: m for m in mixes}, open(sys.argv[2], 'w'), indent=1)
print('wrote', sys.argv[2], 'with', ', '.join(m['variant'] for m in mixes))" "$WORK/sass" "$OUT/sass_sm90.json" || rc=1
  return "$rc"
}

phase_bench() {
  # The default variant (the first of --kernels) first, in processes of its own: its CNN kernel
  # at depths 3/6/11/21 beside the per-layer baseline, then its pooled-stack kernel (Myrtle-5/10),
  # the figures of the issue's targets.  Then the candidates (the other variants) in ONE process
  # for their CNN kernels, at depths 11 and 21 only (the target's depth and one below), and one
  # for the stack kernels of their own (v7 and v8 run v6's and v3's: the extension's `base`).
  # A process per variant spends about 25 s outside its timed calls, so five variants' would not
  # fit the phase and the candidates last in --kernels would not start.  The price: a candidate
  # that breaks the CUDA context (an illegal address is sticky) or hangs costs the candidates
  # after it in that process, never the default's figures.  Each process runs under its own
  # limit; one that cannot start for the time left is a note, not a failure.
  # float64 is each group's check reference (run first, at a smaller N: it is ~10x slower), so
  # every float32 result is checked against float64.  Myrtle's float32 runs at N = 128 (8,256
  # pairs: 62 per block of the persistent grid on a 132-SM H200 at one block per SM) until its
  # speed is known.  Each process's start and seconds are logged.
  local v own rc=0 lim_cnn=100 lim_stack=80 first=${KERNELS%%,*} rest="" rest_own=""
  [ "$DRY" = 1 ] && { lim_cnn=300; lim_stack=300; }
  own=$("$PY" -P -c "from bench.common import own_stack_kernel_variants as o; print(','.join(o()))" \
    2>/dev/null) || own=$KERNELS
  case "$KERNELS" in *,*) rest=${KERNELS#*,} ;; esac
  for v in ${rest//,/ }; do
    case ",$own," in *",$v,"*) rest_own="$rest_own${rest_own:+,}$v" ;; esac
  done
  process() {   # LIMIT WHAT HARNESS-ARGS...
    local lim what=$2 t=$SECONDS r
    if ! lim=$(inner_limit "$1" 20); then
      echo "--- bench process: $what not started: too little of the phase is left"
      echo "${what} not started: too little of the phase was left" >> "$WORK/phase_note"
      return 0
    fi
    shift 2
    echo "--- bench process: $what (limit ${lim}s), at +${SECONDS}s of the phase"
    timeout --kill-after=5 "$lim" bash -c 'harness "$@"' _ "$@"
    r=$?
    case "$r" in 124|137) echo "--- bench process: $what stopped at its limit of ${lim}s" ;; esac
    echo "--- bench process: $what took $(( SECONDS - t ))s (exit status $r)"
    return "$r"
  }
  if [ "$DRY" = 1 ]; then
    process "$lim_cnn" "$first cnn" --methods "cuda,numba,per_layer_cpu" --kernels "$first" \
      --architectures cnn --depths 3 --sizes 32 --dtypes float64,float32 --n 3 \
      --n-for per_layer_cpu=2 --no-ceiling || rc=1
  else
    process "$lim_cnn" "$first cnn" --methods "cuda,per_layer_cuda" --kernels "$first" \
      --architectures cnn --depths 3,6,11,21 --sizes 32 --dtypes float64,float32 --n 256 \
      --n-for "cuda:float64=64,per_layer_cuda=16" || rc=1
  fi
  case ",$own," in
    *",$first,"*)
      if [ "$DRY" = 1 ]; then
        process "$lim_stack" "$first myrtle" --methods "cuda,numba,per_layer_cpu" --kernels "$first" \
          --architectures myrtle5,myrtle10 --depths 3 --sizes 32 --dtypes float64,float32 --n 3 \
          --n-for per_layer_cpu=2 --no-ceiling || rc=1
      else
        process "$lim_stack" "$first myrtle" --methods "cuda,per_layer_cuda" --kernels "$first" \
          --architectures myrtle5,myrtle10 --depths 3,6,11,21 --sizes 32 --dtypes float64,float32 \
          --n 128 --n-for cuda:float64=32,per_layer_cuda=16 || rc=1
      fi ;;
    *) echo "$first: no stack kernel of its own (it runs its base variant's)" ;;
  esac
  if [ -n "$rest" ]; then
    if [ "$DRY" = 1 ]; then
      process "$lim_cnn" "$rest cnn" --methods cuda --kernels "$rest" --architectures cnn \
        --depths 3 --sizes 32 --dtypes float64,float32 --n 3 --no-ceiling || rc=1
    else
      process "$lim_cnn" "$rest cnn" --methods cuda --kernels "$rest" --architectures cnn \
        --depths 11,21 --sizes 32 --dtypes float64,float32 --n 256 --n-for cuda:float64=16 || rc=1
    fi
  fi
  if [ -n "$rest_own" ]; then
    if [ "$DRY" = 1 ]; then
      process "$lim_stack" "$rest_own myrtle" --methods cuda --kernels "$rest_own" \
        --architectures myrtle5,myrtle10 --depths 3 --sizes 32 --dtypes float64,float32 --n 3 \
        --no-ceiling || rc=1
    else
      process "$lim_stack" "$rest_own myrtle" --methods cuda --kernels "$rest_own" \
        --architectures myrtle5,myrtle10 --depths 3 --sizes 32 --dtypes float64,float32 --n 128 \
        --n-for cuda:float64=16 || rc=1
    fi
  fi
  return $rc
}

phase_paper() {
  local extra=()
  [ -n "$PAPER" ] && extra+=(--paper-code "$PAPER")
  if [ "$DRY" = 1 ]; then
    harness --methods paper_code "${extra[@]}" --paper-emulate --depths 3 --sizes 32 --pooling gap,flatten \
      --fix no,yes --n 2 --no-ceiling
  else
    harness --methods paper_code "${extra[@]}" --depths 3,6,11,21 --sizes 32 --pooling gap,flatten \
      --fix no,yes --n 16 --no-ceiling
  fi
}

phase_nt() {
  if [ "$DRY" = 1 ]; then
    harness --methods neural_tangents --nt-python "$NT_PY" --architectures myrtle5,cnn --depths 3 --sizes 32 \
      --n 2 --no-ceiling
  else
    # the targets first (Myrtle-10, depth 21): a phase stopped at its limit keeps them
    harness --methods neural_tangents --nt-python "$NT_PY" --architectures myrtle10,cnn,myrtle5 \
      --depths 21,3,11,6 --sizes 32 --n 16 --no-ceiling
  fi
}

phase_ncu() {
  command -v ncu >/dev/null || skip "ncu (Nsight Compute) is not on the PATH"
  local v rc=0
  for v in ${KERNELS//,/ }; do
    CNTK_ENGINE_CUDA_KERNEL=$v bash tools/gpu/profile_ncu.sh --python "$PY" --tag "${v}_depth21" --depth 21 --n 16 || rc=1
    # one file per profile (its report and three exports): the device tool brings back 8 files
    (cd "$OUT" && ls ncu_"${v}"_depth21* >/dev/null 2>&1 \
      && tar -czf "$WORK/ncu_${v}_depth21.tar.gz" ncu_"${v}"_depth21* && rm -f ncu_"${v}"_depth21* \
      && mv "$WORK/ncu_${v}_depth21.tar.gz" .) || rc=1
  done
  return $rc
}

phase_stack_blocks() {   # the stack kernel's two register budgets, Myrtle-5/10 float32
  if [ "$DRY" = 1 ]; then
    "$PY" -P -c "import cntk_engine._cuda" 2>/dev/null || skip "the CUDA extension (it names the kernel variants) is not installed"
    "$PY" -P bench/bench_stack_blocks.py --out "$OUT" --n 2 --architectures myrtle5 --repeats 1 --cpu-dry-run
    return
  fi
  local why
  why=$("$PY" -P -c "import cntk_engine as ce; print(ce.available_backends()['cuda'] or '')") || return 1
  [ -n "$why" ] && skip "the cuda backend cannot run here: $why"
  "$PY" -P bench/bench_stack_blocks.py --out "$OUT" --n 128
}

phase_bench_cuda() {
  "$PY" -P bench/bench_cuda.py --out "$OUT" --n 256 --n64 64
}

export -f phase_install phase_tests phase_sanitizer phase_sass phase_bench phase_paper phase_nt phase_ncu \
  phase_bench_cuda phase_stack_blocks

run_phase() {   # NAME MIN_SECONDS MAX_SECONDS
  local name=$1 min=$2 max=$3 left limit t rc status reason
  if ! has "$name"; then
    # an earlier call's record of it stands (a phase skipped here is no news)
    grep -q "^${name}	" "$PHASE_TSV" || record "$name" skipped 0 "" "not in --phases"
    return
  fi
  left=$(( DEADLINE - ($(date +%s) - T0) - RESERVE ))
  if [ "$left" -lt "$min" ]; then
    step "$name: skipped, ${left}s left before the deadline (it needs ${min}s)"
    record "$name" skipped 0 "" "${left}s left before the --deadline ${DEADLINE}s (needs >= ${min}s)"
    return
  fi
  limit=$(( left < max ? left : max ))
  # run again here: its record replaces the earlier call's
  grep -v "^${name}	[^	]*	[^	]*	[^	]*	earlier call" "$PHASE_TSV" > "$WORK/phases.kept"
  mv "$WORK/phases.kept" "$PHASE_TSV"
  step "$name (limit ${limit}s)"
  rm -f "$WORK/skip_reason" "$WORK/phase_note"
  t=$(date +%s)
  # the phase's end, for the steps inside it that run under limits of their own (inner_limit)
  export PHASE_END=$(( t + limit ))
  timeout --kill-after=10 "$limit" bash -c "phase_$name"
  rc=$?
  t=$(( $(date +%s) - t ))
  reason=""
  case "$rc" in
    0) status=ok; reason=$(cat "$WORK/phase_note" 2>/dev/null) ;;
    99) status=skipped; reason=$(cat "$WORK/skip_reason" 2>/dev/null) ;;
    124|137) status=timed_out; reason="stopped at its limit of ${limit}s" ;;
    *) status=failed; reason="exit status $rc" ;;
  esac
  # a phase that skipped part of itself (the install's build in a dry run) but did the rest
  if [ "$rc" = 99 ] && [ "$name" = install ] && [ -n "$WHEELS" ]; then status=ok; reason="wheels installed; $reason"; fi
  echo "--- $name: $status after ${t}s${reason:+ ($reason)}"
  record "$name" "$status" "$t" "$limit" "$reason"
  keep_state
  # the summary so far in $OUT (0.2 s): a call the device tool stops before its summary step
  # (its budget less than the deadline allows for) still brings the phases' records back
  if has summary; then
    timeout 15 "$PY" -P -m bench.session_summary "$HARNESS" --phases "$PHASE_TSV" \
      --out "$OUT/gpu_session_${TAG}_summary.json" > /dev/null 2>&1 || true
  fi
}

step "gpu_session.sh tag=$TAG phases=$PHASES deadline=${DEADLINE}s dry_run=$DRY kernels=$KERNELS state=${STATE:-none} host=$(hostname) commit=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo 'unknown (archive)')"
timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"
"$PY" --version
echo "paper code: ${PAPER:-none}; wheels: ${WHEELS:-none}; prebuilt: ${PREBUILT:-none}; neural-tangents python: $NT_PY; data: $CNTK_ENGINE_DATA"

run_phase install 60 300
step "what will run"
timeout 60 "$PY" -P -c "
import cntk_engine as ce
print('cntk_engine from', ce.__file__)
print('backends', ce.available_backends())
from cntk_engine.backends.cuda import describe_kernel_variants
print(describe_kernel_variants())" || echo "cntk_engine does not import"
# numba's kernel into its on-disk cache while the bench runs (the tests phase waits for it):
# both dtypes one after the other in one process
WARMUP_PID=""
if [ "$DRY" != 1 ] && has tests; then
  # (its own output to a file, not to the log's pipe, which it would hold open; stopped before
  # $WORK goes, at the end)
  ( timeout 300 "$PY" -P -c "$NUMBA_WARMUP" > "$WORK/numba_warmup.log" 2>&1
    echo $? > "$WORK/numba_warmup.rc" ) > /dev/null 2>&1 &
  WARMUP_PID=$!
  echo "numba's kernel compiling into its cache in the background, for the tests phase"
fi
run_phase bench 30 190
run_phase tests 30 120
run_phase sanitizer 20 90
run_phase nt 30 100
# after the comparisons the issue's targets need: a tuning question (one or two blocks per SM),
# then the paper's code (timed beside v3 and v5 on the H200 already)
run_phase stack_blocks 20 60
run_phase paper 20 60
run_phase sass 10 30
run_phase ncu 30 120
run_phase bench_cuda 30 120

if has summary; then
  step "summary"
  t=$(date +%s)
  if [ -f "$HARNESS" ]; then
    timeout 15 "$PY" -P -m bench.plots "$HARNESS" || echo "plotting $HARNESS failed"
  fi
  timeout 15 "$PY" -P -m bench.session_summary "$HARNESS" --phases "$PHASE_TSV"
  rc=$?
  record summary "$([ $rc = 0 ] && echo ok || echo failed)" "$(( $(date +%s) - t ))" 15 \
    "$([ $rc = 0 ] || echo "exit status $rc")"
  # the JSON, with the summary's own phase record in it (each step at most 15 s: with the last
  # phase's 10 s of --kill-after the call ends by DEADLINE - RESERVE + 55 s, 570 s by default)
  timeout 15 "$PY" -P -m bench.session_summary "$HARNESS" --phases "$PHASE_TSV" \
    --out "$OUT/gpu_session_${TAG}_summary.json" | tail -1
else
  record summary skipped 0 "" "not in --phases"
fi

step "done after $(( $(date +%s) - T0 ))s; files in $OUT:"
ls -la "$OUT"
nfiles=$(find "$OUT" -type f | wc -l)
[ "$nfiles" -gt 8 ] && echo "WARNING: $nfiles files in $OUT; the device tool brings back at most 8"
FAILED=$(awk -F'\t' '$2 == "failed" || $2 == "timed_out" {printf " %s", $1}' "$PHASE_TSV")
if [ -n "$WARMUP_PID" ] && [ ! -f "$WORK/numba_warmup.rc" ]; then    # still running: the
  # subshell and its timeout (which stops the compile); once it wrote its status, its pid may
  # be another process's
  kill $(pgrep -P "$WARMUP_PID" 2>/dev/null) "$WARMUP_PID" 2>/dev/null || true
fi
rm -rf "$WORK"
if [ -n "$FAILED" ]; then
  echo "FAILED PHASES:$FAILED"; rc=1
else
  echo "ALL PHASES OK OR SKIPPED (skipped phases and their reasons: above and in the summary)"; rc=0
fi
exec >&- 2>&-
wait "$TEE_PID"        # the log complete on disk before the device tool collects $OUT
exit $rc
