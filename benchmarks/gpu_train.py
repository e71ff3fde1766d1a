"""Samples/s of revprompt's DeepSpeed training engine against a bare AMP loop, BLIP-base-sized, on one GPU.

What is measured
    A BlipForConditionalGeneration with random weights and blip-image-captioning-base's shapes
    (BlipConfig's default vision and text configs: vision 768 wide, 12 layers, 384 px, patch 16;
    text decoder 768 wide, 12 layers, 12 heads, cross-attention 768) on revprompt's offline BERT
    vocabulary (`offline_blip_tokenizer()`, 30523 tokens, [DEC] as bos). No weights are downloaded.
    Both sides train on the same pre-built batches held on the device (`--batch` random 384 px
    images + bundled prompts tokenised with `encode_prompts`, max_length 40), so neither measures
    the data loader (benchmarks/loader_throughput.py does that):

    Both sides run BLIP's attention as `--attention` says (default: the preset's train.attention,
    "sdpa": revprompt's switch of BLIP's attention modules to torch's fused SDPA).

    engine  revprompt's path, in this process: `dist.init` + `dist.ensure_group` (a one-rank NCCL
            group, as `revprompt train` makes), the TrainConfig of the sd2-blip preset with
            precision `--precision` (bf16), zero_stage `--zero-stage` (2; one rank runs it as
            ZeRO-0, see engine.effective_stage), micro batch `--batch` (32), then
            `revprompt.training.engine.initialize` (DeepSpeed with a torch AdamW(fused=True) and
            the warm-up + cosine LambdaLR). Per step, as Trainer._micro_step does: `loss =
            engine(**batch).loss` (pixels cast to the module's dtype), `engine.backward(loss)`,
            at the accumulation boundary `clip_gradients` when `trainer_clips(engine.config)`
            (fp32 weights at stage 0: precision fp32 or bf16-autocast; the norm read back on the
            preset's log_every steps, as the trainer logs it), `engine.step()` (DeepSpeed's own
            clipping where the trainer does not clip, optimizer, scheduler, zero_grad inside).
            `--compile-engine`: `engine.compile()` as train.compile does (on CUDA only, as the
            trainer).
    bare    a plain loop over a fresh copy of the same model in fp32 under `torch.autocast(bf16)`
            (plain fp32 with --precision fp32): forward, backward, `clip_grad_norm_(1.0)`,
            AdamW(fused=True) with the same parameter groups, lr and weight decay
            (`build_optimizer`), `scheduler.step()`, `zero_grad(set_to_none=True)`. `--compile`
            wraps the bare model in `torch.compile`.

    Neither side reads its loss back after a step, as the trainer does not (it sums a logging window's
    losses on the device); `--sync-each-step` adds a `loss.item()` after every step to both.
    Each side: `--warmup` steps (5; a compiled side at least two passes over the 4 batches, whose
    padded text lengths differ, so that no compilation falls into the timed steps),
    `torch.cuda.synchronize()`, `--steps` timed steps (30), synchronize. Metric: samples/s =
    steps x batch / elapsed. A compiled side also reports `compile_s`: its warm-up time less
    what its warm-up steps take at the timed rate. The sides run one after the other in one
    process (`--order`, default engine then bare; `--repeats` alternates more rounds), each on a
    freshly built model, the previous side's memory (and compiled graphs) freed. Also reported: peak memory per side, and (`--breakdown`, on
    by default) ms per phase (forward / backward / step) over a few extra steps with a synchronize
    after each phase, to show where the engine's extra time goes.

Reproduce on one GPU (about 1-2 minutes of GPU time on an H100 with the packages installed):
    python benchmarks/gpu_train.py
    python benchmarks/gpu_train.py --compile        # bare side under torch.compile (adds compile time)
Logic check on a CPU (tiny shapes, fp32 unless --precision bf16):
    python benchmarks/gpu_train.py --tiny --device cpu --batch 4 --warmup 1 --steps 3 --out /tmp/gpu_train.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def default_out() -> Path:
    """$OUT/gpu_train.json when OUT is set (the device runner), else benchmarks/results/gpu_train.json."""
    out = os.environ.get("OUT")
    return Path(out) / "gpu_train.json" if out else ROOT / "benchmarks" / "results" / "gpu_train.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options; the defaults are the sd2-blip training setup on one GPU."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, default=32, help="micro batch (train.micro_batch_size)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default 384; --tiny: 64)")
    parser.add_argument("--max-length", type=int, default=40, help="tokeniser max_length")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2), help="engine's ZeRO stage")
    parser.add_argument("--precision", default=None, choices=("bf16", "bf16-autocast", "fp32"),
                        help="engine precision (train.precision) / bare autocast dtype (default bf16; --tiny: fp32)")
    parser.add_argument("--attention", default=None, choices=("sdpa", "eager"),
                        help="BLIP attention on both sides (default: the preset's train.attention)")
    parser.add_argument("--order", default="engine,bare", help="sides per round, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of --order")
    parser.add_argument("--compile", action="store_true", help="torch.compile the bare model")
    parser.add_argument("--compile-engine", action="store_true",
                        help="engine.compile() as train.compile=true does (adds compile time)")
    parser.add_argument("--sync-each-step", action="store_true",
                        help="loss.item() after each step on both sides (the trainer does not)")
    parser.add_argument("--breakdown", type=int, default=6,
                        help="extra steps per side timed per phase with a synchronize after each (0 = off)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (hidden 64, 2 layers) for a CPU logic check")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON results file (default: see the docstring)")
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (64 if args.tiny else 384)
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")
    if args.attention is None:
        from revprompt.launch.config import load_config

        args.attention = load_config("sd2-blip").train.attention
    args.order = [s.strip() for s in args.order.split(",") if s.strip()]
    if not args.order or set(args.order) - {"engine", "bare"}:
        parser.error("--order: a comma-separated list of engine and bare")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps >= 1, --warmup >= 0")
    return args


def build_model(args: argparse.Namespace, tokenizer, device):
    """Random BLIP captioner: blip-image-captioning-base's shapes, or tiny ones with --tiny; attention as
    --attention says (revprompt's SDPA switch, or transformers' eager)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    from revprompt.models.captioner import check_special_tokens, set_attention

    text = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    if args.tiny:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      image_size=args.image_size, patch_size=8)
        text.update(hidden_size=64, encoder_hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=128)
    else:
        # BlipConfig's defaults are blip-image-captioning-base's shapes; the hub model's text decoder has 12 heads
        vision = dict(image_size=args.image_size)
        text.update(num_attention_heads=12)
    config = BlipConfig(vision_config=vision, text_config=text)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = BlipForConditionalGeneration(config)
    check_special_tokens(model, tokenizer)
    set_attention(model, args.attention)
    return model.train()


def save_random_captioner(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """The random captioner of `build_model` (fp32, initialised on --device: seconds instead of a minute of CPU init)
    with a BLIP processor at its image size, saved with save_pretrained: a folder that `revprompt train
    --train.captioner=DIR`, revprompt's captioning and plain transformers all load, without a download."""
    import torch
    from transformers import BlipProcessor

    from revprompt.models.captioner import IMAGE_MEAN, IMAGE_STD, offline_blip_tokenizer

    try:  # transformers 5 without torchvision: the PIL image processor (what revprompt's tiny captioner uses)
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor as ImageProcessor

    start = time.perf_counter()
    tokenizer = offline_blip_tokenizer()
    model = build_model(args, tokenizer, torch.device(args.device))
    processor = BlipProcessor(image_processor=ImageProcessor(size={"height": args.image_size,
                                                                   "width": args.image_size},
                                                             image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD)),
                              tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"kind": "tiny BLIP" if args.tiny else "BLIP-base shapes (random weights)", "params": params,
            "image_size": args.image_size, "save_s": time.perf_counter() - start}


def build_batches(args: argparse.Namespace, tokenizer, device, n: int = 4) -> list[dict]:
    """`n` micro batches on the device: random pixels (fp32) and tokenised bundled prompts."""
    import torch

    from revprompt.prompts.sources import read_prompts
    from revprompt.models.captioner import encode_prompts

    prompts = [p.text for p in read_prompts("bundled") if p.text]
    generator = torch.Generator().manual_seed(args.seed)
    batches = []
    for i in range(n):
        chunk = [prompts[(i * args.batch + j) % len(prompts)] for j in range(args.batch)]
        text = encode_prompts(tokenizer, chunk, args.max_length)
        batches.append({
            "pixel_values": torch.randn(args.batch, 3, args.image_size, args.image_size,
                                        generator=generator).to(device),
            "input_ids": text.input_ids.to(device), "attention_mask": text.attention_mask.to(device),
            "labels": text.labels.to(device)})
    return batches


def train_config(args: argparse.Namespace, extra: list[str] | tuple[str, ...] = ()):
    """The sd2-blip preset's [train] (with `extra` overrides) with this benchmark's stage, precision and batch."""
    from revprompt.launch.config import load_config

    cfg = load_config("sd2-blip", [*extra, f"--train.zero_stage={args.zero_stage}",
                                   f"--train.precision={args.precision}",
                                   f"--train.micro_batch_size={args.batch}", "--train.grad_accum=1",
                                   "--train.max_steps=100000"])
    return cfg.train


def autocast_dtype(precision: str):
    """The bare side's autocast dtype for a train.precision: bf16 for bf16 and bf16-autocast, none (fp32) else."""
    import torch

    return torch.bfloat16 if precision in ("bf16", "bf16-autocast") else torch.float32


def synchronize(device) -> None:
    """Wait for the device (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Side:
    """One side's step, split into phases so the breakdown can time each."""

    def forward(self, batch: dict):
        raise NotImplementedError

    def backward(self, loss) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError


class EngineSide(Side):
    """revprompt.training.engine.initialize on the model; Trainer._micro_step's forward, backward, clip and step."""

    def __init__(self, model, train, info):
        from revprompt.training.engine import forward_entry, initialize, trainer_clips

        self.engine, self.optimizer, self.scheduler = initialize(model, train, info.world_size, info.device)
        # as the trainer: compiled on CUDA only (on a CPU the compile costs minutes and buys nothing)
        self.compiled = train.compile and info.device.type == "cuda"
        if self.compiled:
            self.engine.compile()
        self.model_forward = forward_entry(self.engine, info.world_size)  # as the trainer calls the forward
        self.dtype = next(p for p in self.engine.module.parameters()).dtype
        # as Trainer.__init__: at stage 0 with fp32 weights the trainer clips (torch's foreach clip), not DeepSpeed
        self.clips = trainer_clips(self.engine.config)
        self.trained = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.grad_clip, self.log_every, self.steps = train.grad_clip, train.log_every, 0
        wrapper = self.engine.optimizer
        inner = getattr(wrapper, "optimizer", wrapper)
        fused = inner.defaults.get("fused") if hasattr(inner, "defaults") else None
        weights = ("bf16" if self.engine.bfloat16_enabled() else
                   "fp32 under bf16 autocast" if self.engine.torch_autocast_enabled() else "fp32")
        self.description = (f"DeepSpeed ZeRO-{self.engine.zero_optimization_stage()}, {weights} engine, "
                            f"{type(wrapper).__name__} over {type(inner).__name__}(fused={fused}), "
                            f"{'trainer clips' if self.clips else 'DeepSpeed clips'}, "
                            f"forward through {'the engine' if self.model_forward is self.engine else 'the module'}"
                            f"{', engine.compile()' if self.compiled else ''}")

    def forward(self, batch: dict):
        batch = dict(batch, pixel_values=batch["pixel_values"].to(self.dtype))
        return self.model_forward(**batch).loss

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        from revprompt.training.engine import clip_gradients

        self.steps += 1
        if self.clips and self.engine.is_gradient_accumulation_boundary():
            # the trainer reads the norm back (a device sync) on the steps it logs: Trainer.logs_at
            clip_gradients(self.trained, self.grad_clip, want_norm=self.steps % self.log_every == 0)
        self.engine.step()

    def close(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        del self.engine, self.optimizer, self.scheduler


class BareSide(Side):
    """fp32 weights, autocast forward, fused AdamW with the trainer's groups, clipping, LambdaLR."""

    def __init__(self, model, train, device, dtype, compile_model: bool):
        import torch

        from revprompt.training.engine import build_optimizer, lr_lambda

        self.model, self.device, self.dtype, self.clip = model, device, dtype, train.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, train, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(train))
        self.call = torch.compile(model) if compile_model else model
        self.compiled = compile_model
        self.description = (f"eager{' + torch.compile' if compile_model else ''}, fp32 weights, "
                            f"{'autocast ' + str(dtype).replace('torch.', '') if dtype != torch.float32 else 'fp32'}, "
                            f"AdamW(fused={self.optimizer.defaults.get('fused')})")

    def forward(self, batch: dict):
        import torch

        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            return self.call(**batch).loss

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.model, self.call, self.optimizer, self.scheduler, self.params


def run_steps(side: Side, batches: list[dict], steps: int, sync_loss: bool, offset: int = 0) -> list[float]:
    """`steps` full steps; returns the losses (as floats when synced, else read at the end)."""
    losses = []
    for i in range(steps):
        loss = side.forward(batches[(offset + i) % len(batches)])
        side.backward(loss)
        side.step()
        losses.append(loss.item() if sync_loss else loss.detach())
    return [float(x) for x in losses]


def breakdown(side: Side, batches: list[dict], steps: int, device) -> dict[str, float]:
    """Median ms of forward, backward and step, with a synchronize after each phase."""
    times: dict[str, list[float]] = {"forward_ms": [], "backward_ms": [], "step_ms": []}
    for i in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        loss = side.forward(batches[i % len(batches)])
        synchronize(device)
        t1 = time.perf_counter()
        side.backward(loss)
        synchronize(device)
        t2 = time.perf_counter()
        side.step()
        synchronize(device)
        t3 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            value_ms = value * 1000
            times[key].append(value_ms)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_side(name: str, args: argparse.Namespace, tokenizer, batches, info, train) -> dict[str, Any]:
    """Build the side on a fresh model, warm up, time `--steps`, optionally break a few steps down."""
    import torch

    device = info.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_build = time.perf_counter()
    model = build_model(args, tokenizer, device)
    if name == "engine":
        train.compile = args.compile_engine
        side: Side = EngineSide(model, train, info)
    else:
        side = BareSide(model, train, device, autocast_dtype(args.precision), args.compile)
    built = time.perf_counter()
    # batches differ in padded text length: a compiled model must have seen every shape (and recompiled
    # for dynamic shapes) before the timed steps, or they include compilations
    compiled = side.compiled
    warmup = max(args.warmup, 2 * len(batches)) if compiled else args.warmup
    warm = run_steps(side, batches, warmup, sync_loss=True)
    synchronize(device)
    warmed = time.perf_counter()
    losses = run_steps(side, batches, args.steps, sync_loss=args.sync_each_step, offset=warmup)
    synchronize(device)
    end = time.perf_counter()
    result = {"side": name, "description": side.description, "samples_per_s": args.steps * args.batch / (end - warmed),
              "step_ms": (end - warmed) / args.steps * 1000, "timed_s": end - warmed, "build_s": built - t_build,
              "warmup_steps": warmup, "warmup_s": warmed - built, "first_loss": (warm or losses)[0],
              "last_loss": losses[-1], "compiled": compiled,
              # the warm-up beyond what its steps take at the timed rate: the compilation (and recompilations)
              "compile_s": max(0.0, (warmed - built) - warmup * (end - warmed) / args.steps) if compiled else None}
    if args.breakdown:
        result["breakdown"] = breakdown(side, batches, args.breakdown, device)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    side.close()
    del side, model
    if compiled:  # the compiled graphs (and their guards on this model) go too: the next side starts clean
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    compiling = "" if result["compile_s"] is None else f" (compile {result['compile_s']:.1f} s)"
    print(f"{name:<7} {result['samples_per_s']:8.2f} samples/s ({result['step_ms']:.1f} ms/step), "
          f"build {result['build_s']:.1f} s, warm-up {result['warmup_s']:.1f} s{compiling}, "
          f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}; {result['description']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Build the runtime and the batches once, then measure the sides in order; table and JSON."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    from revprompt.launch import dist  # dist.init sets DS_ACCELERATOR=cpu before deepspeed is imported

    info = dist.init(args.device)
    dist.ensure_group(info)
    import deepspeed
    import torch
    import transformers

    from revprompt.models.captioner import offline_blip_tokenizer
    from revprompt.training.engine import allow_deepspeed_checkpoint_types

    allow_deepspeed_checkpoint_types()
    tokenizer = offline_blip_tokenizer()
    batches = build_batches(args, tokenizer, info.device)
    train = train_config(args)
    rounds: list[dict[str, Any]] = []
    try:
        for _ in range(args.repeats):
            for name in args.order:
                rounds.append(measure_side(name, args, tokenizer, batches, info, train))
    finally:
        dist.close()
    median = {name: statistics.median(r["samples_per_s"] for r in rounds if r["side"] == name)
              for name in dict.fromkeys(args.order)}
    engine, bare = median.get("engine"), median.get("bare")
    gpu = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "benchmark": "gpu_train",
        "command": " ".join([Path(sys.executable).name, "benchmarks/gpu_train.py"] + sys.argv[1:]),
        "metric": "samples/s over the timed steps (synchronize before and after), pre-built batches on the device",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "model": "tiny BLIP" if args.tiny else "BLIP-base shapes (random weights)",
        "train_config": {"lr": train.lr, "weight_decay": train.weight_decay, "grad_clip": train.grad_clip,
                         "warmup_steps": train.warmup_steps, "zero_stage": train.zero_stage,
                         "precision": train.precision},
        "environment": {"device": gpu, "python": platform.python_version(), "torch": torch.__version__,
                        "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
        "median_samples_per_s": median,
        "ratio_engine_over_bare": engine / bare if engine and bare else None,
        "runs": rounds,
        "total_s": time.perf_counter() - t_start,
    }
    print(f"\n{'side':<8}{'samples/s':>11}{'ms/step':>10}{'fwd ms':>9}{'bwd ms':>9}{'step ms':>9}"
          f"{'peak GiB':>10}  what")
    for r in rounds:
        b = r.get("breakdown", {})
        cells = [format(b[k], ".1f") if k in b else "-" for k in ("forward_ms", "backward_ms", "step_ms")]
        mem = format(r["peak_memory_gib"], ".1f") if "peak_memory_gib" in r else "-"
        print(f"{r['side']:<8}{r['samples_per_s']:>11.2f}{r['step_ms']:>10.1f}{cells[0]:>9}{cells[1]:>9}{cells[2]:>9}"
              f"{mem:>10}  {r['description']}")
    if result["ratio_engine_over_bare"] is not None:
        print(f"engine / bare = {result['ratio_engine_over_bare']:.3f} on {gpu} "
              f"(breakdown phases are synchronised, so they add up to more than ms/step)")
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out} ({result['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
