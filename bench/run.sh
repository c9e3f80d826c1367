#!/usr/bin/env bash
# Runs dgemma-bench and stores its JSON with the provenance a result needs (git commit, the exact
# command, the machine) under bench/results/. Usage: bench/run.sh NAME [dgemma-bench args...]
set -euo pipefail
name=${1:?usage: bench/run.sh NAME [dgemma-bench args...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/bench/results/$name.json"
cmd=(dgemma-bench --json --no-progress "$@")
json=$("${cmd[@]}")
commit=$(git -C "$root" rev-parse HEAD)
dirty=$(git -C "$root" status --porcelain --untracked-files=no | head -c1)
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "none")
cpu=$(grep -m1 "model name" /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //' || echo unknown)
printf '%s' "$json" | python3 -c '
import datetime, json, sys
out, commit, dirty, gpu, cpu, cmd = sys.argv[1:]
result = json.load(sys.stdin)
result.update(git_commit=commit, git_dirty=bool(dirty), command=cmd, gpu=gpu, cpu_model=cpu,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
with open(out, "w") as f:
    f.write(json.dumps(result, indent=2) + "\n")
print(out)
' "$out" "$commit" "${dirty:+dirty}" "$gpu" "$cpu" "${cmd[*]}"
