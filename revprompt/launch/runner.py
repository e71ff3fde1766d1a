"""The lifecycle every stage shares: parse args, join the job, log per rank, run, close in `finally`."""

from __future__ import annotations

import argparse
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..shards import storage
from . import dist, process
from .dist import FILE_ONLY
from .config import Config, ConfigError, load_config, save_config
from .layout import RunDirError, RunLayout, StageLock, claim_run_dir
from .metrics import Metrics

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A failure that every rank must see, so none of them waits in a collective for the others."""


def user_message(exc: BaseException) -> str:
    """The message of one of revprompt's own errors; one raised in a DataLoader worker arrives wrapped by torch
    ("Caught X in DataLoader worker process N. Original Traceback ..."): its own last line is the message."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        return last[len(prefix):] if last.startswith(prefix) else last
    return text


def is_user_error(exc: BaseException) -> bool:
    """True for the errors revprompt raises on purpose (its own exception classes: a bad config, a prompt
    file, a manifest, a run directory...): their message says what to do. Anything else is a bug."""
    return type(exc).__module__.startswith("revprompt.")


@dataclass
class StageContext:
    """What a stage body gets: the resolved config, its place in the job, metrics and parsed flags."""

    cfg: Config
    info: dist.DistInfo
    metrics: Metrics
    args: argparse.Namespace

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return Path(self.cfg.run.dir)

    @property
    def layout(self) -> RunLayout:
        """Every path under the run directory."""
        return RunLayout.of(self.cfg)


def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """The options every stage takes; `--section.key=value` overrides are collected separately."""
    parser = argparse.ArgumentParser(prog=f"revprompt {stage}", description=description,
                                     epilog="Any --section.key=value overrides the config file, "
                                            "e.g. --generate.steps=10.")
    parser.add_argument("--config", default="tiny", help="TOML file or preset name (tiny, sd2-blip)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[Config, argparse.Namespace]:
    """Split argv into known flags and overrides; load and validate the config.

    A flag whose `dest` is a config key ("evaluate.batch_size") sets that key, like the override
    `--evaluate.batch_size=N`; a ConfigError about it names the flag too.
    """
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or "." not in item.split("=")[0]:
            parser.error(f"unrecognised argument {item!r}")
        if "=" not in item:
            if i + 1 >= len(rest):
                parser.error(f"override {item!r} needs a value")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    values = {k: v for k, v in vars(args).items() if "." in k and v is not None}
    try:
        return load_config(args.config, overrides, values), args
    except ConfigError as exc:
        flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and "." in a.dest}
        key = str(exc).split(":", 1)[0]
        if key in flags and key in values:
            raise ConfigError(f"{flags[key]} ({key}){str(exc)[len(key):]}") from None
        raise


def on_main_first(info: dist.DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and share its result; if it fails, every rank raises StageError."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # shared with every rank below, so none waits for rank 0 in vain
            error = user_message(exc) if is_user_error(exc) else f"{type(exc).__name__}: {exc}"
            log.debug("%s", traceback.format_exc())
    result, error = dist.broadcast_object((result, error))
    if error:
        raise StageError(error)
    return result


def _claim(stage: str, cfg: Config, info: dist.DistInfo) -> list[StageLock]:
    """Rank 0 claims the run directory and takes the stage's lock before any rank writes in it."""
    held: list[StageLock] = []

    def claim() -> None:
        try:
            claim_run_dir(cfg.run.dir, stage)
        except OSError as exc:
            raise RunDirError(f"cannot write the run directory {cfg.run.dir}: {exc}") from None
        held.append(StageLock(cfg.run.dir, stage).acquire())

    on_main_first(info, claim)
    return held


def _open_run(stage: str, cfg: Config, info: dist.DistInfo) -> Metrics:
    """Per-rank logs and TensorBoard under the run directory; the resolved config saved (rank 0)."""
    layout = RunLayout(cfg.run.dir)
    dist.setup_logging(layout.logs, info.rank, cfg.run.log_level)
    metrics = Metrics(layout.tb(stage), enabled=info.is_main)
    if info.is_main:
        save_config(cfg, layout.config)
    return metrics


def shard_retry_s(cfg: Config) -> float:
    """shards.retry_s, at most half of run.timeout_s: a rank retrying longer would be taken for a hung one."""
    return min(float(cfg.shards.retry_s), cfg.run.timeout_s / 2)


# the stages that read shards, and those that write them
SHARD_STAGES = {"generate": True, "pipeline": True, "train": False, "evaluate": False, "drift": False}


def _check_shard_store(stage: str, cfg: Config, info: dist.DistInfo) -> None:
    """With shards on an object store: fail now, in one line naming the URL and the operation, when this rank cannot
    list it (or, for a stage that writes shards, rank 0 cannot write there), not after the model is loaded."""
    if stage not in SHARD_STAGES or not storage.is_url(cfg.shards.url):
        return
    storage.check_access(str(storage.as_root(cfg.shards.url)), write=SHARD_STAGES[stage] and info.is_main)
    retry_s = shard_retry_s(cfg)
    log.info("shards at %s (reads and uploads retry for up to %.0f s%s)", cfg.shards.url, retry_s,
             "" if retry_s == cfg.shards.retry_s else ": shards.retry_s, capped at half of run.timeout_s")


def run_stage(stage: str, argv: list[str], parser: argparse.ArgumentParser,
              body: Callable[[StageContext], None], *, uses_run_dir: bool = True) -> int:
    """Parse, init the runtime, claim and lock the run directory, log per rank, save the resolved config (rank 0),
    run `body`, close; return the exit code. A command that works outside a run (`caption`, `export`) passes
    `uses_run_dir=False`: it logs to the console only and writes nothing under run.dir."""
    try:
        cfg, args = parse_args(parser, argv)
    except ConfigError as exc:
        logging.basicConfig(level=logging.INFO)
        log.error("config error: %s", exc)
        return 2
    try:
        info = dist.init(cfg.run.device, cfg.run.timeout_s)
    except dist.DeviceError as exc:
        logging.basicConfig(level=logging.INFO)
        log.error("%s: %s", stage, exc)
        return 2
    reused = None
    if cfg.run.reuse_host_memory and info.device.type == "cpu":  # on CUDA the host allocates little: left as it is
        reused = dist.reuse_freed_host_memory()
    storage.configure(shard_retry_s(cfg))
    held: list[StageLock] = []
    try:
        if uses_run_dir:
            held = _claim(stage, cfg, info)
            metrics = _open_run(stage, cfg, info)
            _check_shard_store(stage, cfg, info)
        else:
            dist.setup_logging(None, info.rank, cfg.run.log_level)
            metrics = Metrics("", enabled=False)
    except (StageError, OSError) as exc:  # an unwritable, foreign or busy run directory: one line, no traceback
        logging.basicConfig(level=logging.INFO)
        log.error("%s: %s", stage, str(exc) if isinstance(exc, (StageError, storage.StorageError)) else
                  f"cannot write the run directory {cfg.run.dir}: {exc}")
        for lock in held:
            lock.release()
        dist.close()
        return 1
    try:
        log.info("revprompt %s: rank %d of %d on %s%s", stage, info.rank, info.world_size, info.device,
                 f", run dir {cfg.run.dir}" if uses_run_dir else "")
        if reused is not None:
            log.info("run.reuse_host_memory: freed buffers up to 1 GiB are %s", "kept for reuse" if reused else
                     "returned to the kernel as before (this C library has no mallopt)")
        warning = dist.restart_store_warning()
        if warning and info.is_main:
            log.warning("%s", warning)
        process.resume_collection()  # start-up is over: what it built is frozen, collection resumes
        process.with_frame_room(body, StageContext(cfg, info, metrics, args))  # (see there)
        # leave the group together: a rank that tore its connections down while another was still finishing has
        # been seen to abort the other in gloo's teardown ("terminate called without an active exception") after
        # all the work was written. Bounded by run.timeout_s like every collective.
        dist.barrier()
        return 0
    except KeyboardInterrupt:
        log.error("%s interrupted on rank %d; rerun the same command to resume where it stopped", stage, info.rank)
        return 130
    except Exception as exc:
        if is_user_error(exc):  # a message for the user on the console; the traceback in the rank's log file only
            log.error("%s failed on rank %d: %s", stage, info.rank, user_message(exc))
            log.error("%s", traceback.format_exc().rstrip(), extra={FILE_ONLY: True})
        else:
            log.exception("%s failed on rank %d", stage, info.rank)
        return 1
    finally:
        metrics.close()
        for lock in held:
            lock.release()
        dist.close()
