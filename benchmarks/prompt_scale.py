"""Memory and time of preparing and planning at 10 thousand, 100 thousand and 1 million prompts.

What is measured
    For each N in `--sizes`, on a styles.csv-shaped file of N unique prompts written by
    benchmarks/make_prompts.py (untimed):
    prepare  `revprompt prepare --config tiny --prompts.path=FILE --prompts.limit=0` in one process:
             read, normalise, de-duplicate, split and index the whole set (the once-per-run step);
             wall time and peak RSS of that process (/usr/bin/time).
    plan     `torchrun --nproc_per_node 2 revprompt generate --plan-only ...` on the prepared set:
             each rank plans the shards, then reads its own shards' prompts through the index, one
             shard at a time, as generation does, and stops before any model is loaded; the peak RSS
             each rank reports (getrusage) and the wall time of the command.
    baseline the peak RSS of a bare interpreter that imports the same modules (torch, diffusers,
             transformers, revprompt's generation job): what a rank costs before it holds any prompt.
    The claim under test: a rank's peak RSS does not grow with N.

Reproduce (from the repository root; about 4 minutes on 2 cores, 1M included):
    .venv/bin/python benchmarks/prompt_scale.py
    .venv/bin/python benchmarks/prompt_scale.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402

BIN = Path(sys.executable).parent


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, peak RSS MB, output) of a command under /usr/bin/time."""
    start = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *cmd], env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rss_kb = float(re.findall(r"TIME [\d.]+ (\d+)", proc.stderr)[-1])
    return wall, rss_kb / 1024, proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS / "prompt_scale.json")
    args = parser.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="revprompt-scale-") as tmp:
        _, base_mb, _ = timed([sys.executable, "-c", "import torch, diffusers, transformers, "
                                                       "revprompt.generation.job"], env)
        print(f"baseline (imports only): peak RSS {base_mb:.0f} MB", flush=True)
        for n in [int(x) for x in args.sizes.split(",")]:
            source = Path(tmp) / f"styles-{n}.csv"
            subprocess.run([sys.executable, str(Path(__file__).with_name("make_prompts.py")), "--rows", str(n),
                            "--out", str(source)], check=True, env=env, capture_output=True)
            run_dir = Path(tmp) / f"run-{n}"
            common = ["--config", "tiny", f"--run.dir={run_dir}", f"--prompts.path={source}", "--prompts.limit=0",
                      f"--generate.shard_size={args.shard_size}"]
            prep_s, prep_mb, _ = timed([str(BIN / "revprompt"), "prepare", *common], env)
            plan_s, _, _ = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  "--no-python", str(BIN / "revprompt"), "generate", "--plan-only", *common], env)
            ranks = []
            for rank in (0, 1):
                text = (run_dir / "logs" / f"rank-{rank}.log").read_text()
                found = re.findall(r"plan only: rank \d+ would write (\d+) shards, (\d+) samples; peak RSS ([\d.]+) MB",
                                   text)
                shards, samples, mb = found[-1]
                ranks.append({"rank": rank, "shards": int(shards), "samples": int(samples), "peak_rss_mb": float(mb)})
            row = {"prompts": n, "file_mb": round(source.stat().st_size / 1e6, 1), "prepare_s": round(prep_s, 2),
                   "prepare_peak_rss_mb": round(prep_mb, 1), "plan_s": round(plan_s, 2),
                   "rank_peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "ranks": ranks}
            rows.append(row)
            print(f"{n:>9} prompts: prepare {prep_s:6.1f} s, peak RSS {prep_mb:6.0f} MB; plan (2 ranks) {plan_s:5.1f} s, "
                  f"rank peak RSS {row['rank_peak_rss_mb']:.0f} MB; samples per rank "
                  f"{[r['samples'] for r in ranks]}", flush=True)
    result = {"benchmark": "prompt_scale", "command": "python benchmarks/prompt_scale.py " + " ".join(argv or sys.argv[1:]),
              "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
              "baseline_imports_peak_rss_mb": round(base_mb, 1), "rows": rows}
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
