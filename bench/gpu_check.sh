#!/usr/bin/env bash
# The one-call GPU check: on a fresh, offline H100/H200 machine (Python 3.12, torch 2.11, CUDA 13.0),
# install the carried wheels, build for sm_90a (or install the carried prebuilt wheel of this very checkout:
# tools/gpu_wheels.sh --prebuild), run the GPU tests, the kernel microbenchmark
# (bench/kernels_gpu.py), a compute-sanitizer memcheck of a small generate and the benchmark set, and
# write logs and JSON under $OUT; all within 8 minutes of wall time (every step runs under `timeout`,
# cut to what is left of the budget, and stopped with SIGINT first so pytest still writes its report;
# steps run in order of what only a GPU can tell us, so the peer comparison and then the NVFP4 benchmark
# are the first to be cut: rerun them with GPU_CHECK_STEPS; the results step always runs).
#
#   bash bench/gpu_check.sh             the check (on the GPU machine; OUT defaults to build/gpu-check-out)
#   bash bench/gpu_check.sh --pack      the same, with $OUT kept to at most 7 files at every moment (the
#                                       device tool brings back at most 8, also from a run it killed): logs,
#                                       junit and records in gpu-check.tar.gz, repacked after every step
#   bash bench/gpu_check.sh --dry-run   on any CPU machine: the carried wheel set is complete and installs
#                                       offline into a fresh venv, every step's command exists; prints the plan
#   bash bench/gpu_check.sh --dry-run --strict
#                                       also fails unless the carried prebuilt wheel and SOURCE_COMMIT match
#                                       this checkout (run it right before lending the check a GPU)
#
# The wheels come from tools/gpu_wheels.sh (build/gpu-wheels, or GPU_WHEELS=dir). Environment: PYTHON
# (default python3: on the GPU machine the interpreter that holds torch; the package is installed into
# it, since a venv made from a venv's python3 would not see that venv's torch), GPU_CHECK_BUDGET_S
# (default 470), GPU_CHECK_JOBS (16), GPU_CHECK_ARCH (90a-real), GPU_CHECK_WORK (--pack's folder for
# the logs, default build/gpu-check-work), GPU_CHECK_STEPS (a comma list: run only
# these steps, e.g. bench-nvfp4,results; where the package does not import yet, wheels and build are
# added). docs/gpu-bringup.md says how to run it.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=$(cd "${GPU_WHEELS:-$ROOT/build/gpu-wheels}" 2>/dev/null && pwd || echo "${GPU_WHEELS:-$ROOT/build/gpu-wheels}")
BUDGET=${GPU_CHECK_BUDGET_S:-470}
JOBS=${GPU_CHECK_JOBS:-16}
ARCH=${GPU_CHECK_ARCH:-90a-real}
LIB="$ROOT/bench/gpu_check_lib.py"
MODE=run
PACK=0
STRICT=0
for a in "$@"; do
  case "$a" in
    --dry-run) MODE=dry ;;
    --pack) PACK=1 ;;
    --strict) STRICT=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done

# Where logs and JSON go, and which roofline device the profile's bandwidth is a fraction of (--gpu: the
# H200's name says so, anything else counts as an H100); the dry run shows the plan with both unexpanded.
# WORK holds the logs (the tests' whole outputs in logs/tests/), the step records, the provenance and the
# JUnit files (junit-gpu-<test file>.xml): $OUT itself, or with --pack a folder beside the checkout, packed
# into $OUT after every step.
if [ "$MODE" = dry ]; then OUT='$OUT'; WORK='$WORK'; GPU_KIND='$GPU_KIND'; else
  OUT=${OUT:-$ROOT/build/gpu-check-out}
  if [ "$PACK" = 1 ]; then WORK=${GPU_CHECK_WORK:-$ROOT/build/gpu-check-work}; else WORK=$OUT; fi
  GPU_KIND=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -qi h200 && echo h200 || echo h100)
fi

# The carried wheel set (tools/gpu_wheels.txt): pip specs to install, and the CUTLASS wheel to unpack.
SPECS=$(grep -v '^\s*#' "$ROOT/tools/gpu_wheels.txt" | sed 's/#.*//' | awk 'NF && $2 != "--no-deps" {print $1}' | tr '\n' ' ')
CUTLASS_SPEC=$(grep -v '^\s*#' "$ROOT/tools/gpu_wheels.txt" | awk '$1 ~ /^nvidia-cutlass==/ {print $1}')
CUTLASS_WHEEL="$WHEELS/nvidia_cutlass-${CUTLASS_SPEC#*==}-py3-none-any.whl"
CUTLASS_DIR="$ROOT/build/gpu-check-cutlass"
CUTLASS_INC="$CUTLASS_DIR/cutlass_library/source/include"
CACHE=${DGEMMA_RT_CACHE:-$ROOT/build/gpu-check-cache}   # config-only: the weights are made on the device
BENCH_SHAPE="--random-weights --preset 26b-a4b --device cuda --batch 1 --prompt-len 4096 --new-tokens 512 --steps 16 --fixed-steps --warmup 1 --runs 1 --json --no-progress"
# Options of dgemma-bench the steps use (must exist), and those that may not exist yet (the step then
# fails and says so; the dry run reports them as pending).
BENCH_OPTS="--random-weights --preset --device --batch --prompt-len --new-tokens --steps --fixed-steps --warmup --runs --json --no-progress --quant --peer --profile --gpu"
BENCH_PENDING=""
SMALL_GENERATE="import dgemma_rt, sys; e = dgemma_rt.Engine(sys.argv[1], device='cuda'); o = e.generate([[2, 651, 1234, 77]], max_new_tokens=32, max_denoising_steps=2, seed=0); print(o.sequences.tolist(), o.timings)"

# The build step installs the prebuilt wheel of this very checkout when build/gpu-wheels holds one
# (tools/gpu_wheels.sh --prebuild: same commit, same sources, same ARCH; pip accepts its platform tag; the
# installed package passes verify-install), else it compiles from source, as here. Its log's "[build] path:"
# line says which ran, and the other's reason.
SOURCE_BUILD="PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 CMAKE_BUILD_PARALLEL_LEVEL=$JOBS $PY -m pip install -v --no-build-isolation --no-index --no-cache-dir --find-links $WHEELS -Ccmake.define.CMAKE_CUDA_ARCHITECTURES='$ARCH' -Ccmake.define.DGEMMA_CUTLASS_INCLUDE=$CUTLASS_INC -Ccmake.define.DGEMMA_BUILD_EXAMPLES=OFF -Cbuild-dir=build/gpu-check-build . && $PY $LIB verify-install '$ARCH'"

# Each step: NAME CAP_SECONDS NEEDS COMMAND. NEEDS: a step that must have passed first, or "-".
STEPS=(
  "provenance|30|-|nvidia-smi -q; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version; cmake --version; ninja --version; compute-sanitizer --version; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; $PY -m pip list --format=freeze"
  "wheels|90|-|PIP_CONFIG_FILE=/dev/null $PY -m pip install --no-index --no-cache-dir --find-links $WHEELS $SPECS && $PY $LIB cutlass $CUTLASS_WHEEL $CUTLASS_DIR && $PY -c 'import transformers, nlohmann_json; from transformers.models import diffusion_gemma; print(\"transformers\", transformers.__version__)'"
  "build|300|-|cd $ROOT && if PIP_CONFIG_FILE=/dev/null $PY $LIB prebuilt $WHEELS $ROOT '$ARCH' --install; then :; else echo \"[build] path: source build (for $ARCH, $JOBS jobs)\"; $SOURCE_BUILD; fi"
  "tests|150|build|cd $ROOT && DGEMMA_RT_EXPECT_PREFIX=\$($PY -c 'import sys; print(sys.prefix)') $PY $LIB pytest-files 4 $WORK \$(ls tests/test_cuda_*.py tests/test_backend_ops.py 2>/dev/null)"
  "kernels|90|build|cd / && $PY $ROOT/bench/kernels_gpu.py --out $OUT/results/raw-kernels.json"
  "bench-bf16|150|build|cd / && DGEMMA_RT_CACHE=$CACHE $PY -m dgemma_rt.bench $BENCH_SHAPE --profile --gpu $GPU_KIND > $OUT/results/raw-26b-a4b-bf16.json"
  "memcheck|90|build|cd / && $PY -c 'import dgemma_rt; dgemma_rt.check_device(\"cuda\")' || exit 77; rm -rf /tmp/gpu-check-tiny && $PY -m dgemma_rt.cli make-tiny /tmp/gpu-check-tiny && compute-sanitizer --tool memcheck --error-exitcode 9 $PY -c \"$SMALL_GENERATE\" /tmp/gpu-check-tiny"
  "bench-nvfp4|150|build|cd / && DGEMMA_RT_CACHE=$CACHE $PY -m dgemma_rt.bench $BENCH_SHAPE --quant nvfp4 > $OUT/results/raw-26b-a4b-nvfp4.json"
  "bench-peer|120|build|cd / && DGEMMA_RT_CACHE=$CACHE $PY -m dgemma_rt.bench $BENCH_SHAPE --peer transformers > $OUT/results/raw-26b-a4b-bf16-transformers.json; rc=\$?; rm -rf $CACHE; exit \$rc"
  "results|20|-|$PY $LIB results $OUT $WORK"
)
# The results step runs whatever time is left (its cap only): it gives the benchmark JSONs their
# provenance and names. RESERVE keeps its cap and the summary's free of the other steps' budget.
FINAL_STEP=results

step_field() { echo "$1" | cut -d'|' -f"$2"; }
step_cmd() { echo "$1" | cut -d'|' -f4-; }

# ------------------------------------------------------------------------------------------ dry run
if [ "$MODE" = dry ]; then
  errors=0
  fail() { echo "FAIL: $*"; errors=$((errors + 1)); }
  pass() { echo "ok:   $*"; }
  tmp=$(mktemp -d /tmp/gpu-check-dry.XXXXXX)
  trap 'rm -rf "$tmp"' EXIT
  t0=$(date +%s)

  echo "== the carried wheel set ($WHEELS)"
  for spec in $SPECS $CUTLASS_SPEC; do
    n=$(echo "${spec%%==*}" | tr '-' '_'); v=${spec#*==}
    if ls "$WHEELS/$n-$v-"*.whl >/dev/null 2>&1; then pass "$(basename "$(ls "$WHEELS/$n-$v-"*.whl)")"
    else fail "$spec missing from $WHEELS (run tools/gpu_wheels.sh)"; fi
  done
  [ -f "$WHEELS/SOURCE_COMMIT" ] && pass "stamped for commit $(cat "$WHEELS/SOURCE_COMMIT")" \
    || fail "$WHEELS/SOURCE_COMMIT missing (tools/gpu_wheels.sh writes it: the GPU machine has no .git)"
  if head=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null) && [ -f "$WHEELS/SOURCE_COMMIT" ] \
     && [ "$(cut -d' ' -f1 "$WHEELS/SOURCE_COMMIT")" != "$head" ]; then
    msg="the stamp is not HEAD ($head): the GPU check's provenance would name the wrong commit (rerun tools/gpu_wheels.sh)"
    if [ "$STRICT" = 1 ]; then fail "$msg"; else echo "note: $msg"; fi
  fi
  size=$(du -cb "$WHEELS"/*.whl 2>/dev/null | tail -1 | cut -f1)
  [ "${size:-0}" -lt $((48 * 1024 * 1024)) ] && pass "$((${size:-0} / 1024 / 1024)) MiB to carry" \
    || fail "$((${size:-0} / 1024 / 1024)) MiB: too large to carry with the checkout (64 MiB in all)"

  if [ "$errors" -gt 0 ]; then
    echo "skipped: the offline install and resolution (the wheel set is incomplete)"
  else
  # pip with no config, no PIP_* variables and no index: only the carried folder (and the stubs) count.
  pipenv=(env -i "PATH=$PATH" "HOME=$tmp" PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1)
  echo "== a fresh venv, offline ($("$PY" --version 2>&1) here; the GPU machine has Python 3.12)"
  if "$PY" -m venv "$tmp/venv" >"$tmp/venv.log" 2>&1; then pass "python -m venv"
  else fail "python -m venv: $(tail -1 "$tmp/venv.log")"; fi
  vpy="$tmp/venv/bin/python"
  "$PY" "$LIB" stubs "$ROOT/tools/gpu_machine.txt" "$tmp/stubs" && pass "stub wheels for what the GPU machine has (tools/gpu_machine.txt)"
  target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
          --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
  if "${pipenv[@]}" "$vpy" -m pip install -q --dry-run --ignore-installed --target "$tmp/t312" "${target[@]}" \
       --find-links "$WHEELS" --find-links "$tmp/stubs" --report "$tmp/report.json" $SPECS >"$tmp/resolve.log" 2>&1 \
     && "${pipenv[@]}" "$vpy" -m pip install -q --dry-run --ignore-installed --target "$tmp/t312c" "${target[@]}" \
       --no-deps --find-links "$WHEELS" "$CUTLASS_SPEC" >>"$tmp/resolve.log" 2>&1; then
    pass "pip resolves $SPECS$CUTLASS_SPEC for cp312 manylinux x86_64 from the carried wheels and the machine's packages:"
    "$PY" "$LIB" check-report "$tmp/report.json" "$WHEELS" || fail "resolution report"
  else
    fail "pip cannot resolve the set for Python 3.12 offline:"; sed 's/^/      /' "$tmp/resolve.log" | tail -15
  fi
  if "${pipenv[@]}" "$vpy" -m pip install -q --find-links "$WHEELS" --find-links "$tmp/stubs" $SPECS >"$tmp/install.log" 2>&1; then
    pass "installed into the fresh venv offline: $SPECS"
    site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # what CMakeLists.txt runs to find the headers
    "$vpy" -c "import os, nlohmann_json; assert os.path.isfile(os.path.join(os.path.dirname(nlohmann_json.__file__), 'include', 'nlohmann', 'json.hpp'))" \
      && pass "import nlohmann_json finds nlohmann/json.hpp (as CMakeLists.txt asks)" || fail "import nlohmann_json, as CMakeLists.txt does"
    [ -f "$site/transformers/models/diffusion_gemma/modeling_diffusion_gemma.py" ] && pass "transformers models/diffusion_gemma" \
      || fail "the carried transformers has no models/diffusion_gemma"
  else
    fail "offline install into the fresh venv:"; sed 's/^/      /' "$tmp/install.log" | tail -15
  fi
  if [ -f "$CUTLASS_WHEEL" ] && inc=$("$PY" "$LIB" cutlass "$CUTLASS_WHEEL" "$tmp/cutlass"); then
    pass "CUTLASS headers unpack ($(find "$inc" -type f | wc -l) files: cutlass/cutlass.h, cute/tensor.hpp)"
  else fail "CUTLASS headers from $CUTLASS_WHEEL"; fi
  fi

  echo "== the prebuilt dgemma_rt wheel ($WHEELS, tools/gpu_wheels.sh --prebuild)"
  pre=$("$PY" "$LIB" prebuilt "$WHEELS" "$ROOT" "$ARCH" 2>&1); prc=$?
  case $prc in
    0) pass "the build step installs it instead of compiling: $(echo "$pre" | head -1)"
       echo "$pre" | tail -n +2
       whl=$(ls "$WHEELS"/dgemma_rt-*.whl)
       # the tag as pip on the GPU machine sees it (cp312; manylinux up to 2_35 assumed, as for the wheel set)
       if env -i "PATH=$PATH" "HOME=$tmp" PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
            "$PY" -m pip install -q --dry-run --ignore-installed --no-deps --target "$tmp/tpre" --only-binary=:all: \
            --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 \
            --platform manylinux_2_35_x86_64 "$whl" >"$tmp/pre.log" 2>&1; then
         pass "pip takes $(basename "$whl") for cp312 manylinux_2_35 x86_64"
       else
         fail "pip refuses $(basename "$whl") for cp312 manylinux_2_35 x86_64:"; sed 's/^/      /' "$tmp/pre.log" | tail -5
       fi ;;
    2) msg="$pre: the build step compiles from source (~200-300 s of the budget; tools/gpu_wheels.sh --prebuild makes one here)"
       if [ "$STRICT" = 1 ]; then fail "$msg"; else echo "note: $msg"; fi ;;
    *) echo "stale prebuilt wheel, the build step will compile from source: $pre"
       echo "      (commit, then rerun tools/gpu_wheels.sh --prebuild)"
       [ "$STRICT" = 1 ] && fail "--strict: the prebuilt wheel does not match this checkout" ;;
  esac

  echo "== the commands the steps run"
  for c in timeout tar nvcc cmake ninja; do
    command -v "$c" >/dev/null && pass "$c: $(command -v "$c")" || fail "$c not found"
  done
  command -v nvcc >/dev/null && { nvcc --version | grep -q 'release 13\.' && pass "nvcc is CUDA 13" || fail "nvcc is not CUDA 13: $(nvcc --version | tail -2 | head -1)"; }
  cmv=$(cmake --version 2>/dev/null | head -1 | awk '{print $3}')
  "$PY" -c "import sys; v = tuple(int(x) for x in '$cmv'.split('.')[:2]); sys.exit(v < (3, 26))" 2>/dev/null \
    && pass "cmake $cmv >= 3.26" || fail "cmake ${cmv:-?} older than 3.26"
  "$PY" -m pytest --version >/dev/null 2>&1 && pass "$PY -m pytest" || fail "$PY has no pytest"
  "$PY" -m pip --version >/dev/null 2>&1 && pass "$PY -m pip" || fail "$PY has no pip"
  for c in nvidia-smi compute-sanitizer cuobjdump; do
    command -v "$c" >/dev/null && pass "$c: $(command -v "$c")" || echo "note: $c not here (on the GPU machine only)"
  done
  ls "$ROOT"/tests/test_cuda_*.py >/dev/null 2>&1 && pass "GPU tests: $(cd "$ROOT" && ls tests/test_cuda_*.py tests/test_backend_ops.py 2>/dev/null | tr '\n' ' ')" \
    || fail "no tests/test_cuda_*.py"
  # dgemma-bench / dgemma-rt as the build will install them: read from the source (nothing to import yet)
  have=$("$PY" "$LIB" options "$ROOT/python/dgemma_rt/bench.py")
  for o in $BENCH_OPTS; do echo "$have" | grep -qx -- "$o" || fail "dgemma-bench has no $o"; done
  pass "dgemma-bench (python/dgemma_rt/bench.py) has $BENCH_OPTS"
  for o in $BENCH_PENDING; do
    echo "$have" | grep -qx -- "$o" && pass "dgemma-bench has $o" \
      || echo "pending: dgemma-bench has no $o yet: its step will fail and the summary will say so"
  done
  have=$("$PY" "$LIB" options "$ROOT/python/dgemma_rt/cli.py")
  echo "$have" | grep -qx make-tiny && pass "dgemma-rt make-tiny" || fail "dgemma-rt has no make-tiny"
  # The kernels step: every input builds (torch's meta device) and, in a CUDA build, every binding it calls exists.
  if "$PY" -c 'import torch, dgemma_rt' >/dev/null 2>&1; then
    if kout=$("$PY" "$ROOT/bench/kernels_gpu.py" --dry-run --out "$tmp/kernels.json" 2>&1); then
      pass "bench/kernels_gpu.py --dry-run: $(echo "$kout" | sed -n 's/^\[kernels\] bindings: //p')"
    else
      fail "bench/kernels_gpu.py --dry-run:"; echo "$kout" | sed 's/^/      /' | tail -15
    fi
  else
    echo "note: bench/kernels_gpu.py --dry-run not run: $PY cannot import torch and dgemma_rt here"
  fi
  if command -v dgemma-bench >/dev/null; then  # an installed build: its --help must agree
    h=$(dgemma-bench --help 2>&1)
    for o in $BENCH_OPTS; do echo "$h" | grep -q -- "$o\b" || fail "installed dgemma-bench --help lacks $o"; done
    pass "installed dgemma-bench --help ($(command -v dgemma-bench))"
  fi

  echo "== the plan (budget ${BUDGET}s of wall time, each step capped as shown; OUT=\$OUT)"
  for s in "${STEPS[@]}"; do
    printf '%-12s cap %4ss  needs %-6s %s\n' "$(step_field "$s" 1)" "$(step_field "$s" 2)" "$(step_field "$s" 3)" "$(step_cmd "$s")"
  done
  echo "dry run: $((errors)) problem(s), $(( $(date +%s) - t0 ))s"
  [ "$errors" -eq 0 ]
  exit
fi

# ------------------------------------------------------------------------------------------ the check
[ "$WORK" != "$OUT" ] && rm -rf "$WORK"
mkdir -p "$WORK/logs" "$OUT/results"
: > "$WORK/steps.jsonl"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=$((20 + $(step_field "${STEPS[-1]}" 2)))   # the summary, and the final step's cap
declare -A STATUS

# provenance.json: where the numbers come from. The GPU machine gets the working tree without .git:
# the commit then comes from the stamp tools/gpu_wheels.sh wrote beside the wheels.
if commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null); then
  dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no | head -c1); csrc=git
else
  read -r commit dirty < "$WHEELS/SOURCE_COMMIT" 2>/dev/null || commit=unknown; csrc="$WHEELS/SOURCE_COMMIT"
fi
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
"$PY" - "$WORK/provenance.json" "$commit" "${dirty:-}" "$csrc" "${gpu:-none, none}" "bash bench/gpu_check.sh $*" <<'EOF'
import datetime, json, os, platform, sys
out, commit, dirty, csrc, gpu, cmd = sys.argv[1:]
name, _, driver = gpu.rpartition(",")
json.dump({"git_commit": commit, "git_dirty": bool(dirty), "commit_source": csrc, "device": name.strip() or gpu,
           "driver": driver.strip(), "command": cmd, "host": platform.node(), "cpu_count": os.cpu_count(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
          open(out, "w"), indent=2)
EOF

record() {  # name status rc seconds timeout command note
  "$PY" -c 'import json, sys; n, s, rc, sec, to, cmd, note = sys.argv[1:]; print(json.dumps({"name": n, "status": s, "rc": int(rc), "seconds": round(float(sec), 1), "timeout_s": int(to), "command": cmd, "note": note}))' \
    "$@" >> "$WORK/steps.jsonl"
  printf '[gpu-check] %-12s %-8s %6ss  %s\n' "$1" "$2" "$4" "${7:0:200}"
}

# The summary, and with --pack the tarball, as they stand: after every step, so that a run the device
# tool kills still brings back what it did (and $OUT never holds more than 7 files).
checkpoint() {
  "$PY" "$LIB" summary "$OUT" "$WORK" > "$WORK/logs/summary.log" 2>&1 || echo "summary failed: $(tail -1 "$WORK/logs/summary.log")"
  if [ "$PACK" = 1 ]; then
    (cd "$WORK" && tar czf "$OUT/gpu-check.tar.gz.tmp" logs steps.jsonl provenance.json $(ls junit-*.xml 2>/dev/null) \
       && mv "$OUT/gpu-check.tar.gz.tmp" "$OUT/gpu-check.tar.gz")
  fi
}

# A rerun on a fresh machine with GPU_CHECK_STEPS=bench-nvfp4,... has nothing installed yet.
if [ -n "${GPU_CHECK_STEPS:-}" ] && ! "$PY" -c 'import dgemma_rt._core' >/dev/null 2>&1; then
  echo "[gpu-check] dgemma_rt does not import here: adding the wheels and build steps to GPU_CHECK_STEPS"
  GPU_CHECK_STEPS="wheels,build,$GPU_CHECK_STEPS"
fi

for s in "${STEPS[@]}"; do
  name=$(step_field "$s" 1); cap=$(step_field "$s" 2); needs=$(step_field "$s" 3); cmd=$(step_cmd "$s")
  log="$WORK/logs/$name.log"
  if [ -n "${GPU_CHECK_STEPS:-}" ] && ! echo ",$GPU_CHECK_STEPS," | grep -q ",$name,"; then
    continue  # not selected: no record, and steps that need it run as if it had passed
  fi
  if [ "$needs" != - ] && [ -n "${STATUS[$needs]:-}" ] && [ "${STATUS[$needs]}" != ok ]; then
    STATUS[$name]=skipped; record "$name" skipped 0 0 0 "$cmd" "not run: step $needs did not pass"; continue
  fi
  if [ "$name" = "$FINAL_STEP" ]; then
    limit=$cap  # reserved: runs however late it is
  else
    left=$((DEADLINE - $(date +%s) - RESERVE))
    limit=$(( cap < left ? cap : left ))
  fi
  if [ "$limit" -lt 10 ]; then
    STATUS[$name]=skipped; record "$name" skipped 0 0 0 "$cmd" "not run: out of time (${BUDGET}s budget)"; continue
  fi
  { echo "# step $name: $(date -u +%FT%TZ), timeout ${limit}s"; echo "# command: $cmd"; } > "$log"
  t=$(date +%s.%N)
  # SIGINT first: pytest then writes its JUnit file and failure summary, Python steps keep what they have
  timeout -s INT -k 15 "$limit" bash -c "$cmd" >> "$log" 2>&1 </dev/null
  rc=$?
  sec=$("$PY" -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$t")
  echo "# exit $rc after ${sec}s" >> "$log"
  note=""
  case $rc in
    0) st=ok ;;
    77) st=skipped; note="$(grep -v '^#' "$log" | grep -v '^\s*$' | tail -1)" ;;
    124|137) st=timeout; note="stopped after ${limit}s" ;;
    *) st=failed; note="exit $rc: $(grep -v '^#' "$log" | grep -v '^\s*$' | tail -1)" ;;
  esac
  if [ "$name" = build ]; then  # which path ran (prebuilt wheel or source build), and why not the other
    why=$(grep -m1 '^\[build\] not using' "$log" | cut -c9-)
    [ $rc = 0 ] && note=$(grep -m1 '^\[build\] path:' "$log" | cut -c9-)
    [ -n "$why" ] && note="${note:+$note; }$why"
  fi
  [ "$name" = memcheck ] && [ $rc = 77 ] && note="skipped: the engine refuses device=\"cuda\": ${note}"
  # the tests step's note: the totals of its JUnit files (gpu_check_lib.py pytest-files), whatever its status
  if [ "$name" = tests ] && totals=$(grep '^\[tests\] [0-9]* of ' "$log" | tail -1) && [ -n "$totals" ]; then
    case $st in ok) note=$totals ;; failed) note="exit $rc: $totals" ;; *) note="$note; $totals" ;; esac
  fi
  STATUS[$name]=$st
  record "$name" "$st" "$rc" "$sec" "$limit" "$cmd" "$note"
  checkpoint
done

checkpoint
cat "$OUT/summary.md" 2>/dev/null
echo "[gpu-check] $(( $(date +%s) - START ))s in all; results under $OUT (logs: $WORK)"
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$OUT/summary.json" 2>/dev/null
