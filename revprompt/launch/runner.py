"""The lifecycle every stage shares: parse args, join the job, log per rank, run, close in `finally`."""

from __future__ import annotations

import argparse
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import dist
from .config import Config, ConfigError, load_config, save_config
from .layout import RunDirError, StageLock, claim_run_dir
from .metrics import Metrics

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A failure that every rank must see, so none of them waits in a collective for the others."""


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


def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """The options every stage takes; `--section.key=value` overrides are collected separately."""
    parser = argparse.ArgumentParser(prog=f"revprompt {stage}", description=description,
                                     epilog="Any --section.key=value overrides the config file, "
                                            "e.g. --generate.steps=10.")
    parser.add_argument("--config", default="tiny", help="TOML file or preset name (tiny, sd2-blip)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[Config, argparse.Namespace]:
    """Split argv into known flags and overrides; load and validate the config."""
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
    return load_config(args.config, overrides), args


def on_main_first(info: dist.DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and share its result; if it fails, every rank raises StageError."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # shared with every rank below, so none waits for rank 0 in vain
            error = f"{type(exc).__name__}: {exc}"
            log.debug("%s", traceback.format_exc())
    result, error = dist.broadcast_object((result, error))
    if error:
        raise StageError(error)
    return result


def run_stage(stage: str, argv: list[str], parser: argparse.ArgumentParser,
              body: Callable[[StageContext], None]) -> int:
    """Parse, init the runtime, save the resolved config (rank 0), run `body`, close; return the exit code."""
    try:
        cfg, args = parse_args(parser, argv)
    except ConfigError as exc:
        logging.basicConfig(level=logging.INFO)
        log.error("config error: %s", exc)
        return 2
    info = dist.init(cfg.run.device, cfg.run.timeout_s)
    held: list[StageLock] = []

    def claim() -> None:
        try:
            claim_run_dir(cfg.run.dir, stage)
        except OSError as exc:
            raise RunDirError(f"cannot write the run directory {cfg.run.dir}: {exc}") from None
        held.append(StageLock(cfg.run.dir, stage).acquire())

    try:
        # rank 0 claims the folder and takes the stage's lock before any rank writes in it
        on_main_first(info, claim)
    except StageError as exc:
        logging.basicConfig(level=logging.INFO)
        log.error("%s: %s", stage, str(exc).removeprefix("RunDirError: "))
        dist.close()
        return 1
    try:
        dist.setup_logging(Path(cfg.run.dir) / "logs", info.rank, cfg.run.log_level)
        metrics = Metrics(Path(cfg.run.dir) / "tb" / stage, enabled=info.is_main)
    except OSError as exc:  # an unwritable or missing run directory: say which path, not a traceback
        logging.basicConfig(level=logging.INFO)
        log.error("%s: cannot write the run directory %s: %s", stage, cfg.run.dir, exc)
        for lock in held:
            lock.release()
        dist.close()
        return 1
    try:
        if info.is_main:
            save_config(cfg, Path(cfg.run.dir) / "config.toml")
        log.info("revprompt %s: rank %d of %d on %s, run dir %s", stage, info.rank, info.world_size,
                 info.device, cfg.run.dir)
        warning = dist.restart_store_warning()
        if warning and info.is_main:
            log.warning("%s", warning)
        body(StageContext(cfg, info, metrics, args))
        return 0
    except StageError as exc:
        log.error("%s failed: %s", stage, exc)
        return 1
    except Exception:
        log.exception("%s failed on rank %d", stage, info.rank)
        return 1
    finally:
        metrics.close()
        for lock in held:
            lock.release()
        dist.close()
