"""The shard reader later stages use: marked shards only, rank and worker split, safe decoding.

Decoding is an allow-list: images, text and JSON are decoded; pickle members (.pyd, .pickle, ...)
make the whole sample rejected and are never deserialised; anything else is dropped.
Corrupt tars and undecodable samples are skipped and counted, never fatal.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import random
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys

from . import storage
from .cache import SampleCache
from .keys import is_safe_key
from .manifest import complete_markers
from .images import ImageTooLarge, open_image
from .schema import owner
from .writer import IMAGE_EXTS, stats_path

log = logging.getLogger(__name__)

PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "npy", "npz", "mp", "msgpack"})
TEXT_EXTS = frozenset({"txt"})
JSON_EXTS = frozenset({"json"})
# the key of an item that carries a sample the SampleCache held, already decoded: not a string, so no tar member's
# name can make one
CACHED = ("revprompt", "cached sample")


@dataclass
class ReadStats:
    """Counters of one reading process (a DataLoader worker has its own copy)."""

    samples: int = 0
    corrupt: int = 0
    rejected: int = 0
    incomplete: int = 0
    skipped: int = 0  # files passed over on purpose (not an image format), by `revprompt caption`

    def as_dict(self) -> dict:
        """Plain dict for logs and reports."""
        return asdict(self)


def list_shards(root: str | Path, split: str) -> list[str]:
    """Paths (or URLs) of the complete shards of `split` under `root`, sorted; unmarked tars do not exist here."""
    root = storage.as_root(root)
    listing = storage.sizes(storage.join(root, split))
    names = sorted(f"{split}/{name}" for name in listing if fnmatch.fnmatchcase(name, "[0-9]*.tar"))
    complete = complete_markers(root, names)
    for name in names:
        marker = storage.name_of(stats_path(name))
        if name not in complete and marker in listing:
            log.warning("%s does not match its completion marker %s (damaged or replaced since): left out; "
                        "rerun `revprompt generate` to write it again", storage.join(root, name), marker)
    return [str(storage.join(root, name)) for name in names if name in complete]


def split_by_rank(rank: int, world_size: int):
    """Pipeline stage: keep the shards this rank owns (the shard schema's `owner`)."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        for index, item in enumerate(src):
            if owner(index, world_size) == rank:
                yield item

    return stage


def only_keys(keys: set[str]):
    """Pipeline stage: keep the raw samples whose key is in `keys` (before anything is decoded)."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            if sample.get("__key__") in keys:
                yield sample

    return stage


def decode_sample(sample: dict, require: tuple[str, ...] = ("image", "txt"),
                  fields: tuple[str, ...] = ("image", "txt", "json")) -> dict:
    """Decode one raw sample into {'__key__', 'image' (PIL RGB), 'txt', 'json', ...}; raises on bad input.

    Only `fields` are decoded (a reader that never looks at the JSON does not parse it); pickle
    members reject the sample whatever `fields` says. Raises `RejectedSample` for pickle members
    and `ValueError` for missing or undecodable parts.
    """
    exts = {k for k in sample if not k.startswith("__")}
    unsafe = exts & PICKLE_EXTS
    if unsafe:
        raise RejectedSample(f"{sample.get('__key__')}: refusing serialised members {sorted(unsafe)}")
    if not is_safe_key(str(sample.get("__key__", ""))):
        # later stages name files and shard members after keys: one that could leave a folder is refused
        raise RejectedSample(f"{sample.get('__key__')!r}: unsafe sample key")
    out = {"__key__": sample["__key__"], "__url__": sample.get("__url__")}
    for ext in sorted(exts):
        data = sample[ext]
        if (ext in IMAGE_EXTS or ext == "jpeg") and "image" in fields:
            if "image" in out:
                raise ValueError(f"{sample['__key__']}: more than one image")
            out["image"] = open_image(data, f"{sample['__key__']}.{ext}")
            out["image_ext"] = ext
        elif ext in TEXT_EXTS and ext in fields:
            out[ext] = data.decode("utf-8")
        elif ext in JSON_EXTS and ext in fields:
            out[ext] = json.loads(data.decode("utf-8"))
    missing = [name for name in require if name not in out]
    if missing:
        raise IncompleteSample(f"{sample['__key__']}: missing {', '.join(missing)}")
    return out


class RejectedSample(ValueError):
    """A sample carrying members that would need unpickling."""


class IncompleteSample(ValueError):
    """A sample without one of the required parts."""


class SafeDecoder:
    """Pipeline stage that decodes samples with `decode_sample`, skipping and counting bad ones; with a cache, it
    hands on samples `shard_samples` took from the cache and keeps the ones it decodes there."""

    def __init__(self, stats: ReadStats, require: tuple[str, ...] = ("image", "txt"),
                 fields: tuple[str, ...] = ("image", "txt", "json"), cache: SampleCache | None = None,
                 prepare: Callable[[dict], dict] | None = None):
        self.stats = stats
        self.require = require
        self.fields = fields
        self.cache = cache
        self.prepare = prepare

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            kept = sample.get(CACHED)
            if kept is not None:
                self.stats.samples += 1
                yield dict(kept)  # a copy: what a caller does to its sample does not reach the cache
                continue
            out = self.decode(sample)
            if out is None:
                if self.cache is not None:
                    self.cache.drop(sample.get("__url__"))  # something was skipped: the shard is not kept
                continue
            self.stats.samples += 1
            if self.cache is not None:
                self.cache.put(sample.get("__url__"), out)
                out = dict(out)
            yield out

    def decode(self, sample: dict) -> dict | None:
        """The decoded (and prepared) sample, or None when it is skipped (counted and logged)."""
        try:
            out = decode_sample(sample, self.require, self.fields)
            return self.prepare(out) if self.prepare is not None else out
        except RejectedSample as exc:
            self.stats.rejected += 1
            log.warning("rejected sample: %s (%s)", exc, sample.get("__url__"))
        except IncompleteSample as exc:
            self.stats.incomplete += 1
            log.warning("incomplete sample: %s (%s)", exc, sample.get("__url__"))
        except ImageTooLarge as exc:
            self.stats.rejected += 1
            log.warning("rejected sample: %s (%s)", exc, sample.get("__url__"))
        except Exception as exc:  # undecodable image, bad UTF-8, bad JSON
            self.stats.corrupt += 1
            log.warning("corrupt sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), exc)
        return None


def counting_handler(stats: ReadStats):
    """WebDataset exception handler: count a corrupt tar or member, warn, and go on."""

    def handler(exc: Exception) -> bool:
        stats.corrupt += 1
        log.warning("skipping corrupt shard data: %s", exc)
        return True

    return handler


def shard_samples(stats: ReadStats, cache: SampleCache | None = None):
    """Pipeline stage: {"url"} -> each shard's samples, its tar members grouped by key (webdataset's grouping).

    With `cache`, a shard the cache holds whole is not opened: its decoded samples come out as {CACHED: sample}
    items, in tar order, for `SafeDecoder` to hand on; any other shard is read and offered to the cache, which
    keeps it only if nothing in it was skipped.
    """

    spoil = cache.drop if cache is not None else None
    members = local_tar_members(stats, on_problem=spoil)
    counting = counting_handler(stats)

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        for item in src:
            url = item["url"]
            if cache is not None:
                held = cache.get(url)
                if held is not None:
                    for sample in held:
                        yield {"__key__": sample["__key__"], "__url__": url, CACHED: sample}
                    continue
                cache.start(url)

            def handler(exc: Exception) -> bool:
                if spoil is not None:
                    spoil(url)
                return counting(exc)

            keys = []
            for sample in group_by_keys(members([item]), handler=handler):
                keys.append(sample["__key__"])
                yield sample
            if cache is not None:
                cache.listed(url, keys)

    return stage


# a member larger than this is not read: no sample a revprompt stage uses comes near it (a 4096 px PNG
# is about 50 MB), while a hostile tar can declare gigabytes in a few kilobytes (GNU sparse members)
MAX_MEMBER_BYTES = 64 << 20


def local_tar_members(stats: ReadStats, max_member_bytes: int = MAX_MEMBER_BYTES,
                      on_problem: Callable[[str], None] | None = None):
    """Pipeline stage: {"url": path} -> the regular members of each tar as {"fname", "data", "__url__"}, then an
    end-of-shard marker ({}).

    Shard paths are opened as local files, and shard URLs (s3://, gs://, ...) through fsspec with retries
    (`storage.open_read`), never handed to webdataset's URL opener (its `pipe:` would run a shell command for a
    run.dir that starts with it). Sparse and oversized members are skipped and counted as rejected without
    being read; a damaged tar is counted as corrupt from where it breaks. An object store that stays
    unreachable past shards.retry_s raises `storage.StorageError` naming the URL: a shard cut short by the
    network is never read as a shorter one. `on_problem(path)` hears of every member or tar it skips.
    """

    def problem(path: str) -> None:
        if on_problem is not None:
            on_problem(path)

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        for item in src:
            path = item["url"]
            try:
                with storage.open_read(path) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
                    for info in tar:
                        if not info.isreg():
                            if info.issparse():
                                stats.rejected += 1
                                problem(path)
                                log.warning("rejected sparse member %s in %s", info.name, path)
                            continue
                        if info.size > max_member_bytes:
                            stats.rejected += 1
                            problem(path)
                            log.warning("rejected member %s in %s: %d bytes (at most %d)", info.name, path,
                                        info.size, max_member_bytes)
                            continue
                        yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": path}
                        tar.members = []
            except storage.StorageError:
                raise
            except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
                stats.corrupt += 1
                problem(path)
                log.warning("skipping corrupt shard data in %s: %s", path, exc)
            yield {}

    return stage


def shuffle_buffer(size: int, rng: random.Random):
    """Pipeline stage: a seeded shuffle buffer of `size` samples (raw bytes, so memory stays small)."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        buffer: list[dict] = []
        for item in src:
            if len(buffer) < size:
                buffer.append(item)
                continue
            index = rng.randrange(size)
            yield buffer[index]
            buffer[index] = item
        rng.shuffle(buffer)
        yield from buffer

    return stage


def build_reader(shards: list[str], *, rank: int = 0, world_size: int = 1, stats: ReadStats | None = None,
                 require: tuple[str, ...] = ("image", "txt"), shuffle_shards_seed: int | None = None,
                 buffer: int = 0, buffer_seed: int | str = 0, split_workers: bool = True,
                 fields: tuple[str, ...] = ("image", "txt", "json"), keys: set[str] | None = None,
                 cache: SampleCache | None = None, prepare: Callable[[dict], dict] | None = None) -> wds.DataPipeline:
    """A WebDataset pipeline over `shards`: this rank's shards, then this worker's, decoded safely.

    `buffer` > 0 shuffles samples through a seeded buffer before decoding. `split_workers=False`
    reads every given shard in this process (for callers that assign shards to workers themselves).
    `fields` are the parts decoded (see `decode_sample`); with `keys`, only those samples are decoded.
    With `cache` (one per reading process, used with the same `require`, `fields` and `prepare` every time), shards
    read whole and clean before come from memory (see `shards.cache`). `prepare(sample)` runs once on each freshly
    decoded sample, before the cache keeps it (e.g. an image turned into the tensor a model's batches are stacked from);
    a sample it raises on is counted corrupt.
    """
    stats = stats if stats is not None else ReadStats()
    shards = list(shards)
    if shuffle_shards_seed is not None:
        # the same order on every rank, so the rank split below stays a partition
        random.Random(shuffle_shards_seed).shuffle(shards)
    stages: list = [wds.SimpleShardList(shards), split_by_rank(rank, world_size)]
    if split_workers:
        stages.append(wds.split_by_worker)
    if cache is not None:
        cache.new_pass()
    stages.append(shard_samples(stats, cache))
    if keys is not None:
        stages.append(only_keys(keys))
    if buffer > 0:
        stages.append(shuffle_buffer(buffer, random.Random(buffer_seed)))
    stages.append(SafeDecoder(stats, require, fields, cache, prepare))
    pipeline = wds.DataPipeline(*stages)
    pipeline.read_stats = stats
    return pipeline
