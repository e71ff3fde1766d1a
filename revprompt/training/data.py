"""Streaming training batches from the train shards, with equal batch counts on every rank.

An epoch is planned from the manifest's shard counts alone, the same way on every rank: shards are
shuffled by (seed, epoch), dealt to ranks (s % world) and then to DataLoader workers, and every worker
on every rank yields exactly `batches_per_worker` batches: the smallest share any worker can fill.
Unequal shards therefore never leave one rank waiting in a collective. A worker that comes up
short (corrupt samples) refills from the start of its own share, counted as `resampled`.

Batch j of an epoch comes from worker j % W (the DataLoader's round-robin), so a restart at batch k
of epoch e has each worker skip exactly its share of the first k batches: no sample of the epoch is
seen twice.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..shards.reader import ReadStats, build_reader
from ..shards.schema import owner
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

    @property
    def batches(self) -> int:
        """Batches this epoch yields on every rank."""
        return self.batches_per_worker * len(self.worker_shards)


def plan_epoch(shards: list[tuple[str, int]], epoch: int, seed: int, rank: int, world_size: int,
               num_workers: int, batch_size: int) -> EpochPlan:
    """Deal (path, count) shards for `epoch` to ranks and workers; equal batch quota everywhere."""
    workers = max(1, num_workers)
    if len(shards) < world_size * workers:
        raise DataPlanError(
            f"{len(shards)} train shards cannot feed {world_size} ranks x {workers} DataLoader workers; "
            "write smaller shards (generate.shard_size) or use fewer workers (train.num_workers)")
    order = sorted(shards)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    quotas: list[int] = []
    mine: tuple[tuple[str, ...], ...] = ()
    for r in range(world_size):
        per_rank = [shard for position, shard in enumerate(order) if owner(position, world_size) == r]
        quotas += [sum(c for _, c in per_rank[w::workers]) // batch_size for w in range(workers)]
        if r == rank:
            mine = tuple(tuple(p for p, _ in per_rank[w::workers]) for w in range(workers))
    quota = min(quotas)
    if not quota:
        raise DataPlanError(f"train.micro_batch_size={batch_size} is larger than the samples some DataLoader "
                            "worker receives; lower it or write more train samples")
    return EpochPlan(epoch, mine, quota)


def smallest_share(shards: list[tuple[str, int]], world_size: int, num_workers: int = 1) -> int:
    """The fewest samples any (rank, worker) receives when `shards` are dealt (any epoch's order)."""
    workers = max(1, num_workers)
    if len(shards) < world_size * workers:
        return 0
    counts = sorted(c for _, c in shards)
    # the worst deal puts the smallest shards together: a lower bound that holds for every shuffle
    per_share = len(shards) // (world_size * workers)
    return sum(counts[:per_share])


def skipped_batches(position: int, worker: int, workers: int) -> int:
    """How many of worker `worker`'s batches fall before batch `position` of the epoch (round-robin)."""
    return max(0, (position - worker + workers - 1) // workers)


class TrainStream(IterableDataset):
    """Endless stream of ready batches for one rank, epoch after epoch, from a given position."""

    def __init__(self, shards: list[tuple[str, int]], *, seed: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int, image_size: int, tokenizer, max_length: int, shuffle_buffer: int,
                 start_epoch: int = 0, start_batch: int = 0):
        self.shards, self.seed, self.rank, self.world_size = shards, seed, rank, world_size
        self.num_workers, self.batch_size, self.image_size = max(1, num_workers), batch_size, image_size
        self.tokenizer, self.max_length, self.shuffle_buffer = tokenizer, max_length, shuffle_buffer
        self.start_epoch, self.start_batch = start_epoch, start_batch

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's plan for `epoch`."""
        return plan_epoch(self.shards, epoch, self.seed, self.rank, self.world_size, self.num_workers,
                          self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stats = ReadStats()
        resampled = 0
        epoch = self.start_epoch
        while True:
            plan = self.plan(epoch)
            skip = skipped_batches(self.start_batch, worker, self.num_workers) if epoch == self.start_epoch else 0
            index = 0
            for samples in self._worker_batches(plan, worker, stats):
                if samples is None:
                    resampled += 1
                    continue
                if index >= skip:
                    yield self._collate(samples, epoch, index * self.num_workers + worker, worker, stats,
                                        resampled)
                index += 1
            epoch += 1

    def _worker_batches(self, plan: EpochPlan, worker: int, stats: ReadStats) -> Iterator[list | None]:
        """Exactly `plan.batches_per_worker` lists of samples; a None marks a refill from the start."""
        shards = list(plan.worker_shards[worker])
        produced, passes = 0, 0
        while produced < plan.batches_per_worker:
            if passes:
                yield None  # the share ran short (corrupt samples): read it again from the start
            batch: list = []
            got_any = False
            reader = build_reader(shards, stats=stats, buffer=self.shuffle_buffer, split_workers=False,
                                  fields=("image", "txt"),  # training never reads the JSON: do not parse it
                                  buffer_seed=f"{self.seed}:{plan.epoch}:{self.rank}:{worker}:{passes}")
            for sample in reader:
                got_any = True
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
                    produced += 1
                    if produced == plan.batches_per_worker:
                        return
            passes += 1
            if not got_any:
                raise DataPlanError(f"no readable sample in shards {shards}")

    def _collate(self, samples: list[dict], epoch: int, position: int, worker: int, stats: ReadStats,
                 resampled: int) -> dict:
        pixels = preprocess_images([s["image"] for s in samples], self.image_size)
        text = encode_prompts(self.tokenizer, [s["txt"] for s in samples], self.max_length)
        return {
            "pixel_values": pixels,
            "input_ids": text.input_ids,
            "attention_mask": text.attention_mask,
            "labels": text.labels,
            "keys": [s["__key__"] for s in samples],
            "prompts": [s["txt"] for s in samples],
            "epoch": epoch,
            "position": position,
            "worker": worker,
            "read_stats": torch.tensor([stats.samples, stats.corrupt, stats.rejected, stats.incomplete, resampled]),
        }


def build_loader(stream: TrainStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over ready batches (batch_size=None); 0 workers reads in the training process."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None)
