"""The prepared prompt set on disk: `{split}.jsonl` with an offset index `{split}.idx`, and how prompts are split.

`prepare` writes a folder of these once (streaming); later every rank reads only the prompts its
shards need, through the index, so memory does not grow with the prompt count. Functions here take
that folder (`run.dir/prompts`, which the run layout names).

Under `prompts.split = "hash"` a prompt's split is a pure function of its normalised text (a hash), so it
is stable as prompts are added or removed and the same on every rank. Under `"group"` (prompts/neardup.py) a
prompt takes the split of its near-duplicate group: the hash split of the group's representative, so a prompt
without near-duplicates keeps its hash split.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ..shards.schema import SPLITS
from .sources import Prompt, normalise

__all__ = ["SPLITS", "SplitWriter", "iter_split", "load_at", "load_range", "load_split", "parse", "record", "split_of",
           "split_of_digest", "split_size", "text_digest"]


def text_digest(text: str) -> int:
    """The first 8 bytes of the sha256 of the normalised text, as an unsigned big-endian integer."""
    return int.from_bytes(hashlib.sha256(normalise(text).encode("utf-8")).digest()[:8], "big")


def split_of_digest(digest: int, val_fraction: float, test_fraction: float) -> str:
    """train, val or test from a text digest (`text_digest`): the digest read as a fraction of 2**64."""
    u = digest / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    """train, val or test from a hash of the normalised text: stable as prompts are added or removed."""
    return split_of_digest(text_digest(text), val_fraction, test_fraction)


class SplitWriter:
    """prompts/{split}.jsonl plus prompts/{split}.idx (little-endian uint64 byte offsets, one per line)."""

    def __init__(self, out_dir: Path, split: str):
        self.final = out_dir / f"{split}.jsonl", out_dir / f"{split}.idx"
        self.tmp = tuple(p.with_name(f".{p.name}.tmp{os.getpid()}") for p in self.final)
        self.data, self.index = open(self.tmp[0], "wb"), open(self.tmp[1], "wb")
        self.offset = 0
        self.count = 0

    def write(self, record: str) -> None:
        """Append one prompt's JSON line and its offset."""
        data = (record + "\n").encode("utf-8")
        self.index.write(struct.pack("<Q", self.offset))
        self.data.write(data)
        self.offset += len(data)
        self.count += 1

    def commit(self) -> None:
        """Close and move both files into place."""
        self.data.close()
        self.index.close()
        for tmp, final in zip(self.tmp, self.final):
            os.replace(tmp, final)

    def abort(self) -> None:
        """Close and delete the temporary files."""
        self.data.close()
        self.index.close()
        for tmp in self.tmp:
            tmp.unlink(missing_ok=True)


def record(prompt: Prompt, split: str) -> str:
    """One prompt as its JSON line."""
    return json.dumps({"id": prompt.id, "text": prompt.text, "split": split, "line": prompt.line,
                       "attributes": prompt.attributes}, ensure_ascii=False, sort_keys=True)


def parse(line: bytes | str) -> Prompt:
    """A JSON line back into its prompt."""
    obj = json.loads(line)
    return Prompt(id=obj["id"], text=obj["text"], attributes=obj["attributes"], line=obj["line"])


def split_size(folder: str | Path, split: str) -> int:
    """How many prompts a split holds (from its index, without reading the prompts)."""
    return (Path(folder) / f"{split}.idx").stat().st_size // 8


def load_range(folder: str | Path, split: str, start: int, stop: int) -> list[Prompt]:
    """Prompts start..stop-1 of a split, read through the index: a rank reads only what its shards need."""
    folder = Path(folder)
    stop = min(stop, split_size(folder, split))
    if start >= stop:
        return []
    with open(folder / f"{split}.idx", "rb") as index:
        index.seek(8 * start)
        (offset,) = struct.unpack("<Q", index.read(8))
    with open(folder / f"{split}.jsonl", "rb") as data:
        data.seek(offset)
        return [parse(data.readline()) for _ in range(stop - start)]


def load_at(folder: str | Path, split: str, positions) -> list[Prompt]:
    """The prompts at `positions` (ascending) of a split, each read through the index."""
    folder = Path(folder)
    out = []
    with open(folder / f"{split}.idx", "rb") as index, open(folder / f"{split}.jsonl", "rb") as data:
        for position in positions:
            index.seek(8 * position)
            (offset,) = struct.unpack("<Q", index.read(8))
            data.seek(offset)
            out.append(parse(data.readline()))
    return out


def load_split(folder: str | Path, split: str) -> list[Prompt]:
    """The prepared prompts of one split, in source order (all of them: for small sets and tests)."""
    return load_range(folder, split, 0, split_size(folder, split))


def iter_split(folder: str | Path, split: str):
    """The prompts of one split, one at a time."""
    with open(Path(folder) / f"{split}.jsonl", "rb") as data:
        for line in data:
            yield parse(line)


