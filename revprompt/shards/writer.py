"""The shard writer: deterministic tar members, atomic completion, a stats marker, a background thread."""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import re
import socket
import tarfile
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from . import storage
from .keys import is_safe_key

log = logging.getLogger(__name__)

# Fixed tar header fields: the same samples always give the same bytes.
TAR_MTIME = 1_700_000_000
IMAGE_EXTS = ("jpg", "png", "webp")


def shard_name(split: str, index: int) -> str:
    """Relative path of a shard: '{split}/{index:06d}.tar'."""
    return f"{split}/{index:06d}.tar"


def stats_path(tar_path: Path | str) -> Path | str:
    """The completion marker beside a shard (a path or a URL): '{index:06d}.stats.json'."""
    name = storage.name_of(tar_path).removesuffix(".tar") + ".stats.json"
    if storage.is_url(tar_path):
        return storage.join(storage.parent_of(tar_path), name)
    return Path(tar_path).with_name(name)


def partial_path(tar_path: Path) -> Path:
    """Where this process writes a shard before it is complete: hidden (readers only list marked shards) and
    private to its writer (host and pid in the name), so two writers never share a file."""
    owner = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32]
    return tar_path.with_name(f".{tar_path.name}.{owner}-{os.getpid()}.partial")


# every writer's partial files of shard tars in a folder, older revprompts' included (the holder of the
# folder's lock may remove them: their writers are gone)
PARTIAL_PATTERNS = (".[0-9]*.tar.*.partial", ".[0-9]*.tar.partial")
# finished shards and their markers
FINISHED_PATTERNS = ("[0-9]*.tar", "[0-9]*.stats.json")
# the files a shard folder holds that revprompt wrote
SHARD_PATTERNS = (*FINISHED_PATTERNS, *PARTIAL_PATTERNS)


def count_members(tar_path: Path) -> int | None:
    """Members of a tar, read from its headers alone (one 512-byte read each); None when a header is
    damaged or the archive ends early. Never extracts anything."""
    count, offset = 0, 0
    try:
        with open(tar_path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            while offset + tarfile.BLOCKSIZE <= size:
                handle.seek(offset)
                block = handle.read(tarfile.BLOCKSIZE)
                if block == tarfile.NUL * tarfile.BLOCKSIZE:
                    return count
                info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
                offset += tarfile.BLOCKSIZE + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                count += 1
    except (OSError, tarfile.TarError):
        return None
    return None


def read_marker(tar_path: Path | str) -> dict | None:
    """The parsed stats marker beside a shard (a path or a URL); None when there is none or it is not a JSON
    object. An object store that cannot be reached raises `storage.StorageError`, never reads as "no marker"."""
    try:
        marker = storage.read_json(stats_path(tar_path))
    except storage.StorageError:
        raise
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def marker_matches(marker: dict | None, tar_bytes: int | None) -> bool:
    """Whether a parsed stats marker describes a tar of `tar_bytes` bytes (None: the tar is missing)."""
    return marker is not None and tar_bytes is not None and tar_bytes == marker.get("bytes")


def is_complete(tar_path: Path | str) -> bool:
    """A shard exists for readers only once its stats marker does and the tar matches it: the size, and the
    member count where the marker records one (a tar damaged or replaced after it was marked is not complete).

    On an object store the size alone is checked: counting members would take one ranged read per member, and
    an object, unlike a file, is never seen half written (the marker is written only after the upload ends)."""
    try:
        marker = read_marker(tar_path)
        if not marker_matches(marker, storage.size(tar_path) if marker is not None else None):
            return False
    except storage.StorageError:
        raise
    except OSError:  # a local tar that cannot be looked at
        return False
    return storage.is_url(tar_path) or "members" not in marker or count_members(Path(tar_path)) == marker["members"]


def encode_image(pixels: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """Encode an HxWx3 uint8 array; same pixels, same bytes."""
    buf = io.BytesIO()
    image = Image.fromarray(pixels, mode="RGB") if pixels.ndim == 3 else Image.fromarray(pixels)
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    elif fmt == "png":
        image.save(buf, format="PNG", compress_level=6)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r} (known: {', '.join(IMAGE_EXTS)})")
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces) so metadata is byte-stable."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class WriteError(OSError):
    """A file that could not be written (a full disk, a quota, permissions): the message names it, says what was
    being written and how much room is left there. What was finished before stays; rerunning resumes."""


def free_space(path: Path) -> str:
    """Free bytes on the file system of `path` (or of its nearest existing parent), in words."""
    import shutil

    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            free = shutil.disk_usage(folder).free
            return f"{free / 2**20:.1f} MiB free there"
    return "free space unknown"


def write_error(path: Path, what: str, exc: BaseException) -> WriteError:
    """The one-line error for a failed write of `what` to `path`."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    error = WriteError(f"{path}: cannot write {what} ({reason}; {free_space(path)}); free space or fix the folder, "
                       "then rerun the same command: finished work is kept and the run resumes")
    error.errno = getattr(exc, "errno", None)  # still the OSError it was, for callers that look
    return error


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file and rename it, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, "a JSON record", exc) from None


def marker_bytes(stats: dict) -> bytes:
    """A stats marker's bytes (the same on a disk and in an object store)."""
    return (json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


class ShardWriter:
    """Writes one shard: members go to a hidden partial file, `close()` renames it and writes the marker.

    The partial file lives in `staging`/{split}/ (default: beside the tar). For a shard URL (an object store)
    `staging` is a local folder, and `close()` uploads the finished tar, then writes the marker object: a shard is
    complete exactly when its marker exists, and a writer killed during the upload leaves no marker (nor, the
    store's uploads being all or nothing, a tar)."""

    def __init__(self, tar_path: str | Path, made_with: dict | None = None, staging: Path | None = None):
        self.remote = storage.is_url(tar_path)
        self.path = tar_path if self.remote else Path(tar_path)
        self.made_with = made_with  # recorded in the marker: what else equal bytes depend on (device, threads)
        if staging is None and self.remote:
            raise ValueError(f"{tar_path}: a shard URL needs a local staging folder")
        split = storage.name_of(storage.parent_of(tar_path))
        folder = Path(staging) / split if staging is not None else Path(storage.parent_of(tar_path))
        self._partial = partial_path(folder / storage.name_of(tar_path))
        try:
            self._partial.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._partial, "wb")
        except OSError as exc:
            raise write_error(self._partial if self.remote else self.path, "the shard", exc) from None
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.members = 0
        self.failures = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: `members` maps extension ('jpg', 'txt', 'json') to bytes, written in sorted order."""
        if not is_safe_key(key):
            raise ValueError(f"unsafe sample key {key!r}")
        try:
            self._add(key, members)
        except OSError as exc:
            raise write_error(self._partial if self.remote else self.path, f"shard sample {key}", exc) from None

    def _add(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(members[ext])
            info.mtime = TAR_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(members[ext]))
            self.members += 1
        self.count += 1

    def close(self) -> dict:
        """Finish the tar, fsync, rename into place (or upload it), then write the stats marker; returns the stats."""
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if not self.remote:
                os.replace(self._partial, self.path)
        except OSError as exc:
            raise write_error(self._partial if self.remote else self.path, "the shard", exc) from None
        if self.remote:
            return self._publish()
        return self._mark(self.path.stat().st_size)

    def _publish(self) -> dict:
        """Upload the finished tar, write its marker object last, then drop the local copy."""
        size = self._partial.stat().st_size
        storage.upload(self._partial, self.path)
        stats = self._stats(size)
        storage.write_bytes(stats_path(self.path), marker_bytes(stats))
        self._partial.unlink(missing_ok=True)
        return stats

    def _mark(self, size: int) -> dict:
        stats = self._stats(size)
        write_json_atomic(stats_path(self.path), stats)
        return stats

    def _stats(self, size: int) -> dict:
        stats = {
            "count": self.count,
            "members": self.members,
            "bytes": size,
            "failures": self.failures,
        }
        if self.made_with is not None:
            stats["made_with"] = self.made_with
        return stats

    def abort(self) -> None:
        """Drop the partial file; nothing becomes visible (a write that fails now, on a full disk, changes nothing)."""
        try:
            self._tar.close()
            self._file.close()
        except OSError:
            pass
        finally:
            self._partial.unlink(missing_ok=True)


class BackgroundWorker:
    """Runs submitted calls in order on one thread, so encoding and tar I/O overlap the model.

    The queue is bounded: a slow disk applies back-pressure instead of growing memory. The first
    exception raised on the thread is re-raised in the caller at the next `submit` or `join`.
    """

    def __init__(self, max_pending: int = 4, name: str = "shard-writer"):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            try:
                if task is None:
                    return
                if self._error is None:
                    task()
            except BaseException as exc:  # surfaced in the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, task: Callable[[], None]) -> None:
        """Queue `task`; blocks while `max_pending` tasks wait."""
        self._raise()
        self._queue.put(task)

    def join(self) -> None:
        """Wait for every queued task; re-raise the first failure."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Finish queued work and stop the thread."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
