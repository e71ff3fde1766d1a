"""Checkpoint folders: when a checkpoint counts, which one to resume from, what it was made from, pruning.

A checkpoint is `checkpoints/step-N/`: DeepSpeed's files from every rank, then (rank 0) `hf/` with the
captioner's config and processor and `hf/position.json` (the data position, the ZeRO layout, and what
the run was made from), then, after a barrier, `revprompt-commit.json` listing every file with its
size. Only a committed checkpoint whose files still match counts; resume takes the newest such one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..shards.writer import write_json_atomic

HF_SUBDIR = "hf"  # inside each checkpoint: the processor and model config, so export needs nothing else
POSITION = "position.json"  # inside hf/: where training stood, and what it was made from

COMMIT = "revprompt-commit.json"  # written last, after every rank has saved: only then does a checkpoint count


def checkpoint_dirs(root: Path) -> list[Path]:
    """step-N folders under `root`, oldest first (committed or not)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def fsync_files(folder: Path) -> None:
    """Flush every file under `folder` to the disk (DeepSpeed's torch.save does not), then the folders."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_checkpoint(folder: Path, step: int) -> None:
    """Record every file of a saved checkpoint with its size, atomically: the checkpoint now counts.

    Call on one rank, after every rank has saved and flushed its part (a barrier in between).
    """
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != COMMIT and not p.name.startswith(".")}
    write_json_atomic(folder / COMMIT, {"step": step, "files": files})
    fsync_files(folder)


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be resumed from, or None when it is committed and whole."""
    try:
        commit = json.loads((folder / COMMIT).read_text(encoding="utf-8"))
        files = commit["files"]
    except FileNotFoundError:
        return "not committed (the job stopped while saving it, or an older revprompt wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable commit record {COMMIT} ({exc})"
    for name, size in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was committed"
    return None


def resume_point(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest committed, whole checkpoint (or None), and the newer ones skipped with the reason."""
    skipped = []
    for folder in reversed(checkpoint_dirs(root)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` committed checkpoints; delete older committed ones and every uncommitted one
    older than the newest committed (left by killed runs). Returns what was deleted.

    The newest committed checkpoint is never deleted, whatever else lies in `root`.
    """
    import shutil

    folders = checkpoint_dirs(root)
    committed = [f for f in folders if checkpoint_problem(f) is None]
    if not committed:
        return []
    newest = int(committed[-1].name[5:])
    kept = set(committed[-max(1, keep):])
    old = [f for f in folders if f not in kept and int(f.name[5:]) < newest]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def write_latest(root: Path, tag: str) -> None:
    """DeepSpeed's `latest` file (for its own tools, such as zero_to_fp32), written atomically.

    revprompt itself never trusts it: it resumes from the newest committed checkpoint."""
    tmp = root / f".latest.tmp{os.getpid()}"
    tmp.write_text(tag, encoding="utf-8")
    os.replace(tmp, root / "latest")


def read_position(folder: Path) -> dict:
    """The position record of a checkpoint ({} when it has none)."""
    try:
        record = json.loads((folder / HF_SUBDIR / POSITION).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
