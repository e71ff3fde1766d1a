"""Samples/s of the training data loader alone, per DataLoader worker, at BLIP-base's input size, on the CPU.

What is measured
    `revprompt.training.data.TrainStream` read through `build_loader(stream, num_workers=W,
    pin_memory=False)`, exactly as `revprompt train` builds it for one rank, with BLIP-base's input:
    512 x 512 JPEGs (what sd2-blip generates) resized to 384 px, micro batch 32, the offline BLIP
    tokenizer (`offline_blip_tokenizer()`), max_length 40 and a 256-sample shuffle buffer. Each batch
    is: tar read, shuffle buffer, JPEG decode (PIL), RGB convert, bicubic resize 512 -> 384,
    [0,1] + BLIP normalisation to CHW float32, stack, tokenise the 32 prompts, and the hand-over of
    the batch (56.6 MB of pixels) from the worker process to the training process.

    Data: `--shards` shards of `--per-shard` samples written before any timing into a temp dir with
    `revprompt.shards.writer.ShardWriter` + `encode_image(..., quality=95)`, each sample a `jpg`,
    a `txt` (bundled prompts, cycled) and a small `json`, like the generate stage's samples. The
    images are synthetic but JPEG-realistic: smooth gradients and low-frequency waves per channel
    plus pixel noise, so they compress to a size typical of Stable Diffusion outputs at q95 (the
    mean size is reported), neither flat (too cheap to decode) nor white noise (too expensive). The
    loader gets their (path, count) list, as the trainer gets it from the manifest.

    For each W in `--workers` (default 1, 2), alternating W=1, W=2, W=1, ... for `--repeats`
    rounds, in this process: build the loader, take `--warmup` batches per worker (worker start-up,
    first shuffle-buffer fill), then `--batches` batches per worker, a timestamp after each.
    Primary metric: steady samples/s = samples after the warm-up / time from the warm-up's last
    batch to the last batch; per worker = that / W (the headline: what one worker sustains). The
    loop does nothing with a batch but take it, so the rate is the loader's capacity. Also reported:
    the CPU-seconds this process and its workers spent per sample in the window.

    Disturbance: before each measurement the script waits (up to `--quiet-wait` s) for the machine to
    go idle, samples /proc/stat and its own process tree twice a second, and reruns a measurement
    during whose timed window other processes used more than 5 % of a core (at least 0.5 CPU-s), up
    to `--retries` times (discarded ones stay in the JSON).

    Thread settings: OMP_NUM_THREADS / MKL_NUM_THREADS (`--threads`, default 2) are set before torch
    is imported; DataLoader workers run torch with one thread regardless, PIL and numpy are
    single-threaded here.

Reproduce (from the repository root; about 2 minutes on 2 idle cores):
    .venv/bin/python benchmarks/loader_throughput.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (write_results, RESULTS, CpuMonitor, fmt, is_disturbed, measure, median_of, ratio,  # noqa: E402
                     wait_for_quiet)

DEFAULT_OUT = RESULTS / "loader_throughput.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options; the defaults are BLIP-base's input on sd2-blip's 512 px images."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", default="1,2", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--source-size", type=int, default=512, help="JPEG height and width in the shards")
    parser.add_argument("--image-size", type=int, default=384, help="captioner input size (BLIP-base: 384)")
    parser.add_argument("--batch", type=int, default=32, help="micro batch (samples per loader batch)")
    parser.add_argument("--max-length", type=int, default=40, help="tokeniser max_length")
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="samples in each worker's shuffle buffer")
    parser.add_argument("--shards", type=int, default=6, help="shards written (>= the largest worker count)")
    parser.add_argument("--per-shard", type=int, default=160, help="samples per shard")
    parser.add_argument("--warmup", type=int, default=2, help="excluded batches per worker at the start")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per worker")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per worker count, alternating")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of this process")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a disturbed measurement")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each measurement, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep (and reuse) the shards here instead of a deleted temp dir")
    args = parser.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error("--workers: expected comma-separated integers")
    if min(args.workers) < 0:
        parser.error("--workers: must be >= 0")
    if args.shards < max(max(args.workers), 1):
        parser.error("--shards: need at least one shard per worker")
    if args.per_shard * args.shards // max(max(args.workers), 1) < args.batch:
        parser.error("--per-shard: every worker needs at least one full batch")
    return args


def synthetic_image(rng, size: int):
    """HxWx3 uint8: a gradient and three low-frequency waves per channel, plus pixel noise."""
    import numpy as np

    t = np.arange(size, dtype=np.float32) / size
    image = np.empty((size, size, 3), np.float32)
    for c in range(3):
        gx, gy = rng.uniform(-100, 100, 2)
        channel = rng.uniform(60, 200) + gx * (t[None, :] - 0.5) + gy * (t[:, None] - 0.5)
        for _ in range(3):
            # sin(a(x) + b(y)) = sin a cos b + cos a sin b: two outer products instead of size^2 sines
            fx, fy = rng.uniform(0.5, 8, 2)
            a = 2 * np.pi * fx * t + rng.uniform(0, 2 * np.pi)
            b = 2 * np.pi * fy * t
            channel += rng.uniform(10, 35) * (np.outer(np.cos(b), np.sin(a)) + np.outer(np.sin(b), np.cos(a)))
        image[..., c] = channel
    image += 4 * rng.standard_normal((size, size, 1), dtype=np.float32)
    image += 2 * rng.standard_normal((size, size, 3), dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_shards(args: argparse.Namespace, root: Path) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """`--shards` JPEG shards under `root`; returns their (path, count) list and size statistics."""
    import numpy as np

    from revprompt.prompts.sources import read_prompts
    from revprompt.shards.writer import ShardWriter, encode_image, encode_json, is_complete, shard_name

    prompts = [p.text for p in read_prompts("bundled") if p.text]
    shards, sizes = [], []
    start = time.perf_counter()
    for s in range(args.shards):
        path = root / shard_name("train", s)
        if not is_complete(path):
            writer = ShardWriter(path)
            rng = np.random.default_rng(s)
            for i in range(args.per_shard):
                n = s * args.per_shard + i
                jpg = encode_image(synthetic_image(rng, args.source_size), "jpg", args.quality)
                writer.write(f"sample{n:06d}_0000", {
                    "jpg": jpg, "txt": prompts[n % len(prompts)].encode("utf-8"),
                    "json": encode_json({"split": "train", "size": args.source_size, "seed": n})})
            writer.close()
        shards.append((str(path), args.per_shard))
        sizes.append(path.stat().st_size / args.per_shard)
    info = {"mean_sample_kb": sum(sizes) / len(sizes) / 1024, "write_s": time.perf_counter() - start}
    print(f"{args.shards} shards of {args.per_shard} {args.source_size} px JPEGs (q{args.quality}, "
          f"{info['mean_sample_kb']:.0f} KB per sample) in {root} ({info['write_s']:.1f} s, untimed)", flush=True)
    return shards, info


def measure_loader(args: argparse.Namespace, shards: list[tuple[str, int]], workers: int,
                   tokenizer) -> dict[str, Any]:
    """One measurement: a fresh loader with `workers` workers; warm-up, then timed batches."""
    from revprompt.training.data import TrainStream, build_loader

    waited = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
    per = max(workers, 1)
    stream = TrainStream(shards, seed=0, rank=0, world_size=1, num_workers=workers, batch_size=args.batch,
                         image_size=args.image_size, tokenizer=tokenizer, max_length=args.max_length,
                         shuffle_buffer=args.shuffle_buffer)
    monitor = CpuMonitor(os.getpid())
    start = time.time()
    stamps: list[float] = []
    samples = 0
    loader = build_loader(stream, num_workers=workers, pin_memory=False)
    data = iter(loader)
    try:
        for _ in range((args.warmup + args.batches) * per):
            batch = next(data)
            samples += len(batch["keys"])
            stamps.append(time.time())
            if tuple(batch["pixel_values"].shape[1:]) != (3, args.image_size, args.image_size):
                raise RuntimeError(f"unexpected pixel shape {tuple(batch['pixel_values'].shape)}")
    finally:
        del data, loader
        monitor.stop()
    t0, t1 = stamps[args.warmup * per - 1], stamps[-1]
    timed = args.batches * per * args.batch
    rate = timed / (t1 - t0)
    tree = monitor.tree_cpu_s(t0, t1)
    return {"workers": workers, "config": f"workers{workers}", "samples_per_s": rate,
            "samples_per_s_per_worker": rate / per, "window_s": t1 - t0, "timed_samples": timed,
            "to_first_batch_s": stamps[0] - start, "cpu_s_per_sample": tree / timed if tree is not None else None,
            "window_other_cpu_s": monitor.other_cpu_s(t0, t1), "quiet_wait_s": waited}


def describe_run(run: dict[str, Any]) -> str:
    """One progress line per measurement."""
    return (f"W={run['workers']}: {run['samples_per_s']:7.2f} samples/s, {run['samples_per_s_per_worker']:6.2f} per "
            f"worker, {fmt(run['cpu_s_per_sample'] and run['cpu_s_per_sample'] * 1000, '.1f')} CPU-ms/sample, "
            f"first batch after {run['to_first_batch_s']:.1f} s, others {fmt(run['window_other_cpu_s'], '.2f')} "
            f"CPU-s in the {run['window_s']:.1f} s window")


def main(argv: list[str] | None = None) -> int:
    """Write the shards, then alternate loader measurements per worker count; table and JSON."""
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import PIL
    import torch

    from revprompt.models.captioner import offline_blip_tokenizer

    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="revprompt-loader-"))
    runs: dict[str, list[dict[str, Any]]] = {f"workers{w}": [] for w in args.workers}
    discarded: list[dict[str, Any]] = []
    try:
        shards, data_info = write_shards(args, workdir / "shards")
        tokenizer = offline_blip_tokenizer()
        for i in range(args.repeats):
            for w in args.workers:
                runs[f"workers{w}"].append(measure(
                    f"round {i + 1}/{args.repeats}", args.retries, discarded,
                    lambda n: measure_loader(args, shards, w, tokenizer), describe_run,
                    lambda r: is_disturbed(r, "window_other_cpu_s", "window_s"), side=f"workers{w}"))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = {name: {k: median_of(rs, k) for k in ("samples_per_s", "samples_per_s_per_worker",
                                                     "cpu_s_per_sample", "to_first_batch_s")}
               for name, rs in runs.items()}
    first = f"workers{args.workers[0]}"
    for name in summary:
        summary[name]["scaling_vs_" + first] = ratio(summary[name]["samples_per_s"], summary[first]["samples_per_s"])
    result = {
        "benchmark": "loader_throughput",
        "command": " ".join([Path(sys.executable).name, "benchmarks/loader_throughput.py"] + sys.argv[1:]),
        "metric": "steady samples/s after the warm-up batches; per worker = samples/s / W",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("out", "workdir")},
        "data": data_info,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
                        "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "median": summary,
        "disturbed_runs_kept": sum(r["disturbed"] for rs in runs.values() for r in rs),
        "runs": runs,
        "discarded_runs": discarded,
    }
    print(f"\n{'median over ' + str(args.repeats):<16}{'samples/s':>11}{'per worker':>12}{'CPU-ms/sample':>15}"
          f"{'first batch s':>15}")
    for name, m in summary.items():
        cpu_ms = m["cpu_s_per_sample"] * 1000 if m["cpu_s_per_sample"] is not None else None
        print(f"{name:<16}{fmt(m['samples_per_s'], '.2f'):>11}{fmt(m['samples_per_s_per_worker'], '.2f'):>12}"
              f"{fmt(cpu_ms, '.1f'):>15}{fmt(m['to_first_batch_s'], '.1f'):>15}")
    print(f"disturbed by other processes: {result['disturbed_runs_kept']} kept, {len(discarded)} discarded and rerun")
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
