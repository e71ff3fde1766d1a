"""Nothing revprompt does deletes what it did not write, and nothing half-written is trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from revprompt.launch.layout import RUN_MARKER, RunDirError, StageLock, claim_run_dir, remove_owned
from revprompt.shards.writer import (SHARD_PATTERNS, ShardWriter, count_members, encode_image, is_complete,
                                     partial_path, stats_path)
from revprompt.models.captioner import build_captioner
from revprompt.training.checkpoints import (COMMIT, checkpoint_problem, commit_checkpoint, prune_checkpoints,
                                       resume_point)
from revprompt.launch.layout import EXPORT_INFO, read_export_info
from revprompt.training.export import ExportError, save_hf_dir


# ------------------------------------------------------------------ the run directory
def test_a_folder_with_someone_elses_files_is_not_claimed(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[tool.mine]\nsetting = 1\n")
    (home / "logs").mkdir()
    with pytest.raises(RunDirError, match="config.toml, logs that revprompt did not write"):
        claim_run_dir(home, "pipeline")
    assert (home / "config.toml").read_text() == "[tool.mine]\nsetting = 1\n"
    assert not (home / RUN_MARKER).exists()


def test_new_empty_unrelated_and_earlier_runs_are_claimed(tmp_path: Path):
    claim_run_dir(tmp_path / "new")
    assert json.loads((tmp_path / "new" / RUN_MARKER).read_text())["format"] == "revprompt-run/1"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "styles.csv").write_text("id,productDisplayName\n")  # a name revprompt never writes
    claim_run_dir(mixed)
    assert (mixed / "styles.csv").read_text() == "id,productDisplayName\n"
    theirs = tmp_path / "theirs"  # shards made by another tool: train reads them, writes elsewhere
    (theirs / "shards" / "train").mkdir(parents=True)
    claim_run_dir(theirs, "train")
    (tmp_path / "theirs-too" / "shards").mkdir(parents=True)
    with pytest.raises(RunDirError, match="holds shards that revprompt did not write"):
        claim_run_dir(tmp_path / "theirs-too", "generate")  # ... and generate would write over them
    legacy = tmp_path / "legacy"  # a run of a revprompt from before the marker
    (legacy / "shards").mkdir(parents=True)
    (legacy / "config.toml").write_text('[run]\ndir = "legacy"\n\n[generate]\nsteps = 2\n')
    claim_run_dir(legacy)
    assert (legacy / RUN_MARKER).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is not a folder"):
        claim_run_dir(tmp_path / "file")


def test_a_second_launch_is_refused_and_told_who_holds_the_lock(tmp_path: Path):
    first = StageLock(tmp_path, "generate").acquire()
    try:
        # flock locks belong to open files, so a second opening of the lock file conflicts even in this process
        with pytest.raises(RunDirError, match=rf"another launch is running `prepare` here \(generate launch, pid "
                                              rf"{os.getpid()} on "):
            StageLock(tmp_path, "pipeline").acquire()
        # a stage that rewrites nothing generate writes runs beside it
        StageLock(tmp_path, "train").acquire().release()
        # and from another process
        code = ("import sys; from revprompt.launch.layout import StageLock, RunDirError\n"
                "try: StageLock(sys.argv[1], 'generate').acquire()\nexcept RunDirError as e: print(e); sys.exit(3)")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert proc.returncode == 3 and f"pid {os.getpid()}" in proc.stdout
    finally:
        first.release()
    StageLock(tmp_path, "pipeline").acquire().release()  # free again once released


def test_a_killed_holder_frees_its_lock(tmp_path: Path):
    code = ("import sys, time; from revprompt.launch.layout import StageLock\n"
            "lock = StageLock(sys.argv[1], 'train').acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"pid {proc.pid}"):
            StageLock(tmp_path, "train").acquire()
    finally:
        proc.kill()
        proc.wait()
    StageLock(tmp_path, "train").acquire().release()


def test_remove_owned_leaves_everything_else(tmp_path: Path):
    for name in ("000000.tar", "000000.stats.json", ".000001.tar.host-12.partial", ".000004.tar.partial", "notes.txt",
                 "000002.tar.bak"):
        (tmp_path / name).write_text(name)
    (tmp_path / "000003.tar").mkdir()  # a folder with a shard's name is not a shard
    removed = remove_owned(tmp_path, SHARD_PATTERNS)
    assert sorted(p.name for p in removed) == [".000001.tar.host-12.partial", ".000004.tar.partial",
                                               "000000.stats.json", "000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000002.tar.bak", "000003.tar", "notes.txt"]


# ------------------------------------------------------------------ shards
def _shard(path: Path, n: int = 3) -> Path:
    writer = ShardWriter(path)
    for i in range(n):
        writer.write(f"k{i}_0000", {"jpg": encode_image(np.full((16, 16, 3), 40 * i, np.uint8)), "txt": b"p"})
    writer.close()
    return path


def test_partial_files_are_private_to_their_writer(tmp_path: Path):
    path = tmp_path / "000000.tar"
    writer = ShardWriter(path)
    assert partial_path(path).name.startswith(".000000.tar.") and partial_path(path).name.endswith(
        f"-{os.getpid()}.partial")
    assert partial_path(path).exists()
    writer.abort()
    assert not partial_path(path).exists()


def test_a_marker_is_trusted_only_when_its_tar_matches(tmp_path: Path):
    path = _shard(tmp_path / "000000.tar")
    assert json.loads(stats_path(path).read_text())["members"] == 6 == count_members(path)
    assert is_complete(path)
    data = bytearray(path.read_bytes())
    # what a second writer's stray end-of-archive record did: the first 10,240 bytes zeroed, same size
    data[:10240] = bytes(10240)
    path.write_bytes(bytes(data))
    assert path.stat().st_size == json.loads(stats_path(path).read_text())["bytes"]
    assert count_members(path) == 0 and not is_complete(path)
    _shard(path)
    path.write_bytes(path.read_bytes()[:-1024])  # truncated
    assert not is_complete(path)
    _shard(path)
    stats_path(path).write_text("")  # an empty marker
    assert not is_complete(path)


# ------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def captioner():
    return build_captioner("random-tiny")


def test_export_refuses_a_folder_of_the_users_and_leaves_it_whole(tmp_path: Path, captioner):
    model, processor = captioner
    mine = tmp_path / "mymodels"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportError, match="not a revprompt export"):
        save_hf_dir(model, processor, None, mine, {"step": 1})
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mymodels"]  # no hidden temporary folder either
    not_a_dir = tmp_path / "model.bin"
    not_a_dir.write_bytes(b"weights")
    with pytest.raises(ExportError, match="not a folder"):
        save_hf_dir(model, processor, None, not_a_dir, {"step": 1})
    assert not_a_dir.read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "mymodels"]


def test_export_replaces_only_its_own_earlier_export(tmp_path: Path, captioner):
    model, processor = captioner
    out = tmp_path / "captioner"
    save_hf_dir(model, processor, None, out, {"step": 1})
    assert read_export_info(out) == {"step": 1}
    listed = json.loads((out / EXPORT_INFO).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir())
    save_hf_dir(model, processor, None, out, {"step": 2})
    assert read_export_info(out) == {"step": 2}
    (out / "my-notes.md").write_text("keep me")
    with pytest.raises(ExportError, match="also holds my-notes.md"):
        save_hf_dir(model, processor, None, out, {"step": 3})
    assert (out / "my-notes.md").read_text() == "keep me" and read_export_info(out) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captioner"]


def test_a_killed_exports_temporary_folder_is_cleaned_up(tmp_path: Path, captioner):
    model, processor = captioner
    import socket

    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:32]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".captioner.tmp-{host}-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".captioner.tmp-{host}-{os.getppid()}"  # a running process's: not touched
    live.mkdir()
    save_hf_dir(model, processor, None, tmp_path / "captioner", {"step": 1})
    assert not stale.exists() and live.is_dir()


# ------------------------------------------------------------------ checkpoints
def _checkpoint(root: Path, step: int, commit: bool = True) -> Path:
    folder = root / f"step-{step}"
    (folder / "hf").mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"o" * 50)
    (folder / "hf" / "position.json").write_text(json.dumps({"step": step}))
    if commit:
        commit_checkpoint(folder, step)
    return folder


def test_resume_takes_the_newest_committed_checkpoint_and_says_what_it_skipped(tmp_path: Path):
    _checkpoint(tmp_path, 4)
    uncommitted = _checkpoint(tmp_path, 8, commit=False)
    truncated = _checkpoint(tmp_path, 12)
    (truncated / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"o" * 20)
    missing = _checkpoint(tmp_path, 16)
    (missing / "hf" / "position.json").unlink()
    (tmp_path / "latest").write_text("")  # an empty `latest` changes nothing
    folder, skipped = resume_point(tmp_path)
    assert folder == tmp_path / "step-4"
    assert [(p.name, why) for p, why in skipped] == [
        ("step-16", "hf/position.json is missing"),
        ("step-12", "zero_pp_rank_1_mp_rank_00_optim_states.pt has 20 bytes, 50 when it was committed"),
        ("step-8", "not committed (the job stopped while saving it, or an older revprompt wrote it)")]
    assert checkpoint_problem(uncommitted).startswith("not committed")
    assert resume_point(tmp_path / "nothing") == (None, [])


def test_pruning_never_deletes_the_newest_committed_checkpoint(tmp_path: Path):
    _checkpoint(tmp_path, 4)
    leftover = _checkpoint(tmp_path, 20, commit=False)  # half-written by a killed run that got further
    _checkpoint(tmp_path, 8)
    assert [p.name for p in prune_checkpoints(tmp_path, keep=1)] == ["step-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-20", "step-8"]
    assert resume_point(tmp_path)[0] == tmp_path / "step-8"
    _checkpoint(tmp_path, 12, commit=False)  # older than the newest committed after the next save: garbage
    _checkpoint(tmp_path, 16)
    assert [p.name for p in prune_checkpoints(tmp_path, keep=2)] == ["step-12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-16", "step-20", "step-8"]
    assert leftover.is_dir() and (tmp_path / "step-16" / COMMIT).is_file()


# ------------------------------------------------------------------ what a file or a folder may claim
def _manifest(root: Path, shards: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({
        "format": "revprompt-shards/1", "fingerprint": "f", "complete": True,
        "splits": {"train": {"planned_shards": 2, "shards": shards, "count": 0}}}))
    return root


@pytest.mark.parametrize("shard, message", [
    ({"name": "train/000000.tar", "count": -12}, r"shards\[0\]\.count: -12 is not a count"),
    ({"name": "../../etc/000000.tar", "count": 4}, "is not one of this split's planned shard names"),
    ({"name": "/tmp/elsewhere/000000.tar", "count": 4}, "is not one of this split's planned shard names"),
    ({"name": "train/000007.tar", "count": 4}, "is not one of this split's planned shard names"),  # beyond the plan
    ({"name": "val/000000.tar", "count": 4}, "is not one of this split's planned shard names"),  # another split
    ({"name": "train/000000.tar", "count": True}, "is not a count"),
])
def test_a_manifest_is_checked_before_it_is_trusted(tmp_path: Path, shard: dict, message: str):
    from revprompt.shards.manifest import ManifestError, split_shards

    root = _manifest(tmp_path / "shards", [shard])
    with pytest.raises(ManifestError, match=message):
        split_shards(root, "train")


def test_a_manifest_count_must_agree_with_the_shards_marker(tmp_path: Path):
    from revprompt.shards.manifest import ManifestError, split_shards

    root = tmp_path / "shards"
    _shard(root / "train" / "000000.tar", n=3)
    _manifest(root, [{"name": "train/000000.tar", "count": 300}])
    with pytest.raises(ManifestError, match="lists 300 samples in 000000.tar of train, its marker 3"):
        split_shards(root, "train")
    _manifest(root, [{"name": "train/000000.tar", "count": 3}])
    assert split_shards(root, "train") == [(str(root / "train" / "000000.tar"), 3)]


def test_shard_paths_are_opened_as_files_never_as_urls(tmp_path: Path):
    from revprompt.shards.reader import ReadStats, build_reader

    proof = tmp_path / "ran"
    stats = ReadStats()
    assert list(build_reader([f"pipe:touch {proof};true"], stats=stats, split_workers=False)) == []
    assert not proof.exists() and stats.corrupt == 1  # no such local file: counted, and no shell ever ran


def test_sparse_and_oversized_members_are_rejected_unread(tmp_path: Path):
    import tarfile

    from revprompt.shards.reader import ReadStats, build_reader, local_tar_members

    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "k0_0000.jpg").write_bytes(encode_image(np.zeros((8, 8, 3), np.uint8)))
    with open(folder / "k0_0000.txt", "wb") as handle:  # 1 GiB of holes: a few KB in the tar
        handle.truncate(1 << 30)
    shard = tmp_path / "000000.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(shard), "-C", str(folder), "k0_0000.jpg",
                    "k0_0000.txt"], check=True)
    assert shard.stat().st_size < 100_000
    stats = ReadStats()
    assert list(build_reader([str(shard)], stats=stats, split_workers=False)) == []
    assert stats.rejected == 1 and stats.incomplete == 1  # the sparse text refused, so the sample has none
    with tarfile.open(tmp_path / "big.tar", "w") as tar:
        tar.add(folder / "k0_0000.jpg", arcname="k1_0000.jpg")
    stats = ReadStats()
    assert list(local_tar_members(stats, max_member_bytes=64)([{"url": str(tmp_path / "big.tar")}])) == [{}]
    assert stats.rejected == 1


def test_fifos_are_refused_not_read(tmp_path: Path):
    from revprompt.launch.config import ConfigError, load_config
    from revprompt.prompts.sources import PromptSourceError, read_prompts

    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)
    with pytest.raises(PromptSourceError, match="not a regular file"):
        read_prompts(str(fifo))
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(str(fifo))


def test_a_failed_write_names_the_path_and_the_room_left(tmp_path: Path):
    # a process whose files may not grow past 16 bytes (RLIMIT_FSIZE): the kernel refuses the write as a full
    # disk would, without needing one
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))\n"
            "from pathlib import Path\n"
            "from revprompt.shards.writer import WriteError, write_json_atomic\n"
            "try:\n    write_json_atomic(Path(sys.argv[1]), {'a': 'x' * 100})\n"
            "except WriteError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.json")], capture_output=True, text=True)
    assert f"{tmp_path / 'x.json'}: cannot write a JSON record (File too large; " in out.stdout
    assert "MiB free there); free space or fix the folder, then rerun the same command" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the temporary file went too


def test_a_fifo_among_images_is_skipped_and_counted(tmp_path: Path):
    from PIL import Image

    from revprompt.evaluation.caption import iter_inputs
    from revprompt.shards.reader import ReadStats

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.jpg")  # opening it to read would wait for a writer for ever
    stats = ReadStats()
    assert [value for _, value, _ in iter_inputs([str(tmp_path)], stats)] == [str(tmp_path / "a.png")]
    assert stats.rejected == 1 and stats.samples == 1
