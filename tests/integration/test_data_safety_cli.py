"""From the outside: a second launch, a damaged shard, an export into the wrong folder, a run.dir that is not ours."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from revprompt.launch.layout import StageLock, claim_run_dir
from tests.conftest import run_cli, tiny_args


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def second_launch(run_dir: Path, stage: str):
    """`revprompt STAGE` on a run dir where a first launch of it holds the stage's lock (still running)."""
    claim_run_dir(run_dir)
    lock = StageLock(run_dir, stage).acquire()
    try:
        return run_cli(stage, *tiny_args(run_dir, limit=12), check=False)
    finally:
        lock.release()


def test_a_second_generate_on_the_same_run_dir_is_refused(run_dir: Path):
    proc = second_launch(run_dir, "generate")
    assert proc.returncode == 1
    assert f"another launch is running `prepare` here (generate launch, pid {os.getpid()}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".locks", ".revprompt-run.json"]  # nothing written


def test_a_shard_damaged_after_its_marker_is_written_again(run_dir: Path):
    args = tiny_args(run_dir, limit=24)
    run_cli("generate", *args)
    shard = run_dir / "shards" / "train" / "000001.tar"
    original = _digest(shard)
    data = bytearray(shard.read_bytes())
    data[:10240] = bytes(10240)  # same size, marker untouched: what two writers at once used to leave
    shard.write_bytes(bytes(data))
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "shards").rglob("*.tar") if p != shard}
    run_cli("generate", *args)
    assert _digest(shard) == original
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the intact shards were not rewritten
    assert json.loads((run_dir / "shards" / "manifest.json").read_text())["complete"]


def test_a_run_dir_holding_someone_elses_files_is_refused(tmp_path: Path):
    home = tmp_path / "project"
    home.mkdir()
    (home / "config.toml").write_text("# my project's settings\n[tool]\nname = 'x'\n")
    proc = run_cli("prepare", *tiny_args(home, limit=12), check=False)
    assert proc.returncode == 1
    assert f"run.dir {home}: holds config.toml that revprompt did not write" in proc.stderr
    assert (home / "config.toml").read_text() == "# my project's settings\n[tool]\nname = 'x'\n"
    assert sorted(p.name for p in home.iterdir()) == ["config.toml"]


def test_export_never_replaces_a_folder_it_did_not_export(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, limit=24, train__micro_batch_size=4, train__max_steps=2, train__val_captions=0,
                     train__num_workers=0, generate__shard_size=4)
    run_cli("generate", *args)
    run_cli("train", *args)
    checkpoint = run_dir / "checkpoints" / "step-2"
    mine = tmp_path / "mymodels"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    for out in (mine, run_dir, run_dir / "config.toml"):
        proc = run_cli("export", "--checkpoint", str(checkpoint), "--out", str(out), check=False)
        assert proc.returncode == 1, out
        assert "export failed" in proc.stderr and "Traceback" not in proc.stderr
    assert (mine / "notes.txt").read_text() == "mine" and [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mymodels", "run"]  # no temporary folder left
    out = tmp_path / "exported"
    run_cli("export", "--checkpoint", str(checkpoint), "--out", str(out))
    run_cli("export", "--checkpoint", str(checkpoint), "--out", str(out))  # its own export: replaced
    assert json.loads((out / "revprompt.json").read_text())["step"] == 2


def test_a_second_train_on_the_same_run_dir_is_refused(run_dir: Path):
    proc = second_launch(run_dir, "train")
    assert proc.returncode == 1
    assert f"another launch is running `train` here (train launch, pid {os.getpid()}" in proc.stderr
