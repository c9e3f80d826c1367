#!/usr/bin/env bash
# Downloads the wheels the offline GPU machine lacks (tools/gpu_wheels.txt) for its platform (CPython
# 3.12, manylinux x86_64) into an ignored folder that the device tool carries with the checkout, and
# stamps the folder with the commit it was made for (the GPU machine gets no .git to read it from).
# Usage: tools/gpu_wheels.sh [DIR]   (default build/gpu-wheels; PYTHON=... picks the pip that downloads)
# Idempotent: wheels already there are not fetched again. Prints each wheel and the total size.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/build/gpu-wheels}
py=${PYTHON:-python3}
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
  keep=no
  for w in $want; do case "$base" in "$w"-*) keep=yes;; esac; done
  [ $keep = yes ] || { echo "removing $base (not in tools/gpu_wheels.txt)"; rm -f "$f"; }
done
commit=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | head -c1)
printf '%s%s\n' "$commit" "${dirty:+ dirty}" > "$dest/SOURCE_COMMIT"
ls -l "$dest"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "total $(( total / 1024 / 1024 )) MiB ($total bytes) in $dest, for commit $(cat "$dest/SOURCE_COMMIT")"
[ "$total" -lt $(( 48 * 1024 * 1024 )) ] || { echo "too large to carry (device tool limit: 64 MiB with the checkout)" >&2; exit 1; }
