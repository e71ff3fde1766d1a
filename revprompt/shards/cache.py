"""Decoded samples of whole shards, kept in one reading process's memory up to a byte budget.

A training worker reads the same shards epoch after epoch. Once it has read a shard from end to end with
nothing skipped (no corrupt, rejected or incomplete part, no tar damage), the shard's decoded samples are
kept in the order the tar holds them; the next read of that shard yields them without opening the tar or
decoding a JPEG. What a cached read yields is what a fresh read would: the same samples in the same order,
counted the same way, so batches, losses and checkpoints do not depend on whether the cache was on.

A shard read only in part (the epoch's quota ended inside it) or with anything skipped is not kept; its
pending samples are dropped at the next pass. When keeping a shard would pass the budget, the shard is
dropped and no new shard is started: memory never exceeds the budget by more than one sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def sample_bytes(sample: dict) -> int:
    """Memory a decoded sample holds, near enough: its pixels and its text."""
    size = 0
    image = sample.get("image")
    if hasattr(image, "nbytes"):  # an array or tensor a reader's `prepare` made of it
        size += image.nbytes
    elif image is not None:
        size += image.width * image.height * len(image.getbands())
    for name in ("txt", "json"):
        value = sample.get(name)
        if isinstance(value, str):
            size += len(value)
    return size + 512  # the dicts and objects around them


@dataclass
class _Pending:
    keys: list[str] | None = None  # the tar's sample keys in order, once the tar was read to its end
    samples: dict[str, dict] = field(default_factory=dict)
    bytes: int = 0


class SampleCache:
    """Whole shards' decoded samples by shard path or URL; see the module docstring."""

    def __init__(self, budget_bytes: int):
        self.budget = max(0, int(budget_bytes))
        self.used = 0
        self.full = False  # a shard did not fit: start no more
        self._done: dict[str, list[dict]] = {}
        self._pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        """Shards held whole."""
        return len(self._done)

    def get(self, url: str) -> list[dict] | None:
        """The shard's decoded samples in tar order, or None when it is not held whole."""
        return self._done.get(url)

    def new_pass(self) -> None:
        """A reader starts over: shards it left unfinished will not be finished."""
        for url in list(self._pending):
            self.drop(url)

    def start(self, url: str) -> None:
        """A fresh read of `url` begins: collect its samples, if there is room."""
        self.drop(url)
        if not self.full and self.used < self.budget and url not in self._done:
            self._pending[url] = _Pending()

    def listed(self, url: str, keys: list[str]) -> None:
        """The tar of `url` was read to its end, giving these sample keys in order."""
        pending = self._pending.get(url)
        if pending is not None:
            pending.keys = list(keys)
            self._finish(url, pending)

    def put(self, url: str, sample: dict) -> None:
        """One sample of `url` decoded without fault."""
        pending = self._pending.get(url)
        if pending is None:
            return
        key = sample["__key__"]
        size = sample_bytes(sample)
        if key in pending.samples or self.used + size > self.budget:
            self.drop(url)  # a key seen twice cannot be replayed in order; over budget: keep nothing of it
            self.full = self.full or self.used + size > self.budget
            return
        pending.samples[key] = sample
        pending.bytes += size
        self.used += size
        self._finish(url, pending)

    def drop(self, url: str) -> None:
        """Forget what was collected of `url` (a skipped sample or a damaged tar spoils the whole shard)."""
        pending = self._pending.pop(url, None)
        if pending is not None:
            self.used -= pending.bytes

    def _finish(self, url: str, pending: _Pending) -> None:
        if pending.keys is None or len(pending.samples) != len(pending.keys):
            return
        if set(pending.samples) != set(pending.keys):
            self.drop(url)
            return
        self._done[url] = [pending.samples[key] for key in pending.keys]
        del self._pending[url]
