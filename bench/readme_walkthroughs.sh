#!/usr/bin/env bash
# The README's timed walkthroughs, run as a user runs them, with their output and timings:
#
#   bash bench/readme_walkthroughs.sh demo   LOG    # `cntk-engine demo`: empty numba cache, then two warm runs
#   bash bench/readme_walkthroughs.sh resume LOG    # "Interrupt and resume": Ctrl-C (SIGINT) midway, --resume
#   bash bench/readme_walkthroughs.sh scale  LOG    # "Readouts, flips and ZCA" at scale: preprocess, two
#                                                   # gram jobs, solve; against evaluate in memory
#
# scale runs the README's commands (Myrtle-5, flips, ZCA) on N_TRAIN / N_TEST (default 200 /
# 100) images of the CIFAR-10 subset at CIFAR (default ../shared/data/cifar10_jpeg_small.npz),
# drawn by `preprocess --n-train --n-test`, then `cntk-engine evaluate` with the same recipe and
# the same --n-train / --n-test (so the same images), whose accuracy and ridge must be the same.
#
# Uses the `cntk-engine` and `python` on PATH (an installed package: the numba kernel is loaded
# from its cache as in any user's process) and NUMBA_NUM_THREADS (default 2).  The resume
# walkthrough times an uninterrupted run first and sends SIGINT at 40 % of that time, so the
# interruption falls midway on any machine; it then checks that the resumed matrix is
# bit-identical to the uninterrupted one, and times tiles of 8 rows against one tile of 40.
# Writes LOG (every command, its output, exit status, wall time and the load average); nothing
# else outside a temporary folder.
set -u
what=${1:?usage: readme_walkthroughs.sh demo|resume LOG}
log=${2:?usage: readme_walkthroughs.sh demo|resume LOG}
case "$what" in demo|resume|scale) ;; *) echo "readme_walkthroughs.sh: demo, resume or scale, not '$what'" >&2; exit 2 ;; esac
cifar=$(realpath -m "${CIFAR:-$(dirname "$0")/../../shared/data/cifar10_jpeg_small.npz}")
if [ "$what" = scale ] && [ ! -f "$cifar" ]; then
  echo "readme_walkthroughs.sh: no CIFAR-10 subset at $cifar (set CIFAR=path.npz)" >&2; exit 2
fi
command -v cntk-engine >/dev/null || { echo "readme_walkthroughs.sh: no cntk-engine on PATH (pip install . first)" >&2; exit 2; }
export NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-2}
log=$(realpath -m "$log")
[ -d "$(dirname "$log")" ] || { echo "readme_walkthroughs.sh: the folder of LOG, $(dirname "$log"), does not exist" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 2
load() { cut -d' ' -f1-3 /proc/loadavg; }
run() {     # run a command line, logging it with its exit status, wall time and load
  local t0 t1 rc
  echo "[$(date -u +%H:%M:%S.%3N)] \$ $*"
  t0=$(date +%s.%N)
  bash -c "$*" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  echo "[$(date -u +%H:%M:%S.%3N)] exit status $rc, wall $(python -c "print(f'{$t1 - $t0:.1f}')") s  (load: $(load))"
  echo
  return $rc
}
{
  echo "# README walkthrough '$what' (cntk_engine), date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(getconf _NPROCESSORS_ONLN) logical cores; NUMBA_NUM_THREADS=$NUMBA_NUM_THREADS"
  echo "# package: $(python -c 'import cntk_engine as ce; print(ce.__file__, ce.__version__)')"
  echo "# load average at start: $(load)"
  echo
  if [ "$what" = demo ]; then
    export NUMBA_CACHE_DIR=$work/numba_cache
    for name in first warm1 warm2; do
      echo "## $name run$([ $name = first ] && echo ': an empty numba cache (the kernel is compiled into it)')"
      run "/usr/bin/time -f 'wall %e s, user %U s, sys %S s' cntk-engine demo --no-progress"
      echo "cache now holds: $(find "$NUMBA_CACHE_DIR" -type f | wc -l) files"
      echo
    done
  elif [ "$what" = scale ]; then
    n_train=${N_TRAIN:-200} n_test=${N_TEST:-100}
    echo "## the README's commands, on $n_train training and $n_test test images of $cifar"
    run "cntk-engine preprocess '$cifar' --zca --n-train $n_train --n-test $n_test --out cifar_zca.npz"
    run "cntk-engine gram cifar_zca.npz:x_train --architecture myrtle5 --flip --out train.zarr --no-progress"
    run "cntk-engine gram cifar_zca.npz:x_test --x2 cifar_zca.npz:x_train --architecture myrtle5 --flip --out test.zarr --no-progress"
    run "cntk-engine solve cifar_zca.npz --train train.zarr --test test.zarr --predictions pred.npy --json solve.json"
    echo "## the same recipe in memory: evaluate draws the same images (the same --n-train, --n-test and --seed)"
    run "cntk-engine evaluate '$cifar' --architecture myrtle5 --flip --zca --n-train $n_train --n-test $n_test --no-progress --json evaluate.json"
    run "python -c \"
import json
s, e = json.load(open('solve.json')), json.load(open('evaluate.json'))['results'][0]
same = all(s[k] == e[k] for k in ('accuracy', 'ridge_relative', 'loo_accuracy'))
print('solve:', {k: s[k] for k in ('accuracy', 'ridge_relative', 'loo_accuracy')})
print('evaluate:', {k: e[k] for k in ('accuracy', 'ridge_relative', 'loo_accuracy')})
print('the same figures' if same else 'DIFFERENT')\""
  else
    run "python -c \"import numpy as np; np.save('imgs.npy', np.random.default_rng(0).random((100, 3, 32, 32), dtype=np.float32))\""
    echo "## 1. uninterrupted run (reference), store full.zarr"
    t0=$(date +%s.%N)
    run "cntk-engine gram imgs.npy --depth 6 --out full.zarr --no-progress"
    t1=$(date +%s.%N)
    stop=$(python -c "print(max(1, round(0.4 * ($t1 - $t0))))")
    echo "## 2. the walkthrough: Ctrl-C (SIGINT) after $stop s (40 % of the uninterrupted run)"
    run "timeout -s INT $stop cntk-engine gram imgs.npy --depth 6 --out demo.zarr --no-progress"
    run "cntk-engine verify demo.zarr"
    echo "## 3. resume"
    run "cntk-engine gram imgs.npy --depth 6 --out demo.zarr --resume --no-progress"
    echo "## 4. compare with the uninterrupted run"
    run "python -c \"
import zarr, numpy as np
a = zarr.open_group('full.zarr', mode='r'); b = zarr.open_group('demo.zarr', mode='r')
for k in ('ntk', 'nngp'):
    if k in a:
        x, y = a[k][:], b[k][:]
        print(k, x.shape, 'bit-identical' if np.array_equal(x, y) else 'DIFFERENT', 'max abs diff', np.abs(x - y).max())
\""
    echo "## 5. tile size: 40 of the images, tiles of 8 rows vs one tile of 40 (same run)"
    run "python -c \"import numpy as np; np.save('imgs40.npy', np.load('imgs.npy')[:40])\""
    for t in 8 40 8 40; do
      run "cntk-engine gram imgs40.npy --depth 6 --out t${t}_\$RANDOM.zarr --tile $t --no-progress"
    done
  fi
  echo "# done $(date -u +%H:%M:%S)"
} > "$log" 2>&1 || { echo "readme_walkthroughs.sh: LOG $log could not be written" >&2; exit 2; }
echo "wrote $log"
