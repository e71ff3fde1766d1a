"""Generation under torchrun with 2 gloo ranks: same bytes as 1 rank; SIGKILL mid-shard, rerun, same shards."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from revprompt.generation.job import ShardTask, group_tasks
from revprompt.shards.reader import build_reader, list_shards
from tests.conftest import BIN, ROOT, cli_env, kill_tree, run_cli, shard_digests, tiny_args


def test_two_ranks_write_the_same_bytes_as_one(tmp_path: Path):
    one, two, again = tmp_path / "one", tmp_path / "two", tmp_path / "again"
    run_cli("generate", *tiny_args(one, limit=30), nproc=1)
    run_cli("generate", *tiny_args(two, limit=30), nproc=2)
    run_cli("generate", *tiny_args(again, limit=30), nproc=1)
    digests = shard_digests(one)
    manifest = json.loads((two / "shards" / "manifest.json").read_text())
    planned = sum(s["planned_shards"] for s in manifest["splits"].values())
    assert manifest["complete"] and len(digests) == planned >= 4
    assert shard_digests(two) == digests
    assert shard_digests(again) == digests  # the same config twice: byte-identical shards
    # the plan's order: the splits as configured (the manifest lists them sorted), shards in order
    sizes = [shard["count"] for split in manifest["config"]["splits"] for shard in manifest["splits"][split]["shards"]]
    tasks = [ShardTask("train", i, i, sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
    groups = group_tasks(tasks, 4)  # tiny_args: batches of 4; a rank owns whole batch groups
    assert len(groups) >= 2
    for rank in (0, 1):  # both ranks worked and logged to their own file
        log = (two / "logs" / f"rank-{rank}.log").read_text()
        owned = sum(len(g.tasks) for g in groups[rank::2])
        assert f"rank {rank} of 2" in log and f"this rank owns {owned} shards, {owned} still to write" in log


def test_sigkill_mid_shard_then_rerun_gives_the_uninterrupted_shards(tmp_path: Path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    args = tiny_args(killed, limit=60, generate__steps=8, generate__batch_size=2, generate__shard_size=8)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", str(BIN / "revprompt"),
           "generate", *args]
    proc = subprocess.Popen(cmd, env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            markers = list((killed / "shards").rglob("*.stats.json"))
            partials = list((killed / "shards").rglob(".*.partial"))
            if markers and partials:
                break
            assert proc.poll() is None, "the run ended before it could be killed mid-shard"
            time.sleep(0.05)
        else:
            raise AssertionError("no shard completed in time")
    finally:
        assert kill_tree(proc.pid) >= 3  # torchrun and both ranks
        proc.wait()
    # what readers see after the kill: only complete shards, never the partial file
    partials = list((killed / "shards").rglob(".*.partial"))
    assert partials, "the kill should have landed mid-shard"
    visible = list_shards(killed / "shards", "train")
    assert all(Path(p).with_name(Path(p).stem + ".stats.json").exists() for p in visible)
    assert not any(p.name.endswith(".tar") for p in (killed / "shards").rglob("*") if p.name.startswith("."))

    run_cli("generate", *args, nproc=2)
    run_cli("generate", *tiny_args(reference, limit=60, generate__steps=8, generate__batch_size=2,
                                   generate__shard_size=8), nproc=2)
    assert shard_digests(killed) == shard_digests(reference)
    assert not list((killed / "shards").rglob(".*.partial"))


def test_torchrun_restarts_a_killed_rank_and_the_job_completes(tmp_path: Path):
    """`--max-restarts` (MAX_RESTARTS in the sbatch scripts): a rank killed mid-shard, torchrun restarts the
    worker group, and the restarted ranks resume to the shards of a run that was never interrupted."""
    import psutil

    reference, restarted = tmp_path / "reference", tmp_path / "restarted"

    def args(run_dir: Path) -> list[str]:
        return tiny_args(run_dir, limit=60, generate__steps=8, generate__batch_size=2, generate__shard_size=8)

    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=1", "--no-python",
           str(BIN / "revprompt"), "generate", *args(restarted)]
    # as the Slurm scripts do: without it, restarted ranks may join through the failed attempt's keys
    env = dict(cli_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    victim = None
    try:
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before a rank could be killed"
            if list((restarted / "shards").rglob("*.stats.json")) and list((restarted / "shards").rglob(".*.partial")):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        if child.environ().get("RANK") == "1":
                            victim = child
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            time.sleep(0.05)
        assert victim is not None, "no rank-1 worker mid-shard in time"
        victim.kill()
        _, stderr = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, stderr[-12000:]
    for rank in (0, 1):  # the whole worker group started twice
        log_text = (restarted / "logs" / f"rank-{rank}.log").read_text()
        assert log_text.count(f"rank {rank} of 2") == 2
        assert "share the rendezvous store" not in log_text
    assert json.loads((restarted / "shards" / "manifest.json").read_text())["complete"]
    assert not list((restarted / "shards").rglob(".*.partial"))
    run_cli("generate", *args(reference), nproc=2)
    assert shard_digests(restarted) == shard_digests(reference)


def test_restarts_over_the_shared_store_are_warned_about_in_the_log(tmp_path: Path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in cli_env().items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=1", "--no-python",
           str(BIN / "revprompt"), "generate", *tiny_args(run_dir, limit=12)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in (run_dir / "logs" / "rank-0.log").read_text()


@pytest.mark.parametrize("family", ["StableDiffusionXLPipeline", "FluxPipeline"])
def test_other_families_write_the_same_bytes_on_one_and_two_ranks(tmp_path: Path, family: str):
    from tests.families import save_family

    model = save_family(family, tmp_path / "model")
    one, two = tmp_path / "one", tmp_path / "two"
    extra = dict(limit=16, generate__model=model, generate__height=32, generate__width=32, generate__shard_size=4)
    run_cli("generate", *tiny_args(one, **extra), nproc=1)
    run_cli("generate", *tiny_args(two, **extra), nproc=2)
    assert shard_digests(one) == shard_digests(two) and len(shard_digests(one)) >= 4
    samples = list(build_reader(list_shards(one / "shards", "train"), split_workers=False))
    assert {s["json"]["family"] for s in samples} == {family}
    assert {s["json"]["scheduler"] for s in samples} == (
        {"FlowMatchEulerDiscreteScheduler"} if family == "FluxPipeline" else {"dpmsolver++"})
