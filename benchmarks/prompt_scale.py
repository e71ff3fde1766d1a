"""Memory and time of preparing and planning at 10 thousand, 100 thousand and 1 million prompts.

What is measured
    For each N in `--sizes`, on a styles.csv-shaped file of N unique prompts written by
    benchmarks/make_prompts.py (untimed):
    prepare  `revprompt prepare --config tiny --prompts.path=FILE --prompts.limit=0 --prompts.split=SPLIT` in one
             process: read, normalise, de-duplicate, group near-duplicates (under `--split group`), split and
             index the whole set (the once-per-run step); wall time and peak RSS of that process
             (/usr/bin/time), and the figures of its prompts/stats.json.
    plan     `torchrun --nproc_per_node 2 revprompt generate --plan-only ...` on the prepared set:
             each rank plans the shards, then reads its own shards' prompts through the index, one
             shard at a time, as generation does, and stops before any model is loaded; the peak RSS
             each rank reports (getrusage) and the wall time of the command (skipped by --prepare-only).
    baseline the peak RSS of a bare interpreter that imports the same modules (torch, diffusers,
             transformers, revprompt's generation job): what a rank costs before it holds any prompt.
    The claims under test: a rank's peak RSS does not grow with N; prepare's peak RSS at the largest N
    stays within 1.5 times its peak RSS at the smallest (`prepare_rss_ratio`).

Reproduce (from the repository root; about 4 minutes on 2 cores, 1M included):
    .venv/bin/python benchmarks/prompt_scale.py
    .venv/bin/python benchmarks/prompt_scale.py --sizes 10000,100000
Near-duplicate groups at 20 thousand and 2 million prompts, with number codes (groups of thousands) and with
letter codes (every word set distinct), as make_prompts.py explains (each about 6 to 10 minutes on 2 cores):
    .venv/bin/python benchmarks/prompt_scale.py --sizes 20000,2000000 --split group --prepare-only \
        --out benchmarks/results/prompt_scale_groups.json
    .venv/bin/python benchmarks/prompt_scale.py --sizes 20000,2000000 --split group --prepare-only --codes letters \
        --out benchmarks/results/prompt_scale_groups_letters.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
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
    parser.add_argument("--split", choices=("group", "hash"), default="group", help="prompts.split of prepare")
    parser.add_argument("--prepare-only", action="store_true", help="measure prepare alone, not the plan")
    parser.add_argument("--codes", choices=("digits", "letters"), default="digits",
                        help="make_prompts.py's model codes: digits (near-duplicate groups of thousands) or letters "
                             "(no two names with the same word set)")
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
                            "--out", str(source), "--codes", args.codes], check=True, env=env, capture_output=True)
            run_dir = Path(tmp) / f"run-{n}"
            common = ["--config", "tiny", f"--run.dir={run_dir}", f"--prompts.path={source}", "--prompts.limit=0",
                      f"--prompts.split={args.split}", f"--generate.shard_size={args.shard_size}"]
            prep_s, prep_mb, _ = timed([str(BIN / "revprompt"), "prepare", *common], env)
            stats = json.loads((run_dir / "prompts" / "stats.json").read_text())
            row = {"prompts": n, "file_mb": round(source.stat().st_size / 1e6, 1), "prepare_s": round(prep_s, 2),
                   "prepare_peak_rss_mb": round(prep_mb, 1),
                   "near_duplicates": {k: stats[k] for k in ("split", "near_duplicate_threshold", "word_sets", "groups",
                                                             "largest_group", "prompts_in_shared_groups", "moved",
                                                             "lsh", "leakage")}}
            line = f"{n:>9} prompts: prepare ({args.split}) {prep_s:6.1f} s, peak RSS {prep_mb:6.0f} MB"
            if not args.prepare_only:
                plan_s, _, _ = timed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc_per_node=2", "--no-python", str(BIN / "revprompt"), "generate",
                                      "--plan-only", *common], env)
                ranks = []
                for rank in (0, 1):
                    text = (run_dir / "logs" / f"rank-{rank}.log").read_text()
                    found = re.findall(r"plan only: rank \d+ would write (\d+) shards, (\d+) samples; peak RSS "
                                       r"([\d.]+) MB", text)
                    shards, samples, mb = found[-1]
                    ranks.append({"rank": rank, "shards": int(shards), "samples": int(samples),
                                  "peak_rss_mb": float(mb)})
                row.update(plan_s=round(plan_s, 2), rank_peak_rss_mb=max(r["peak_rss_mb"] for r in ranks), ranks=ranks)
                line += (f"; plan (2 ranks) {plan_s:5.1f} s, rank peak RSS {row['rank_peak_rss_mb']:.0f} MB; samples "
                         f"per rank {[r['samples'] for r in ranks]}")
            rows.append(row)
            leak = stats["leakage"]
            print(f"{line}; {stats['groups']} groups (largest {stats['largest_group']}), leakage hash "
                  f"{leak['hash']['share']:.3f} / group {leak['group']['share']:.3f}", flush=True)
            shutil.rmtree(run_dir)  # free the disk before the next size (2M prompts: about 1 GB with the source)
            source.unlink()
    result = {"benchmark": "prompt_scale", "command": "python benchmarks/prompt_scale.py " + " ".join(argv or sys.argv[1:]),
              "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
              "baseline_imports_peak_rss_mb": round(base_mb, 1), "rows": rows,
              "prepare_rss_ratio": round(rows[-1]["prepare_peak_rss_mb"] / rows[0]["prepare_peak_rss_mb"], 3)}
    print(f"prepare peak RSS, largest over smallest N: {result['prepare_rss_ratio']:.3f}", flush=True)
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
