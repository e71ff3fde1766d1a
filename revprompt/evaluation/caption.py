"""`revprompt caption`: recover prompts for image files, folders or shards with an exported captioner.

It goes through the same typed config as every stage ([caption] for what to caption and where the
JSONL goes; [evaluate] for decoding; run.device), but works outside a run: nothing is written under
run.dir. Shard roots and their split folders are read through their manifest.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..launch.runner import StageContext, build_parser, run_stage
from ..models.captioner import load_exported
from ..shards import storage
from ..shards.manifest import MANIFEST, listed_shards
from ..shards.images import ImageRefused, ImageTooLarge, open_image, readable_suffixes
from ..shards.reader import ReadStats, build_reader, list_shards
from ..shards.writer import read_marker
from .items import captioner_for
from .rerank import HeadAnswers, head_fits

log = logging.getLogger(__name__)



class CaptionInputError(ValueError):
    """An input that is no image, folder or shard; the message names it."""


def shards_of(path: Path) -> list[str] | None:
    """The shards a folder stands for: a shard root or one of its split folders (through the manifest), or
    a folder of marked tars without a manifest (eval/regenerated, drift/iter_k); None for other folders."""
    if (path / MANIFEST).is_file():
        return listed_shards(path)
    if (path.parent / MANIFEST).is_file() and list(path.glob("[0-9]*.tar")):
        return listed_shards(path.parent, (path.name,))
    if list(path.glob("[0-9]*.tar")):
        return list_shards(path.parent, path.name)
    return None


def url_shards(url: str) -> list[str]:
    """The shards a URL stands for: one shard (.tar), a shard root or one of its split folders (through the
    manifest), or a prefix of marked tars; CaptionInputError when it holds none."""
    try:
        root = storage.as_root(url)
    except ValueError as exc:
        raise CaptionInputError(str(exc)) from None
    if str(root).endswith(".tar"):
        if storage.size(root) is None:
            raise CaptionInputError(f"{root}: no such shard")
        return [str(root)]
    if storage.read_bytes(storage.join(root, MANIFEST)) is not None:
        return listed_shards(root)
    parent = storage.parent_of(root)
    if storage.read_bytes(storage.join(parent, MANIFEST)) is not None:
        return listed_shards(parent, (storage.name_of(root),))
    shards = list_shards(parent, storage.name_of(root))
    if not shards:
        raise CaptionInputError(f"{url}: holds no complete shard (marked [0-9]*.tar) and no manifest.json")
    return shards


def iter_inputs(inputs: list[str], stats: ReadStats) -> Iterator[tuple[str, str, Image.Image]]:
    """("path" or "key", its value, image) for each image file, image in a folder, or sample in shards (local, or
    at an fsspec URL: s3://bucket/prefix)."""
    for item in inputs:
        if storage.is_url(item):
            yield from _shard_samples(url_shards(item), stats)
            continue
        path = Path(item)
        shards = shards_of(path) if path.is_dir() else None
        if shards is not None:
            yield from _shard_samples(shards, stats)
        elif path.suffix == ".tar" and path.is_file():
            yield from _shard_samples([str(path)], stats)
        elif path.is_dir():
            yield from _folder_images(path, stats)
        elif path.is_file():
            yield from _image_file(path, stats)
        elif path.exists():
            raise CaptionInputError(f"{path}: not a regular file, folder or shard (a FIFO or device)")
        else:
            raise CaptionInputError(f"{path}: no such image, folder or shard")


def _folder_images(folder: Path, stats: ReadStats) -> Iterator[tuple[str, str, Image.Image]]:
    """Every file of `folder` (and below) in a format Pillow reads; each other file is named with the reason."""
    suffixes = readable_suffixes()
    for file in sorted(p for p in folder.rglob("*") if not p.is_dir()):
        if not file.is_file():  # a FIFO or device would block the read
            stats.rejected += 1
            log.warning("skipping %s: not a regular file", file)
        elif file.suffix.lower() not in suffixes:
            stats.skipped += 1
            log.info("skipping %s: not a format Pillow reads", file)
        else:
            yield from _image_file(file, stats)


def _shard_samples(shards: list[str], stats: ReadStats) -> Iterator[tuple[str, str, Image.Image]]:
    for sample in build_reader(shards, stats=stats, require=("image",), split_workers=False):
        yield "key", sample["__key__"], sample["image"]


def _image_file(path: Path, stats: ReadStats) -> Iterator[tuple[str, str, Image.Image]]:
    try:
        image = open_image(path)
    except ImageTooLarge as exc:
        stats.rejected += 1
        log.warning("skipping %s", exc)
        return
    except (ImageRefused, OSError) as exc:
        stats.corrupt += 1
        log.warning("skipping unreadable image %s", exc)
        return
    stats.samples += 1
    yield "path", str(path), image


def count_inputs(inputs: list[str]) -> int | None:
    """How many images `inputs` hold, for the progress bar's total and ETA (shards by their markers); None when a
    shard has no marker to say."""
    total = 0
    suffixes = readable_suffixes()
    for item in inputs:
        path = Path(item)
        if storage.is_url(item):
            shards = url_shards(item)
        else:
            shards = shards_of(path) if path.is_dir() else ([str(path)] if path.suffix == ".tar" else None)
        if shards is not None:
            counts = [_marked_count(s) for s in shards]
            if None in counts:
                return None
            total += sum(counts)
        elif path.is_dir():
            total += sum(1 for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        else:
            total += 1
    return total


def _marked_count(tar: str) -> int | None:
    return (read_marker(tar if storage.is_url(tar) else Path(tar)) or {}).get("count")


def caption_all(ctx: StageContext) -> dict:
    """Caption every input into the [caption] out file (written atomically); returns counts."""
    from tqdm import tqdm

    cfg, device = ctx.cfg, ctx.info.device
    folder = cfg.caption.captioner or ctx.layout.captioner
    model, processor = load_exported(folder, device, attention=cfg.evaluate.attention)
    captioner = captioner_for(cfg, model, processor, device)
    head = None
    if cfg.caption.rerank and Path(folder).is_dir() and head_fits(Path(folder), cfg.evaluate.text_model):
        head = HeadAnswers(captioner, Path(folder), cfg.evaluate.text_model, cfg.evaluate.num_candidates, device)
        log.info("captions reranked by %s's embedding head: the greedy caption or one of %d beams, whichever is "
                 "nearest the head's embedding", folder, cfg.evaluate.num_candidates)

    def caption(images: list[Image.Image]) -> list[str]:
        greedy = captioner(images)
        return head.rerank(images, greedy, head.embeddings(images)) if head is not None else greedy

    stats = ReadStats()
    out_path = Path(cfg.caption.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    written = 0
    try:
        with open(tmp, "w", encoding="utf-8") as handle, \
                tqdm(total=count_inputs(cfg.caption.inputs), unit="img", desc="caption", dynamic_ncols=True) as bar:
            batch: list[tuple[str, str, Image.Image]] = []
            for item in [*iter_inputs(cfg.caption.inputs, stats), None]:
                if item is not None:
                    batch.append(item)
                if batch and (item is None or len(batch) == captioner.batch_size):
                    for (field, value, _), text in zip(batch, caption([img for _, _, img in batch])):
                        handle.write(json.dumps({field: value, "caption": text}, ensure_ascii=False) + "\n")
                    written += len(batch)
                    bar.update(len(batch))
                    batch.clear()
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    counts = {"captioned": written, **stats.as_dict()}
    log.info("wrote %s: %s", out_path, counts)
    return counts


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt caption [--captioner DIR] INPUT... --out FILE.jsonl`."""
    parser = build_parser("caption", __doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("caption.inputs", nargs="+", metavar="INPUT",
                        help="image files, folders of images, shard .tar files or shard roots")
    parser.add_argument("--captioner", dest="caption.captioner",
                        help="an exported captioner folder or a hub id (default: run.dir/captioner)")
    parser.add_argument("--out", dest="caption.out", help="JSONL output: one {path|key, caption} per image")
    parser.add_argument("--batch-size", dest="evaluate.batch_size", help="images per forward pass")
    parser.add_argument("--max-new-tokens", dest="evaluate.max_new_tokens", help="longest caption")
    parser.add_argument("--num-beams", dest="evaluate.num_beams", help="beam width (1 = greedy)")
    parser.add_argument("--repetition-penalty", dest="evaluate.repetition_penalty")
    parser.add_argument("--attention", dest="evaluate.attention",
                        help="a BLIP captioner's attention: sdpa (fused, the default) or eager")
    parser.add_argument("--num-candidates", dest="evaluate.num_candidates",
                        help="with an embedding head: beams besides the greedy caption for the head to choose from")
    parser.add_argument("--no-rerank", dest="caption.rerank", action="store_const", const="false",
                        help="greedy captions even when the captioner has an embedding head")
    parser.add_argument("--device", dest="run.device", help="auto (CUDA when present), cuda or cpu")
    return run_stage("caption", argv if argv is not None else [], parser, caption_all, uses_run_dir=False)
