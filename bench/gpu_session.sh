#!/usr/bin/env bash
# One call on a GPU machine: build, sanitizer, GPU tests, CUDA bench.  Output into $OUT.
#   OUT=/tmp/out CNTK_ENGINE_DATA=.devdata bash bench/gpu_session.sh [--no-bench]
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export CNTK_ENGINE_DATA=${CNTK_ENGINE_DATA:-$PWD/.devdata}
export PYTHONUNBUFFERED=1
log="$OUT/gpu_session.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "== build"; t0=$(date +%s)
  CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -20
  echo "build took $(( $(date +%s) - t0 )) s"
  python3 -c "import cntk_engine as ce; print(ce.available_backends())"
  echo "== compute-sanitizer memcheck (small run)"
  cd /tmp && compute-sanitizer --tool memcheck --error-exitcode 3 python3 -c "
import numpy as np, cntk_engine as ce
x = np.random.default_rng(0).standard_normal((3, 2, 9, 7))
k = ce.gram(x, depths=[2, 4], backend='cuda', kernel='both'); k2 = ce.gram(x[:2], x, depth=3, backend='cuda', pooling='flatten', dtype='float64')
print('sanitizer run ok', k[4][0][0, :2], k2[0, :2])" 2>&1 | tail -5; echo "sanitizer rc=$?"; cd - >/dev/null
  echo "== SASS of the 32x32 float32 k=3 kernel (instruction mix)"
  so=$(python3 -P -c "import cntk_engine._cuda as m; print(m.__file__)")
  cuobjdump -sass "$so" > /tmp/k.sass 2>/dev/null && python3 - <<'PY'
import re, collections
s = open("/tmp/k.sass").read()
for f in re.split(r"\n\s+Function : ", s)[1:]:
    name = f.split("\n")[0]
    if "IfLi32ELi1ELb1" not in name:
        continue
    ins = re.findall(r"/\*[0-9a-f]{4}\*/\s+([^;]+);", f)
    ops = collections.Counter((i.split()[1] if i.startswith("@") else i.split()[0]).split(".")[0] for i in ins)
    print(len(ins), "instructions;", ops.most_common(25))
PY
  echo "== GPU tests"
  python3 -P -m pytest -q -x tests/test_cuda.py tests/test_core.py -p no:cacheprovider 2>&1 | tail -15
  if [ "${1:-}" != "--no-bench" ]; then
    echo "== bench"
    python3 bench/bench_cuda.py --out "$OUT" "${@:2}"
  fi
} 2>&1 | tee "$log"
