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
