"""Do two revisions of revprompt write the same bytes? The check behind a refactor that must not change results.

Runs `revprompt pipeline` on the tiny preset under torchrun (2 ranks by default) once with the code of a
baseline revision (exported with `git archive`, imported through PYTHONPATH) and once with this
checkout, each in a run directory of its own and with one thread per rank, then compares the sha256 of
the outputs that later work depends on: every shard tar, the manifest, eval/results.jsonl,
eval/summary.json and drift/summary.json.

    python benchmarks/same_bytes.py --baseline 8023842
    python benchmarks/same_bytes.py --baseline 8023842 --reuse   # keep the baseline run of an earlier call

Exit status 0 when every file is equal, 1 otherwise. For each file that differs it says where: the tar
members that differ and, inside JSON (a JSON file, a JSON member or a JSON line), the keys whose values differ,
so a change that had to touch some bytes (a renamed model, say) shows that it touched nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPARED = ("shards/manifest.json", "eval/results.jsonl", "eval/summary.json", "drift/summary.json")


def export_revision(revision: str, dest: Path) -> Path:
    """The tree of `revision` unpacked into `dest` (no git worktree: nothing in the repository changes)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_pipeline(code: Path, run_dir: Path, nproc: int, args: list[str], timeout_s: int) -> float:
    """`revprompt pipeline` with the package under `code`, under torchrun; returns its wall time."""
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "revprompt.launch.cli", "pipeline", "--config", "tiny", f"--run.dir={run_dir}", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-6000:]}")
    return time.monotonic() - start


def digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every compared file under `run_dir`, by relative path ('missing' when absent)."""
    files = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "shards").rglob("*.tar"))
    out = {}
    for name in [*files, *COMPARED]:
        path = run_dir / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    return out


def json_differences(old, new, where: str = "") -> list[str]:
    """Key paths whose values differ between two parsed JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in json_differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in json_differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [where or "(whole value)"]


def _json_lines(data: bytes):
    text = data.decode("utf-8")
    try:
        return json.loads(text)
    except ValueError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def where_they_differ(old: Path, new: Path) -> list[str]:
    """What differs between two versions of a compared file: tar members, then JSON keys inside them."""
    if not old.is_file() or not new.is_file():
        return ["missing on one side"]
    if old.suffix != ".tar":
        found = json_differences(_json_lines(old.read_bytes()), _json_lines(new.read_bytes()))
        return sorted({re.sub(r"\[\d+\]", "[*]", d) for d in found})  # one line per key, not per row
    with tarfile.open(old) as a, tarfile.open(new) as b:
        members_a = {m.name: a.extractfile(m).read() for m in a.getmembers()}
        members_b = {m.name: b.extractfile(m).read() for m in b.getmembers()}
    out = set()
    for name in sorted(set(members_a) | set(members_b)):
        x, y = members_a.get(name), members_b.get(name)
        if x == y:
            continue
        ext = name.rsplit(".", 1)[-1]
        if ext == "json" and x is not None and y is not None:
            out.update(f"*.json: {d}" for d in json_differences(json.loads(x), json.loads(y)))
        else:
            out.add(f"*.{ext}")
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    """Run both revisions and compare."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--baseline", default="8023842", help="git revision to compare against")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/revprompt-same-bytes"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="reuse the baseline's run from an earlier call")
    parser.add_argument("--timeout-s", type=int, default=1800)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "same_bytes.json")
    parser.add_argument("overrides", nargs="*", default=[
        "--prompts.limit=200", "--generate.shard_size=8", "--train.max_steps=60", "--train.save_every=30",
        "--train.val_every=30", "--drift.iterations=2"], help="config overrides for both runs")
    args = parser.parse_args(argv)
    base_code = args.workdir / f"code-{args.baseline}"
    base_run, new_run = args.workdir / f"run-{args.baseline}", args.workdir / "run-checkout"
    seconds = {}
    if not (args.reuse and (base_run / "drift" / "summary.json").is_file()):
        if not base_code.is_dir():
            export_revision(args.baseline, base_code)
        if base_run.exists():
            raise SystemExit(f"{base_run} exists from an earlier call: pass --reuse or remove it")
        seconds["baseline"] = run_pipeline(base_code, base_run, args.nproc, args.overrides, args.timeout_s)
    if new_run.exists():
        raise SystemExit(f"{new_run} exists from an earlier call: remove it first")
    seconds["checkout"] = run_pipeline(ROOT, new_run, args.nproc, args.overrides, args.timeout_s)
    old, new = digests(base_run), digests(new_run)
    names = sorted(set(old) | set(new))
    differ = [n for n in names if old.get(n) != new.get(n)]
    where = {name: where_they_differ(base_run / name, new_run / name) for name in differ}
    for name in names:
        print(f"{'same' if name not in differ else 'DIFFERS':8s} {name}"
              + (f"  ({'; '.join(where[name])})" if name in where else ""))
    result = {"baseline": args.baseline, "nproc": args.nproc, "overrides": args.overrides, "seconds": seconds,
              "files": len(names), "differ": where}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(names) - len(differ)} of {len(names)} files equal; {args.out}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
