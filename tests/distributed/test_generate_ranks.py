"""Generation under torchrun with 2 gloo ranks: same bytes as 1 rank; SIGKILL mid-shard, rerun, same shards."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from revprompt.shards.reader import list_shards
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
    for rank in (0, 1):  # both ranks worked and logged to their own file
        log = (two / "logs" / f"rank-{rank}.log").read_text()
        owned = len(range(rank, planned, 2))
        assert f"rank {rank} of 2" in log and f"this rank owns {owned}, {owned} still to write" in log


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
