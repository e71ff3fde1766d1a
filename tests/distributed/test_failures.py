"""Failures end the job with a non-zero code and a message that names the path; finished work stays."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

from tests.conftest import run_cli, tiny_args


def test_a_rank_that_fails_ends_the_job_within_the_timeout(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, limit=48, run__timeout_s=60)
    run_cli("prepare", *args)  # the run directory is revprompt's from here on
    # plant a failure only rank 1 meets: the final name of the first train shard of batch group 1 (group g -> rank
    # g % 2) is a folder
    from revprompt.generation.job import group_tasks, plan_shards

    counts = json.loads((run_dir / "prompts" / "report.json").read_text())["splits"]
    groups = group_tasks(plan_shards({s: counts[s] for s in ("train", "val", "test")}, 1, 6), 4)
    task = groups[1].tasks[0]
    assert task.split == "train"
    blocker = run_dir / "shards" / "train" / f"{task.shard:06d}.tar"
    blocker.mkdir(parents=True)
    start = time.monotonic()
    proc = run_cli("generate", *args, nproc=2, check=False, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60 + 30, elapsed  # torchrun stops rank 0 when rank 1 exits: no waiting in a collective
    log1 = (run_dir / "logs" / "rank-1.log").read_text()
    assert "generate failed on rank 1" in log1 and "Traceback" in log1 and str(blocker) in log1
    # rank 0's finished shards are intact and marked; rank 1's planted one is still only the folder
    done = sorted(p for p in (run_dir / "shards").glob("*/*.stats.json"))
    assert done, "rank 0 finished no shard"
    for stats in done:
        tar = stats.with_name(stats.name.replace(".stats.json", ".tar"))
        with tarfile.open(tar) as t:
            assert len([m for m in t.getmembers() if m.name.endswith(".jpg")]) == json.loads(stats.read_text())["count"]
    assert blocker.is_dir() and not blocker.with_name(blocker.name.replace(".tar", ".stats.json")).exists()

    # with the obstacle gone, the same command finishes the job without redoing rank 0's shards
    before = {p: p.stat().st_mtime_ns for p in done}
    blocker.rmdir()
    run_cli("generate", *args, nproc=2)
    assert json.loads((run_dir / "shards" / "manifest.json").read_text())["complete"]
    assert {p: p.stat().st_mtime_ns for p in done} == before


def test_an_unwritable_run_dir_is_named(tmp_path: Path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a file where the run directory's parent should be\n")
    proc = run_cli("generate", *tiny_args(not_a_dir / "run", limit=12), check=False)
    assert proc.returncode == 1
    assert f"cannot write the run directory {not_a_dir / 'run'}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ranks_stop_when_their_launcher_is_killed(tmp_path: Path):
    # issue 11.10: torchrun starts each rank in a session of its own; killing torchrun alone left them running
    import subprocess

    import psutil

    from tests.conftest import BIN, ROOT, cli_env

    run_dir = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", str(BIN / "revprompt"),
           "generate", *tiny_args(run_dir, limit=60, generate__steps=300, generate__batch_size=2)]
    launcher = subprocess.Popen(cmd, env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    ranks: list = []
    try:
        deadline = time.monotonic() + 120
        while len(list((run_dir / "shards").rglob("*.partial"))) < 2:  # both ranks are drawing
            assert launcher.poll() is None and time.monotonic() < deadline, "the ranks never started drawing"
            time.sleep(0.05)
        ranks = psutil.Process(launcher.pid).children(recursive=True)
        assert len(ranks) >= 2
        marked = sorted((run_dir / "shards").rglob("*.stats.json"))
        launcher.kill()  # torchrun alone, as a scheduler or a user killing its process group would
        launcher.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=5)  # a shard takes far longer than this to draw
        assert not alive, [p.pid for p in alive]
    finally:
        for proc in ranks + psutil.Process().children(recursive=True):  # orphans included, should any be left
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    assert sorted((run_dir / "shards").rglob("*.stats.json")) == marked  # nobody finished a shard after the kill
