"""Throughput of `revprompt train` against a bare PyTorch loop over the same tiny captioner, on the CPU.

What is measured
    Both sides train `build_captioner("random-tiny")` (random BLIP, 64 px, hidden 64, 2+2 layers) with the
    same micro batch, the same AdamW parameter groups, lr and weight decay (`build_optimizer` and the
    warm-up + cosine `LambdaLR` of revprompt.training.engine), gradient clipping at train.grad_clip,
    fp32, and the same OMP_NUM_THREADS / MKL_NUM_THREADS (`--threads`, default 2):

    trainer  the real CLI in a subprocess: `revprompt train --config tiny --run.dir=<fresh copy of a
             generated run> --train.max_steps=N --train.val_every=0 --train.val_captions=0
             --train.save_every=<huge> --train.log_every=K --train.zero_stage=S --train.num_workers=W`.
             It streams JPEG shards through its DataLoader (decode, resize, normalise, tokenise),
             steps the DeepSpeed ZeRO-S engine, updates its tqdm bar and logs TensorBoard scalars,
             exactly as a user's run does. The shards come from one `revprompt generate --config tiny
             --prompts.limit=P --generate.steps=2` run made before any timing (image content does
             not change the cost of decoding a 64 px JPEG); each trainer run gets a fresh copy of
             its prompts/ and shards/, so no checkpoint, export or event file of an earlier run is
             there.
    bare     a subprocess of this script (`_bare` mode): builds the same model, optimizer and
             scheduler from the same resolved config, pre-builds its batches in memory (random
             pixels at the captioner's image size + the first P bundled prompts from
             `read_prompts("bundled")`, tokenised with `encode_prompts` in micro batches, so the
             padded lengths follow the same prompt length distribution) and runs N steps of
             forward, backward, clip, `optimizer.step()`, `scheduler.step()`, `zero_grad`,
             `loss.item()`, a timestamp after each step. It treats Python's cycle collector as the
             CLI's console script does (launch/process.py: held during start-up, start-up frozen before
             the model is built, with what the CLI's start-up imports, `_common.resume_collection_as_the_cli`; the
             heap frozen before exit), and runs its worker, then its loop, from a chunk of the interpreter's
             frame stack of their own, as the console script runs the CLI and `run_stage` the stage's work
             (`process.with_frame_room`).
    bare_stream  the same bare loop fed by the trainer's data path instead of memory: `TrainStream`
             + `build_loader` over the same shards, built as `Trainer.stream` builds them, with the
             headline configuration's DataLoader workers. It splits the trainer's overhead in two:
             bare_stream / bare is the cost of streaming, trainer / bare_stream the cost of DeepSpeed
             and the rest of the trainer (tqdm, TensorBoard, position bookkeeping). Skipped with
             `--no-stream-side`.

    How the sides are run: each round starts every side (a trainer run per configuration, bare and
    bare_stream) as `--processes` processes (default 3; see 'Processes per side' below), and the processes
    take turns of `--slice-s` seconds (default 1),
    one running while the others are stopped (SIGSTOP to the process group, DataLoader workers
    included; `_common.run_interleaved`). A small shared VM's speed drifts by +-10 % over tens of
    seconds: run one after the other, identical bare runs ranged 247-281 samples/s within one round,
    and a round's ratio swung with whichever side caught the slow spell. Taking turns, all sides see
    the same spells. Four identical bare loops taking turns, three rounds each, were within 1.8, 0.6 and
    1.1 % of each other (fastest over slowest) with turns of 0.25 s, and 0.8, 1.3 and 2.1 % with turns
    of 1 s: the steady window here is long (300 steps), so the turn length matters less for the drift
    than in the generation benchmark. The side that starts moves one place each round. Tried and dropped:
    each cycle after the first in a seeded random order, so that no side always follows the same other side
    into its turn (in three runs with the fixed order the worst round was the third each time): one run gave
    0.932, 1.009, 0.947, no better, and four identical sides differed by 1.2, 4.6 and 5.6 % with it.

    Why turns of 1 s and not 0.25 s: every turn after the first starts with cold caches, and the step a
    turn resumes in takes longer than one run without a stop. Measured on 2 cores with every side
    stamping each step (a trainer process patched to stamp its steps; ad-hoc drivers, three rounds of
    four sides, turns of 0.25 s), a resume added 3.5-6.9 ms to a bare process's step (1.4-2.8 % of its
    window), and 3.4-10.5 ms to a process that had gone through the trainer's whole start-up (1.4-4.2 %),
    even when that process then ran exactly the bare loop. Between resumes, that bare loop in the trainer's
    process stepped as fast as in a bare process (medians 38.6-38.9 ms against 38.5-39.0 ms). So the
    turns themselves charged the larger process up to 2 % more than the bare one: a cost of being stopped
    four times a second, which no real run has. Turns of 1 s resume a quarter as often.

    Memory pages: every side's malloc takes transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1: glibc
    2.35 and later madvise their heap, where the kernel's THP mode is "madvise"; `--small-pages` leaves it
    out). On a 2-core KVM guest (AMD EPYC, THP "madvise", 4 KiB pages by default), four identical bare loops
    taking turns at 1 s differed by 1.0, 7.9, 5.7, 1.9 and 13.0 % (fastest over slowest) in five rounds, and
    the difference sat in the steps between resumes (medians 109.7 against 124.3 ms in the worst round), not
    in the resumes: where a process's memory landed decided the round, not its code. With huge pages on every
    side the same check gave 2.0 and 2.0 % (steps between resumes within 0.7 and 2.6 %), every side about 5 %
    faster, and `--identical 4 --repeats 3` (that check: rounds of N identical bare sides and nothing else)
    1.7, 0.9 and 2.5 % (benchmarks/results/train_overhead_identical.json).

    Processes per side: a process draws its speed once, at its start. On a 2-vCPU KVM guest (Intel Xeon,
    THP "madvise", huge pages as below), four identical bare loops taking turns, one process each, differed by
    0.7, 4.6 and 1.4 % (fastest over slowest) in three rounds, and in the 4.6 % round two processes ran at
    304-305 samples/s and the other two at 317-318 from end to end: the gap stayed with the process, whatever
    the moment (without address-space randomisation, `setarch -R`, it was 8.0, 4.5 and 2.8 %: not the layout
    of the virtual addresses). One trainer process against one bare process drew that lottery every round.
    So each side runs as K processes, its turns spread over the whole cycle (every side's first process, then
    every side's second, ...), and a side's rate is its processes' window samples over their window time
    together. Six identical loops, three rounds: single processes 3.8, 2.2 and 7.6 % apart, the same six grouped
    in threes 1.1, 0.5 and 1.4 %; `--identical 2 --repeats 3` (two sides of three processes) 2.1, 2.2 and 3.2 %
    (single processes 4.6, 4.1 and 5.3 %), the second side the faster in all three rounds: the identical sides'
    order did not rotate then. It rotates now, as the comparison's does: `--identical 2 --repeats 4` gave 0.3,
    0.6, 0.4 and 0.7 % (single processes 1.9, 1.2, 2.5 and 3.4 %). `--identical N` runs N sides of K processes
    and prints both spreads.

    Primary metric, the same definition on every side: steady samples/s = samples of steps K+1..N /
    the process's own time from the end of step K to the end of step N (its turns in that span; the
    other sides' turns are taken out), with K = train.log_every (`--log-every`). Start-up (imports,
    model build, DeepSpeed initialize, DataLoader worker spawn, the first K steps) and the end of
    training (final validation, checkpoint, export) are excluded. One untimed one-step trainer run goes
    first, so DeepSpeed's CPU comm op is built (if its cache is stale) before any timed run.

    The trainer's step times come from the wall times of its `train/loss` TensorBoard events, one per
    K steps, written right after step K, 2K, ..., N: the same measurement as the bare side's
    timestamps (samples over the time between two step ends). The mean of its own `perf/samples_per_s`
    windows after the first is recorded as `logged_samples_per_s`; its clock includes the other
    sides' turns, so it is a cross-check of the logging only.

    Disturbance: on a small shared machine another process on the cores slows a run several-fold, so
    before each round the script waits (up to `--quiet-wait` s) for the machine to go idle, and after
    it computes `other_cpu_s`: the machine's busy CPU time during the round minus the sides' own
    (their rusage, reaped DataLoader workers included) and this script's. A round where that exceeds
    5 % of a core (at least 0.5 CPU-s) is rerun (up to `--retries` times; discarded rounds stay in
    the JSON; a round still disturbed after the retries is kept and flagged).

    Configurations (`--configs stage:workers,...`, default `2:0,2:1`): the first, the tiny preset's
    ZeRO-2 with the loader in the training process (train.num_workers = 0), is the headline; `2:1`
    shows what one DataLoader worker process costs on this CPU. A round's ratio for a configuration is
    its trainer run's steady samples/s over the round's bare run's; the target (>= 0.95: streaming,
    DeepSpeed and the trainer's own work cost at most 5 %) is met when every round meets it. Also
    reported per round: bare_stream / bare (the streaming cost) and trainer / bare_stream (DeepSpeed
    and the rest of the trainer: tqdm, TensorBoard, position bookkeeping).

    The trainer runs as the preset ships it, with the decoded-sample cache (train.cache_mb) on: after
    the first epoch its loader neither reads the tars nor decodes a JPEG again. Pass `--cache-mb 0`
    to measure the trainer and bare_stream without it.

    Note on the CPU setting: with OMP_NUM_THREADS equal to the core count (2 here) the model's
    threads use every core, so whatever CPU time a DataLoader worker process spends (JPEG decode,
    normalisation, tokenising, handing the batch over) is taken from the model, and the hand-over
    costs the training process too: hence the preset's 0 workers. On a GPU machine the workers run on
    cores the model does not use.

Reproduce (from the repository root; about 15 minutes on 2 idle cores of a fast machine, 45 on a slow one):
    .venv/bin/python benchmarks/train_overhead.py --repeats 3
    .venv/bin/python benchmarks/train_overhead.py --identical 2 --repeats 4   # the machine's noise floor
    .venv/bin/python benchmarks/train_overhead.py --configs 2:0 --repeats 3 --no-stream-side   # headline only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from revprompt.launch import process  # the standard library only

if __name__ == "__main__" and sys.argv[1:2] == ["_bare"]:
    process.hold_collection()  # as the CLI's console script does first, before the imports both sides pay

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (write_results, RESULTS, active_s, fmt, measure, ratio, revprompt_command,  # noqa: E402
                     resume_collection_as_the_cli, run_interleaved, subprocess_env)

from revprompt.launch.layout import RUN_MARKER  # noqa: E402

DEFAULT_OUT = RESULTS / "train_overhead.json"
IDENTICAL_OUT = RESULTS / "train_overhead_identical.json"
BARE_MARKER = "BARE_RESULT "
TARGET_RATIO = 0.95
RUN_TIMEOUT_S = 900  # of a run's own turns


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options; sizes default to the tiny preset's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=320, help="optimizer steps per run (train.max_steps)")
    parser.add_argument("--log-every", type=int, default=20,
                        help="train.log_every; the first this many steps are the excluded warm-up")
    parser.add_argument("--micro-batch", type=int, default=16, help="train.micro_batch_size (preset: 16)")
    parser.add_argument("--prompts", type=int, default=240, help="prompts generated once (train/val/test split)")
    parser.add_argument("--configs", default="2:0,2:1",
                        help="trainer configurations as zero_stage:num_workers, comma-separated; first = headline "
                             "(the tiny preset's: ZeRO-2, the loader in the training process)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds (each: every side as --processes processes, all taking turns)")
    parser.add_argument("--processes", type=int, default=3,
                        help="processes per side per round, all taking turns; a side's rate is its processes' samples "
                             "over their own time together (see 'Processes per side' above). Every process of a round "
                             "is alive until it ends: about 0.7 GB each (a bare one held 0.69 GB resident), 12 with "
                             "the default sides")
    parser.add_argument("--slice-s", type=float, default=1.0,
                        help="seconds a side runs per turn before the next side's turn")
    parser.add_argument("--no-stream-side", dest="stream_side", action="store_false",
                        help="skip the bare_stream side (bare loop over the trainer's streaming loader)")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads on both sides")
    parser.add_argument("--cache-mb", type=int, default=None,
                        help="train.cache_mb of the trainer and bare_stream runs (default: the preset's; 0 = off)")
    parser.add_argument("--small-pages", dest="huge_pages", action="store_false",
                        help="leave malloc on the kernel's default pages instead of transparent huge pages on every "
                             "side (see 'Memory pages' above)")
    parser.add_argument("--identical", type=int, default=0, metavar="N",
                        help="instead of the comparison: rounds of N identical bare sides taking turns, their spread "
                             "(fastest over slowest) per round: how far apart this machine puts equal work")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON results file (default {DEFAULT_OUT}, with --identical {IDENTICAL_OUT})")
    parser.add_argument("--retries", type=int, default=2,
                        help="reruns of a round that other processes disturbed (see other_cpu_s)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each round, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--generated", type=Path, default=None,
                        help="an existing `revprompt generate --config tiny` run dir to train on (skips generate)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep run directories here instead of a deleted temp dir")
    args = parser.parse_args(argv)
    try:
        args.configs = [tuple(int(x) for x in item.split(":")) for item in args.configs.split(",")]
    except ValueError:
        parser.error("--configs: expected stage:workers[,stage:workers...], e.g. 2:0,2:1")
    if any(len(c) != 2 or c[0] not in (0, 1, 2, 3) or c[1] < 0 for c in args.configs):
        parser.error("--configs: stage in 0..3, workers >= 0")
    if args.repeats < 1:
        parser.error("--repeats: need at least 1 round")
    if not 1 <= args.processes <= 8:
        parser.error("--processes: between 1 and 8 per side")
    if not 0.05 <= args.slice_s <= 60:
        parser.error("--slice-s: between 0.05 and 60 seconds")
    if args.identical == 1 or args.identical < 0:
        parser.error("--identical: at least 2 sides to compare")
    if args.out is None:
        args.out = IDENTICAL_OUT if args.identical else DEFAULT_OUT
    if args.steps < 2 * args.log_every:
        parser.error("--steps: need at least two --log-every windows (the first is warm-up)")
    return args


def shared_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The `--section.key=value` overrides of the tiny preset that both sides resolve their config from."""
    return [f"--run.dir={run_dir}", "--run.device=cpu", f"--prompts.limit={args.prompts}",
            f"--train.max_steps={args.steps}", f"--train.log_every={args.log_every}",
            f"--train.micro_batch_size={args.micro_batch}", "--train.val_every=0", "--train.val_captions=0",
            "--train.save_every=1000000000", "--train.precision=fp32", "--generate.steps=2",
            # the bare loop trains the captioner alone: so does the trainer, without the preset's embedding head
            "--train.embedding_head=false"] + ([] if args.cache_mb is None else [f"--train.cache_mb={args.cache_mb}"])


def generate(args: argparse.Namespace, run_dir: Path, env: dict[str, str]) -> None:
    """One untimed `revprompt generate` run: the shards every trainer run reads."""
    cmd = revprompt_command() + ["generate", "--config", "tiny"] + shared_overrides(args, run_dir)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"generate failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    print(f"generated {run_dir} in {time.perf_counter() - start:.1f} s (untimed)", flush=True)


def warm_up(args: argparse.Namespace, generated: Path, run_dir: Path, env: dict[str, str]) -> None:
    """One untimed one-step `revprompt train`: DeepSpeed's CPU comm op gets built (or loaded) and the
    page cache warmed before any timed run, so no timed run (or a kill of one) lands in the op build."""
    fresh_copy(generated, run_dir)
    cmd = (revprompt_command() + ["train", "--config", "tiny"] + shared_overrides(args, run_dir)
           + ["--train.max_steps=1", "--train.log_every=1"])
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"warm-up train failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    print(f"warm-up train run (1 step) in {time.perf_counter() - start:.1f} s (untimed)", flush=True)


OWN_MARKER = ".train_overhead-copy"  # in every run directory fresh_copy makes, so only those are ever removed


def fresh_copy(generated: Path, run_dir: Path) -> None:
    """prompts/, shards/ and config.toml of the generated run; no tb/, logs/, checkpoints/ or captioner/."""
    if (run_dir / OWN_MARKER).is_file():
        shutil.rmtree(run_dir)  # this benchmark's copy, from an earlier invocation with the same --workdir
    elif run_dir.exists():
        raise SystemExit(f"{run_dir} exists and is not a copy this benchmark made: pass another --workdir")
    run_dir.mkdir(parents=True)
    (run_dir / OWN_MARKER).write_text("a copy made by benchmarks/train_overhead.py; it removes it on a rerun\n")
    for name in ("prompts", "shards"):
        shutil.copytree(generated / name, run_dir / name)
    if (generated / "config.toml").is_file():
        shutil.copy2(generated / "config.toml", run_dir / "config.toml")
    # the copy is a revprompt run: its marker comes along, or train refuses shards it did not write
    shutil.copy2(generated / RUN_MARKER, run_dir / RUN_MARKER)


def read_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float, float]]:
    """(step, wall time, value) of one TensorBoard scalar over every event file in `tb_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: dict[int, tuple[int, float, float]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            events.update({e.step: (e.step, e.wall_time, e.value) for e in acc.Scalars(tag)})
    return [events[s] for s in sorted(events)]


def steady(stamps: list[tuple[int, float]], warmup_steps: int, samples_per_step: int,
           turns: list[tuple[float, float]]) -> dict[str, Any]:
    """Samples/s between the end of step `warmup_steps` and the last (step, time) stamp, over the time the process
    was let run in that window (its `turns`: the other sides' turns do not count)."""
    after = [(s, t) for s, t in stamps if s >= warmup_steps]
    if len(after) < 2 or after[0][0] != warmup_steps:
        return {"steady_samples_per_s": None, "window_s": None}
    (s0, t0), (s1, t1) = after[0], after[-1]
    seconds = active_s(turns, t0, t1)
    return {"steady_samples_per_s": (s1 - s0) * samples_per_step / seconds if seconds > 0 else None,
            "window_s": seconds, "window_steps": s1 - s0, "window_turns": sum(1 for a, b in turns if b > t0 and a < t1)}


def trainer_command(args: argparse.Namespace, stage: int, workers: int, generated: Path, run_dir: Path) -> list[str]:
    """`revprompt train` on a fresh copy of the generated run."""
    fresh_copy(generated, run_dir)
    return (revprompt_command() + ["train", "--config", "tiny"] + shared_overrides(args, run_dir)
            + [f"--train.zero_stage={stage}", f"--train.num_workers={workers}"])


def trainer_result(args: argparse.Namespace, stage: int, workers: int, run_dir: Path,
                   proc: subprocess.CompletedProcess, timing: dict[str, Any]) -> dict[str, Any]:
    """A trainer run's record: its steps from the TensorBoard events of its run dir, timed over its own turns."""
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed ({proc.returncode}): {' '.join(proc.args)}\n{proc.stderr[-4000:]}")
    tb = run_dir / "tb" / "train"
    losses = read_scalars(tb, "train/loss")
    rates = [v for s, _, v in read_scalars(tb, "perf/samples_per_s") if s > args.log_every]
    log_text = (run_dir / "logs" / "rank-0.log").read_text(encoding="utf-8")
    run = {"config": f"zero{stage}/workers{workers}", "zero_stage": stage, "num_workers": workers,
           "steps": losses[-1][0] if losses else 0, "final_loss": losses[-1][2] if losses else None,
           # its own clock, which the other sides' turns inflate: a cross-check only
           "logged_samples_per_s": statistics.fmean(rates) if rates else None,
           "resumed": "resumed from" in log_text,
           **steady([(s, t) for s, t, _ in losses], args.log_every, args.micro_batch, timing["turns"]),
           "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"], "turns": len(timing["turns"])}
    if run["steps"] != args.steps or run["resumed"]:
        raise RuntimeError(f"{run_dir}: trainer logged up to step {run['steps']} (expected {args.steps}, "
                           f"resumed={run['resumed']})")
    return run


def bare_command(args: argparse.Namespace, generated: Path, source: str) -> list[str]:
    """This script's worker mode over in-memory batches (`memory`) or the streaming loader (`stream`)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_bare", str(args.threads), source]
    cmd += shared_overrides(args, generated)
    if source == "stream":
        cmd.append(f"--train.num_workers={args.configs[0][1]}")
    return cmd


def bare_result(args: argparse.Namespace, source: str, proc: subprocess.CompletedProcess,
                timing: dict[str, Any]) -> dict[str, Any]:
    """A bare run's record: its result line, timed over its own turns."""
    if proc.returncode != 0:
        raise RuntimeError(f"bare loop failed ({proc.returncode}): {' '.join(proc.args)}\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(BARE_MARKER)]
    if not lines:
        raise RuntimeError(f"bare loop printed no result line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1][len(BARE_MARKER):])
    stamps = [tuple(x) for x in result.pop("stamps")]
    for key in ("build_s", "loop_s"):  # timed inside the worker, with the other sides' turns in them
        result.pop(key, None)
    return {"config": "bare" if source == "memory" else "bare_stream", **result,
            **steady(stamps, args.log_every, args.micro_batch, timing["turns"]),
            "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"], "turns": len(timing["turns"])}


def sides_of(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(name, zero stage, workers) of every side a round runs: the trainer configurations, bare, bare_stream."""
    sides = [(name, stage, workers) for (stage, workers), name in zip(args.configs, config_names(args))]
    sides.append(("bare", -1, 0))
    if args.stream_side:
        sides.append(("bare_stream", -1, args.configs[0][1]))
    return sides


def combine(name: str, processes: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's record from its processes' records: steady samples/s = their window samples over their window
    time together (each process's own turns); wall and CPU time summed; each process's record kept."""
    windows = [p for p in processes if p.get("steady_samples_per_s") is not None]
    seconds = sum(p["window_s"] for p in windows)
    samples = sum(p["steady_samples_per_s"] * p["window_s"] for p in windows)
    complete = len(windows) == len(processes) and seconds > 0
    return {"config": name, "steady_samples_per_s": samples / seconds if complete else None,
            "window_s": seconds if complete else None,
            "window_steps": sum(p["window_steps"] for p in windows) if complete else None,
            "window_turns": sum(p["window_turns"] for p in windows) if complete else None,
            "wall_s": sum(p["wall_s"] for p in processes), "cpu_s": sum(p["cpu_s"] for p in processes),
            "final_losses": [p["final_loss"] for p in processes],
            "process_samples_per_s": [p.get("steady_samples_per_s") for p in processes], "processes": processes}


def rotated(items: list, index: int) -> list:
    """`items` with the first moved `index` places on (round `index`'s order), so that no side always starts first."""
    shift = index % len(items)
    return items[shift:] + items[:shift]


def slots_of(sides: list, processes: int) -> list[tuple[Any, int]]:
    """(side, process index) in the order the processes take turns: every side's first process, then every side's
    second, ..., so that each side's processes are spread over the whole cycle."""
    return [(side, k) for k in range(processes) for side in sides]


def run_round(args: argparse.Namespace, index: int, attempt: int, generated: Path, workdir: Path,
              env: dict[str, str]) -> dict[str, Any]:
    """One round: every side as `--processes` processes, all taking turns of `--slice-s` seconds (see
    `run_interleaved`); the first side moves one place each round, so no side always starts first."""
    sides = rotated(sides_of(args), index)
    slots = slots_of(sides, args.processes)
    cmds, dirs = [], {}
    for (name, stage, workers), k in slots:
        if stage >= 0:
            dirs[name, k] = workdir / f"train-{index}-{attempt}-{stage}-{workers}-{k}"
            cmds.append(trainer_command(args, stage, workers, generated, dirs[name, k]))
        else:
            cmds.append(bare_command(args, generated, "memory" if name == "bare" else "stream"))
    results, group = run_interleaved(cmds, env, args.slice_s, RUN_TIMEOUT_S, args.quiet_wait)
    processes: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in sides}
    for ((name, stage, workers), k), (proc, timing) in zip(slots, results):
        if stage >= 0:
            processes[name].append(trainer_result(args, stage, workers, dirs[name, k], proc, timing))
        else:
            processes[name].append(bare_result(args, "memory" if name == "bare" else "stream", proc, timing))
    return {**group, "order": [name for name, _, _ in sides],
            "runs": {name: combine(name, found) for name, found in processes.items()}}


def bare_worker(argv: list[str]) -> None:
    """Worker mode: the same model, optimizer and schedule; in-memory batches (`memory`) or the trainer's
    streaming loader over the generated shards (`stream`); print one JSON result line."""
    threads, source, overrides = int(argv[0]), argv[1], argv[2:]
    import torch

    from revprompt.launch.config import load_config
    # imported before the clock starts, as before the trainer's; used in bare_work
    from revprompt.models.captioner import build_captioner  # noqa: F401
    from revprompt.prompts.sources import read_prompts  # noqa: F401
    from revprompt.training.engine import build_optimizer  # noqa: F401

    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch uses {torch.get_num_threads()} threads, OMP_NUM_THREADS asked for {threads}")
    start = time.perf_counter()
    cfg = load_config("tiny", overrides)
    resume_collection_as_the_cli()  # where run_stage resumes it, with what the stage's start-up imported by then
    # called as run_stage calls a stage's work: from a fresh chunk of the interpreter's frame stack (launch/process.py)
    result = process.with_frame_room(bare_work, cfg, source, start)
    print(BARE_MARKER + json.dumps(result), flush=True)
    process.skip_collection_at_exit()  # as the console script does once the stage returned


def bare_work(cfg, source: str, start: float) -> dict[str, Any]:
    """The bare loop itself: build, feed (`memory` or `stream`), train train.max_steps steps; the result's fields."""
    import itertools

    import torch

    from revprompt.prompts.sources import read_prompts
    from revprompt.models.captioner import TrainingInputs, build_captioner, encode_prompts, image_size_of
    from revprompt.training.engine import build_optimizer, lr_lambda

    if cfg.run.reuse_host_memory:  # the CLI's allocator setting on a CPU device (run.reuse_host_memory): same on both
        from revprompt.launch.dist import reuse_freed_host_memory

        reuse_freed_host_memory()
    t = cfg.train
    model, processor = build_captioner(t.captioner, cfg.run.seed)
    model.config.text_config.label_smoothing = t.label_smoothing
    model.text_decoder.label_smoothing = t.label_smoothing
    model.train()
    optimizer = build_optimizer(model, t, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
    params = [p for p in model.parameters() if p.requires_grad]

    size, mb = image_size_of(model), t.micro_batch_size
    batches = []
    if source == "stream":
        # the trainer's data path without the trainer: TrainStream + build_loader, as Trainer.stream builds them
        from revprompt.training.data import TrainStream, build_loader
        from revprompt.training.loop import split_shards

        stream = TrainStream(split_shards(Path(cfg.run.dir) / "shards", "train"), seed=cfg.run.seed, rank=0,
                             world_size=1, num_workers=t.num_workers, batch_size=mb,
                             encode=TrainingInputs(model, processor, t.max_length), shuffle_buffer=t.shuffle_buffer,
                             cache_bytes=t.cache_mb << 20)
        feed = iter(build_loader(stream, t.num_workers, pin_memory=False))
    else:
        prompts = [p.text for p in read_prompts(cfg.prompts.path) if p.text][:cfg.prompts.limit]
        generator = torch.Generator().manual_seed(cfg.run.seed)
        for first in range(0, len(prompts) - mb + 1, mb):
            text = encode_prompts(processor.tokenizer, prompts[first:first + mb], t.max_length)
            batches.append({"pixel_values": torch.randn(mb, 3, size, size, generator=generator),
                            "input_ids": text.input_ids, "attention_mask": text.attention_mask,
                            "labels": text.labels})
        feed = itertools.cycle(batches)
    built = time.perf_counter()

    stamps: list[tuple[int, float]] = []
    losses = []
    seq_lens = []
    for step in range(1, t.max_steps + 1):
        batch = next(feed)
        seq_lens.append(batch["input_ids"].shape[1])
        loss = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        stamps.append((step, time.time()))
    end = time.perf_counter()
    return {"source": source, "steps": t.max_steps, "batches_in_memory": len(batches), "final_loss": losses[-1],
            "num_workers": t.num_workers if source == "stream" else None, "mean_seq_len": statistics.fmean(seq_lens),
            "build_s": built - start, "loop_s": end - built, "threads": torch.get_num_threads(), "stamps": stamps}


def spread_of(rates: list[float | None]) -> float | None:
    """Fastest over slowest, minus one; None when a rate is missing."""
    return max(rates) / min(rates) - 1 if rates and None not in rates else None


def percent(fraction: float | None) -> str:
    """A spread as a percentage with one decimal ('-' when missing)."""
    return fmt(None if fraction is None else 100 * fraction, ".1f")


def run_identical_round(args: argparse.Namespace, index: int, generated: Path, env: dict[str, str]) -> dict[str, Any]:
    """One round of `--identical` N bare sides (data in memory), each as `--processes` processes, all taking turns;
    the sides' rates (in side order) and spread, and the spread of the single processes. The first side moves one
    place each round, as in the comparison."""
    order = rotated(list(range(args.identical)), index)
    slots = slots_of(order, args.processes)
    cmds = [bare_command(args, generated, "memory") for _ in slots]
    results, group = run_interleaved(cmds, env, args.slice_s, RUN_TIMEOUT_S, args.quiet_wait)
    processes: list[list[dict[str, Any]]] = [[] for _ in range(args.identical)]
    for (side, _), (proc, timing) in zip(slots, results):
        processes[side].append(bare_result(args, "memory", proc, timing))
    runs = [combine("bare", found) for found in processes]
    singles = [rate for run in runs for rate in run["process_samples_per_s"]]
    return {**group, "order": order, "runs": runs, "spread": spread_of([r["steady_samples_per_s"] for r in runs]),
            "process_spread": spread_of(singles)}


def describe_identical(group: dict[str, Any]) -> str:
    """A progress line for one `--identical` round."""
    rates = ", ".join(fmt(r["steady_samples_per_s"], ".2f") for r in group["runs"])
    singles = "" if len(group["runs"][0]["processes"]) == 1 else \
        f" (single processes: spread {percent(group['process_spread'])} %)"
    return (f"{group['wall_s']:.0f} s, others {fmt(group.get('other_cpu_s'), '.2f')} CPU-s: {rates} samples/s, "
            f"spread {percent(group['spread'])} %{singles}")


def rounds(args: argparse.Namespace, run: Callable[[int, int], dict[str, Any]],
           describe: Callable[[dict[str, Any]], str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`--repeats` rounds, `run(index, attempt)` each, a disturbed one rerun up to `--retries` times (`measure`);
    the kept rounds and the discarded ones."""
    groups: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    for i in range(args.repeats):
        groups.append(measure(f"round {i + 1}/{args.repeats}", args.retries, discarded,
                              lambda attempt, i=i: run(i, attempt), describe, side="round"))
    return groups, discarded


def identical(args: argparse.Namespace, generated: Path, env: dict[str, str]) -> dict[str, Any]:
    """`--identical`: rounds of identical bare sides; the JSON's record."""
    groups, discarded = rounds(args, lambda i, attempt: run_identical_round(args, i, generated, env),
                               describe_identical)
    spreads = [g["spread"] for g in groups]
    print("spread of identical bare sides per round: "
          + ", ".join(percent(s) + " %" for s in spreads))
    return {"benchmark": "train_overhead --identical",
            "command": " ".join([Path(sys.executable).name, "benchmarks/train_overhead.py"] + sys.argv[1:]),
            "settings": {"sides": args.identical, "processes_per_side": args.processes, "steps": args.steps,
                         "log_every": args.log_every,
                         "micro_batch": args.micro_batch, "threads": args.threads, "slice_s": args.slice_s,
                         "glibc_tunables": env.get("GLIBC_TUNABLES")},
            "round_spreads": spreads, "round_process_spreads": [g["process_spread"] for g in groups],
            "disturbed_rounds_kept": sum(g["disturbed"] for g in groups),
            "rounds": groups, "discarded_rounds": discarded}


def describe_round(group: dict[str, Any]) -> str:
    """Progress lines for one round: each side's steady rate, then the machine."""
    out = []
    for name in group["order"]:
        run = group["runs"][name]
        singles = ", ".join(fmt(r, ".1f") for r in run["process_samples_per_s"])
        out.append(f"\n  {name:<17} steady {fmt(run.get('steady_samples_per_s'), '7.2f')} samples/s over "
                   f"{fmt(run.get('window_s'), '.1f')} s of its own ({run.get('window_turns')} turns; processes "
                   f"{singles}), processes {run['wall_s']:6.1f} s / {run['cpu_s']:6.1f} s CPU")
    return (f"{group['wall_s']:.0f} s, others {fmt(group.get('other_cpu_s'), '.2f')} CPU-s, "
            f"order {', '.join(group['order'])}" + "".join(out))


def config_names(args: argparse.Namespace) -> list[str]:
    """zero{S}/workers{W} labels, headline first."""
    return [f"zero{s}/workers{w}" for s, w in args.configs]


def summarise(args: argparse.Namespace, groups: list[dict[str, Any]],
              discarded: list[dict[str, Any]], env: dict[str, str]) -> dict[str, Any]:
    """Per-round ratios, medians and the raw rounds, as written to the JSON file."""
    import deepspeed
    import torch
    import transformers

    def rate(group: dict[str, Any], name: str) -> float | None:
        return group["runs"][name].get("steady_samples_per_s") if name in group["runs"] else None

    def median_rate(name: str) -> float | None:
        values = [rate(g, name) for g in groups if rate(g, name) is not None]
        return statistics.median(values) if values else None

    bare_rate, stream_rate = median_rate("bare"), median_rate("bare_stream")
    configs = {}
    for name in config_names(args):
        rounds = [ratio(rate(g, name), rate(g, "bare")) for g in groups]
        configs[name] = {
            "median_steady_samples_per_s": median_rate(name),
            # each round's trainer run against its bare run, the two taking turns
            "round_ratios": rounds,
            "meets_target": bool(rounds and None not in rounds and min(rounds) >= TARGET_RATIO),
            "ratio_of_medians": ratio(median_rate(name), bare_rate),
            # the streaming cost taken out: DeepSpeed and the trainer's own work
            "round_ratios_over_bare_stream": [ratio(rate(g, name), rate(g, "bare_stream")) for g in groups]
            if args.stream_side else None,
        }
    return {
        "benchmark": "train_overhead",
        "command": " ".join([Path(sys.executable).name, "benchmarks/train_overhead.py"] + sys.argv[1:]),
        "metric": ("steady samples/s = samples of steps K+1..N / the process's own time (its turns) from the end of "
                   "step K to the end of step N (K = log_every); trainer: wall times of its train/loss TensorBoard "
                   "events"),
        "settings": {"preset": "tiny", "steps": args.steps, "log_every": args.log_every,
                     "micro_batch": args.micro_batch, "prompts": args.prompts, "threads": args.threads,
                     "cache_mb": args.cache_mb, "precision": "fp32", "device": "cpu", "rounds": args.repeats,
                     "slice_s": args.slice_s, "processes_per_side": args.processes, "configs": config_names(args),
                     "glibc_tunables": env.get("GLIBC_TUNABLES"),
                     "bare_stream_workers": args.configs[0][1] if args.stream_side else None,
                     "order": "per round every side as processes_per_side processes (every side's first, then "
                              "every side's second, ...), all taking turns of slice_s seconds; the first side moves "
                              "one place each round"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                        "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "bare_median_steady_samples_per_s": bare_rate,
        "bare_stream_median_steady_samples_per_s": stream_rate,
        # the bare loop fed by the trainer's streaming loader, against in-memory batches: the streaming cost
        "round_ratios_bare_stream_over_bare": [ratio(rate(g, "bare_stream"), rate(g, "bare")) for g in groups]
        if args.stream_side else None,
        "configs": configs,
        "headline": config_names(args)[0],
        "target_ratio": TARGET_RATIO,
        "disturbed_rounds_kept": sum(g["disturbed"] for g in groups),
        "rounds": groups,
        "discarded_rounds": discarded,
    }


def print_table(result: dict[str, Any]) -> None:
    """Per configuration: the per-round ratios against bare, and the streaming attribution."""
    print(f"\nbare loop, data in memory: median {fmt(result['bare_median_steady_samples_per_s'], '.2f')} samples/s")
    print(f"{'trainer':<20}{'median samples/s':>17}  per-round ratio to bare (target >= {TARGET_RATIO})")
    for name, c in result["configs"].items():
        print(f"{name:<20}{fmt(c['median_steady_samples_per_s'], '.2f'):>17}  "
              + ", ".join(fmt(r, ".3f") for r in c["round_ratios"]))
    if result["round_ratios_bare_stream_over_bare"] is not None:
        workers = result["settings"]["bare_stream_workers"]
        print(f"bare loop over the streaming loader ({workers} worker(s)) / bare, per round: "
              + ", ".join(fmt(r, ".3f") for r in result["round_ratios_bare_stream_over_bare"])
              + " (the streaming cost)")
        for name, c in result["configs"].items():
            print(f"{name} / that, per round: " + ", ".join(fmt(r, ".3f") for r in c["round_ratios_over_bare_stream"])
                  + " (DeepSpeed + the trainer's own work)")
    print(f"disturbed by other processes: {result['disturbed_rounds_kept']} of {len(result['rounds'])} kept rounds, "
          f"{len(result['discarded_rounds'])} rounds discarded and rerun")
    head = result["configs"][result["headline"]]
    verdict = "meets" if head["meets_target"] else "misses"
    worst = min((r for r in head["round_ratios"] if r is not None), default=None)
    print(f"{result['headline']}: trainer/bare in every round >= {TARGET_RATIO}: {verdict} the target (worst round "
          f"{fmt(worst, '.3f')})")


def main(argv: list[str] | None = None) -> int:
    """Generate once, then rounds of every side taking turns; table and JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_bare":
        process.with_frame_room(bare_worker, argv[1:])  # as the console script calls the CLI (launch/process.py)
        return 0
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="revprompt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = subprocess_env(args.threads, huge_pages=args.huge_pages)
    try:
        generated = args.generated
        if generated is None:
            generated = workdir / "generated"
            if not (generated / "shards" / "manifest.json").is_file():
                generate(args, generated, env)
        if args.identical:
            write_results(identical(args, generated, env), args.out)
            return 0
        warm_up(args, generated, workdir / "warm-up", env)
        groups, discarded = rounds(args, lambda i, attempt: run_round(args, i, attempt, generated, workdir, env),
                                   describe_round)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = summarise(args, groups, discarded, env)
    print_table(result)
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
