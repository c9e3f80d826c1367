"""Helpers of bench/gpu_check.sh (standard library only: they run before anything is installed).

  stubs MANIFEST DIR          metadata-only wheels for what the GPU machine already has (tools/gpu_machine.txt)
  options FILE                the --options a module's argparse parsers declare (read from the source, not imported)
  cutlass WHEEL DEST          unpack the CUTLASS include tree of the nvidia-cutlass wheel into DEST; print its path
  check-report REPORT WHEELS  pip's --report: every distribution comes from WHEELS or a stub; list what installs
  results OUT                 add provenance to each raw dgemma-bench JSON and name it for bench/results/
  summary OUT                 $OUT/summary.json and summary.md from the steps' records
"""

from __future__ import annotations

import ast
import base64
import datetime
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys
import zipfile

_INCLUDE_IN_WHEEL = "cutlass_library/source/include/"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def read_manifest(path: str) -> list[tuple[str, str]]:
    out = []
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out.append((name.strip(), version.strip()))
    return out


def stubs(manifest: str, dest: str) -> None:
    """One py3-none-any wheel per manifest line (python itself left out), holding only its metadata."""
    d = pathlib.Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    for name, version in read_manifest(manifest):
        if name == "python":
            continue
        dist = f"{_norm(name)}-{version}"
        files = {
            f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                          "Summary: stub for a package the GPU machine already has\n",
            f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        }
        record = []
        for fname, text in files.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{fname},sha256={digest},{len(text.encode())}")
        record.append(f"{dist}.dist-info/RECORD,,")
        files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
        with zipfile.ZipFile(d / f"{dist}-py3-none-any.whl", "w") as z:
            for fname, text in files.items():
                z.writestr(fname, text)


def options(path: str) -> None:
    """Prints each option string passed to add_argument / add_parser in a module's source."""
    tree = ast.parse(pathlib.Path(path).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "add_argument", "add_parser"):
            for a in node.args:
                if isinstance(a, ast.Constant) and isinstance(a.value, str):
                    found.add(a.value)
    print("\n".join(sorted(found)))


def cutlass(wheel: str, dest: str) -> None:
    root = pathlib.Path(dest)
    include = root / _INCLUDE_IN_WHEEL
    if not (include / "cutlass" / "cutlass.h").is_file():
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp, [n for n in z.namelist() if n.startswith(_INCLUDE_IN_WHEEL)])
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    if not (include / "cutlass" / "cutlass.h").is_file() or not (include / "cute" / "tensor.hpp").is_file():
        sys.exit(f"{wheel} holds no CUTLASS include tree")
    print(include.resolve())


def check_report(report: str, wheels: str) -> None:
    """Every distribution pip chose comes from the carried folder or a stub, and none twice."""
    carried = {p.name for p in pathlib.Path(wheels).glob("*.whl")}
    data = json.loads(pathlib.Path(report).read_text())
    seen = {}
    for item in data.get("install", []):
        meta = item["metadata"]
        name = _norm(meta["name"])
        fname = item["download_info"]["url"].rsplit("/", 1)[-1]
        if name in seen:
            sys.exit(f"two versions of {name} in the resolution")
        seen[name] = (meta["version"], "carried" if fname in carried else "on the machine (stub)")
    for name, (version, where) in sorted(seen.items()):
        print(f"  {name} {version}: {where}")


def _gpu_tag(device: str) -> str:
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]*)\b", device)
    return m.group(1).lower() if m else "gpu"


def results(out: str) -> None:
    """results/raw-NAME.json (dgemma-bench's --json) -> results/<gpu>-NAME.json with the provenance."""
    o = pathlib.Path(out)
    prov = json.loads((o / "provenance.json").read_text())
    tag = _gpu_tag(prov.get("device", ""))
    steps = [json.loads(line) for line in (o / "steps.jsonl").read_text().splitlines() if line.strip()]
    for raw in sorted((o / "results").glob("raw-*.json")):
        name = raw.stem[len("raw-"):]
        try:
            result = json.loads(raw.read_text())
        except ValueError:  # the step failed (its log says why): nothing to keep
            raw.unlink()
            continue
        # the exact command: the step's, which wrote this file
        command = next((s["command"] for s in steps if f"/{raw.name}" in s["command"]), None)
        result.update(
            git_commit=prov["git_commit"], git_dirty=prov["git_dirty"], gpu=prov["device"],
            gpu_driver=prov["driver"], command=command, check_summary="summary.json of the same run",
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source="bench/gpu_check.sh",
        )  # fmt: skip
        target = o / "results" / f"{tag}-{name}.json"
        target.write_text(json.dumps(result, indent=2) + "\n")
        raw.unlink()
        print(target)


def kernels_summary(j: dict) -> str:
    """One line of bench/kernels_gpu.py's JSON: the issue-13 targets and the sections that failed."""
    def ms(v):
        return "-" if v is None else f"{v:.3f} ms"

    t = j.get("targets", {})
    parts = []
    for hd in (512, 256):
        a = t.get(f"attention_hd{hd}_faster_than_sdpa", {})
        if a:
            parts.append(f"attention hd{hd} {ms(a.get('ms'))} vs SDPA ({a.get('sdpa_backend')}) "
                         f"{ms(a.get('sdpa_ms'))}")
    for name in ("moe_experts_nvfp4", "moe_experts_bf16"):
        e = next((v for k, v in t.items() if k.startswith(name + "_within")), {})
        if e.get("ratio") is not None:
            target = f" (target 1.25x: {'meets' if e['meets'] else 'misses'})" if "nvfp4" in name else ""
            parts.append(f"{name} {ms(e.get('ms'))} = {e['ratio']:.2f}x its weight bytes at HBM bandwidth{target}")
    k = j.get("kernels", {})
    for name in ("moe_router", "lm_head"):
        if k.get(name, {}).get("ms") is not None:
            parts.append(f"{name} {ms(k[name]['ms'])}")
    failed = [s for s, v in j.get("sections", {}).items() if v.get("status") != "ok"]
    if failed:
        parts.append("FAILED sections: " + ", ".join(failed))
    return "; ".join(parts) or "no kernel timed"


def summary(out: str) -> None:
    o = pathlib.Path(out)
    prov = json.loads((o / "provenance.json").read_text())
    steps = []
    for line in (o / "steps.jsonl").read_text().splitlines():
        if line.strip():
            steps.append(json.loads(line))
    ok = all(s["status"] in ("ok", "skipped") for s in steps)
    doc = dict(prov, ok=ok, total_s=round(sum(s["seconds"] for s in steps), 1), steps=steps,
               results=sorted(p.name for p in (o / "results").glob("*.json")))
    (o / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# GPU check: {prov['device']} (driver {prov['driver']}), commit {prov['git_commit']}"
             f"{' (dirty)' if prov['git_dirty'] else ''}", "",
             "| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    for s in steps:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s.get('note', '')[:160]} |")
    for r in doc["results"]:
        try:
            j = json.loads((o / "results" / r).read_text())
            if "kernels" in j:
                lines.append(f"\n{r}: {kernels_summary(j)}")
                continue
            lines.append(f"\n{r}: {j.get('tokens_per_s', 0):.1f} tok/s, {j.get('ms_per_step', 0):.2f} ms/step, "
                         f"prefill {j.get('prefill_ms', 0):.1f} ms")
        except (ValueError, TypeError, KeyError, AttributeError):
            pass
    (o / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str]) -> None:
    cmds = {"stubs": stubs, "options": options, "cutlass": cutlass, "check-report": check_report,
            "results": results, "summary": summary}
    if not argv or argv[0] not in cmds:
        sys.exit(__doc__)
    cmds[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
