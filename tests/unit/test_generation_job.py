"""generation/job: where the generating thread's time goes, and progress across ranks without collectives."""

from __future__ import annotations

import torch

from revprompt.launch import dist


def test_loop_clock_splits_model_and_host_time(monkeypatch):
    from revprompt.generation import job

    ticks = iter([10.0, 10.5, 12.5, 12.75, 15.0, 15.25])  # start, then (model start, model end) twice, stop
    monkeypatch.setattr(job.time, "perf_counter", lambda: next(ticks))
    clock = job.LoopClock()
    clock.model_starts()
    assert clock.model_ends() == 2.0
    clock.model_starts()
    assert clock.model_ends() == 2.25
    clock.stop()
    assert (clock.model_s, clock.host_s, clock.batches) == (4.25, 1.0, 2)
    assert clock.summary() == ("generating thread: 4.25 s in the model, 1.00 s elsewhere (19.0% of the loop) "
                               "over 2 batches")


def test_progress_reads_other_ranks_at_most_once_per_interval(tmp_path):
    from revprompt.generation.job import Progress

    folder = tmp_path / "progress"
    folder.mkdir()
    rank1 = Progress(folder, dist.DistInfo(1, 2, 1, torch.device("cpu")), total=100, interval_s=3600)
    main = Progress(folder, dist.DistInfo(0, 2, 0, torch.device("cpu")), total=100, interval_s=3600)
    try:
        assert rank1.add(10) == 10  # first call writes its file; a non-main rank knows only its own count
        assert main.add(5) == 15  # first call reads the others
        rank1.add(20, force=True)  # rank 1 at 30 now
        assert main.add(5) == 20  # within the interval: the last read (10) stands
        assert main.add(0, force=True) == 40  # a forced update reads again
        assert main.rate() > 0
    finally:
        main.close()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=3000, deadline=None)
@given(counts=st.lists(st.integers(0, 300), min_size=1, max_size=3), images_per_prompt=st.integers(1, 4),
       shard_size=st.integers(1, 120), batch_size=st.integers(1, 64), world=st.integers(1, 9))
def test_batch_groups_cover_the_plan_in_order_and_never_cost_more_calls(counts, images_per_prompt, shard_size,
                                                                       batch_size, world):
    from revprompt.generation.job import MAX_GROUP_SHARDS, group_tasks, plan_shards
    from revprompt.shards.schema import owner

    tasks = plan_shards({s: n for s, n in zip(("train", "val", "test"), counts)}, images_per_prompt, shard_size)
    groups = group_tasks(tasks, batch_size)
    # the groups are the plan's shards, in order, each exactly once, numbered 0..n-1
    assert [t for g in groups for t in g.tasks] == tasks
    assert [g.index for g in groups] == list(range(len(groups)))
    for i, g in enumerate(groups):
        assert 1 <= len(g.tasks) <= MAX_GROUP_SHARDS
        if i < len(groups) - 1:  # closed early only when its samples fill whole batches
            assert g.size % batch_size == 0 or len(g.tasks) == MAX_GROUP_SHARDS
        spans = g.batches(batch_size)
        # the batches tile the group; every batch is full but the last
        assert spans[0][0] == 0 if spans else g.size == 0
        assert all(a == b_prev for (_, b_prev), (a, _) in zip(spans, spans[1:]))
        assert (spans[-1][1] if spans else 0) == g.size
        assert all(b - a == batch_size for a, b in spans[:-1]) and all(0 < b - a <= batch_size for a, b in spans)
    calls = sum(len(g.batches(batch_size)) for g in groups)
    per_shard = sum(-(-t.size // batch_size) for t in tasks)
    total = sum(t.size for t in tasks)
    assert -(-total // batch_size) <= calls <= per_shard
    if shard_size % batch_size == 0:  # aligned shards: one short batch per forced group close, at most
        forced = sum(1 for g in groups[:-1] if g.size % batch_size)
        assert calls <= -(-total // batch_size) + forced + 1
    # ownership by group: every shard has exactly one rank, and the groups (so every batch) do not depend on world
    owners = {t.index: owner(g.index, world) for g in groups for t in g.tasks}
    assert sorted(owners) == [t.index for t in tasks] and all(0 <= r < world for r in owners.values())
    assert group_tasks(tasks, batch_size) == groups
