"""The retrieval baseline: each test image answers with the prompt of its nearest train image.

Kaggle's "Stable Diffusion - Image to Prompts" found nearest-neighbour retrieval over CLIP image
embeddings, with no training at all, a strong method (0.553, against 0.458 for CLIP Interrogator and
about 0.58 for a fine-tuned BLIP-large): a captioner has to beat it to show it learnt more than lookup.

How it runs, and what it keeps in eval/retrieval/:
- every rank embeds the train shards it owns (`evaluate.image_model`, shard by shard), writing
  `{shard:06d}.features.npy` and then `{shard:06d}.jsonl` (the shard's prompts, its completion mark);
  a rerun embeds only the shards without a mark;
- rank 0 builds one faiss index over them in shard order (`index.faiss`, the prompts in `index.texts`
  with their byte offsets in `index.offsets.npy`, then `index.json` last): exact inner product
  (`IndexFlatIP`: cosine, the vectors being unit length) up to `evaluate.retrieval_exact_limit`
  vectors, an inverted-file index beyond (`IndexIVFFlat`, 4 sqrt(N) lists trained on up to 64 vectors
  a list, `evaluate.retrieval_nprobe` lists searched), where exact search over every train image for
  every test image would cost too much;
- every rank reads the index and answers its own test images.
`fingerprint.txt` records what the embeddings depend on (the shards, the image model, the seed); when
it changes, the folder's files are made again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..launch import dist
from ..launch.layout import short_hash
from ..launch.runner import StageContext, on_main_first
from ..models.image_embedder import embed_images
from ..shards.manifest import read_manifest, split_shards
from ..shards.reader import ReadStats, build_reader
from ..shards.schema import owned
from ..shards.writer import write_error, write_json_atomic
from .items import read_json_lines, restart_if_changed, write_features, write_json_lines

log = logging.getLogger(__name__)

INDEX_FILES = ("index.faiss", "index.texts", "index.offsets.npy", "index.json")


def retrieval_fingerprint(cfg, manifest: dict) -> str:
    """What the cached train embeddings depend on: the shards, the image model and (for random models) the seed."""
    return short_hash({"shards": manifest.get("fingerprint"), "image_model": cfg.evaluate.image_model,
                       "seed": cfg.run.seed})


def embed_train_shard(folder: Path, path: str, index: int, image_model: str, seed: int, batch: int = 64) -> int:
    """Embed one train shard's images in batches of `batch` (a shard's images are never all in memory); write
    its features, then its prompts (the mark). Returns the number of samples embedded."""
    stats = ReadStats()
    vectors, rows, images = [], [], []

    def flush() -> None:
        if images:
            vectors.append(embed_images(images, image_model, seed=seed))
            images.clear()

    for sample in build_reader([path], stats=stats, split_workers=False, require=("image", "txt"),
                               fields=("image", "txt")):
        images.append(sample["image"])
        rows.append({"key": sample["__key__"], "prompt": sample["txt"]})
        if len(images) == batch:
            flush()
    flush()
    if stats.corrupt or stats.rejected:
        log.warning("%s: %d corrupt and %d rejected samples left out of the retrieval index", path, stats.corrupt,
                    stats.rejected)
    features = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    write_features(folder / f"{index:06d}.features.npy", features)
    write_json_lines(folder / f"{index:06d}.jsonl", rows)
    return len(rows)


def embed_train_shards(ctx: StageContext) -> list[int]:
    """Embed this rank's train shards that have no mark yet; returns the shard indices of the split."""
    cfg, info, layout = ctx.cfg, ctx.info, ctx.layout
    folder = layout.eval_retrieval
    shards = split_shards(layout.shards, "train")
    stamp = retrieval_fingerprint(cfg, read_manifest(layout.shards) or {})
    on_main_first(info, lambda: restart_if_changed(folder / "fingerprint.txt", stamp, [folder],
                                                   "the train shards or evaluate.image_model"))
    mine = owned(len(shards), info.rank, info.world_size)
    pending = [s for s in mine if not (folder / f"{s:06d}.jsonl").is_file()]
    log.info("retrieval: %d train shards (%d on this rank, %d to embed)", len(shards), len(mine), len(pending))
    from tqdm import tqdm

    bar = tqdm(total=sum(shards[s][1] for s in pending), unit="img", desc="embed train images",
               disable=not info.is_main or not pending, dynamic_ncols=True)
    for s in pending:
        bar.update(embed_train_shard(folder, shards[s][0], s, cfg.evaluate.image_model, cfg.run.seed))
    bar.close()
    dist.barrier()
    return list(range(len(shards)))


def index_kind(vectors: int, exact_limit: int) -> str:
    """`flat` (exact) up to `exact_limit` vectors, `ivf` beyond."""
    return "flat" if vectors <= exact_limit else "ivf"


def ivf_lists(vectors: int) -> int:
    """Inverted lists of an IVF index over `vectors` vectors: about 4 sqrt(N) (faiss's guideline), at least 1."""
    return max(1, int(4 * np.sqrt(vectors)))


def _shard_features(folder: Path, shard: int) -> np.ndarray:
    return np.load(folder / f"{shard:06d}.features.npy", allow_pickle=False)


def build_index(folder: Path, shards: list[int], exact_limit: int) -> dict:
    """index.faiss and the prompts it answers with, from the cached features in shard order; nothing is done when
    index.json already describes these shards. Returns index.json's record."""
    import faiss

    counts = [len(read_json_lines(folder / f"{s:06d}.jsonl")) for s in shards]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"{folder}: the train shards hold no image to retrieve from; the retrieval baseline needs "
                         "train images (or set evaluate.retrieval = false)")
    kind = index_kind(total, exact_limit)
    record = {"vectors": total, "shards": len(shards), "kind": kind, "exact_limit": exact_limit}
    done = folder / "index.json"
    if done.is_file() and json.loads(done.read_text(encoding="utf-8")) == record:
        return record
    done.unlink(missing_ok=True)
    dim = next(_shard_features(folder, s).shape[1] for s, n in zip(shards, counts) if n)
    index = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        lists = ivf_lists(total)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(_training_sample(folder, shards, counts, 64 * lists))  # faiss asks 39 to 256 a list
    texts, offsets = _private(folder / "index.texts"), [0]
    try:
        with open(texts, "wb") as out:
            for s, n in zip(shards, counts):
                if not n:
                    continue
                index.add(np.ascontiguousarray(_shard_features(folder, s), dtype=np.float32))
                for row in read_json_lines(folder / f"{s:06d}.jsonl"):
                    data = row["prompt"].encode("utf-8")
                    out.write(data)
                    offsets.append(offsets[-1] + len(data))
        os.replace(texts, folder / "index.texts")
        write_features(folder / "index.offsets.npy", offsets, dtype=np.int64)
        tmp = _private(folder / "index.faiss")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, folder / "index.faiss")
    except OSError as exc:
        raise write_error(folder / "index.faiss", "the retrieval index", exc) from None
    finally:
        for name in ("index.texts", "index.faiss"):
            _private(folder / name).unlink(missing_ok=True)
    write_json_atomic(done, record)  # last: the index is whole
    log.info("retrieval index: %s over %d train images (%d shards)", kind, total, len(shards))
    return record


def _private(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _training_sample(folder: Path, shards: list[int], counts: list[int], at_most: int) -> np.ndarray:
    """Up to `at_most` vectors evenly spaced through the split, to train the IVF lists."""
    total = sum(counts)
    step = max(1, total // at_most)
    picked, offset = [], 0
    for s, n in zip(shards, counts):
        if n:
            first = (-offset) % step
            picked.append(_shard_features(folder, s)[first::step])
        offset += n
    return np.ascontiguousarray(np.concatenate(picked), dtype=np.float32)


class Retrieval:
    """Answers image embeddings with the prompt of the nearest train image (the index built by `build_index`)."""

    def __init__(self, folder: Path, nprobe: int):
        import faiss

        self.index = faiss.read_index(str(folder / "index.faiss"))
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = nprobe
        self.offsets = np.load(folder / "index.offsets.npy", allow_pickle=False)
        self.texts = folder / "index.texts"

    def nearest(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cosine, train position) of each row's nearest train image."""
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        return scores[:, 0], ids[:, 0]

    def __call__(self, vectors: np.ndarray) -> list[str]:
        """The prompt of each row's nearest train image ('' where an IVF search found no vector in its lists)."""
        _, ids = self.nearest(vectors)
        out = []
        with open(self.texts, "rb") as handle:
            for i in ids:
                if i < 0:
                    out.append("")
                    continue
                handle.seek(int(self.offsets[i]))
                out.append(handle.read(int(self.offsets[i + 1] - self.offsets[i])).decode("utf-8"))
        return out


def prepare_retrieval(ctx: StageContext) -> Retrieval:
    """Embed the train shards (distributed, cached), build the index on rank 0, and load it on every rank."""
    e, folder = ctx.cfg.evaluate, ctx.layout.eval_retrieval
    shards = embed_train_shards(ctx)
    on_main_first(ctx.info, lambda: build_index(folder, shards, e.retrieval_exact_limit))
    return Retrieval(folder, e.retrieval_nprobe)
