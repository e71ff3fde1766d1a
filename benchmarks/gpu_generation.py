"""Images/s of a bare diffusers loop and of the `revprompt generate` job on one GPU, SD2-base-sized model.

What is measured
    A Stable Diffusion 2-base-shaped pipeline with random weights (UNet 320/640/1280/1280, cross-attention
    1024, linear projections; VAE 128/256/512/512; a 23-layer, 1024-wide CLIP text encoder on revprompt's
    offline BERT vocabulary) is built on the device, cast to `--dtype` (bf16) and saved with
    `save_pretrained` to a temp directory, so that both sides load the same files the same way
    (`build_pipeline(<dir>, ...)`: SDPA attention, DPM-Solver++, no safety checker). No weights are
    downloaded. Then, at 512 px, 25 steps, CFG 7.5, batch 32, over the same `--prompts` bundled prompts
    (all put in the train split so that every batch is full on both sides):

    bare  in this process: `build_pipeline`, then `pipe(prompt=batch, generator=[...], output_type="np")`
          per batch, the images discarded; a timestamp after each batch.
    job   the real CLI in a subprocess: `revprompt generate --config sd2-blip --run.device=cuda
          --generate.model=<dir> --generate.dtype=bf16 --generate.batch_size=32 --generate.steps=25
          --generate.height=512 --generate.width=512 --generate.compile=false --prompts.limit=N ...`,
          writing JPEG shards, manifest, logs and TensorBoard as a user's run does.

    Primary metric, the same definition on both sides: steady images/s = images after the first batch
    / time from the end of the first batch to the end of the last, so the first (warm-up) batch and
    the pipeline load are excluded. The bare side takes its timestamps itself; the job's come from the
    wall times of its `perf/images_per_s` TensorBoard events, which it logs once per batch right after
    the batch's images reach the host. Also reported: the job's own logged images/s (its log line
    "generated N images in S s"; this includes the pipeline load and the first batch), the bare
    rate over all batches, the bare load time, and the job's process wall time.

    Where a gap comes from: both sides also report the median seconds of one pipeline call after the
    first batch (bare: timed around `pipe(...)`; job: its `perf/model_s_per_batch` events, the call
    plus the copy of its pixels to the host), and the job the share of its generating loop spent
    outside the model call (its "generating thread: ..." log line). Equal calls with a larger share
    outside mean host work on the critical path; a slower call means contention inside the process.

Reproduce on one GPU (defaults: 256 images per side, roughly 3-4 minutes on an H100 with a warm disk):
    python benchmarks/gpu_generation.py
Logic check on a CPU (revprompt's tiny random components instead of the SD2-sized ones):
    python benchmarks/gpu_generation.py --tiny --device cpu --dtype fp32 --size 64 --steps 2 --batch 4 --prompts 12
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (fmt, job_batches, loop_clock, median_of, read_job_scalars, revprompt_command,  # noqa: E402
                     run_bounded, steady_rate)

JOB_LOG_LINE = re.compile(r"generated (\d+) images in ([\d.]+) s \(([\d.]+) images/s")
JOB_TIMEOUT_S = 1800


def default_out() -> Path:
    """$OUT/gpu_generation.json when OUT is set (the device runner), else benchmarks/results/."""
    out = os.environ.get("OUT")
    return Path(out) / "gpu_generation.json" if out else ROOT / "benchmarks" / "results" / "gpu_generation.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options; the defaults are the sd2-blip reference setup on one GPU."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    parser.add_argument("--batch", type=int, default=32, help="images per pipeline call")
    parser.add_argument("--prompts", type=int, default=256, help="prompts (= images) per side, first batch included")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (job only)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each side, alternating bare, job")
    parser.add_argument("--tiny", action="store_true",
                        help="revprompt's tiny random components instead of SD2-sized ones (CPU logic check)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--out", type=Path, default=None, help="JSON results file (default: see the docstring)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the model and run directories here instead of a deleted temp dir")
    args = parser.parse_args(argv)
    if args.prompts < 2 * args.batch:
        parser.error("--prompts: need at least two batches, the first one is the excluded warm-up")
    if args.size % 8:
        parser.error("--size: must be a multiple of 8")
    args.out = args.out or default_out()
    return args


# --- the model ------------------------------------------------------------------------------------


def sd2_components(device: str) -> dict[str, Any]:
    """Random UNet, VAE and CLIP text encoder with stabilityai/stable-diffusion-2-base's shapes, on `device`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from revprompt.models.text_to_image import TEXT_MAX_TOKENS, offline_tokenizer

    tokenizer = offline_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: seconds instead of a minute of CPU init
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
            norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, hidden_act="gelu", projection_dim=512,
            max_position_embeddings=TEXT_MAX_TOKENS, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def save_random_pipeline(model_dir: Path, tiny: bool, dtype: str, device: str) -> dict[str, Any]:
    """Build the random pipeline, cast it to `dtype`, save it as a diffusers directory; return its size."""
    import torch
    from diffusers import StableDiffusionPipeline

    from revprompt.models.text_to_image import DTYPES, build_tiny_components, make_scheduler

    start = time.perf_counter()
    components = build_tiny_components(0) if tiny else sd2_components(device)
    pipe = StableDiffusionPipeline(**components, scheduler=make_scheduler("dpmsolver++"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(dtype=DTYPES[dtype])
    params = {name: sum(p.numel() for p in components[name].parameters())
              for name in ("unet", "vae", "text_encoder")}
    pipe.save_pretrained(model_dir, safe_serialization=True)
    del pipe, components
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    return {"kind": "tiny" if tiny else "sd2-base-shaped", "params": params, "bytes_on_disk": size,
            "dtype": dtype, "build_and_save_s": time.perf_counter() - start}


# --- the two sides --------------------------------------------------------------------------------


def generation_overrides(model_dir: Path, run_dir: Path, *, device: str, dtype: str, batch: int, steps: int,
                         size: int, guidance: float, shard_size: int, prompts: int,
                         preset_fast_paths: bool = False) -> list[str]:
    """Overrides of the sd2-blip preset for a benchmark run: the model, the shapes, all prompts in the train split
    (every batch full). The preset's fast paths (generate.compile, compile_scope, compile_mode, fuse_qkv) stay as
    the preset sets them with `preset_fast_paths`, else compilation is turned off (this script's comparison)."""
    overrides = [f"--run.dir={run_dir}", f"--run.device={device}", f"--generate.model={model_dir}",
                 f"--generate.dtype={dtype}", f"--generate.batch_size={batch}", f"--generate.steps={steps}",
                 f"--generate.height={size}", f"--generate.width={size}", f"--generate.guidance_scale={guidance}",
                 "--generate.scheduler=dpmsolver++", f"--generate.shard_size={shard_size}",
                 f"--prompts.limit={prompts}", "--prompts.val_fraction=0", "--prompts.test_fraction=0"]
    return overrides if preset_fast_paths else overrides + ["--generate.compile=false"]


def job_overrides(args: argparse.Namespace, model_dir: Path, run_dir: Path) -> list[str]:
    """Overrides of the sd2-blip preset shared by the job and by `prepare` (and so by the bare loop)."""
    return generation_overrides(model_dir, run_dir, device=args.device, dtype=args.dtype, batch=args.batch,
                                steps=args.steps, size=args.size, guidance=args.guidance, shard_size=args.shard_size,
                                prompts=args.prompts)


def prepare_prompts(overrides: list[str]) -> dict[str, Any]:
    """`prepare` into the run.dir of `overrides`, claimed as a revprompt run first (as `revprompt prepare` does), so
    that a job's run dir seeded with a copy of it accepts the prompts."""
    from revprompt.generation.prepare import prepare
    from revprompt.launch.config import load_config
    from revprompt.launch.layout import claim_run_dir

    cfg = load_config("sd2-blip", overrides)
    claim_run_dir(cfg.run.dir)
    return prepare(cfg)


def prepared_texts(prepared: Path) -> list[str]:
    """The prompts a prepared run dir holds, splits in order."""
    from revprompt.prompts.prepared import load_split
    from revprompt.shards.schema import SPLITS

    folder = prepared / "prompts"
    return [p.text for split in SPLITS if (folder / f"{split}.idx").is_file() for p in load_split(folder, split)]


def bare_loop(g, device: str, texts: list[str], *, fuse: bool = False, compile: bool = False,
              scope: str = "whole", mode: str = "default", seed: int = 0) -> dict[str, Any]:
    """Build the pipeline of the [generate] settings `g` here (with the given fast paths) and generate `texts` in
    batches of g.batch_size with plain `pipe(...)` calls; per-batch timestamps.

    A compiled denoiser compiles inside the first call, so that call's excess over a steady one is reported as
    `first_batch_excess_s` (the compile time, for a compiled side; cuDNN and allocator warm-up for an eager one).
    """
    import torch

    from revprompt.models.text_to_image import build_pipeline

    cuda = device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    pipe = build_pipeline(g.model, scheduler=g.scheduler, dtype=g.dtype, device=device, seed=seed, fuse=fuse,
                          compile=compile, compile_scope=scope, compile_mode=mode)
    sync()
    built = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stamps: list[tuple[int, float]] = []
    calls: list[float] = []
    with torch.inference_mode():
        for first in range(0, len(texts), g.batch_size):
            batch = texts[first:first + g.batch_size]
            called = time.perf_counter()
            pipe(prompt=batch, num_inference_steps=g.steps, guidance_scale=g.guidance_scale, height=g.height,
                 width=g.width, generator=[torch.Generator("cpu").manual_seed(i)
                                           for i in range(first, first + len(batch))], output_type="np")
            sync()  # output_type="np" already waits for the device; this makes it explicit
            stamps.append((first + len(batch), time.perf_counter()))
            calls.append(stamps[-1][1] - called)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    generate_s = stamps[-1][1] - built
    steady_call = statistics.median(calls[1:]) if len(calls) > 1 else None
    return {"images": len(texts), "pipeline_calls": len(stamps), "load_s": built - start,
            "first_batch_s": stamps[0][1] - built, "generate_s": generate_s,
            "first_batch_excess_s": calls[0] - steady_call if steady_call is not None else None,
            "all_batches_images_per_s": len(texts) / generate_s, "steady_images_per_s": steady_rate(stamps),
            "steady_model_s_per_batch": steady_call, "model_s_per_batch": calls,
            "peak_gpu_memory_gib": peak / 2**30 if peak is not None else None}


def run_bare(args: argparse.Namespace, model_dir: Path, prepared: Path) -> dict[str, Any]:
    """Load the saved pipeline here and generate the prepared prompts in batches; per-batch timestamps."""
    from revprompt.launch.config import load_config

    cfg = load_config("sd2-blip", job_overrides(args, model_dir, prepared))
    return bare_loop(cfg.generate, args.device, prepared_texts(prepared), seed=cfg.run.seed)


def generate_job(overrides: list[str], run_dir: Path, prepared: Path | None = None,
                 timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    """One `revprompt generate --config sd2-blip` process with `overrides` on a fresh `run_dir` (seeded with the
    prompts of `prepared`, else the job prepares them itself); its rates from its log and TensorBoard events.

    The job's first `perf/model_s_per_batch` includes the denoiser's compilation when it compiles, so its excess
    over a steady call is reported as `first_batch_excess_s`, as for the bare loop."""
    if prepared is not None:
        shutil.copytree(prepared / "prompts", run_dir / "prompts")
        # the copy is a revprompt run: its marker comes along, or the job refuses prompts it did not write
        from revprompt.launch.layout import RUN_MARKER

        shutil.copy2(prepared / RUN_MARKER, run_dir / RUN_MARKER)
    cmd = revprompt_command() + ["generate", "--config", "sd2-blip"] + overrides
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    run_bounded(cmd, env, timeout_s, "revprompt generate")
    wall = time.perf_counter() - start
    log_text = (run_dir / "logs" / "rank-0.log").read_text(encoding="utf-8")
    match = JOB_LOG_LINE.search(log_text)
    if match is None:
        raise RuntimeError(f"{run_dir}/logs/rank-0.log: no 'generated N images' line")
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    failures = sum(json.loads(m.read_text())["failures"] for m in (run_dir / "shards").glob("*/*.stats.json"))
    batches = job_batches(run_dir)
    calls = [value for _, _, value in read_job_scalars(run_dir, "perf/model_s_per_batch")]
    steady_call = statistics.median(calls[1:]) if len(calls) > 1 else None
    return {"images": int(match.group(1)), "pipeline_calls": len(batches), "process_wall_s": wall,
            "logged_s": float(match.group(2)), "logged_images_per_s": float(match.group(3)),
            "steady_images_per_s": steady_rate(batches), "steady_model_s_per_batch": steady_call,
            "first_batch_excess_s": calls[0] - steady_call if steady_call is not None else None,
            **loop_clock(log_text), "complete": manifest["complete"], "non_finite_images": failures}


def run_job(args: argparse.Namespace, model_dir: Path, run_dir: Path, prepared: Path) -> dict[str, Any]:
    """One `revprompt generate` process on a fresh run dir seeded with the prepared prompts."""
    return generate_job(job_overrides(args, model_dir, run_dir), run_dir, prepared)


# --- report ---------------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    """Versions and the device name."""
    import diffusers
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "device": device}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_count"] = os.cpu_count()
    return env


def summarise(args: argparse.Namespace, model: dict[str, Any], bare: list[dict[str, Any]],
              job: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians, the job/bare time ratio and the raw runs, as written to the JSON file."""
    bare_rate, job_rate = median_of(bare, "steady_images_per_s"), median_of(job, "steady_images_per_s")
    return {
        "benchmark": "gpu_generation",
        "command": " ".join(["python", "benchmarks/gpu_generation.py"] + sys.argv[1:]),
        "metric": "steady images/s: images after the first batch / time from the end of the first batch to the "
                  "end of the last (bare: own timestamps; job: wall times of its per-batch TensorBoard events)",
        "settings": {"size": args.size, "steps": args.steps, "batch": args.batch, "prompts": args.prompts,
                     "guidance_scale": args.guidance, "scheduler": "dpmsolver++", "dtype": args.dtype,
                     "device": args.device, "shard_size": args.shard_size, "repeats": args.repeats,
                     "order": "bare, job, bare, job, ..."},
        "environment": environment(args.device),
        "model": model,
        "median": {
            "bare": {k: median_of(bare, k) for k in ("steady_images_per_s", "all_batches_images_per_s", "load_s",
                                                     "peak_gpu_memory_gib", "steady_model_s_per_batch")},
            "job": {k: median_of(job, k) for k in ("steady_images_per_s", "logged_images_per_s", "process_wall_s",
                                                    "steady_model_s_per_batch", "loop_host_percent")},
        },
        # rates, so bare / job is the time ratio job / bare
        "time_ratio_job_over_bare": bare_rate / job_rate if bare_rate and job_rate else None,
        "runs": {"bare": bare, "job": job},
    }


def print_table(result: dict[str, Any]) -> None:
    """The medians and the job/bare time ratio."""
    bare, job = result["median"]["bare"], result["median"]["job"]
    s = result["settings"]
    print(f"\n{result['model']['kind']}, {s['size']} px, {s['steps']} steps, batch {s['batch']}, {s['dtype']}, "
          f"{s['prompts']} images per side, {result['environment'].get('gpu', s['device'])}")
    print(f"{'':<44}{'bare':>10}{'job':>10}")
    print(f"{'steady images/s (first batch excluded)':<44}{fmt(bare['steady_images_per_s']):>10}"
          f"{fmt(job['steady_images_per_s']):>10}")
    print(f"{'images/s, all batches (bare: load excluded)':<44}{fmt(bare['all_batches_images_per_s']):>10}{'':>10}")
    print(f"{'images/s, job log line (load included)':<44}{'':>10}{fmt(job['logged_images_per_s']):>10}")
    print(f"{'pipeline load (s)':<44}{fmt(bare['load_s']):>10}{'':>10}")
    print(f"{'process wall time (s)':<44}{'':>10}{fmt(job['process_wall_s']):>10}")
    print(f"{'peak GPU memory (GiB)':<44}{fmt(bare['peak_gpu_memory_gib']):>10}{'':>10}")
    # where a gap comes from: a slower model call (contention inside the process), or time outside it
    print(f"{'model call per batch, steady (s)':<44}{fmt(bare['steady_model_s_per_batch'], '.3f'):>10}"
          f"{fmt(job['steady_model_s_per_batch'], '.3f'):>10}")
    print(f"{'job loop outside the model call (%)':<44}{'':>10}{fmt(job['loop_host_percent'], '.1f'):>10}")
    print(f"time ratio job/bare (steady): {fmt(result['time_ratio_job_over_bare'], '.3f')}")


def main(argv: list[str] | None = None) -> int:
    """Save the random pipeline, prepare the prompts, alternate bare and job; print and write the results."""
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here (use --tiny --device cpu for a logic check)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="revprompt-gpu-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model_dir = workdir / "model"
        model = save_random_pipeline(model_dir, args.tiny, args.dtype, args.device)
        print(f"saved {model['kind']} pipeline ({model['bytes_on_disk'] / 2**30:.2f} GiB, "
              f"{model['build_and_save_s']:.1f} s) to {model_dir}", flush=True)
        prepared = workdir / "prepared"
        report = prepare_prompts(job_overrides(args, model_dir, prepared))
        print(f"prepared {report['kept']} prompts", flush=True)
        bare: list[dict[str, Any]] = []
        job: list[dict[str, Any]] = []
        for i in range(args.repeats):
            bare.append(run_bare(args, model_dir, prepared))
            print(f"run {i + 1}/{args.repeats} bare: {fmt(bare[-1]['steady_images_per_s'])} images/s steady",
                  flush=True)
            job.append(run_job(args, model_dir, workdir / f"job-{i}", prepared))
            print(f"run {i + 1}/{args.repeats} job:  {fmt(job[-1]['steady_images_per_s'])} images/s steady",
                  flush=True)
        counts = {r["images"] for r in bare + job}
        if counts != {report["kept"]}:
            raise RuntimeError(f"image counts differ: {counts}, prepared {report['kept']}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = summarise(args, model, bare, job)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
