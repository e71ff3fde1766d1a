"""Overhead of the `revprompt generate` job against a bare diffusers loop, on the CPU (tiny preset).

What is measured
    Both sides generate the same prepared prompts with the same pipeline (`build_pipeline` from
    `revprompt.models.text_to_image`: the tiny preset's miniature Stable Diffusion, DPM-Solver++, fp32, CPU):

    job   the real CLI in a subprocess: `revprompt generate --config tiny --run.dir=<fresh dir> ...`.
          It writes JPEG samples into tar shards, the manifest, logs, TensorBoard scalars and the sample
          grid, exactly as a user's run does.
    bare  a subprocess of this script that builds the pipeline with `build_pipeline(...)` and calls
          `pipe(prompt=..., generator=[torch.Generator().manual_seed(i), ...], output_type="np")` over
          the same prompts in batches of `batch_size` (train, val and test concatenated), discarding
          the images. It treats Python's cycle collector as the CLI's console script does
          (launch/process.py): held from its first line, start-up frozen and collection resumed where
          `run_stage` resumes it (before the stage's work, once it has imported what the CLI's start-up
          imports: accelerate and the libraries' progress-bar switches, not TensorBoard, which is the
          job's own cost; `_common.resume_collection_as_the_cli`), the heap frozen before exit. It runs
          its worker, then its loop, from a chunk of the interpreter's frame stack of their own, as the
          console script runs the CLI and `run_stage` the stage's work (`process.with_frame_room`).

    How the sides are run: a job process and a bare process take turns of `--slice-s` seconds
    (default 0.25), one running while the other is stopped (SIGSTOP to its process group;
    `_common.run_interleaved`). A small shared VM's speed drifts by +-10 % over tens of seconds: run one
    after the other, a round's ratio swung with whichever side caught a slow spell (0.90-1.08 for one
    code). Taking turns, both sides see the same spells; the shorter the turns, the closer. Two identical
    bare processes (12 pairs for each setting, 2-core VM) differed per pair by 2.35 % (standard
    deviation; at most 5.3 %) with turns of 1 s, 1.1 % (at most 2.1-2.6 %) with turns of 0.25 s, and no
    less with 0.1 s (1.2 %); whether the benchmark polled for the side's exit every 5 ms or slept on a
    pidfd made no difference beyond that noise. A round is two such pairs, the job starting the first,
    the bare run the second.

    Primary metric: each process's own time from spawn to exit (its turns; the other side's turns
    taken out), so interpreter start-up, imports and the pipeline build count on both sides. `prepare`
    runs once before any timing; every job run gets a fresh run directory holding a copy of the
    prepared prompts, so its own `prepare` only confirms them and each job run writes every shard from
    scratch.

    Secondary metrics (in the JSON and the table), also over the process's own turns:
      build+generate  bare: pipeline build + generation loop, between time stamps in the worker; job:
                      the span of its own "generated N images in S s" log line (S seconds up to the
                      line's time stamp), which also starts just before the pipeline build and ends
                      once the last shard is written.
      steady img/s    images after the first batch / time from the end of the first batch to the end
                      of the last (bare: timestamps in the worker; job: wall times of its
                      `perf/images_per_s` TensorBoard events, one per batch).

    The job cuts batches inside batch groups (consecutive shards, split ends included, joined until they
    fill whole batches; see generation.job.group_tasks), the bare loop over all prompts at once; the JSON
    records each side's pipeline calls (the job's from its log).
    Both sides get the same OMP_NUM_THREADS / MKL_NUM_THREADS (`--threads`, default: all cores), the
    only thread setting the CLI honours; the bare worker checks that torch picked it up. A round's ratio
    is its two job times over its two bare ones, and the target (<= 1.05) is met when every round
    meets it. The report also gives each side's median over all runs and its process CPU time.

    On a small shared machine another process on the cores slows a run several-fold (the OpenMP
    threads of torch wait for each other). So before each pair the script waits (up to
    `--quiet-wait` s) for the machine to go idle, measures over the pair the CPU time that other
    processes used (`other_cpu_s`, from /proc/stat minus both children's and its own rusage), and
    reruns a pair where that exceeds 5 % of one core (up to `--retries` times; the discarded pairs stay
    in the JSON, and a pair still disturbed after the retries is kept and flagged).

Reproduce (from the repository root, about 4 minutes on 2 idle cores):
    .venv/bin/python benchmarks/generation_overhead.py --prompts 96 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
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
from typing import Any

from revprompt.launch import process  # the standard library only

if __name__ == "__main__" and sys.argv[1:2] == ["_bare"]:
    process.hold_collection()  # as the CLI's console script does first, before the imports both sides pay

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (write_results, ROOT, active_s, fmt, job_batches, loop_clock, measure, median_of,  # noqa: E402
                     ratio, resume_collection_as_the_cli, revprompt_command, run_interleaved, steady_rate,
                     subprocess_env)

from revprompt.launch.layout import RUN_MARKER, claim_run_dir  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "generation_overhead.json"
BARE_MARKER = "BARE_RESULT "
JOB_LOG_LINE = re.compile(r"generated (\d+) images in ([\d.]+) s")
TARGET_RATIO = 1.05
RUN_TIMEOUT_S = 900  # of a run's own turns


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options; sizes default to the tiny preset's at 96 prompts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--prompts", type=int, default=96, help="prompts (= images) per run")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds, each two pairs of a job and a bare run taking turns (job first, then bare "
                             "first)")
    parser.add_argument("--slice-s", type=float, default=0.25,
                        help="seconds a side runs per turn before the other side's turn")
    parser.add_argument("--size", type=int, default=64, help="image height and width in pixels")
    parser.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--shard-size", type=int, default=32, help="samples per shard (job only)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP/MKL threads on both sides")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--retries", type=int, default=2,
                        help="reruns of a pair that other processes disturbed (see other_cpu_s)")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="before each pair, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep run directories here instead of a deleted temp dir")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats: need at least 1 round")
    if not 0.05 <= args.slice_s <= 60:
        parser.error("--slice-s: between 0.05 and 60 seconds")
    return args


def config_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The `--section.key=value` overrides of the tiny preset shared by both sides."""
    return [f"--run.dir={run_dir}", "--run.device=cpu", f"--prompts.limit={args.prompts}",
            f"--generate.steps={args.steps}", f"--generate.height={args.size}", f"--generate.width={args.size}",
            f"--generate.batch_size={args.batch}", f"--generate.shard_size={args.shard_size}",
            "--generate.dtype=fp32"]


def job_calls(log_text: str) -> int:
    """Pipeline calls the job made: the batches of its "generating thread: ... over N batches" log line (batches
    cross shard boundaries inside batch groups, so the shards alone do not say)."""
    found = re.search(r"generating thread: .* over (\d+) batches", log_text)
    if found is None:
        raise RuntimeError("the job's log has no 'generating thread: ... over N batches' line")
    return int(found.group(1))


def job_command(args: argparse.Namespace, run_dir: Path, prepared: Path) -> list[str]:
    """`revprompt generate` on a fresh run dir seeded with the prepared prompts."""
    shutil.copytree(prepared / "prompts", run_dir / "prompts")
    # the copy is a revprompt run: its marker comes along, or the job refuses prompts it did not write
    shutil.copy2(prepared / RUN_MARKER, run_dir / RUN_MARKER)
    return revprompt_command() + ["generate", "--config", "tiny"] + config_overrides(args, run_dir)


def job_result(run_dir: Path, proc: subprocess.CompletedProcess, timing: dict[str, Any]) -> dict[str, Any]:
    """A job run's record, its times taken over its own turns."""
    if proc.returncode != 0:
        raise RuntimeError(f"job failed ({proc.returncode}): {' '.join(proc.args)}\n{proc.stderr[-4000:]}")
    log_text = (run_dir / "logs" / "rank-0.log").read_text(encoding="utf-8")
    match = JOB_LOG_LINE.search(log_text)
    if match is None:
        raise RuntimeError(f"{run_dir}/logs/rank-0.log: no 'generated N images' line")
    # the line's own time stamp ends the span it reports; the span's own time is the job's turns inside it
    stamp = datetime.datetime.strptime(log_text[:match.start()].rsplit("\n", 1)[-1][:23], "%Y-%m-%d %H:%M:%S,%f")
    end = stamp.timestamp()
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    return {"wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"], "turns": len(timing["turns"]),
            "images": int(match.group(1)),
            "build_generate_s": active_s(timing["turns"], end - float(match.group(2)), end),
            "steady_images_per_s": steady_rate(job_batches(run_dir), timing["turns"]),
            "pipeline_calls": job_calls(log_text), "complete": manifest["complete"],
            **loop_clock(log_text)}


def bare_command(args: argparse.Namespace, prepared: Path) -> list[str]:
    """This script's worker mode over the prepared prompts."""
    return ([sys.executable, str(Path(__file__).resolve()), "_bare", str(args.threads)]
            + config_overrides(args, prepared))


def bare_result(proc: subprocess.CompletedProcess, timing: dict[str, Any]) -> dict[str, Any]:
    """A bare run's record, its times taken over its own turns."""
    if proc.returncode != 0:
        raise RuntimeError(f"bare loop failed ({proc.returncode}): {' '.join(proc.args)}\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(BARE_MARKER)]
    if not lines:
        raise RuntimeError(f"bare loop printed no result line:\n{proc.stdout[-2000:]}")
    result = json.loads(lines[-1][len(BARE_MARKER):])
    turns = timing["turns"]
    start, built, end = result.pop("clock")
    stamps = [tuple(x) for x in result.pop("stamps")]
    return {"wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"], "turns": len(turns), **result,
            "build_s": active_s(turns, start, built), "generate_s": active_s(turns, built, end),
            "build_generate_s": active_s(turns, start, end), "steady_images_per_s": steady_rate(stamps, turns)}


def run_pair(args: argparse.Namespace, first: str, run_dir: Path, prepared: Path,
             env: dict[str, str]) -> dict[str, Any]:
    """A job run and a bare run taking turns of `--slice-s` seconds (see `run_interleaved`), `first` starting."""
    cmds = {"job": job_command(args, run_dir, prepared), "bare": bare_command(args, prepared)}
    order = [first] + [side for side in cmds if side != first]
    results, group = run_interleaved([cmds[side] for side in order], env, args.slice_s, RUN_TIMEOUT_S,
                                     args.quiet_wait)
    found = dict(zip(order, results))
    return {**group, "order": order,
            "runs": {"job": job_result(run_dir, *found["job"]), "bare": bare_result(*found["bare"])}}



def bare_worker(argv: list[str]) -> None:
    """Worker mode: build the pipeline, loop over the prepared prompts, print one JSON result line."""
    threads, overrides = int(argv[0]), argv[1:]
    import torch

    from revprompt.models.text_to_image import build_pipeline  # noqa: F401  (imported before the clock starts)
    from revprompt.prompts.prepared import load_split  # noqa: F401
    from revprompt.launch.config import load_config

    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch uses {torch.get_num_threads()} threads, OMP_NUM_THREADS asked for {threads}")
    start = time.time()  # time.time(): the benchmark counts this process's own turns between these stamps
    cfg = load_config("tiny", overrides)
    resume_collection_as_the_cli()  # where run_stage resumes it, with what the stage's start-up imported by then
    # called as run_stage calls a stage's work: from a fresh chunk of the interpreter's frame stack (launch/process.py)
    result = process.with_frame_room(bare_work, cfg)
    result["clock"] = [start, *result["clock"]]
    print(BARE_MARKER + json.dumps(result), flush=True)
    process.skip_collection_at_exit()  # as the console script does once the stage returned


def bare_work(cfg) -> dict[str, Any]:
    """The bare loop itself: build the pipeline, generate every prepared prompt's image in batches, discard them."""
    import torch

    from revprompt.models.text_to_image import build_pipeline
    from revprompt.prompts.prepared import load_split

    if cfg.run.reuse_host_memory:  # the CLI's allocator setting on a CPU device (run.reuse_host_memory): same on both
        from revprompt.launch.dist import reuse_freed_host_memory

        reuse_freed_host_memory()
    g = cfg.generate
    texts = [p.text for split in g.splits for p in load_split(Path(cfg.run.dir) / "prompts", split)]
    pipe = build_pipeline(g.model, scheduler=g.scheduler, dtype=g.dtype, device="cpu", seed=cfg.run.seed)
    built = time.time()
    stamps: list[tuple[int, float]] = []
    with torch.inference_mode():
        for first in range(0, len(texts), g.batch_size):
            batch = texts[first:first + g.batch_size]
            pipe(prompt=batch, num_inference_steps=g.steps, guidance_scale=g.guidance_scale, height=g.height,
                 width=g.width, generator=[torch.Generator().manual_seed(i) for i in range(first, first + len(batch))],
                 output_type="np")
            stamps.append((first + len(batch), time.time()))
    end = time.time()
    return {"images": len(texts), "clock": [built, end], "stamps": stamps, "pipeline_calls": len(stamps),
            "threads": torch.get_num_threads()}


def describe_pair(pair: dict[str, Any]) -> str:
    """One progress line per pair."""
    other = pair["other_cpu_s"]
    sides = "; ".join(f"{side} {run['wall_s']:6.2f} s of its own ({run['turns']} turns), {run['cpu_s']:6.2f} s CPU, "
                      f"{run['pipeline_calls']} pipeline calls" for side, run in pair["runs"].items())
    return f"{sides}; other processes {'n/a' if other is None else format(other, '.1f')} CPU-s"



def summarise(args: argparse.Namespace, pairs: list[dict[str, Any]], discarded: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians, ratios and the raw runs, as written to the JSON file."""
    import diffusers
    import torch

    job, bare = [p["runs"]["job"] for p in pairs], [p["runs"]["bare"] for p in pairs]
    summary = {
        side: {key: median_of(runs, key) for key in ("wall_s", "cpu_s", "build_generate_s", "steady_images_per_s",
                                                      "loop_host_percent")}
        for side, runs in (("job", job), ("bare", bare))}
    job_wall, bare_wall = summary["job"]["wall_s"], summary["bare"]["wall_s"]
    rounds = [(job[2 * i]["wall_s"] + job[2 * i + 1]["wall_s"]) / (bare[2 * i]["wall_s"] + bare[2 * i + 1]["wall_s"])
              for i in range(len(job) // 2)]
    return {
        "benchmark": "generation_overhead",
        "command": " ".join([Path(sys.executable).name, "benchmarks/generation_overhead.py"] + sys.argv[1:]),
        "timing": ("time of the whole subprocess from spawn to exit (start-up, imports, pipeline build, generation, "
                   "writes), its own turns only: the job and the bare run of a pair take turns of slice_s seconds"),
        "settings": {"preset": "tiny", "prompts": args.prompts, "steps": args.steps, "size": args.size,
                     "batch": args.batch, "shard_size": args.shard_size, "dtype": "fp32", "device": "cpu",
                     "threads": args.threads, "rounds": args.repeats, "slice_s": args.slice_s,
                     "order": "each round: a pair of job and bare taking turns, the job starting, then a pair "
                              "with the bare run starting"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "diffusers": diffusers.__version__, "cpu_count": os.cpu_count(),
                        "machine": platform.machine()},
        "median": summary,
        "ratio_job_over_bare": {
            "wall": ratio(job_wall, bare_wall),
            "cpu": ratio(summary["job"]["cpu_s"], summary["bare"]["cpu_s"]),
            "build_generate": ratio(summary["job"]["build_generate_s"], summary["bare"]["build_generate_s"]),
            # a rate: bare / job is the time ratio
            "steady": ratio(summary["bare"]["steady_images_per_s"], summary["job"]["steady_images_per_s"]),
        },
        # each round's two job runs against its two bare runs (its two pairs)
        "round_wall_ratios": rounds,
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(rounds and max(rounds) <= TARGET_RATIO),
        "disturbed_pairs_kept": sum(p["disturbed"] for p in pairs),
        "runs": {"job": job, "bare": bare},
        "pairs": [{k: v for k, v in p.items() if k != "runs"} for p in pairs],
        "discarded_pairs": discarded,
    }


def print_table(result: dict[str, Any]) -> None:
    """Medians per side and the job / bare ratios."""
    med, rat = result["median"], result["ratio_job_over_bare"]
    rows = [("process time, own turns (s)", "wall_s", ".2f", rat["wall"]),
            ("process CPU time (s)", "cpu_s", ".2f", rat["cpu"]),
            ("build+generate (s)", "build_generate_s", ".2f", rat["build_generate"]),
            ("steady images/s", "steady_images_per_s", ".2f", rat["steady"]),
            ("loop outside the model (%)", "loop_host_percent", ".1f", None)]
    print(f"\n{'median over ' + str(2 * result['settings']['rounds']) + ' runs':<26}{'job':>10}{'bare':>10}"
          f"{'job/bare':>10}")
    for label, key, spec, r in rows:
        print(f"{label:<26}{fmt(med['job'][key], spec):>10}{fmt(med['bare'][key], spec):>10}{fmt(r, '.3f'):>10}")
    print("(steady images/s: the ratio is the time ratio, bare rate / job rate)")
    print(f"disturbed by other processes: {result['disturbed_pairs_kept']} of {len(result['pairs'])} kept pairs, "
          f"{len(result['discarded_pairs'])} pairs discarded and rerun")
    rounds = result["round_wall_ratios"]
    print("time ratio per round (its 2 job runs / its 2 bare runs, own turns): "
          + ", ".join(f"{r:.3f}" for r in rounds))
    verdict = "meets" if result["meets_target"] else "misses"
    print(f"every round job/bare <= {TARGET_RATIO}: {verdict} the target "
          f"(worst round {fmt(max(rounds, default=None), '.3f')}; "
          f"median of all runs {fmt(rat['wall'], '.3f')})")


def main(argv: list[str] | None = None) -> int:
    """Prepare once, then rounds of two job/bare pairs taking turns; print the table and write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_bare":
        process.with_frame_room(bare_worker, argv[1:])  # as the console script calls the CLI (launch/process.py)
        return 0
    args = parse_args(argv)
    from revprompt.models.text_to_image import build_pipeline
    from revprompt.generation.prepare import prepare
    from revprompt.launch.config import load_config

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="revprompt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = subprocess_env(args.threads)
    try:
        prepared = workdir / "prepared"
        claim_run_dir(prepared)  # a revprompt run dir, as `revprompt prepare` would make it
        report = prepare(load_config("tiny", config_overrides(args, prepared)))
        print(f"prepared {report['kept']} prompts {report['splits']} in {prepared}")
        build_pipeline("miniature")  # untimed: warms the page cache for the imports both sides pay
        pairs: list[dict[str, Any]] = []
        discarded: list[dict[str, Any]] = []
        for i in range(args.repeats):
            # a round is two pairs taking turns, the job starting one, the bare run the other
            for half, first in enumerate(("job", "bare")):
                pairs.append(measure(f"round {i + 1}/{args.repeats} pair {half + 1}", args.retries, discarded,
                                     lambda attempt: run_pair(args, first, workdir / f"job-{i}-{half}-{attempt}",
                                                              prepared, env), describe_pair, side="pair"))
        counts = {side: [p["runs"][side]["images"] for p in pairs] for side in ("job", "bare")}
        if set(counts["job"] + counts["bare"]) != {report["kept"]}:
            raise RuntimeError(f"image counts differ: {counts}, prepared {report['kept']}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = summarise(args, pairs, discarded)
    print_table(result)
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
