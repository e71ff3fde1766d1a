"""Where a shard root lives: a local folder (a path or file://), or any fsspec URL (s3://, gs://, az://, ...).

A local root keeps the POSIX ways the rest of revprompt uses (hidden partial files, fsync, atomic renames).
A URL root goes through fsspec, and every operation on it

- is retried with exponential backoff for at most `retry_s` seconds (`configure`, from shards.retry_s), then
  fails with a `StorageError` naming the URL and the operation, so nothing waits for ever;
- fails at once, with the same kind of message, when the store answers for good: no such bucket or object,
  no permission.

Credentials come from the backend's standard places (for S3: AWS_* environment variables, ~/.aws/credentials
and config, instance or pod roles; a custom endpoint such as MinIO through AWS_ENDPOINT_URL or the profile's
endpoint_url). A URL that carries credentials itself (user:secret@) is refused, so none reaches a log line or
config.toml.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

T = TypeVar("T")

# how long one operation on a URL keeps retrying (seconds); the runner sets shards.retry_s
_RETRY_S = 120.0
# the first pause between tries, doubled each time up to the cap
BACKOFF_S, BACKOFF_CAP_S = 0.5, 8.0
# bytes fetched per ranged read while streaming a shard (fsspec's read-ahead block)
READ_BLOCK = 8 << 20


class StorageError(OSError):
    """An object store operation that failed for good, or kept failing for shards.retry_s; names the URL."""


def configure(retry_s: float) -> None:
    """Set how long an operation on a URL keeps retrying (shards.retry_s); DataLoader workers inherit it."""
    global _RETRY_S
    _RETRY_S = float(retry_s)


def retry_seconds() -> float:
    """The current retry bound (seconds)."""
    return _RETRY_S



def is_url(root: str | Path) -> bool:
    """Whether `root` names a remote fsspec location (anything with a scheme except file://)."""
    if isinstance(root, Path):
        return False
    scheme = urlsplit(str(root)).scheme
    return "://" in str(root) and scheme not in ("", "file")


def as_root(root: str | Path) -> str | Path:
    """A local Path for a plain path or a file:// URL, else the URL itself (checked: no credentials in it, a
    bucket or host named); ValueError names what is wrong."""
    if isinstance(root, Path):
        return root
    text = str(root)
    if not is_url(text):
        return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)
    parts = urlsplit(text)
    # 'container@account' is how Azure names a container (abfs://, az://); in an S3 or GCS URL an @ means a key
    if parts.password or ("@" in parts.netloc and parts.scheme not in AT_SIGN_SCHEMES):
        raise ValueError(f"{parts.scheme}://{parts.hostname or ''}...: a shard URL must not carry credentials (a user "
                         "name or password before @); give them through the backend's standard places (for S3: AWS_* "
                         "environment variables, ~/.aws/credentials, an instance role)")
    if not parts.netloc:
        raise ValueError(f"{text}: names no bucket or host (expected e.g. s3://bucket/prefix)")
    if parts.query or parts.fragment:  # a signed URL's token would be logged and saved: named without it
        raise ValueError(f"{parts.scheme}://{parts.netloc}{parts.path}?...: a shard URL takes no ?query or #fragment "
                         "(give a token through the backend's standard places)")
    return text.rstrip("/")


# schemes whose bucket part may hold an @ (Azure: container@account.dfs.core.windows.net)
AT_SIGN_SCHEMES = frozenset({"abfs", "abfss", "az", "adl"})


def join(root: str | Path, *names: str) -> str | Path:
    """`root`/`names`, for a Path or a URL."""
    if isinstance(root, Path) or not is_url(root):
        return Path(root).joinpath(*names)
    return "/".join([str(root).rstrip("/"), *[n.strip("/") for n in names]])


def name_of(location: str | Path) -> str:
    """The last part of a path or URL."""
    return Path(location).name if isinstance(location, Path) else str(location).rstrip("/").rsplit("/", 1)[-1]


def parent_of(location: str | Path) -> str | Path:
    """The folder (prefix) holding `location`."""
    if isinstance(location, Path) or not is_url(location):
        return Path(location).parent
    return str(location).rstrip("/").rsplit("/", 1)[0]


# S3 (s3fs/botocore) settings unless the user's fsspec config sets its own: a stopped server that keeps its port
# open fails a try in seconds, not after botocore's 60 s connect timeout, and botocore does not retry on its own:
# `retrying` is the one policy, bounded by shards.retry_s
S3_CONFIG = {"connect_timeout": 10, "read_timeout": 30, "retries": {"max_attempts": 1}}


def _fs(url: str):
    """The fsspec file system and path of `url`; a backend that fails to start (missing credentials or package,
    a bad option) is one StorageError naming the URL."""
    import fsspec

    options = {}
    s3 = url.startswith(("s3://", "s3a://"))
    if s3:
        user = fsspec.config.conf.get("s3", {}).get("config_kwargs", {})
        options["config_kwargs"] = {**S3_CONFIG, **user}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except Exception as exc:
        raise StorageError(f"{url}: opening the store failed: {type(exc).__name__}: {exc}") from None
    if s3:
        # s3fs retries timeouts 5 times on its own (5 x read_timeout per call): one try, then `retrying` decides
        fs.retries = 1
    return fs, path


# answers that no retry changes
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)
# errors of a backend's own classes that no retry changes either: no or half credentials, a bad config
PERMANENT_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError", "InvalidConfigError",
                             "ProfileNotFound", "ParamValidationError", "DefaultCredentialsError", "RefreshError"})
# what s3fs makes of S3's permanent answers (an invalid bucket name, a bucket in another region, a malformed key)
PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.ENAMETOOLONG, getattr(errno, "EREMCHG", errno.EINVAL),
                              errno.EACCES, errno.EPERM})


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying `exc` cannot help (refused connections, timeouts and 5xx answers can be retried)."""
    return (isinstance(exc, PERMANENT) or type(exc).__name__ in PERMANENT_NAMES
            or (type(exc) is OSError and exc.errno in PERMANENT_ERRNOS))


def retrying(url: str, operation: str, call: Callable[[], T], *, missing_ok: bool = False) -> T | None:
    """`call()` retried with backoff for up to retry_s seconds while it fails with a transient error (a refused or
    dropped connection, a timeout, a 5xx); a permanent answer or the end of the bound raises StorageError naming
    `url` and `operation`. With `missing_ok`, a missing object gives None."""
    deadline = time.monotonic() + _RETRY_S
    pause, tries = BACKOFF_S, 0
    while True:
        tries += 1
        try:
            return call()
        except FileNotFoundError:
            if missing_ok:
                return None
            raise StorageError(f"{url}: {operation} failed: no such object or bucket") from None
        except StorageError:
            raise
        except Exception as exc:  # connection refused or dropped, timeouts, throttling, server errors
            if is_permanent(exc):
                raise StorageError(f"{url}: {operation} failed: {type(exc).__name__}: {exc}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageError(f"{url}: {operation} failed after {tries} tries over {_RETRY_S:.0f} s "
                                   f"(shards.retry_s): {type(exc).__name__}: {exc}") from None
            if tries == 1:
                log.warning("%s: %s failed (%s: %s); retrying for up to %.0f s", url, operation, type(exc).__name__,
                            exc, _RETRY_S)
            time.sleep(min(pause, max(left, 0.0)))
            pause = min(pause * 2, BACKOFF_CAP_S)


def read_bytes(location: str | Path) -> bytes | None:
    """The whole file or object, or None when it does not exist (OSError from a local file other than missing)."""
    if not is_url(location):
        try:
            return Path(location).read_bytes()
        except FileNotFoundError:
            return None
    fs, path = _fs(str(location))
    return retrying(str(location), "read", lambda: fs.cat_file(path), missing_ok=True)


def read_json(location: str | Path):
    """Parsed JSON of a file or object, or None when it does not exist; ValueError when it is not JSON."""
    data = read_bytes(location)
    return None if data is None else json.loads(data.decode("utf-8"))


def read_many(locations: list[str | Path]) -> dict[str, bytes]:
    """The files or objects of `locations` that exist, keyed by str(location); a URL list is fetched concurrently
    (fsspec's batched `cat`), so thousands of markers cost one round of requests, not thousands."""
    if not locations:
        return {}
    if not is_url(locations[0]):
        out = {}
        for location in locations:
            data = read_bytes(location)
            if data is not None:
                out[str(location)] = data
        return out
    fs, _ = _fs(str(locations[0]))
    paths = {fs._strip_protocol(str(u)): str(u) for u in locations}

    def batch() -> dict[str, bytes]:
        got = fs.cat(list(paths), on_error="return")
        if isinstance(got, bytes):  # fsspec returns the bytes alone for a single path
            got = {next(iter(paths)): got}
        out = {}
        for key, value in got.items():
            if isinstance(value, FileNotFoundError):
                continue  # missing: not there, as for a local file
            if isinstance(value, BaseException):
                raise value  # a failed read is not a missing object: retried, then named
            out[paths[fs._strip_protocol(key)]] = value
        return out

    return retrying(str(parent_of(locations[0])), f"read {len(paths)} objects", batch)


def sizes(folder: str | Path) -> dict[str, int]:
    """{name: bytes} of the files directly in `folder` (one listing for a URL); {} when it does not exist."""
    if not is_url(folder):
        folder = Path(folder)
        if not folder.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    fs, path = _fs(str(folder))

    def listing() -> dict[str, int]:
        fs.invalidate_cache(path)  # another rank or process may have written since
        entries = fs.ls(path, detail=True)
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
                if e.get("type") == "file"}

    return retrying(str(folder), "list", listing, missing_ok=True) or {}


def size(location: str | Path) -> int | None:
    """Bytes of one file or object, None when it does not exist."""
    if not is_url(location):
        try:
            return Path(location).stat().st_size if Path(location).is_file() else None
        except FileNotFoundError:
            return None
    fs, path = _fs(str(location))
    info = retrying(str(location), "stat", lambda: fs.info(path), missing_ok=True)
    return None if info is None or info.get("type") != "file" else int(info["size"])


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole object (one PUT: readers see all of it or nothing). Local paths: the caller's atomic writers."""
    fs, path = _fs(str(location))
    retrying(str(location), f"write ({len(data)} bytes)", lambda: fs.pipe_file(path, data))


def upload(local: Path, location: str) -> None:
    """Copy a finished local file to `location` (multipart above fsspec's chunk size; an interrupted upload leaves
    no object, and is retried whole)."""
    fs, path = _fs(location)
    retrying(location, f"upload of {local.stat().st_size} bytes from {local}", lambda: fs.put_file(str(local), path))


def remove(location: str | Path) -> None:
    """Delete one object (revprompt's own: callers pass only names it wrote)."""
    fs, path = _fs(str(location))
    retrying(str(location), "delete", lambda: fs.rm_file(path), missing_ok=True)


def check_access(root: str, write: bool) -> None:
    """Fail at start-up, in one line naming the URL and the operation, when `root`'s bucket cannot be listed (or,
    with `write`, written: a probe object is put and deleted)."""
    fs, path = _fs(root)
    bucket = path.split("/", 1)[0]
    # the prefix alone is listed (a policy may allow no more); an empty listing is told from a missing bucket by
    # asking for the bucket only then, and a bucket that may not be asked about counts as present
    if retrying(root, "list", lambda: fs.ls(path, detail=False, refresh=True), missing_ok=True) is None:
        try:
            retrying(root, f"open the bucket {bucket}", lambda: fs.info(bucket))
        except StorageError as exc:
            if "PermissionError" not in str(exc):
                raise
    if write:
        probe = f"{path.rstrip('/')}/.revprompt-probe-{os.uname().nodename}-{os.getpid()}"
        retrying(root, "write (a probe object)", lambda: fs.pipe_file(probe, b""))
        try:
            retrying(root, "delete (the probe object)", lambda: fs.rm_file(probe), missing_ok=True)
        except StorageError as exc:  # writing is what generation needs; a left probe is only untidy
            log.warning("%s; the empty probe object %s stays", exc, probe)


class RetryingReader(io.RawIOBase):
    """A sequential reader of one object that survives dropped connections: a failed read reopens the object at
    the same offset (a ranged GET), with backoff, for up to retry_s seconds; then StorageError names the URL.
    Bytes are only ever returned from a successful read, so a reader never sees a partial or shifted stream."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self._fs, self._path = _fs(url)
        self._pos = 0
        self._handle = None

    def readable(self) -> bool:
        return True

    def _open(self):
        handle = self._fs.open(self._path, "rb", block_size=READ_BLOCK, cache_type="readahead")
        if self._pos:
            handle.seek(self._pos)
        return handle

    def readinto(self, buffer) -> int:
        want = len(buffer)

        def read() -> bytes:
            if self._handle is None:
                self._handle = self._open()
            try:
                return self._handle.read(want)
            except Exception:
                self._drop()
                raise

        data = retrying(self.url, f"read at byte {self._pos}", read)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _drop(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop()
        super().close()


def open_read(location: str | Path):
    """A binary file object to stream `location` from: the local file, or a `RetryingReader` over the URL."""
    if not is_url(location):
        return open(location, "rb")
    return io.BufferedReader(RetryingReader(str(location)), buffer_size=1 << 20)
