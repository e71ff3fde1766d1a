"""The run directory's owner: which folder is a run, who may write in it now, and what revprompt may delete.

Three rules keep a user's files safe:

- a run directory is claimed with a marker (`.revprompt-run.json`) the first time revprompt writes in
  it; a folder that already holds files under the names the stage would write (config.toml, logs/,
  shards/ for generate, ...) but no marker is someone else's, and is refused;
- one launch per stage at a time: the launch's rank 0 holds an exclusive lock (`.locks/{stage}.lock`,
  `flock`, released by the kernel when the process dies, so a killed job never leaves a stale lock);
  a second launch stops with a message naming the holder;
- revprompt deletes only what it wrote: `remove_owned` removes the files of a folder whose names match
  the patterns of revprompt's own outputs and leaves everything else where it is.
"""

from __future__ import annotations

import datetime
import errno
import fnmatch
import json
import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger(__name__)

RUN_MARKER = ".revprompt-run.json"
RUN_FORMAT = "revprompt-run/1"
# what every launch writes at the top of a run directory, and what each stage writes besides
COMMON_NAMES = ("config.toml", "logs", "tb", ".locks")
STAGE_NAMES = {
    "prepare": ("prompts",),
    "generate": ("prompts", "shards"),
    "train": ("checkpoints", "captioner"),
    "evaluate": ("eval",),
    "drift": ("drift",),
    "pipeline": ("prompts", "shards", "checkpoints", "captioner", "eval", "drift", "pipeline.json"),
}
LOCKS = ".locks"
# the locks a stage takes: its own, and those of the stages whose outputs it rewrites
STAGE_LOCKS = {
    "prepare": ("prepare",),
    "generate": ("prepare", "generate"),
    "train": ("train",),
    "evaluate": ("evaluate",),
    "drift": ("drift",),
    "pipeline": ("prepare", "generate", "train", "evaluate", "drift"),
}


class RunDirError(RuntimeError):
    """The run directory cannot be used by this launch; the message says why and what to do."""


def _is_legacy_run(run_dir: Path) -> bool:
    """A run written before the marker existed: its config.toml is a resolved revprompt config."""
    config = run_dir / "config.toml"
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data.get("run"), dict) and "dir" in data["run"] and isinstance(data.get("generate"), dict)


def claim_run_dir(run_dir: str | Path, stage: str = "pipeline") -> Path:
    """Create `run_dir` or adopt it as a revprompt run; RunDirError when files of another owner stand where
    `stage` writes (its outputs, config.toml, logs/, tb/). Other files (a prompt file, shards made by another
    tool for `train`) are no obstacle."""
    run_dir = Path(run_dir)
    marker = run_dir / RUN_MARKER
    if marker.is_file():
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir {run_dir}: exists and is not a folder")
    names = (*COMMON_NAMES, *STAGE_NAMES.get(stage, STAGE_NAMES["pipeline"]))
    foreign = [name for name in names if (run_dir / name).exists()]
    if foreign and not _is_legacy_run(run_dir):
        raise RunDirError(f"run.dir {run_dir}: holds {', '.join(foreign)} that revprompt did not write (no "
                          f"{RUN_MARKER}); `{stage}` would overwrite them: choose a new or empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f"{marker.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format": RUN_FORMAT, "created": _now()}) + "\n", encoding="utf-8")
    os.replace(tmp, marker)
    return run_dir


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class StageLock:
    """Exclusive locks on `.locks/{name}.lock` for one launch; `release()` (or process death) frees them."""

    def __init__(self, run_dir: str | Path, stage: str):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.names = STAGE_LOCKS.get(stage, (stage,))
        self._handles: list = []

    def acquire(self) -> "StageLock":
        """Take every lock of the stage or none; RunDirError names the launch that holds one."""
        import fcntl

        folder = self.run_dir / LOCKS
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.names:
                handle = open(folder / f"{name}.lock", "a+", encoding="utf-8")
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown (it has not written its name yet)"
                    handle.close()
                    raise RunDirError(f"run.dir {self.run_dir}: another launch is running `{name}` here "
                                      f"({holder}); wait for it to end, or use another run.dir") from None
                except OSError as exc:
                    if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        handle.close()
                        raise
                    # some network file systems (Lustre without -o flock) have no locks at all
                    log.warning("%s: the file system does not support locks (%s): nothing stops a second "
                                "launch on this run directory", folder, exc.strerror)
                self._handles.append(handle)
                handle.seek(0)
                handle.truncate()
                handle.write(f"{self.stage} launch, pid {os.getpid()} on {socket.gethostname()}, "
                             f"since {_now()}: {' '.join(sys.argv)}\n")
                handle.flush()
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Free the locks (the files stay: deleting a lock file races with a launch opening it)."""
        for handle in self._handles:
            try:
                handle.close()
            except OSError:
                pass
        self._handles = []


def remove_owned(folder: str | Path, patterns: tuple[str, ...]) -> list[Path]:
    """Delete the files of `folder` whose names match `patterns` (fnmatch, e.g. '[0-9]*.tar'): the names of
    revprompt's own outputs. Anything else, folders included, stays. Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            entry.unlink()
            removed.append(entry)
    return removed


def remove_if_empty(folder: str | Path) -> None:
    """Remove `folder` when nothing is left in it (a user's file keeps it)."""
    try:
        Path(folder).rmdir()
    except OSError:
        pass
