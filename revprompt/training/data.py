"""Streaming training batches from the train shards, with equal batch counts on every rank.

An epoch is planned from the manifest's shard counts alone, the same way on every rank: shards are
shuffled by (seed, epoch) and dealt to the job's (rank, DataLoader worker) slots, each shard to the
slot with the fewest samples so far, so no two slots' shares differ by more than the largest shard
(and `smallest_share` bounds every epoch's poorest share before training starts). Every worker on
every rank yields exactly `batches_per_worker` batches: the most the poorest share can fill. Unequal
shards therefore never leave one rank waiting in a collective, and no epoch takes a worker by
surprise. A worker that comes up short (corrupt samples) reads its share again, counted as
`resampled`; a share whose full pass reads less than one micro-batch is an error, not an endless loop.

Batch j of an epoch comes from worker j % W (the DataLoader's round-robin), so a restart at batch k
of epoch e has each worker skip exactly its share of the first k batches: no sample of the epoch is
seen twice.
"""

from __future__ import annotations

import fcntl
import heapq
import logging
import multiprocessing
import multiprocessing.context
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..shards.cache import SampleCache
from ..shards.reader import ReadStats, build_reader
from ..models.captioner import encode_prompts, preprocess_images

log = logging.getLogger(__name__)


class DataPlanError(ValueError):
    """The shards cannot be dealt to ranks and workers as configured."""


@dataclass(frozen=True)
class EpochPlan:
    """One rank's view of an epoch: its shards per worker and the per-worker batch quota."""

    epoch: int
    worker_shards: tuple[tuple[str, ...], ...]
    batches_per_worker: int
    shard_counts: dict = field(default_factory=dict, compare=False)  # path -> samples the manifest lists

    @property
    def batches(self) -> int:
        """Batches this epoch yields on every rank."""
        return self.batches_per_worker * len(self.worker_shards)


def deal(shards: list[tuple[str, int]], epoch: int, seed: int, slots: int) -> list[list[tuple[str, int]]]:
    """Each slot's (path, count) shards for `epoch`: shuffled by (seed, epoch), each to the least-filled slot
    (ties to the lowest slot). Any two slots end within the largest shard's count of each other."""
    order = sorted(shards)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    dealt: list[list[tuple[str, int]]] = [[] for _ in range(slots)]
    heap = [(0, slot) for slot in range(slots)]
    for shard in order:
        load, slot = heapq.heappop(heap)
        dealt[slot].append(shard)
        heapq.heappush(heap, (load + shard[1], slot))
    return dealt


def plan_epoch(shards: list[tuple[str, int]], epoch: int, seed: int, rank: int, world_size: int,
               num_workers: int, batch_size: int) -> EpochPlan:
    """Deal (path, count) shards for `epoch` to ranks and workers (slot rank * workers + worker); the same
    batch quota everywhere."""
    workers = max(1, num_workers)
    if len(shards) < world_size * workers:
        raise DataPlanError(
            f"{len(shards)} train shards cannot feed {world_size} ranks x {workers} DataLoader workers; "
            "write smaller shards (generate.shard_size) or use fewer workers (train.num_workers)")
    dealt = deal(shards, epoch, seed, world_size * workers)
    quota = min(sum(c for _, c in share) for share in dealt) // batch_size
    if not quota:
        raise DataPlanError(f"train.micro_batch_size={batch_size} is larger than the samples some DataLoader "
                            f"worker receives in epoch {epoch}; lower it or write more train samples")
    mine = tuple(tuple(p for p, _ in dealt[rank * workers + w]) for w in range(workers))
    return EpochPlan(epoch, mine, quota, dict(shards))


def smallest_share(shards: list[tuple[str, int]], world_size: int, num_workers: int = 1) -> int:
    """A lower bound on the samples any (rank, worker) receives in any epoch's deal.

    Dealing each shard to the least-filled slot keeps every two slots within the largest count of each
    other, so the poorest slot holds at least (total - (slots - 1) * largest) / slots samples; with at
    least one shard per slot it also holds at least the smallest shard.
    """
    slots = world_size * max(1, num_workers)
    if len(shards) < slots:
        return 0
    counts = [c for _, c in shards]
    balanced = -(-(sum(counts) - (slots - 1) * max(counts)) // slots)
    return max(balanced, min(counts), 0)


def check_deal(shards: list[tuple[str, int]], world_size: int, num_workers: int, batch_size: int) -> None:
    """Before training: every epoch can give every worker at least one micro-batch, or DataPlanError says
    what to change."""
    if not sum(c for _, c in shards):
        raise DataPlanError("the train split is empty (its shards hold no sample): use more prompts, or lower "
                            "prompts.val_fraction and prompts.test_fraction")
    plan_epoch(shards, 0, 0, 0, world_size, num_workers, batch_size)  # too few shards: its own message
    bound = smallest_share(shards, world_size, num_workers)
    if bound < batch_size:
        raise DataPlanError(
            f"train.micro_batch_size={batch_size}: the {len(shards)} train shards ({sum(c for _, c in shards)} "
            f"samples) guarantee only {bound} samples to each of {world_size} ranks x {max(1, num_workers)} "
            "DataLoader workers in every epoch; lower train.micro_batch_size or train.num_workers, or write "
            "smaller shards (generate.shard_size) or more train samples")


def skipped_batches(position: int, worker: int, workers: int) -> int:
    """How many of worker `worker`'s batches fall before batch `position` of the epoch (round-robin)."""
    return max(0, (position - worker + workers - 1) // workers)


class TrainStream(IterableDataset):
    """Endless stream of ready batches for one rank, epoch after epoch, from a given position."""

    def __init__(self, shards: list[tuple[str, int]], *, seed: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int, image_size: int = 0, tokenizer=None, max_length: int = 40, shuffle_buffer: int,
                 start_epoch: int = 0, start_batch: int = 0, encode: Callable | None = None, cache_bytes: int = 0):
        """`encode(images, prompts)` makes a micro-batch's model inputs (the captioner's TrainingInputs; its
        `prepare(sample)`, if it has one, runs once on each decoded sample before the cache keeps it); without
        one, BLIP's: pixels at `image_size`, prompts through `tokenizer` up to `max_length` tokens. `cache_bytes`
        > 0 keeps up to that many bytes of decoded samples in memory per rank, split evenly over its reading
        processes, so later epochs do not read and decode the shards again (`shards.cache.SampleCache`)."""
        self.shards, self.seed, self.rank, self.world_size = shards, seed, rank, world_size
        self.num_workers, self.batch_size, self.image_size = max(1, num_workers), batch_size, image_size
        self.tokenizer, self.max_length, self.shuffle_buffer = tokenizer, max_length, shuffle_buffer
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.encode = encode
        self.cache_bytes = cache_bytes

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's plan for `epoch`."""
        return plan_epoch(self.shards, epoch, self.seed, self.rank, self.world_size, self.num_workers,
                          self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stats = ReadStats()
        cache = SampleCache(self.cache_bytes // self.num_workers) if self.cache_bytes > 0 else None
        resampled = 0
        epoch = self.start_epoch
        while True:
            plan = self.plan(epoch)
            skip = skipped_batches(self.start_batch, worker, self.num_workers) if epoch == self.start_epoch else 0
            index = 0
            for samples in self._worker_batches(plan, worker, stats, cache):
                if samples is None:
                    resampled += 1
                    continue
                if index >= skip:
                    yield self._collate(samples, epoch, index * self.num_workers + worker, worker, stats,
                                        resampled)
                index += 1
            epoch += 1

    def _worker_batches(self, plan: EpochPlan, worker: int, stats: ReadStats,
                        cache: SampleCache | None = None) -> Iterator[list | None]:
        """Exactly `plan.batches_per_worker` lists of samples; a None marks a refill from the start."""
        shards = list(plan.worker_shards[worker])
        produced, passes = 0, 0
        while produced < plan.batches_per_worker:
            if passes:
                yield None  # the share ran short (corrupt samples): read it again from the start
            batch: list = []
            read = 0
            reader = build_reader(shards, stats=stats, buffer=self.shuffle_buffer, split_workers=False,
                                  fields=("image", "txt"),  # training never reads the JSON: do not parse it
                                  cache=cache, prepare=getattr(self.encode, "prepare", None),
                                  buffer_seed=f"{self.seed}:{plan.epoch}:{self.rank}:{worker}:{passes}")
            for sample in reader:
                read += 1
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
                    produced += 1
                    if produced == plan.batches_per_worker:
                        return
            passes += 1
            if read < self.batch_size:  # a refill would make no batch: fail instead of looping for ever
                listed = sum(plan.shard_counts.get(path, 0) for path in shards)
                raise DataPlanError(f"shards {shards}: a full pass read {read} readable samples of the {listed} the "
                                    f"manifest lists, fewer than one micro-batch ({self.batch_size}); they are "
                                    "damaged: rerun `revprompt generate` to write them again")

    def _collate(self, samples: list[dict], epoch: int, position: int, worker: int, stats: ReadStats,
                 resampled: int) -> dict:
        if self.encode is not None:
            inputs = self.encode([s["image"] for s in samples], [s["txt"] for s in samples])
        else:
            text = encode_prompts(self.tokenizer, [s["txt"] for s in samples], self.max_length)
            inputs = {"pixel_values": preprocess_images([s["image"] for s in samples], self.image_size),
                      "input_ids": text.input_ids, "attention_mask": text.attention_mask, "labels": text.labels}
        return {
            **inputs,
            "model_inputs": sorted(inputs),
            "keys": [s["__key__"] for s in samples],
            "prompts": [s["txt"] for s in samples],
            "epoch": epoch,
            "position": position,
            "worker": worker,
            "read_stats": torch.tensor([stats.samples, stats.corrupt, stats.rejected, stats.incomplete, resampled]),
        }


def build_loader(stream: TrainStream, num_workers: int, pin_memory: bool) -> Iterable[dict]:
    """Ready batches (batch_size=None) from a DataLoader; 0 workers reads in the training process (without pinned
    memory, straight from the stream).

    Without pinned memory (a CPU device), workers hand batches over as numpy arrays through the DataLoader's pipe
    and they become tensors again here, sharing the received buffer: torch's default moves every tensor of every
    batch into a fresh shared-memory segment, which costs the worker and the trainer more CPU than the copy (on
    the tiny preset the trainer stepped 8 % slower fed by a worker that way, 4 % this way). With pinned memory
    (CUDA) the tensors travel as torch's default has them, to be pinned.
    """
    if not num_workers and not pin_memory:
        # in the training process with nothing to pin, a DataLoader would only call next() on the stream, inside a
        # profiler range and its fetcher, and pass the batch through `_as_is`: the stream is the loader
        return stream
    if num_workers and not pin_memory:
        return _PipedLoader(DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_to_numpy,
                                       prefetch_factor=4, multiprocessing_context=_wide_pipe_context()))
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, collate_fn=_as_is,
                      prefetch_factor=4 if num_workers else None)


def _as_is(batch: dict) -> dict:
    """The batch as the stream made it: its model inputs are tensors already. torch's default (default_convert)
    walks every value of every batch, the key and prompt lists item by item, looking for numpy arrays to convert
    (0.16 of the 0.41 ms a cached tiny-preset batch costs in the training process)."""
    return batch


# the key under which a worker's batch lists the keys it sent as numpy arrays
_PIPED = "__piped__"
# tensors of these types become numpy arrays for the trip from a worker; any other (bfloat16) travels as a tensor
_PIPED_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16,
                           torch.int8, torch.uint8, torch.bool})


def _to_numpy(batch: dict) -> dict:
    """In a worker: the batch's tensors as numpy arrays (a tensor shares its storage with its array)."""
    piped = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dtype in _PIPED_DTYPES]
    return {**batch, **{k: batch[k].numpy() for k in piped}, _PIPED: piped}


# a pipe this large holds a whole batch of the tiny preset (about 0.85 MB): the worker writes it in one go while the
# model computes, instead of 64 KiB at a time, each waking the trainer to read it; Linux's unprivileged limit
PIPE_BYTES = 1 << 20


def _wide_pipe_context() -> multiprocessing.context.BaseContext:
    """The default multiprocessing context, whose queues' pipes hold PIPE_BYTES where the system allows (Linux)."""
    base = type(multiprocessing.get_context())

    def Queue(self, maxsize: int = 0):  # noqa: N802 (multiprocessing's name)
        queue = base.Queue(self, maxsize)
        try:
            fcntl.fcntl(queue._reader.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size: the default pipe
            pass
        return queue

    return type(f"WidePipe{base.__name__}", (base,), {"Queue": Queue})()


class _PipedLoader:
    """Iterates a DataLoader whose workers send `_to_numpy` batches; yields them with their tensors back."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            piped = batch.pop(_PIPED)
            yield {**batch, **{k: torch.from_numpy(batch[k]) for k in piped}}

