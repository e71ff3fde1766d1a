"""What evaluate and drift share: the test split as items, the per-shard part files, redrawn-image shards.

Work is done shard by shard (the shard schema's ownership: shard s on rank s % world), in fixed
chunks from the start of each shard, so a sample meets the same batch neighbours whatever the number
of ranks: 1 rank and N ranks compute the same bytes. A finished shard's rows go to a part file
(`{shard:06d}.jsonl`, written last) so a stopped stage resumes by shard.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..launch.layout import GENERATE_SPEED_KEYS, RunLayout, remove_owned
from ..launch.runner import StageError
from ..models.captioner import Captioner, build_captioner, is_adapter_dir, load_exported, set_instruction
from ..models.text_to_image import build_pipeline, draw
from ..shards.manifest import read_manifest, split_shards
from ..shards.images import ImageRefused, open_image
from ..shards.reader import ReadStats, build_reader
from ..shards.schema import RedrawnMeta, SampleMeta, SchemaError
from ..shards.writer import SHARD_PATTERNS, ShardWriter, encode_image, encode_json, write_error

log = logging.getLogger(__name__)

# what evaluate and drift write into their part folders: per-shard rows, redrawn-image shards, their stamps
PART_PATTERNS = ("[0-9]*.jsonl", ".[0-9]*.jsonl.partial", "[0-9]*.read.json", ".[0-9]*.read.json.tmp*",
                 "[0-9]*.features.npy", ".[0-9]*.features.npy.partial", "fingerprint.txt", *SHARD_PATTERNS,
                 # the retrieval baseline's index (evaluation/retrieval.py)
                 "index.faiss", "index.texts", "index.offsets.npy", "index.json", ".index.*.partial",
                 ".index.json.tmp*")


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


def shard_of(order: int, offsets: list[int]) -> int:
    """The shard holding the sample at global `order`."""
    return max(i for i, first in enumerate(offsets) if first <= order)


def read_items(shards: list[tuple[str, int]], index: int, max_samples: int, stats: ReadStats,
               images: bool = True) -> list[Item]:
    """The items of shard `index` in file order, cut at the split's first `max_samples` (0 = all).

    `images=False` reads what each sample was made from without decoding its image. A sample whose
    metadata breaks the shard schema is skipped and counted as corrupt, like an undecodable one.
    """
    offset = shard_offsets(shards)[index]
    fields = ("image", "txt", "json") if images else ("txt", "json")
    items: list[Item] = []
    for sample in build_reader([shards[index][0]], stats=stats, split_workers=False, require=fields, fields=fields):
        try:
            meta = SampleMeta.from_json(sample["json"], sample["__key__"])
        except SchemaError as exc:
            stats.samples -= 1
            stats.corrupt += 1
            log.warning("corrupt sample %s in %s: %s", sample["__key__"], shards[index][0], exc)
            continue
        order = offset + len(items)
        if max_samples and order >= max_samples:
            break
        items.append(Item(order, index, sample["__key__"], sample["txt"], meta.seed, meta.attributes,
                          sample.get("image")))
    return items


def test_shards(layout: RunLayout, cfg) -> list[tuple[str, int]]:
    """The test split's shards, after checking that generation finished, that a captioner trained on these shards
    was exported, and that [generate] draws as the shards were drawn (evaluate and drift redraw with it)."""
    shards = split_shards(layout.shards, "test")
    if not sum(count for _, count in shards):
        raise StageError("the test split is empty (its shards hold no sample): nothing to evaluate; use more prompts "
                         "or raise prompts.test_fraction, then `revprompt generate --overwrite`")
    if not (layout.captioner / "config.json").is_file() and not is_adapter_dir(layout.captioner):
        raise StageError(f"{layout.captioner}: no exported captioner; run `revprompt train` first")
    manifest = read_manifest(layout.shards) or {}
    trained_on = ((layout.exported() or {}).get("made_from") or {}).get("data", manifest.get("fingerprint"))
    if trained_on != manifest.get("fingerprint"):
        raise StageError(f"{layout.captioner} was trained on the shards of fingerprint {trained_on}, but "
                         f"{layout.shards} now holds {manifest.get('fingerprint')}: run `revprompt train --overwrite` "
                         "to train on them")
    drawn = {k: v for k, v in (manifest.get("config") or {}).items() if k not in GENERATE_SPEED_KEYS}
    now = cfg.to_dict()["generate"]
    diff = [f"generate.{k}: {v!r} (shards) vs {now.get(k)!r} (now)" for k, v in sorted(drawn.items())
            if now.get(k) != v]
    if diff:
        raise StageError(f"the test shards were drawn with other [generate] settings ({'; '.join(diff)}); images "
                         "redrawn now would not be comparable: use the shards' settings, or draw them again with "
                         "`revprompt generate --overwrite`")
    return shards


def restart_if_changed(stamp: Path, current: str, outputs: list[Path], what: str) -> None:
    """Remove what revprompt wrote into `outputs` when `stamp` records another fingerprint than `current`,
    then record `current`. Files of other names, and folders they keep, stay."""
    if stamp.is_file() and stamp.read_text().strip() != current:
        log.info("%s changed: starting again", what)
        for folder in outputs:
            remove_owned(folder, PART_PATTERNS)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(current + "\n")


def write_json_lines(path: Path, rows: list[dict]) -> None:
    """Rows as JSON lines, written atomically."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, "a part file", exc) from None


def write_features(path: Path, vectors: np.ndarray, dtype=np.float32) -> None:
    """Embedding rows (or other numbers) as a .npy of `dtype`, written atomically (never pickled: read back with
    allow_pickle=False)."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(vectors, dtype=dtype), allow_pickle=False)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, "image features", exc) from None


def read_json_lines(path: Path) -> list[dict]:
    """The rows of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def captioner_for(cfg, model, processor, device: torch.device) -> Captioner:
    """`model` captioning with the [evaluate] decoding settings."""
    e = cfg.evaluate
    return Captioner(model, processor, device, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                     num_beams=e.num_beams, repetition_penalty=e.repetition_penalty)


def zero_shot_captioner(cfg, device: torch.device) -> Captioner:
    """The captioner before fine-tuning: train.captioner as built for training (same seed, same instruction)."""
    model, processor = build_captioner(cfg.train.captioner, cfg.run.seed, attention=cfg.evaluate.attention,
                                       key="evaluate.attention")
    if cfg.train.instruction:
        try:
            set_instruction(model, cfg.train.instruction)
        except ValueError as exc:
            raise StageError(str(exc)) from None
    return captioner_for(cfg, model, processor, device)


def finetuned_captioner(layout: RunLayout, cfg, device: torch.device) -> Captioner:
    """The exported captioner in run_dir/captioner, through plain from_pretrained."""
    model, processor = load_exported(layout.captioner, device, key="the run's captioner/",
                                     attention=cfg.evaluate.attention)
    return captioner_for(cfg, model, processor, device)


class Painter:
    """The [generate] Stable Diffusion pipeline, redrawing texts with given seeds (None: a non-finite image)."""

    def __init__(self, cfg, device: torch.device):
        g = cfg.generate
        self.settings = g
        self.pipe = build_pipeline(g.model, scheduler=g.scheduler, dtype=g.dtype, device=device, seed=cfg.run.seed,
                                   compile=g.compile, compile_scope=g.compile_scope,
                                   compile_mode=g.compile_mode, fuse=g.fuse_qkv)

    def __call__(self, texts: list[str], seeds: list[int]) -> list[Image.Image | None]:
        """Images in chunks of generate.batch_size."""
        return draw(self.pipe, texts, seeds, self.settings)


def write_image_shard(path: Path, items: list[Item], texts: list[str], images: list[Image.Image | None],
                      meta: dict, fmt: str = "jpg") -> None:
    """A shard of redrawn images: the item's key, the text that drew it, and where it came from (`meta`: the
    RedrawnMeta fields of the stage). A non-finite image (None) is left out and counted as a failure."""
    writer = ShardWriter(path)
    try:
        for item, text, image in zip(items, texts, images):
            if image is None:
                writer.failures += 1
                continue
            record = RedrawnMeta(key=item.key, prompt=item.prompt, seed=item.seed, attributes=item.attributes, **meta)
            writer.write(item.key, {fmt: encode_image(np.asarray(image), fmt), "txt": text.encode("utf-8"),
                                    "json": encode_json(record.to_json())})
    except BaseException:
        writer.abort()
        raise
    writer.close()


def read_images(path: Path, keys: set[str] | None = None) -> dict[str, Image.Image]:
    """key -> image of a redrawn-image shard (only `keys`, when given: the others are never decoded)."""
    return {s["__key__"]: s["image"] for s in build_reader([str(path)], split_workers=False, require=("image",),
                                                           fields=("image",), keys=keys)}


def read_originals(shards: list[tuple[str, int]], index: int, keys: set[str]) -> dict[str, Image.Image]:
    """key -> the test image of the samples `keys` in shard `index`; no other image of it is decoded."""
    return {s["__key__"]: s["image"] for s in build_reader([shards[index][0]], split_workers=False,
                                                           require=("image",), fields=("image",), keys=keys)}


def real_photos(folder: str, items: list[Item]) -> dict:
    """key -> real product photo for the items that have one: {prompt id}.jpg in `folder`, or, for
    `renders`, the product render of the item's source row (the tiny preset's stand-in for photos)."""
    if not folder:
        return {}
    if folder == "renders":
        from ..models.miniature.render import render

        return {it.key: render(dict(it.attributes, productDisplayName=it.prompt)) for it in items
                if it.attributes.get("articleType")}
    out = {}
    for it in items:
        photo_id = str(it.attributes.get("id", ""))
        path = Path(folder) / f"{photo_id}.jpg"
        if photo_id and "/" not in photo_id and path.is_file():
            try:
                out[it.key] = open_image(path)
            except ImageRefused as exc:
                log.warning("real photo left out: %s", exc)
    return out
