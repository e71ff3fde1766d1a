"""Epoch planning: every rank gets the same batch count from unequal shards; clear errors; exact resume skips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revprompt.training.data import (DataPlanError, check_deal, deal, plan_epoch, skipped_batches,
                                     smallest_share)

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


def test_a_small_set_on_two_ranks_feeds_every_epoch():
    # issue 11.9: 3 train shards of 32/32/12 on 2 ranks at micro-batch 16 used to fail at epoch 1
    small = [("/s/train/000000.tar", 32), ("/s/train/000001.tar", 32), ("/s/train/000002.tar", 12)]
    check_deal(small, 2, 1, 16)
    for epoch in range(50):
        plans = [plan_epoch(small, epoch=epoch, seed=0, rank=r, world_size=2, num_workers=1, batch_size=16)
                 for r in range(2)]
        assert {p.batches_per_worker for p in plans} == {2}  # 44 or 32 samples each: two batches of 16


@settings(max_examples=3000, deadline=None)
@given(counts=st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=40),
       world=st.integers(1, 8), workers=st.integers(1, 4), batch=st.integers(1, 24), epoch=st.integers(0, 1000),
       seed=st.integers(0, 5))
def test_every_deal_partitions_balances_and_keeps_the_up_front_promise(counts, world, workers, batch, epoch, seed):
    shards = [(f"/s/train/{i:06d}.tar", n) for i, n in enumerate(counts)]
    slots = world * workers
    if not sum(counts):
        with pytest.raises(DataPlanError, match="the train split is empty"):
            check_deal(shards, world, workers, batch)
        return
    if len(shards) < slots:
        with pytest.raises(DataPlanError, match="cannot feed"):
            check_deal(shards, world, workers, batch)
        return
    dealt = deal(shards, epoch, seed, slots)
    assert sorted(s for share in dealt for s in share) == sorted(shards)  # a partition of the shards
    loads = [sum(n for _, n in share) for share in dealt]
    assert max(loads) - min(loads) <= max(counts)  # balanced within the largest shard
    assert min(loads) >= smallest_share(shards, world, workers)  # the bound holds in this epoch
    try:
        check_deal(shards, world, workers, batch)
    except DataPlanError as exc:
        assert "train.micro_batch_size" in str(exc) and smallest_share(shards, world, workers) < batch
        return
    plans = [plan_epoch(shards, epoch=epoch, seed=seed, rank=r, world_size=world, num_workers=workers,
                        batch_size=batch) for r in range(world)]  # never raises once the check passed
    quota = min(loads) // batch
    assert quota >= 1 and {p.batches_per_worker for p in plans} == {quota}  # every rank: the same batches
    counts_of = dict(shards)
    for plan in plans:
        assert len(plan.worker_shards) == workers
        assert all(sum(counts_of[s] for s in share) >= quota * batch for share in plan.worker_shards)
