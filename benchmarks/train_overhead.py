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
             `loss.item()`, a timestamp after each step.
    bare_stream  the same bare loop fed by the trainer's data path instead of memory: `TrainStream`
             + `build_loader` over the same shards, built as `Trainer.stream` builds them, with the
             headline configuration's DataLoader workers. It splits the trainer's overhead in two:
             bare_stream / bare is the cost of streaming, trainer / bare_stream the cost of DeepSpeed
             and the rest of the trainer (tqdm, TensorBoard, position bookkeeping). Skipped with
             `--no-stream-side`.

    Primary metric, the same definition on both sides: steady samples/s = samples of steps K+1..N
    / time from the end of step K to the end of step N, with K = train.log_every (`--log-every`).
    Start-up (imports, model build, DeepSpeed initialize, DataLoader worker spawn, the first K
    steps) and the end of training (final validation, checkpoint, export) are excluded. One
    untimed one-step trainer run goes first, so DeepSpeed's CPU comm op is built (if its cache is
    stale) before any timed run.

    The trainer's step times come from the wall times of its `train/loss` TensorBoard events, one per
    K steps, written right after step K, 2K, ..., N. That is chosen over averaging its
    `perf/samples_per_s` scalars because (a) it is exactly the same measurement as the bare side's
    (samples over elapsed time between two step ends), (b) a mean of per-window rates would weight
    windows by count, not by time, and (c) it does not depend on where the trainer starts its
    window clock. The mean of the `perf/samples_per_s` windows after the first is still recorded
    as a cross-check (`logged_samples_per_s`).

    Disturbance: on a small shared machine another process on the cores slows a run several-fold, so
    before each run the script waits (up to `--quiet-wait` s) for the machine to go idle, samples
    /proc/stat and the child's process tree (DataLoader worker included) twice a second while it
    runs, and computes `other_cpu_s`: the CPU time processes outside the child's tree used *during
    the steady window*. A run where that exceeds 5 % of a core (at least 0.5 CPU-s) is rerun (up to
    `--retries` times; discarded runs stay in the JSON; a run still disturbed after the retries is
    kept and flagged; a run that is not the last try is stopped as soon as other processes have
    used a third of a core for 5 s, once the trainer is past its start-up). So is a run during
    whose window the machine was more than 0.15 cores short of `--threads` busy cores
    (`window_busy_cores`): both sides keep every core busy while they compute (OpenMP threads
    spin between parallel regions), so idle cores mean the virtual machine's host
    did not run our threads, a slowdown that shows up in /proc/stat as idle time, not as other
    processes' time. Even undisturbed, step times on a small shared VM drift by +-10 % between
    processes, hence the alternation, the medians and the per-round ratios.

    Configurations (`--configs stage:workers,...`, default `2:1,0:1`; the first, ZeRO-2 with the
    preset's one DataLoader worker, is the headline; `2:0` adds the loader in the training
    process). Each round runs one trainer run per configuration, two bare runs, one trainer run per
    configuration in reverse order (so a drift of the machine's speed over the round weighs on both
    sides alike), then one bare_stream run; rounds repeat `--repeats` times (default 3). A round's
    ratio is the mean steady samples/s of its trainer runs of a configuration over the mean of its
    two bare runs; the target (>= 0.95: streaming, DeepSpeed and the trainer's own work cost at most
    5 %) is met when every round meets it. Also reported per configuration: the median steady
    samples/s of its trainer runs, the median of all bare runs and their ratio, and the streaming /
    DeepSpeed split described above.

    The trainer runs as the preset ships it, with the decoded-sample cache (train.cache_mb) on: after
    the first epoch its DataLoader worker neither reads the tars nor decodes a JPEG again. Pass
    `--cache-mb 0` to measure the trainer and bare_stream without it.

    Note on the CPU setting: with OMP_NUM_THREADS equal to the core count (2 here) the model's
    threads use every core, so whatever CPU time the DataLoader worker spends (JPEG decode,
    normalisation, tokenising, handing the batch over) is taken from the model; on a GPU machine
    the workers run on cores the model does not use.

Reproduce (from the repository root; about 6 minutes on 2 idle cores, more while others use them):
    .venv/bin/python benchmarks/train_overhead.py
    .venv/bin/python benchmarks/train_overhead.py --configs 2:1 --repeats 3 --no-stream-side   # headline only
    .venv/bin/python benchmarks/train_overhead.py --configs 2:1,0:1,2:0                       # + loader in-process
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (write_results, RESULTS, fmt, is_disturbed, measure, median_of, ratio, revprompt_command,  # noqa: E402
                     subprocess_env, timed_run)

from revprompt.launch.layout import RUN_MARKER  # noqa: E402

DEFAULT_OUT = RESULTS / "train_overhead.json"
BARE_MARKER = "BARE_RESULT "
TARGET_RATIO = 0.95
RUN_TIMEOUT_S = 900
# a steady window during which the machine was this many cores short of busy counts as disturbed
STARVED_CORES = 0.15
# a run (not the last try) is stopped early when other processes used more than this many cores
# over the last ABORT_WINDOW_S seconds: it would be discarded anyway, at a fraction of its speed
ABORT_OTHER_CORES = 0.3
ABORT_WINDOW_S = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options; sizes default to the tiny preset's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps per run (train.max_steps)")
    parser.add_argument("--log-every", type=int, default=20,
                        help="train.log_every; the first this many steps are the excluded warm-up")
    parser.add_argument("--micro-batch", type=int, default=16, help="train.micro_batch_size (preset: 16)")
    parser.add_argument("--prompts", type=int, default=240, help="prompts generated once (train/val/test split)")
    parser.add_argument("--configs", default="2:1,0:1",
                        help="trainer configurations as zero_stage:num_workers, comma-separated; first = headline "
                             "(add 2:0 for the loader in the training process)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds (each: a run per config, bare, bare, a run per config in reverse)")
    parser.add_argument("--no-stream-side", dest="stream_side", action="store_false",
                        help="skip the bare_stream side (bare loop over the trainer's streaming loader)")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads on both sides")
    parser.add_argument("--cache-mb", type=int, default=None,
                        help="train.cache_mb of the trainer and bare_stream runs (default: the preset's; 0 = off)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--retries", type=int, default=2,
                        help="reruns of a run that other processes disturbed (see other_cpu_s)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each run, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--generated", type=Path, default=None,
                        help="an existing `revprompt generate --config tiny` run dir to train on (skips generate)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep run directories here instead of a deleted temp dir")
    args = parser.parse_args(argv)
    try:
        args.configs = [tuple(int(x) for x in item.split(":")) for item in args.configs.split(",")]
    except ValueError:
        parser.error("--configs: expected stage:workers[,stage:workers...], e.g. 2:1,0:1")
    if any(len(c) != 2 or c[0] not in (0, 1, 2, 3) or c[1] < 0 for c in args.configs):
        parser.error("--configs: stage in 0..3, workers >= 0")
    if args.repeats < 1:
        parser.error("--repeats: need at least 1 round")
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


def fresh_copy(generated: Path, run_dir: Path) -> None:
    """prompts/, shards/ and config.toml of the generated run; no tb/, logs/, checkpoints/ or captioner/."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run dir of an earlier invocation with the same --workdir
    run_dir.mkdir(parents=True)
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


def steady(stamps: list[tuple[int, float]], warmup_steps: int, samples_per_step: int) -> dict[str, Any]:
    """Samples/s between the end of step `warmup_steps` and the last (step, time) stamp."""
    after = [(s, t) for s, t in stamps if s >= warmup_steps]
    if len(after) < 2 or after[0][0] != warmup_steps:
        return {"steady_samples_per_s": None, "window": None}
    (s0, t0), (s1, t1) = after[0], after[-1]
    return {"steady_samples_per_s": (s1 - s0) * samples_per_step / (t1 - t0) if t1 > t0 else None,
            "window": (t0, t1), "window_s": t1 - t0, "window_steps": s1 - s0}


def finish(run: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """Merge the timing, and the disturbance during the steady window alone (from the CPU monitor)."""
    monitor = timing.pop("_monitor", None)
    window = run.pop("window", None)
    run.update(timing)
    run["window_other_cpu_s"] = monitor.other_cpu_s(*window) if monitor is not None and window else None
    run["window_busy_cores"] = monitor.busy_cores(*window) if monitor is not None and window else None
    run["window_own_cores"] = (monitor.tree_cpu_s(*window) / (window[1] - window[0])
                               if monitor is not None and window and monitor.tree_cpu_s(*window) is not None else None)
    return run


def busy_now(monitor) -> bool:
    """Other processes have been using the cores for the last few seconds: the run is disturbed."""
    recent = monitor.recent_other_cores(ABORT_WINDOW_S)
    return recent is not None and recent > ABORT_OTHER_CORES


def aborted_run(config: str, timing: dict[str, Any]) -> dict[str, Any]:
    """The record of a run stopped early because other processes were using the cores."""
    timing.pop("_monitor", None)
    return {"config": config, "steady_samples_per_s": None, **timing}


def run_trainer(args: argparse.Namespace, stage: int, workers: int, generated: Path, run_dir: Path,
                env: dict[str, str], allow_abort: bool) -> dict[str, Any]:
    """One `revprompt train` process on a fresh copy of the generated run."""
    fresh_copy(generated, run_dir)
    cmd = (revprompt_command() + ["train", "--config", "tiny"] + shared_overrides(args, run_dir)
           + [f"--train.zero_stage={stage}", f"--train.num_workers={workers}"])
    log_path = run_dir / "logs" / "rank-0.log"

    def abort(monitor) -> bool:
        # only once training runs: DeepSpeed may be compiling its CPU comm op before (never stop that)
        return (busy_now(monitor) and log_path.is_file()
                and "training from step" in log_path.read_text(encoding="utf-8", errors="replace"))

    called = time.time()
    proc, timing = timed_run(cmd, env, args.quiet_wait, monitor=True, timeout_s=RUN_TIMEOUT_S,
                             abort=abort if allow_abort else None)
    if timing.get("aborted"):
        return aborted_run(f"zero{stage}/workers{workers}", timing)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    tb = run_dir / "tb" / "train"
    losses = read_scalars(tb, "train/loss")
    rates = [v for s, _, v in read_scalars(tb, "perf/samples_per_s") if s > args.log_every]
    log_text = (run_dir / "logs" / "rank-0.log").read_text(encoding="utf-8")
    run = {"config": f"zero{stage}/workers{workers}", "zero_stage": stage, "num_workers": workers,
           "steps": losses[-1][0] if losses else 0, "final_loss": losses[-1][2] if losses else None,
           "logged_samples_per_s": statistics.fmean(rates) if rates else None,
           "resumed": "resumed from" in log_text,
           # process start (after the quiet wait) to the end of step K: start-up + the warm-up steps
           "to_first_window_s": losses[0][1] - called - timing["quiet_wait_s"] if losses else None,
           **steady([(s, t) for s, t, _ in losses], args.log_every, args.micro_batch)}
    if run["steps"] != args.steps or run["resumed"]:
        raise RuntimeError(f"{run_dir}: trainer logged up to step {run['steps']} (expected {args.steps}, "
                           f"resumed={run['resumed']})")
    return finish(run, timing)


def run_bare(args: argparse.Namespace, generated: Path, env: dict[str, str], allow_abort: bool,
             source: str = "memory") -> dict[str, Any]:
    """One bare-loop process (this script's worker mode) over in-memory batches or the streaming loader."""
    name = "bare" if source == "memory" else "bare_stream"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_bare", str(args.threads), source]
    cmd += shared_overrides(args, generated)
    if source == "stream":
        cmd.append(f"--train.num_workers={args.configs[0][1]}")
    proc, timing = timed_run(cmd, env, args.quiet_wait, monitor=True, timeout_s=RUN_TIMEOUT_S,
                             abort=busy_now if allow_abort else None)
    if timing.get("aborted"):
        return aborted_run(name, timing)
    if proc.returncode != 0:
        raise RuntimeError(f"bare loop failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(BARE_MARKER)]
    if not lines:
        raise RuntimeError(f"bare loop printed no result line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1][len(BARE_MARKER):])
    stamps = [tuple(x) for x in result.pop("stamps")]
    run = {"config": name, **result, **steady(stamps, args.log_every, args.micro_batch)}
    return finish(run, timing)


def bare_worker(argv: list[str]) -> None:
    """Worker mode: the same model, optimizer and schedule; in-memory batches (`memory`) or the trainer's
    streaming loader over the generated shards (`stream`); print one JSON result line."""
    threads, source, overrides = int(argv[0]), argv[1], argv[2:]
    import itertools

    import torch

    from revprompt.prompts.sources import read_prompts
    from revprompt.launch.config import load_config
    from revprompt.models.captioner import TrainingInputs, build_captioner, encode_prompts, image_size_of
    from revprompt.training.engine import build_optimizer, lr_lambda

    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch uses {torch.get_num_threads()} threads, OMP_NUM_THREADS asked for {threads}")
    start = time.perf_counter()
    cfg = load_config("tiny", overrides)
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
    print(BARE_MARKER + json.dumps({
        "source": source, "steps": t.max_steps, "batches_in_memory": len(batches), "final_loss": losses[-1],
        "num_workers": t.num_workers if source == "stream" else None, "mean_seq_len": statistics.fmean(seq_lens),
        "build_s": built - start, "loop_s": end - built, "threads": torch.get_num_threads(),
        "stamps": stamps}), flush=True)


def starved(run: dict[str, Any], threads: int) -> bool:
    """The machine was markedly less busy than `threads` cores during the window: the host did not run us."""
    busy = run.get("window_busy_cores")
    return busy is not None and busy < min(threads, os.cpu_count() or threads) - STARVED_CORES


def window_disturbed(run: dict[str, Any], threads: int) -> bool:
    """Disturbed during the steady window (falls back to the whole run when the window is unknown):
    other processes used the cores, or the cores sat idle while our threads wanted them."""
    if run.get("aborted"):
        return True
    if run.get("window_other_cpu_s") is not None and run.get("window_s"):
        return is_disturbed(run, "window_other_cpu_s", "window_s") or starved(run, threads)
    return is_disturbed(run)


def describe_run(run: dict[str, Any]) -> str:
    """One progress line per run."""
    if run.get("aborted"):
        return (f"{run['config']:<17} stopped after {run['wall_s']:.1f} s: other processes were using the cores "
                f"({fmt(run.get('other_cpu_s'), '.1f')} CPU-s)")
    return (f"{run['config']:<17} steady {fmt(run.get('steady_samples_per_s'), '7.2f')} samples/s over "
            f"{fmt(run.get('window_s'), '.1f')} s, process {run['wall_s']:6.1f} s wall / {run['cpu_s']:6.1f} s CPU, "
            f"others {fmt(run.get('window_other_cpu_s'), '.2f')} CPU-s in the window "
            f"({fmt(run.get('other_cpu_s'), '.1f')} in the run), "
            f"machine busy {fmt(run.get('window_busy_cores'), '.2f')} "
            f"cores, own {fmt(run.get('window_own_cores'), '.2f')}")


def config_names(args: argparse.Namespace) -> list[str]:
    """zero{S}/workers{W} labels, headline first."""
    return [f"zero{s}/workers{w}" for s, w in args.configs]


def round_ratio(trainer: list[dict[str, Any]], bare: list[dict[str, Any]]) -> float | None:
    """Mean steady samples/s of a round's trainer runs over the mean of its bare runs."""
    t = [r.get("steady_samples_per_s") for r in trainer]
    b = [r.get("steady_samples_per_s") for r in bare]
    if not t or not b or None in t + b:
        return None
    return ratio(statistics.fmean(t), statistics.fmean(b))


def summarise(args: argparse.Namespace, trainer: dict[str, list[dict[str, Any]]], bare: list[dict[str, Any]],
              bare_stream: list[dict[str, Any]], discarded: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians, ratios and the raw runs, as written to the JSON file."""
    import deepspeed
    import torch
    import transformers

    keys = ("steady_samples_per_s", "logged_samples_per_s", "wall_s", "cpu_s", "window_other_cpu_s",
            "window_busy_cores")
    bare_median = {k: median_of(bare, k) for k in keys + ("build_s",)}
    stream_median = {k: median_of(bare_stream, k) for k in keys + ("build_s",)} if bare_stream else None
    stream_rate = stream_median["steady_samples_per_s"] if stream_median else None
    configs = {}
    for name, runs in trainer.items():
        med = {k: median_of(runs, k) for k in keys}
        r = ratio(med["steady_samples_per_s"], bare_median["steady_samples_per_s"])
        rounds = [round_ratio(runs[2 * i: 2 * i + 2], bare[2 * i: 2 * i + 2]) for i in range(len(bare) // 2)]
        configs[name] = {
            "median": med, "ratio_trainer_over_bare": r,
            "meets_target": bool(rounds and None not in rounds and min(rounds) >= TARGET_RATIO),
            # each round's two trainer runs against its two bare runs (trainer, bare, bare, trainer)
            "round_ratios": rounds,
            # what is left once the streaming cost is taken out: DeepSpeed and the trainer's own work
            "ratio_trainer_over_bare_stream": ratio(med["steady_samples_per_s"], stream_rate),
        }
    all_runs = bare + bare_stream + [x for runs in trainer.values() for x in runs]
    return {
        "benchmark": "train_overhead",
        "command": " ".join([Path(sys.executable).name, "benchmarks/train_overhead.py"] + sys.argv[1:]),
        "metric": ("steady samples/s = samples of steps K+1..N / time from the end of step K to the end of step N "
                   "(K = log_every); trainer: wall times of its train/loss TensorBoard events"),
        "settings": {"preset": "tiny", "steps": args.steps, "log_every": args.log_every,
                     "micro_batch": args.micro_batch, "prompts": args.prompts, "threads": args.threads,
                     "cache_mb": args.cache_mb, "precision": "fp32", "device": "cpu", "repeats": args.repeats,
                     "configs": config_names(args), "bare_stream_workers": args.configs[0][1] if bare_stream else None,
                     "order": "per round: trainer of each config in order, bare, bare, trainer of each config in "
                              "reverse order, then bare_stream"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                        "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "bare_median": bare_median,
        "bare_stream_median": stream_median,
        # the bare loop fed by the trainer's streaming loader, against in-memory batches: the streaming cost
        "ratio_bare_stream_over_bare": ratio(stream_rate, bare_median["steady_samples_per_s"]),
        "configs": configs,
        "headline": config_names(args)[0],
        "target_ratio": TARGET_RATIO,
        "disturbed_runs_kept": sum(r["disturbed"] for r in all_runs),
        "runs": {"trainer": trainer, "bare": bare, "bare_stream": bare_stream},
        "discarded_runs": discarded,
    }


def print_table(result: dict[str, Any]) -> None:
    """Per configuration: trainer median, bare median, ratio; then the streaming attribution."""
    bare = result["bare_median"]
    print(f"\n{'steady samples/s (median)':<28}{'trainer':>10}{'bare':>10}{'ratio':>8}  per-round ratios")
    for name, c in result["configs"].items():
        paired = ", ".join(fmt(r, ".3f") for r in c["round_ratios"])
        print(f"{name:<28}{fmt(c['median']['steady_samples_per_s'], '.2f'):>10}"
              f"{fmt(bare['steady_samples_per_s'], '.2f'):>10}{fmt(c['ratio_trainer_over_bare'], '.3f'):>8}  {paired}")
    if result["bare_stream_median"]:
        workers = result["settings"]["bare_stream_workers"]
        print(f"bare loop over the streaming loader ({workers} worker(s)): "
              f"{fmt(result['bare_stream_median']['steady_samples_per_s'], '.2f')} samples/s = "
              f"{fmt(result['ratio_bare_stream_over_bare'], '.3f')} x bare (the streaming cost); trainer / that: "
              + ", ".join(f"{name} {fmt(c['ratio_trainer_over_bare_stream'], '.3f')}"
                          for name, c in result["configs"].items()) + " (DeepSpeed + the trainer's own work)")
    kept = len(result["runs"]["bare"]) + len(result["runs"]["bare_stream"]) + sum(
        len(r) for r in result["runs"]["trainer"].values())
    print(f"disturbed by other processes: {result['disturbed_runs_kept']} of {kept} kept runs, "
          f"{len(result['discarded_runs'])} runs discarded and rerun")
    head = result["configs"][result["headline"]]
    verdict = "meets" if head["meets_target"] else "misses"
    worst = min((r for r in head["round_ratios"] if r is not None), default=None)
    print(f"{result['headline']}: trainer/bare in every round >= {TARGET_RATIO}: {verdict} the target (worst round "
          f"{fmt(worst, '.3f')}; medians of all runs {fmt(head['ratio_trainer_over_bare'], '.3f')})")


def main(argv: list[str] | None = None) -> int:
    """Generate once, then rounds of trainer runs (one per config) and a bare run; table and JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_bare":
        bare_worker(argv[1:])
        return 0
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="revprompt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = subprocess_env(args.threads)
    trainer: dict[str, list[dict[str, Any]]] = {name: [] for name in config_names(args)}
    bare: list[dict[str, Any]] = []
    bare_stream: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    try:
        generated = args.generated
        if generated is None:
            generated = workdir / "generated"
            if not (generated / "shards" / "manifest.json").is_file():
                generate(args, generated, env)
        warm_up(args, generated, workdir / "warm-up", env)
        for i in range(args.repeats):
            label = f"round {i + 1}/{args.repeats}"
            # trainer runs, bare, bare, trainer runs in reverse: a drift of the machine's speed over the round
            # weighs on both sides alike
            for half in range(2):
                configs = list(zip(args.configs, config_names(args)))
                if half:
                    bare.extend(measure(f"{label} bare   ", args.retries, discarded,
                                        lambda n: run_bare(args, generated, env, allow_abort=n < args.retries),
                                        describe_run, lambda r: window_disturbed(r, args.threads), side="bare")
                                for _ in range(2))
                    configs.reverse()
                for (stage, workers), name in configs:
                    trainer[name].append(measure(
                        f"{label} trainer", args.retries, discarded,
                        lambda n: run_trainer(args, stage, workers, generated,
                                              workdir / f"train-{i}-{half}-{stage}-{workers}-{n}", env,
                                              allow_abort=n < args.retries),
                        describe_run, lambda r: window_disturbed(r, args.threads), side="trainer"))
            if args.stream_side:
                bare_stream.append(measure(
                    f"{label} bare   ", args.retries, discarded,
                    lambda n: run_bare(args, generated, env, allow_abort=n < args.retries, source="stream"),
                    describe_run, lambda r: window_disturbed(r, args.threads), side="bare_stream"))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = summarise(args, trainer, bare, bare_stream, discarded)
    print_table(result)
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
