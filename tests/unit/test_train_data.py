"""Epoch planning: every rank gets the same batch count from unequal shards; clear errors; exact resume skips."""

from __future__ import annotations

import pytest

from revprompt.training.data import DataPlanError, plan_epoch, skipped_batches, smallest_share

SHARDS = [(f"/s/train/{i:06d}.tar", n) for i, n in enumerate([32, 32, 32, 7, 32, 19, 5])]


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (2, 3), (3, 2), (7, 1)])
def test_every_rank_yields_the_same_batches_and_shards_are_a_partition(world, workers):
    for epoch in range(3):
        plans = [plan_epoch(SHARDS, epoch=epoch, seed=0, rank=r, world_size=world, num_workers=workers, batch_size=4)
                 for r in range(world)]
        assert len({p.batches for p in plans}) == 1 and plans[0].batches > 0
        dealt = [s for p in plans for w in p.worker_shards for s in w]
        assert sorted(dealt) == sorted(p for p, _ in SHARDS)
        # the quota is what the poorest worker can fill
        counts = dict(SHARDS)
        poorest = min(sum(counts[s] for s in w) for p in plans for w in p.worker_shards)
        assert plans[0].batches_per_worker == poorest // 4


def test_the_shard_order_changes_with_the_epoch_but_not_with_the_rank_asking():
    a = plan_epoch(SHARDS, epoch=0, seed=0, rank=0, world_size=2, num_workers=1, batch_size=4).worker_shards
    b = plan_epoch(SHARDS, epoch=1, seed=0, rank=0, world_size=2, num_workers=1, batch_size=4).worker_shards
    assert a != b
    again = plan_epoch(SHARDS, epoch=0, seed=0, rank=0, world_size=2, num_workers=1, batch_size=4)
    assert plan_epoch(SHARDS, epoch=0, seed=0, rank=0, world_size=2, num_workers=1, batch_size=4) == again


def test_too_few_shards_or_too_large_batches_say_what_to_change():
    with pytest.raises(DataPlanError, match=r"7 train shards cannot feed 4 ranks x 2 DataLoader workers; .*"
                                            r"generate\.shard_size.*train\.num_workers"):
        plan_epoch(SHARDS, epoch=0, seed=0, rank=0, world_size=4, num_workers=2, batch_size=4)
    with pytest.raises(DataPlanError, match=r"train\.micro_batch_size=200 is larger"):
        plan_epoch(SHARDS, epoch=0, seed=0, rank=0, world_size=1, num_workers=1, batch_size=200)


def test_resume_skips_exactly_the_batches_each_worker_already_gave():
    # round-robin: batch j of the epoch comes from worker j % W
    for workers in (1, 2, 3):
        for position in range(10):
            served = [j % workers for j in range(position)]
            assert [skipped_batches(position, w, workers) for w in range(workers)] == \
                [served.count(w) for w in range(workers)]


def test_smallest_share_is_a_lower_bound_for_any_deal():
    bound = smallest_share(SHARDS, 2)
    for epoch in range(20):
        for rank in range(2):
            plan = plan_epoch(SHARDS, epoch=epoch, seed=0, rank=rank, world_size=2, num_workers=1, batch_size=1)
            assert sum(dict(SHARDS)[s] for s in plan.worker_shards[0]) >= bound
    assert smallest_share(SHARDS, 8) == 0
