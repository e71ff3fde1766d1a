"""`revprompt caption`: recover prompts for image files, folders or shards with an exported captioner."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from ..shards.reader import ReadStats, build_reader, list_shards

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def iter_inputs(inputs: list[str], stats: ReadStats) -> Iterator[tuple[str, str, Image.Image]]:
    """("path" or "key", its value, image) for each image file, image in a folder, or sample in shards."""
    for item in inputs:
        path = Path(item)
        if path.is_dir() and ((path / "manifest.json").is_file() or any(path.glob("*/[0-9]*.tar"))):
            shards = [s for split in ("train", "val", "test") for s in list_shards(path, split)]
            yield from _shard_samples(shards, stats)
        elif path.is_dir() and list(path.glob("[0-9]*.tar")):
            yield from _shard_samples(list_shards(path.parent, path.name), stats)
        elif path.suffix == ".tar":
            yield from _shard_samples([str(path)], stats)
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                yield from _image_file(file, stats)
        elif path.is_file():
            yield from _image_file(path, stats)
        else:
            raise FileNotFoundError(f"{path}: no such image, folder or shard")


def _shard_samples(shards: list[str], stats: ReadStats) -> Iterator[tuple[str, str, Image.Image]]:
    for sample in build_reader(shards, stats=stats, require=("image",), split_workers=False):
        yield "key", sample["__key__"], sample["image"]


def _image_file(path: Path, stats: ReadStats) -> Iterator[tuple[str, str, Image.Image]]:
    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except (OSError, ValueError) as exc:
        stats.corrupt += 1
        log.warning("skipping unreadable image %s: %s", path, exc)
        return
    stats.samples += 1
    yield "path", str(path), image


def caption_all(captioner: str, inputs: list[str], out: str, *, batch_size: int = 32, max_new_tokens: int = 40,
                num_beams: int = 1, repetition_penalty: float = 1.0, device: str = "auto") -> dict:
    """Caption every input into a JSONL file (written atomically); returns counts."""
    from tqdm import tqdm
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from ..training.captioner import generate_captions, image_size_of, preprocess_images

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = BlipForConditionalGeneration.from_pretrained(captioner, dtype=dtype).to(dev).eval()
    processor = BlipProcessor.from_pretrained(captioner)
    size = image_size_of(model)
    stats = ReadStats()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    written = 0
    with open(tmp, "w", encoding="utf-8") as handle, tqdm(unit="img", desc="caption") as bar:
        batch: list[tuple[str, str, Image.Image]] = []

        def flush() -> None:
            nonlocal written
            pixels = preprocess_images([img for _, _, img in batch], size)
            captions = generate_captions(model, processor.tokenizer, pixels.to(dev, dtype), max_new_tokens,
                                         num_beams, repetition_penalty)
            for (field, value, _), caption in zip(batch, captions):
                handle.write(json.dumps({field: value, "caption": caption}, ensure_ascii=False) + "\n")
            written += len(batch)
            bar.update(len(batch))
            batch.clear()

        for item in iter_inputs(inputs, stats):
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    os.replace(tmp, out_path)
    return {"captioned": written, **stats.as_dict()}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt caption --captioner DIR INPUT... --out FILE.jsonl`."""
    parser = argparse.ArgumentParser(prog="revprompt caption", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, shard .tar files or shard roots")
    parser.add_argument("--captioner", required=True, help="an exported captioner directory (or a hub id)")
    parser.add_argument("--out", required=True, help="JSONL output: one {path|key, caption} per image")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        counts = caption_all(args.captioner, args.inputs, args.out, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                             repetition_penalty=args.repetition_penalty, device=args.device)
    except (FileNotFoundError, OSError, ValueError) as exc:
        log.error("caption failed: %s", exc)
        return 1
    log.info("wrote %s: %s", args.out, counts)
    return 0
