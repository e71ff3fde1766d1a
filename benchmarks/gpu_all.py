"""Every GPU throughput comparison of revprompt in one command and one table: generation, training, captioning.

Reproduce on one H100/H200 (sized to end within `--budget-s` 480, i.e. 8 minutes; no network, nothing downloaded):
    python benchmarks/gpu_all.py
    python benchmarks/gpu_all.py --budget-s 900                      # more images and steps per side
    python benchmarks/gpu_all.py --set generate.fuse_qkv=true        # a preset setting changed, on every side
Logic check on a CPU (tiny random components, fp32, small sizes, no compilation; 1-3 minutes on 2 cores):
    python benchmarks/gpu_all.py --tiny --device cpu

What runs (SD2-base / BLIP-base shapes with random weights, bf16, one GPU; the fast-path settings are read from
the sd2-blip preset with `load_config("sd2-blip")`, so the benchmark follows the preset; `--set` changes them)
    generation, 512 px, 25 DPM-Solver++ steps, CFG 7.5, batch 32 (gpu_generation.py's pipeline and loops):
      (a) a bare diffusers loop, eager;
      (b) the same loop with the preset's fast paths (generate.fuse_qkv, generate.compile with its
          compile_scope and compile_mode): the compilation happens in the first call, which the steady
          window excludes; its excess over a steady call is reported as the compile time;
      (c) the `revprompt generate --config sd2-blip` job (the preset's fast paths), writing JPEG shards;
          its steady images/s from its per-batch TensorBoard events, and the share of its generating loop
          spent outside the model call (its "generating thread:" log line). Its shards hold a multiple of
          the batch each, at least one per DataLoader worker of the data-wait run (the preset's 1000 would
          be one shard): that changes the writer thread's work, not the generating thread's;
      (b') with `--blocks` (on by default, skipped when the budget is short): (b) with
          compile_scope="blocks" (diffusers' compile_repeated_blocks), for its compile seconds against (b)'s.
      Target: job (c) / bare fast (b) as a time ratio <= 1.05.
    training, 384 px, batch 32 (gpu_train.py's model, batches and sides, on pre-built batches on the device):
      (a) a bare AMP loop (fp32 weights under bf16 autocast), eager, SDPA attention, fused AdamW;
      (b) the same under torch.compile;
      (c) revprompt's DeepSpeed engine with the preset's train.precision, train.attention and train.compile,
          stepping as Trainer._micro_step does. Targets: (c) / (b) >= 1.0 and (c) >= 475 samples/s.
      data wait: the real `revprompt train --config sd2-blip` CLI for `--cli-steps` steps (log_every
      `--cli-log-every`) on (c)'s shards (512 px JPEGs) with the preset's train.num_workers, reading the
      trainer's `perf/data_wait_fraction` (time in next() on the loader / window time) and
      `perf/samples_per_s` over the windows after the first (which holds start-up and compilation). The
      embedding head is off there (`--cli-head` turns the preset's on), so that the CLI trains the model
      (c) trains: its samples/s against (c)'s on pre-built batches is the loader's cost. Random weights
      draw images unlike a trained model's, so the job's mean JPEG size ("mean_sample_kb") is recorded:
      decode cost follows it.
    captioning, greedy, 40 new tokens, batch evaluate.batch_size (64): transformers' own batched
      `model.generate` (BlipProcessor, from_pretrained in bf16, transformers' eager BLIP attention) against
      revprompt's captioning path (load_exported + Captioner, evaluate.attention); both over the same random
      512 px images, a warm-up batch first, then 3 timed runs each, alternating, medians. Random weights
      caption to the token limit on both sides (the agreement of their captions is reported). Target:
      revprompt / transformers >= 1.0.

How it runs
    One process tree: this script plans the counts, then runs each part in a child process of its own (a
    fresh CUDA context; a part that fails or runs out of time leaves the others' figures), and the two
    revprompt CLIs as children too. Order, most needed first: generation (a, b, and b' when affordable),
    the job (c), training (a, b, c; it also saves the random BLIP-base captioner that the rest loads),
    captioning, the data-wait CLI. Every child has a time limit (the time left to `--budget-s`, less what
    the parts after it are expected to need); one that overruns is stopped with its descendants and named
    in the table. `--budget-s` (default 480) sizes the counts: ESTIMATES holds each part's expected fixed
    seconds (start-up, model build, compilation) and seconds per image or step; what the budget leaves
    after the fixed costs goes to more images and steps (up to 4x the minimum counts). The estimates for
    the GPU are guesses until a GPU run's JSON ("parts.*.seconds") corrects them; (b') runs only while the
    parts after it keep their estimated seconds. Torch's compile caches are
    left where torch keeps them (a rerun on the same machine compiles faster; the JSON says whether they
    were warm); `--fresh-compile-cache` points them at a new folder for cold compile times.

Output: one table (what | baseline | revprompt | ratio | target | met?), then the compile seconds, the shares
of time outside the model and the elapsed time; and a JSON (`--out`; default $OUT/gpu_all.json when OUT is
set, as on the device runner, else benchmarks/results/gpu_all.json) with every figure, each part's raw
results, the plan, the exact command and the environment (GPU, torch, diffusers, transformers, deepspeed).
The exit status is 1 when a part failed or ran out of time (its rows read n/a). With --tiny the targets are
shown in parentheses and not judged: CPU figures at toy sizes, with no compilation, say nothing about a GPU;
that mode checks that every part runs end to end and that the table and JSON fill in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, ChildTimeout, fmt, read_job_scalars, revprompt_command, run_bounded  # noqa: E402

# the workload, as the task states it; --tiny shrinks it to a CPU logic check
GPU_SHAPES = {"size": 512, "steps": 25, "guidance": 7.5, "gen_batch": 32, "dtype": "bf16", "train_image": 384,
              "train_batch": 32, "max_new_tokens": 40, "caption_batch": None, "caption_source": 512}
TINY_SHAPES = {"size": 64, "steps": 2, "guidance": 7.5, "gen_batch": 4, "dtype": "fp32", "train_image": 64,
               "train_batch": 4, "max_new_tokens": 40, "caption_batch": 8, "caption_source": 96}
# the fewest units each part measures with (generation: images; train: timed steps per side; caption: images;
# data_wait: CLI steps); the job writes at least one micro batch per DataLoader worker (see plan_shards)
GPU_MINIMUM = {"eager": 96, "fast": 128, "job": 192, "blocks": 64, "train_steps": 20, "train_warmup": 5,
               "caption": 128, "cli_steps": 40}
TINY_MINIMUM = {"eager": 12, "fast": 12, "job": 24, "blocks": 8, "train_steps": 3, "train_warmup": 1,
                "caption": 16, "cli_steps": 12}
# (fixed seconds, seconds per unit) of each part. GPU: guesses for one H100/H200 with cold compile caches, not yet
# measured (fixed: process start and imports ~10 s each; SD2 UNet compiled whole ~60 s, by blocks ~20 s, again in the
# job from the warm cache ~25 s; BLIP forward+backward ~50 s, a recompile for the text lengths ~25 s, the engine's
# ~30 s; the CLI's end-of-run checkpoint and export ~15 s; 10 images/s eager; 0.07-0.1 s a training step); their sum
# at the minimum counts is about 480 s. tiny: measured on 2 CPU cores.
ESTIMATES = {
    "gpu": {"generation": (100.0, 0.09), "blocks": (30.0, 0.08), "job": (45.0, 0.08), "train": (130.0, 0.1),
            "caption": (20.0, 0.02), "data_wait": (80.0, 0.12)},
    "tiny": {"generation": (8.0, 0.03), "blocks": (1.0, 0.03), "job": (8.0, 0.02), "train": (7.0, 0.01),
             "caption": (5.0, 0.085), "data_wait": (12.0, 0.1)},
}
# timed captioning runs per side, alternating; the median is reported (one run disturbed by a stray process is
# outvoted)
CAPTION_REPEATS = 3
GEN_TARGET, TRAIN_RATIO_TARGET, TRAIN_RATE_TARGET, CAPTION_TARGET = 1.05, 1.0, 475.0, 1.0


def default_out() -> Path:
    """$OUT/gpu_all.json when OUT is set (the device runner), else benchmarks/results/gpu_all.json."""
    out = os.environ.get("OUT")
    return Path(out) / "gpu_all.json" if out else ROOT / "benchmarks" / "results" / "gpu_all.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; the defaults are the sd2-blip reference setup on one GPU within 8 minutes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny random components and sizes (CPU logic check)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds the whole run may take")
    parser.add_argument("--blocks", action=argparse.BooleanOptionalAction, default=True,
                        help="also time compile_scope='blocks' (b') when the budget allows")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a sd2-blip preset setting for every side and CLI (repeatable)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers of the data-wait CLI run (default: the preset's train.num_workers)")
    parser.add_argument("--cli-steps", type=int, default=None, help="steps of the data-wait CLI run (default: planned)")
    parser.add_argument("--cli-log-every", type=int, default=None, help="its train.log_every (default: steps / 4)")
    parser.add_argument("--cli-head", action="store_true", help="keep the preset's embedding head in the CLI run")
    parser.add_argument("--fresh-compile-cache", action="store_true",
                        help="compile into a new cache folder (cold compile times; slower)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file (default: see the docstring)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and runs here (default: a temp dir)")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this (child) process
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return args
    bad = [o for o in args.overrides if "=" not in o or "." not in o.split("=", 1)[0]]
    if bad:
        parser.error(f"--set {bad[0]!r}: expected SECTION.KEY=VALUE, e.g. generate.fuse_qkv=true")
    if args.budget_s < 60:
        parser.error("--budget-s: at least 60 s")
    args.out = args.out or default_out()
    return args


def preset_overrides(overrides: list[str]) -> list[str]:
    """--set SECTION.KEY=VALUE as load_config / CLI overrides."""
    return [f"--{o}" for o in overrides]


# --- the plan ---------------------------------------------------------------------------------------


def round_to(n: float, unit: int) -> int:
    """`n` rounded down to a multiple of `unit`, at least one unit."""
    return max(unit, int(n) // unit * unit)


def plan_shards(images: int, batch: int, workers: int, micro_batch: int) -> tuple[int, int]:
    """(images, shard size) for the job, so that the train CLI's deal gives each of `workers` DataLoader workers
    whole shards of at least one micro batch in every epoch: equal shards, each a multiple of the generation
    batch, at least `workers` of them."""
    slots = max(workers, 1)
    shard = round_to(max(micro_batch, images // slots), batch)
    shard = max(shard, round_to(micro_batch + batch - 1, batch))  # a shard holds a whole micro batch
    return max(images // shard, slots) * shard, shard


def make_plan(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """Counts per part from `--budget-s`, with ESTIMATES: the minimum counts, scaled up (at most 4x) by what the
    budget leaves after every part's fixed seconds."""
    shapes = TINY_SHAPES if args.tiny else GPU_SHAPES
    minimum = TINY_MINIMUM if args.tiny else GPU_MINIMUM
    est = ESTIMATES["tiny" if args.tiny else "gpu"]
    units = {"generation": minimum["eager"] + minimum["fast"], "blocks": minimum["blocks"], "job": minimum["job"],
             "train": 3 * (minimum["train_steps"] + minimum["train_warmup"]),
             "caption": 2 * (CAPTION_REPEATS + 1) * minimum["caption"], "data_wait": minimum["cli_steps"]}
    parts = [p for p in est if p != "blocks" or args.blocks]
    fixed = sum(est[p][0] for p in parts)
    variable = sum(est[p][1] * units[p] for p in parts)
    factor = min(4.0, max(1.0, (args.budget_s - fixed) / variable)) if variable else 1.0
    batch = shapes["gen_batch"]
    job, shard = plan_shards(round_to(minimum["job"] * factor, batch), batch, workers, shapes["train_batch"])
    cli_steps = args.cli_steps or int(minimum["cli_steps"] * factor)
    plan = {"factor": factor, "eager_images": round_to(minimum["eager"] * factor, batch),
            "fast_images": round_to(minimum["fast"] * factor, batch),
            "blocks_images": round_to(minimum["blocks"], batch),
            "job_images": job, "shard_size": shard, "train_steps": int(minimum["train_steps"] * factor),
            "train_warmup": minimum["train_warmup"], "caption_images": int(minimum["caption"] * factor),
            "cli_steps": cli_steps, "cli_log_every": args.cli_log_every or max(1, cli_steps // 4),
            "cli_workers": workers}
    plan["estimate_s"] = {p: est[p][0] + est[p][1] * units[p] * factor for p in est}
    plan["estimated_total_s"] = sum(plan["estimate_s"][p] for p in parts)
    plan["fixed_over_budget"] = fixed > args.budget_s
    return plan


# --- the parts (each in a child process) ---------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    """The device and the versions that decide the figures."""
    import torch

    env = {"python": platform.python_version(), "device": device}
    for name in ("torch", "diffusers", "transformers", "deepspeed", "accelerate"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    else:
        env.update(gpu=None, cpu_count=os.cpu_count())
    return env


def generation_overrides(spec: dict[str, Any], run_dir: Path, images: int, shard_size: int = 1000) -> list[str]:
    """The sd2-blip overrides of every generation side: this benchmark's shapes, the preset's fast paths, --set."""
    import gpu_generation

    s = spec["shapes"]
    return gpu_generation.generation_overrides(
        Path(spec["model_dir"]), run_dir, device=spec["device"], dtype=s["dtype"], batch=s["gen_batch"],
        steps=s["steps"], size=s["size"], guidance=s["guidance"], shard_size=shard_size, prompts=images,
        preset_fast_paths=True) + preset_overrides(spec["overrides"])


def part_generation(spec: dict[str, Any], record: Callable[[dict], None]) -> None:
    """Save the random SD2-shaped pipeline, prepare the prompts, run the bare loop eager (a), with the preset's fast
    paths (b) and, when the budget allows, compiled by blocks (b')."""
    import gpu_generation

    from revprompt.launch.config import load_config

    plan, device = spec["plan"], spec["device"]
    out: dict[str, Any] = {"environment": environment(device)}
    out["model"] = gpu_generation.save_random_pipeline(Path(spec["model_dir"]), spec["tiny"], spec["shapes"]["dtype"],
                                                       device)
    record(out)
    prepared = Path(spec["workdir"]) / "prepared"
    count = max(plan["eager_images"], plan["fast_images"], plan["blocks_images"])
    gpu_generation.prepare_prompts(generation_overrides(spec, prepared, count))
    texts = gpu_generation.prepared_texts(prepared)
    g = load_config("sd2-blip", generation_overrides(spec, prepared, count)).generate
    compiles = g.compile and device == "cuda"  # build_pipeline compiles on CUDA only
    out["fast_paths"] = {"fuse_qkv": g.fuse_qkv, "compile": g.compile, "compile_scope": g.compile_scope,
                         "compile_mode": g.compile_mode, "compiled_here": compiles}
    out["eager"] = gpu_generation.bare_loop(g, device, texts[:plan["eager_images"]])
    print(f"generation (a) bare eager: {fmt(out['eager']['steady_images_per_s'])} images/s", flush=True)
    record(out)
    out["fast"] = gpu_generation.bare_loop(g, device, texts[:plan["fast_images"]], fuse=g.fuse_qkv, compile=g.compile,
                                           scope=g.compile_scope, mode=g.compile_mode)
    print(f"generation (b) bare + fast paths: {fmt(out['fast']['steady_images_per_s'])} images/s, first batch "
          f"{fmt(out['fast']['first_batch_excess_s'], '.1f')} s over a steady one", flush=True)
    record(out)
    if spec["run_blocks"] and time.time() < spec["blocks_by"]:
        import torch

        torch._dynamo.reset()  # (b)'s graphs go: (b') compiles from scratch, as a fresh process would
        out["blocks"] = gpu_generation.bare_loop(g, device, texts[:plan["blocks_images"]], fuse=g.fuse_qkv,
                                                 compile=True, scope="blocks", mode=g.compile_mode)
        out["blocks"]["compiled_here"] = device == "cuda"
        print(f"generation (b') compiled by blocks: first batch {fmt(out['blocks']['first_batch_excess_s'], '.1f')} s "
              f"over a steady one", flush=True)
    else:
        out["blocks_skipped"] = "--no-blocks" if not spec["run_blocks"] else "not enough budget left"
    record(out)


def part_train(spec: dict[str, Any], record: Callable[[dict], None]) -> None:
    """Save the random captioner (for the CLI and captioning), then the bare AMP loop eager (a), compiled (b), and
    revprompt's engine with the preset's settings (c), on the same pre-built batches."""
    import gpu_train

    from revprompt.launch import dist  # dist.init sets DS_ACCELERATOR=cpu before deepspeed is imported
    from revprompt.launch.config import load_config

    preset = load_config("sd2-blip", preset_overrides(spec["overrides"])).train
    plan, device, s = spec["plan"], spec["device"], spec["shapes"]
    # the tiny check trains in fp32 as the CPU does; "auto" is bf16 on CUDA (engine.resolve_precision)
    precision = "fp32" if spec["tiny"] else "bf16" if preset.precision == "auto" else preset.precision
    argv = ["--batch", str(s["train_batch"]), "--image-size", str(s["train_image"]), "--warmup",
            str(plan["train_warmup"]), "--steps", str(plan["train_steps"]), "--precision", precision, "--attention",
            preset.attention, "--zero-stage", str(preset.zero_stage), "--breakdown", "0", "--device", device]
    targs = gpu_train.parse_args(argv + (["--tiny"] if spec["tiny"] else []))
    out: dict[str, Any] = {"environment": environment(device),
                           "settings": {"precision": precision, "attention": preset.attention,
                                        "zero_stage": preset.zero_stage, "compile": preset.compile,
                                        "batch": s["train_batch"], "image_size": s["train_image"]}}
    out["captioner"] = gpu_train.save_random_captioner(targs, Path(spec["captioner_dir"]))
    record(out)
    info = dist.init(device)
    dist.ensure_group(info)
    from revprompt.models.captioner import offline_blip_tokenizer
    from revprompt.training.engine import allow_deepspeed_checkpoint_types

    allow_deepspeed_checkpoint_types()
    tokenizer = offline_blip_tokenizer()
    batches = gpu_train.build_batches(targs, tokenizer, info.device)
    train = gpu_train.train_config(targs, preset_overrides(spec["overrides"]))
    cuda = device == "cuda"  # torch.compile on a CPU costs minutes for nothing: the trainer skips it there too
    sides = [("eager", "bare", {"compile": False}), ("compiled", "bare", {"compile": cuda}),
             ("engine", "engine", {"compile_engine": preset.compile})]
    try:
        for key, name, change in sides:
            out[key] = gpu_train.measure_side(name, argparse.Namespace(**{**vars(targs), **change}), tokenizer,
                                              batches, info, train)
            record(out)
    finally:
        dist.close()


def caption_images(count: int, size: int) -> list:
    """`count` random RGB images of `size` px (what a generated 512 px JPEG decodes to, in shape)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def part_caption(spec: dict[str, Any], record: Callable[[dict], None]) -> None:
    """transformers' batched model.generate against revprompt's Captioner, greedy, the same images and batch."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from revprompt.evaluation.items import captioner_for
    from revprompt.launch.config import load_config
    from revprompt.models.captioner import caption_dtype, load_exported

    device, s, plan = torch.device(spec["device"]), spec["shapes"], spec["plan"]
    extra = [f"--evaluate.max_new_tokens={s['max_new_tokens']}", "--evaluate.num_beams=1"]
    if s["caption_batch"]:
        extra.append(f"--evaluate.batch_size={s['caption_batch']}")
    cfg = load_config("sd2-blip", extra + preset_overrides(spec["overrides"]))
    e = cfg.evaluate
    folder = spec["captioner_dir"]
    model, processor = load_exported(folder, device, key="benchmark captioner", attention=e.attention)
    ours = captioner_for(cfg, model, processor, device)
    dtype = caption_dtype(device)
    theirs_model = BlipForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    theirs_processor = BlipProcessor.from_pretrained(folder)

    def theirs(images: list) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(images), e.batch_size):
            inputs = theirs_processor(images=images[start:start + e.batch_size], return_tensors="pt")
            with torch.no_grad():
                ids = theirs_model.generate(pixel_values=inputs["pixel_values"].to(device, dtype),
                                            max_new_tokens=e.max_new_tokens, num_beams=1, do_sample=False)
            captions += theirs_processor.batch_decode(ids, skip_special_tokens=True)
        return [c.strip() for c in captions]

    images = caption_images(plan["caption_images"], s["caption_source"])
    out: dict[str, Any] = {"environment": environment(spec["device"]), "images": len(images),
                           "batch_size": e.batch_size, "max_new_tokens": e.max_new_tokens, "attention": e.attention,
                           "dtype": str(dtype).replace("torch.", ""), "run_s": {"transformers": [], "revprompt": []}}
    sides = {"transformers": theirs, "revprompt": ours}
    captions = {}
    for name, fn in sides.items():  # warm-up: CUDA kernels, cuBLAS handles, the allocator
        fn(images[:e.batch_size])
    for _ in range(CAPTION_REPEATS):
        for name, fn in sides.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            captions[name] = fn(images)
            out["run_s"][name].append(time.perf_counter() - start)
    for name in sides:
        out[f"{name}_captions_per_s"] = len(images) / statistics.median(out["run_s"][name])
    out["same_captions"] = sum(a == b for a, b in zip(captions["transformers"], captions["revprompt"])) / len(images)
    out["mean_words"] = {n: statistics.fmean(len(c.split()) for c in captions[n]) for n in sides}
    print(f"captioning: transformers {out['transformers_captions_per_s']:.1f}, revprompt "
          f"{out['revprompt_captions_per_s']:.1f} captions/s", flush=True)
    record(out)


PARTS = {"generation": part_generation, "train": part_train, "caption": part_caption}


def run_part(args: argparse.Namespace) -> int:
    """Child mode: run one part from its spec, writing its results after every side (a part stopped at its time
    limit still leaves what it finished)."""
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    out = Path(spec["out"])

    def record(result: dict) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, out)

    PARTS[args.part](spec, record)
    return 0


# --- the parent: children, CLIs, deadlines ---------------------------------------------------------------


class Runner:
    """Runs the parts in order against one deadline; keeps each part's results, seconds and failure."""

    def __init__(self, args: argparse.Namespace, plan: dict[str, Any], workdir: Path, env: dict[str, str],
                 started: float):
        self.args, self.plan, self.workdir, self.env = args, plan, workdir, env
        self.deadline = started + args.budget_s
        self.results: dict[str, dict[str, Any]] = {}

    def left(self) -> float:
        """Seconds to the end of the budget."""
        return self.deadline - time.time()

    def limit(self, later: list[str]) -> float:
        """A part's time limit: the time left, less half of what the parts after it are expected to need."""
        reserve = 0.5 * sum(self.plan["estimate_s"][p] for p in later)
        return max(30.0, self.left() - reserve) if self.left() > 30.0 else 0.0

    def run(self, name: str, later: list[str], body: Callable[[float], dict[str, Any]]) -> dict[str, Any]:
        """`body(time_limit)` with its seconds and any failure recorded; the results it got so far stay."""
        limit = self.limit(later)
        entry: dict[str, Any] = {"time_limit_s": limit}
        self.results[name] = entry
        if limit <= 0:
            entry["error"] = f"skipped: the budget of {self.args.budget_s:.0f} s is spent"
            print(f"[{name}] {entry['error']}", flush=True)
            return entry
        print(f"\n[{name}] starting, {self.left():.0f} s of the budget left, time limit {limit:.0f} s", flush=True)
        started = time.time()
        try:
            entry.update(body(limit))
        except ChildTimeout as exc:
            entry["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a failed part is reported in the table; the others still run
            entry["error"] = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, RuntimeError):  # not a child's or CLI's failure message: a bug here, show where
                traceback.print_exc()
        entry["seconds"] = time.time() - started
        if "error" in entry:
            print(f"[{name}] FAILED: {entry['error'][-3000:]}", flush=True)
        print(f"[{name}] {entry['seconds']:.0f} s", flush=True)
        return entry

    def child(self, part: str, spec: dict[str, Any], limit: float) -> dict[str, Any]:
        """One part in a child process of this script; its results file (partial ones too, on failure)."""
        out = self.workdir / f"{part}.json"
        spec = {**spec, "out": str(out)}
        spec_path = self.workdir / f"{part}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--spec", str(spec_path)]
        failure: Exception | None = None
        try:
            run_bounded(cmd, self.env, limit, f"part {part}", stderr_path=self.workdir / f"{part}.stderr.log")
        except (ChildTimeout, RuntimeError) as exc:
            failure = exc
        result = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
        if failure is not None:
            result["error"] = str(failure)
        return result


def job_part(runner: Runner, spec: dict[str, Any], limit: float) -> dict[str, Any]:
    """(c): `revprompt generate` with the preset's fast paths, into the run dir the data-wait CLI trains on."""
    import gpu_generation

    plan = runner.plan
    run_dir = runner.workdir / "job"
    overrides = generation_overrides(spec, run_dir, plan["job_images"], plan["shard_size"])
    result = gpu_generation.generate_job(overrides, run_dir, timeout_s=limit)
    # random weights draw images unlike a trained model's: their JPEG size says how costly they are to decode
    tars = list((run_dir / "shards").glob("*/*.tar"))
    result["mean_sample_kb"] = sum(t.stat().st_size for t in tars) / max(result["images"], 1) / 1024
    print(f"generation (c) revprompt generate: {fmt(result['steady_images_per_s'])} images/s, "
          f"{fmt(result['loop_host_percent'], '.1f')} % of its loop outside the model", flush=True)
    return {**result, "run_dir": str(run_dir), "command": " ".join(revprompt_command() + ["generate", "--config",
                                                                                        "sd2-blip"] + overrides)}


def data_wait_part(runner: Runner, spec: dict[str, Any], limit: float) -> dict[str, Any]:
    """`revprompt train` on the job's shards with the preset's settings; the trainer's own data-wait share and
    samples/s over the logging windows after the first."""
    plan = runner.plan
    run_dir = Path(runner.results.get("job", {}).get("run_dir", runner.workdir / "job"))
    if not (run_dir / "shards" / "manifest.json").is_file():
        raise RuntimeError(f"no shards to train on: the job (c) did not finish ({run_dir})")
    if not (Path(spec["captioner_dir"]) / "config.json").is_file():
        raise RuntimeError(f"no captioner to train: the training part did not save it ({spec['captioner_dir']})")
    s, steps, every = spec["shapes"], plan["cli_steps"], plan["cli_log_every"]
    overrides = generation_overrides(spec, run_dir, plan["job_images"], plan["shard_size"]) + [
        f"--train.captioner={spec['captioner_dir']}", f"--train.max_steps={steps}", f"--train.log_every={every}",
        f"--train.micro_batch_size={s['train_batch']}", f"--train.num_workers={plan['cli_workers']}",
        "--train.val_every=0", "--train.val_captions=0", "--train.save_every=1000000000"]
    if not runner.args.cli_head:
        overrides.append("--train.embedding_head=false")
    if spec["tiny"]:
        overrides.append("--train.precision=fp32")
    cmd = revprompt_command() + ["train", "--config", "sd2-blip"] + overrides
    started = time.time()
    run_bounded(cmd, runner.env, limit, "revprompt train (data wait)", stderr_path=runner.workdir / "train.stderr.log")
    wall = time.time() - started
    tb = run_dir / "tb" / "train"
    # the job's TensorBoard reader, pointed at the train stage's events
    wait = {step: v for step, _, v in read_job_scalars(tb.parent.parent, "perf/data_wait_fraction", "train")}
    rate = {step: v for step, _, v in read_job_scalars(tb.parent.parent, "perf/samples_per_s", "train")}
    if not wait:
        raise RuntimeError(f"{tb}: no perf/data_wait_fraction scalars (a trainer without the data-wait clock?)")
    later = [step for step in sorted(wait) if step > every and step in rate] or sorted(wait)
    # the windows hold equal steps, so each one's time is proportional to 1 / its rate
    weights = [1.0 / rate[step] for step in later]
    result = {"command": " ".join(cmd), "process_wall_s": wall, "steps": steps, "log_every": every,
              "num_workers": plan["cli_workers"], "embedding_head": runner.args.cli_head,
              "data_wait_fraction": sum(w * wait[st] for w, st in zip(weights, later)) / sum(weights),
              "steady_samples_per_s": len(later) / sum(weights), "windows": {
                  str(st): {"data_wait_fraction": wait[st], "samples_per_s": rate.get(st)} for st in sorted(wait)},
              "first_window_s": every * s["train_batch"] / rate[min(rate)] if rate else None}
    print(f"train CLI: {result['steady_samples_per_s']:.1f} samples/s, {100 * result['data_wait_fraction']:.1f} % "
          f"of the step time waiting for data ({plan['cli_workers']} workers)", flush=True)
    return result


# --- the report -------------------------------------------------------------------------------------------


def rate_of(result: dict[str, Any], *keys: str) -> float | None:
    """A nested figure, or None where a part did not get that far."""
    for key in keys:
        if not isinstance(result, dict) or result.get(key) is None:
            return None
        result = result[key]
    return result


def build_rows(r: dict[str, dict[str, Any]], tiny: bool) -> list[dict[str, Any]]:
    """The table's rows: (what, baseline, revprompt, ratio, target, met)."""
    gen, job, train, cap, wait = (r.get(k, {}) for k in ("generation", "job", "train", "caption", "data_wait"))
    eager, fast = rate_of(gen, "eager", "steady_images_per_s"), rate_of(gen, "fast", "steady_images_per_s")
    blocks = rate_of(gen, "blocks", "steady_images_per_s")
    job_rate = rate_of(job, "steady_images_per_s")
    t_eager, t_comp, t_eng = (rate_of(train, k, "samples_per_s") for k in ("eager", "compiled", "engine"))
    c_theirs, c_ours = rate_of(cap, "transformers_captions_per_s"), rate_of(cap, "revprompt_captions_per_s")

    def ratio(a, b):
        return a / b if a is not None and b else None

    rows = [
        ("generate img/s: job (c) vs bare + preset fast paths (b), time ratio", fast, job_rate,
         ratio(fast, job_rate), f"<= {GEN_TARGET}", lambda x: x <= GEN_TARGET),
        ("generate img/s: job (c) vs bare eager (a), speed-up", eager, job_rate, ratio(job_rate, eager), "-", None),
        ("generate img/s: bare compiled by blocks (b') vs as preset (b)", fast, blocks, ratio(blocks, fast), "-", None),
        ("train samples/s: engine (c) vs bare AMP compiled (b)", t_comp, t_eng, ratio(t_eng, t_comp),
         f">= {TRAIN_RATIO_TARGET}", lambda x: x >= TRAIN_RATIO_TARGET),
        ("train samples/s: engine (c), absolute", None, t_eng, None, f">= {TRAIN_RATE_TARGET:.0f}",
         lambda _: t_eng >= TRAIN_RATE_TARGET),
        ("train samples/s: engine (c) vs bare AMP eager (a)", t_eager, t_eng, ratio(t_eng, t_eager), "-", None),
        ("train samples/s: CLI with loader vs engine (c) in memory", t_eng, rate_of(wait, "steady_samples_per_s"),
         ratio(rate_of(wait, "steady_samples_per_s"), t_eng), "-", None),
        ("caption captions/s: revprompt vs transformers generate", c_theirs, c_ours, ratio(c_ours, c_theirs),
         f">= {CAPTION_TARGET}", lambda x: x >= CAPTION_TARGET),
    ]
    out = []
    for what, base, ours, value, target, check in rows:
        judged = value if value is not None else ours
        met = None if check is None or judged is None else bool(check(judged))
        out.append({"what": what, "baseline": base, "revprompt": ours, "ratio": value, "target": target,
                    "met": met, "judged": not tiny})
    return out


def notes(r: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Compile seconds and the shares of time spent outside the model, from every part that got that far."""
    gen, job, train, wait = (r.get(k, {}) for k in ("generation", "job", "train", "data_wait"))

    def compiled(value, flag) -> float | None:
        # a first batch's excess is a compile time only where something compiled (else it is warm-up and noise)
        return value if flag else None

    # the job compiles as (b) does: the same preset settings on the same device
    gen_compiles = rate_of(gen, "fast_paths", "compiled_here")
    return {
        "compile_s": {
            "generate bare, preset scope (b): first batch over a steady one":
                compiled(rate_of(gen, "fast", "first_batch_excess_s"), gen_compiles),
            "generate bare, compile_scope=blocks (b')":
                compiled(rate_of(gen, "blocks", "first_batch_excess_s"), rate_of(gen, "blocks", "compiled_here")),
            "generate job (c): first batch over a steady one":
                compiled(rate_of(job, "first_batch_excess_s"), gen_compiles),
            "train bare AMP (b)": rate_of(train, "compiled", "compile_s"),
            "train engine (c)": rate_of(train, "engine", "compile_s"),
            "train CLI: first logging window (start-up included)": rate_of(wait, "first_window_s"),
        },
        "outside_model": {
            "generate job: share of its loop outside the model call (%)": rate_of(job, "loop_host_percent"),
            "train CLI: share of step time waiting for the loader (%)":
                None if rate_of(wait, "data_wait_fraction") is None else 100 * wait["data_wait_fraction"],
        },
        "compiled": {"generate (b)": rate_of(gen, "fast_paths", "compiled_here"),
                     "generate (b')": rate_of(gen, "blocks", "compiled_here"),
                     "train (b)": rate_of(train, "compiled", "compiled"),
                     "train engine (c)": rate_of(train, "engine", "compiled")},
    }


def print_report(result: dict[str, Any]) -> None:
    """The one table, then compile seconds, shares outside the model, failures and the elapsed time."""
    rows, extra = result["table"], result["notes"]
    env = result["environment"]
    print(f"\n{'tiny logic check' if result['settings']['tiny'] else 'SD2-base / BLIP-base shapes'}, "
          f"{env.get('gpu') or env.get('device')}, torch {env.get('torch')}")
    paths = result["settings"]["preset_fast_paths"]
    print("preset settings: " + "; ".join(f"{section} " + ", ".join(f"{k}={v}" for k, v in values.items())
                                          for section, values in paths.items()))
    width = max(len(r["what"]) for r in rows)
    print(f"{'what':<{width}} | {'baseline':>9} | {'revprompt':>9} | {'ratio':>6} | {'target':>7} | met?")
    print("-" * (width + 50))
    for r in rows:
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else "NO")
        if not r["judged"] and r["met"] is not None:
            met = f"({met}: tiny)"
        print(f"{r['what']:<{width}} | {fmt(r['baseline'], '.1f'):>9} | {fmt(r['revprompt'], '.1f'):>9} | "
              f"{fmt(r['ratio'], '.3f'):>6} | {r['target']:>7} | {met}")
    print("compiled: " + ", ".join(f"{k} {v}" for k, v in extra["compiled"].items()))
    for title, figures in (("compile seconds", extra["compile_s"]), ("time outside the model", extra["outside_model"])):
        print(f"{title}:")
        for k, v in figures.items():
            print(f"  {k:<{width}} {fmt(v, '.1f'):>9}")
    for name, part in result["parts"].items():
        if part.get("error"):
            print(f"part {name}: {part['error'].splitlines()[0][:300]}")
        for key in ("blocks_skipped",):
            if part.get(key):
                print(f"part {name}: (b') skipped: {part[key]}")
    print(f"elapsed {result['elapsed_s']:.0f} s of a {result['settings']['budget_s']:.0f} s budget "
          f"(planned {result['plan']['estimated_total_s']:.0f} s)")


def compile_cache_state(env: dict[str, str]) -> dict[str, Any]:
    """Where inductor keeps compiled code and whether something is there already (warm caches compile faster)."""
    folder = Path(env.get("TORCHINDUCTOR_CACHE_DIR") or Path(tempfile.gettempdir()) /
                  f"torchinductor_{os.environ.get('USER', 'root')}")
    return {"dir": str(folder), "warm": folder.is_dir() and any(folder.iterdir())}


def main(argv: list[str] | None = None) -> int:
    """Plan, run the parts within the budget, print the table, write the JSON."""
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    started = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from revprompt.launch.config import load_config

    preset = load_config("sd2-blip", preset_overrides(args.overrides))  # a bad --set stops here, with its field
    workers = preset.train.num_workers if args.num_workers is None else args.num_workers
    plan = make_plan(args, workers)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="revprompt-gpu-all-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # every child inherits these (the generate job's too): offline, unbuffered progress, and the compile caches
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                      TOKENIZERS_PARALLELISM="false")
    if args.fresh_compile_cache:
        os.environ.update(TORCHINDUCTOR_CACHE_DIR=str(workdir / "inductor-cache"),
                          TRITON_CACHE_DIR=str(workdir / "triton"))
    env = dict(os.environ)
    cache = compile_cache_state(env)
    print(f"plan for {args.budget_s:.0f} s (estimated {plan['estimated_total_s']:.0f} s, counts x{plan['factor']:.2f}):"
          f" {json.dumps({k: v for k, v in plan.items() if k not in ('estimate_s',)})}", flush=True)
    if plan["fixed_over_budget"]:
        print("the budget is below the parts' estimated fixed seconds: later parts may be cut short", flush=True)
    shapes = TINY_SHAPES if args.tiny else GPU_SHAPES
    spec = {"device": args.device, "tiny": args.tiny, "shapes": shapes, "plan": plan, "overrides": args.overrides,
            "workdir": str(workdir), "model_dir": str(workdir / "sd2-model"),
            "captioner_dir": str(workdir / "captioner")}
    runner = Runner(args, plan, workdir, env, started)
    # (b') runs inside the generation part only while the parts after it still get their expected seconds
    later_than_blocks = ["job", "train", "caption", "data_wait"]
    blocks_spec = {**spec, "run_blocks": args.blocks,
                   "blocks_by": runner.deadline - sum(plan["estimate_s"][p] for p in later_than_blocks)
                   - plan["estimate_s"]["blocks"]}
    try:
        runner.run("generation", later_than_blocks, lambda limit: runner.child("generation", blocks_spec, limit))
        runner.run("job", ["train", "caption", "data_wait"], lambda limit: job_part(runner, spec, limit))
        runner.run("train", ["caption", "data_wait"], lambda limit: runner.child("train", spec, limit))
        runner.run("caption", ["data_wait"], lambda limit: runner.child("caption", spec, limit))
        runner.run("data_wait", [], lambda limit: data_wait_part(runner, spec, limit))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    parts = runner.results
    environment_ = next((p["environment"] for p in parts.values() if p.get("environment")), {})
    result = {
        "benchmark": "gpu_all",
        "command": " ".join([Path(sys.executable).name, "benchmarks/gpu_all.py"] + (argv if argv is not None
                                                                                       else sys.argv[1:])),
        "environment": {**environment_, "hostname": platform.node(), "compile_cache": cache},
        "settings": {"tiny": args.tiny, "device": args.device, "budget_s": args.budget_s, "shapes": shapes,
                     "overrides": args.overrides, "blocks": args.blocks, "cli_head": args.cli_head,
                     "preset_fast_paths": {"generate": {k: getattr(preset.generate, k) for k in
                                                        ("compile", "compile_scope", "compile_mode", "fuse_qkv")},
                                           "train": {k: getattr(preset.train, k) for k in
                                                     ("precision", "attention", "compile", "num_workers")},
                                           "evaluate": {k: getattr(preset.evaluate, k) for k in
                                                        ("attention", "batch_size")}}},
        "plan": plan,
        "table": build_rows(parts, args.tiny),
        "notes": notes(parts),
        "parts": parts,
        "elapsed_s": time.time() - started,
    }
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"results: {args.out}")
    return 0 if not any(p.get("error") for p in parts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
