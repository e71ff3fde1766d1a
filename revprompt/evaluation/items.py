"""What evaluate and drift share: test samples as items, shard ownership, captioning and redrawing.

Work is done shard by shard, in fixed chunks from the start of each shard, so a sample meets the
same batch neighbours whatever the number of ranks: 1 rank and N ranks compute the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..shards.reader import ReadStats, build_reader
from ..launch.layout import remove_owned
from ..shards.writer import SHARD_PATTERNS, encode_image, encode_json, shard_name

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One test sample: its global order in the split, where it lives, and what it was made from."""

    order: int
    shard: int
    key: str
    prompt: str
    seed: int
    attributes: dict = field(default_factory=dict)
    image: Image.Image | None = None


def shard_offsets(shards: list[tuple[str, int]]) -> list[int]:
    """Global order of each shard's first sample (the manifest's counts, cumulated)."""
    offsets, total = [], 0
    for _, count in shards:
        offsets.append(total)
        total += count
    return offsets


def owned(n_shards: int, rank: int, world_size: int) -> list[int]:
    """Shard s belongs to rank s % world_size."""
    return [s for s in range(n_shards) if s % world_size == rank]


def read_items(shards: list[tuple[str, int]], index: int, max_samples: int, stats: ReadStats) -> list[Item]:
    """The items of shard `index` in file order, cut at the split's first `max_samples` (0 = all)."""
    offset = shard_offsets(shards)[index]
    items = []
    for position, sample in enumerate(build_reader([shards[index][0]], stats=stats, split_workers=False,
                                                   require=("image", "txt", "json"))):
        order = offset + position
        if max_samples and order >= max_samples:
            break
        meta = sample["json"]
        items.append(Item(order, index, sample["__key__"], sample["txt"], int(meta.get("seed", 0)),
                          dict(meta.get("attributes") or {}), sample["image"]))
    return items


def test_shards_for(run_dir: Path) -> list[tuple[str, int]]:
    """The test split's shards, after checking that generation finished and a captioner was exported."""
    from ..launch.runner import StageError
    from ..shards.manifest import split_shards

    try:
        shards = split_shards(Path(run_dir) / "shards", "test")
    except ValueError as exc:
        raise StageError(str(exc)) from None
    if not (Path(run_dir) / "captioner" / "config.json").is_file():
        raise StageError(f"{Path(run_dir) / 'captioner'}: no exported captioner; run `revprompt train` first")
    return shards


# what evaluate and drift write into their part folders: per-shard rows, redrawn-image shards, their stamps
PART_PATTERNS = ("[0-9]*.jsonl", ".[0-9]*.jsonl.partial", "fingerprint.txt", *SHARD_PATTERNS)


def restart_if_changed(stamp: Path, current: str, outputs: list[Path], what: str) -> None:
    """Remove what revprompt wrote into `outputs` when `stamp` records another fingerprint than `current`,
    then record `current`. Files of other names, and folders they keep, stay."""
    if stamp.is_file() and stamp.read_text().strip() != current:
        log.info("%s changed: starting again", what)
        for folder in outputs:
            remove_owned(folder, PART_PATTERNS)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(current + "\n")


def chunks(seq: list, size: int):
    """Consecutive slices of `size`."""
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def fingerprint(obj) -> str:
    """Short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Captioner:
    """A BLIP captioner on the job's device with the [evaluate] decoding settings."""

    def __init__(self, model, tokenizer, cfg, device: torch.device):
        from ..training.captioner import image_size_of

        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = model.to(device, self.dtype).eval()
        self.tokenizer, self.cfg, self.device = tokenizer, cfg.evaluate, device
        self.size = image_size_of(self.model)

    @classmethod
    def zero_shot(cls, cfg, device: torch.device) -> "Captioner":
        """The captioner before fine-tuning: train.captioner as built for training (same seed)."""
        from ..training.captioner import build_captioner

        model, processor = build_captioner(cfg.train.captioner, cfg.run.seed)
        return cls(model, processor.tokenizer, cfg, device)

    @classmethod
    def finetuned(cls, run_dir: Path, cfg, device: torch.device) -> "Captioner":
        """The exported captioner in run_dir/captioner, through plain from_pretrained."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        path = Path(run_dir) / "captioner"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no exported captioner; run `revprompt train` first")
        model = BlipForConditionalGeneration.from_pretrained(path)
        return cls(model, BlipProcessor.from_pretrained(path).tokenizer, cfg, device)

    def __call__(self, images: list[Image.Image]) -> list[str]:
        """Captions in chunks of evaluate.batch_size."""
        from ..training.captioner import generate_captions, preprocess_images

        out: list[str] = []
        for part in chunks(images, self.cfg.batch_size):
            pixels = preprocess_images(part, self.size).to(self.device, self.dtype)
            out += generate_captions(self.model, self.tokenizer, pixels, self.cfg.max_new_tokens, self.cfg.num_beams,
                                     self.cfg.repetition_penalty)
        return out


class Painter:
    """The generation stage's Stable Diffusion pipeline, redrawing texts with given seeds."""

    def __init__(self, cfg, device: torch.device):
        from ..generation.models import build_pipeline

        g = cfg.generate
        self.cfg = cfg
        self.pipe = build_pipeline(g.model, scheduler=g.scheduler, dtype=g.dtype, device=device, seed=cfg.run.seed,
                                   compile=g.compile)

    def __call__(self, texts: list[str], seeds: list[int]) -> list[Image.Image]:
        """Images in chunks of generate.batch_size; a non-finite image comes back black (and is logged)."""
        from ..generation.job import generate_images, to_pixels

        images: list[Image.Image] = []
        size = self.cfg.generate.batch_size
        for part_texts, part_seeds in zip(chunks(texts, size), chunks(seeds, size)):
            pixels, finite = to_pixels(generate_images(self.pipe, part_texts, part_seeds, self.cfg))
            for text, px, ok in zip(part_texts, pixels, finite):
                if not ok:
                    log.warning("non-finite image for %r; using a black image", text)
                    px = np.zeros_like(px)
                images.append(Image.fromarray(px))
        return images


def write_image_shard(path: Path, items: list[Item], texts: list[str], images: list[Image.Image], extra: dict,
                      fmt: str = "jpg") -> None:
    """A shard of redrawn images: the item's key, the text that drew it, and where it came from."""
    from ..shards.writer import ShardWriter

    writer = ShardWriter(path)
    try:
        for item, text, image in zip(items, texts, images):
            writer.write(item.key, {fmt: encode_image(np.asarray(image), fmt),
                                    "txt": text.encode("utf-8"),
                                    "json": encode_json({"key": item.key, "prompt": item.prompt, "seed": item.seed,
                                                         "attributes": item.attributes, **extra})})
    except BaseException:
        writer.abort()
        raise
    writer.close()


def read_images(path: Path) -> dict[str, Image.Image]:
    """key -> image of a redrawn-image shard."""
    return {s["__key__"]: s["image"] for s in build_reader([str(path)], split_workers=False, require=("image",))}


def image_shard_path(root: Path, index: int) -> Path:
    """root/{index:06d}.tar (the same numbering as the test shards it mirrors)."""
    return root / Path(shard_name("x", index)).name
