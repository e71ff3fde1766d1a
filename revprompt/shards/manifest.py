"""manifest.json at a run's shard root: splits, shards, counts and the config fingerprint that made them."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .schema import SPLITS
from .writer import is_complete, shard_name, stats_path, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "revprompt-shards/1"
SHARD_NAME = re.compile(r"(train|val|test)/[0-9]{6}\.tar")


class ManifestError(ValueError):
    """No usable manifest for what a stage needs; the message says what to run first."""


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ManifestError(f"{where}: {value!r:.40} is not a count")
    return value


def validate_manifest(manifest, path: Path) -> dict:
    """The manifest if its structure holds (splits, shard names {split}/{index:06d}.tar, counts >= 0), else
    ManifestError naming the field. Shard paths therefore never leave the shard root."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ManifestError(f"{path}: not a revprompt manifest (no splits); rerun `revprompt generate` to rewrite it")
    for split, body in manifest["splits"].items():
        where = f"{path}: splits.{split}"
        if split not in SPLITS or not isinstance(body, dict) or not isinstance(body.get("shards"), list):
            raise ManifestError(f"{where}: not a split of {', '.join(SPLITS)} with a list of shards")
        planned = _count(body.get("planned_shards"), f"{where}.planned_shards")
        names = set()
        for i, shard in enumerate(body["shards"]):
            name = shard.get("name") if isinstance(shard, dict) else None
            if not isinstance(name, str) or not SHARD_NAME.fullmatch(name) or not name.startswith(f"{split}/") \
                    or int(name[len(split) + 1:-4]) >= planned or name in names:
                raise ManifestError(f"{where}.shards[{i}]: {name!r:.60} is not one of this split's planned shard names")
            names.add(name)
            _count(shard.get("count"), f"{where}.shards[{i}].count")
    return manifest


def read_manifest(root: str | Path) -> dict | None:
    """The manifest under `root`, checked (`validate_manifest`), or None when there is none yet."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from None
    return validate_manifest(manifest, path)


def scan_manifest(root: str | Path, fingerprint: str, planned: dict[str, int], extra: dict | None = None) -> dict:
    """Describe what is on disk for a plan of `planned[split]` shards, from the stats markers."""
    root = Path(root)
    splits = {}
    made_with: list = []  # the distinct settings the shards were written with (their markers say)
    for split, n_shards in planned.items():
        shards = []
        for index in range(n_shards):
            tar = root / shard_name(split, index)
            if is_complete(tar):
                stats = json.loads(stats_path(tar).read_text(encoding="utf-8"))
                shards.append({"name": shard_name(split, index), "count": stats["count"],
                               "bytes": stats["bytes"], "failures": stats["failures"]})
                if stats.get("made_with") not in made_with + [None]:
                    made_with.append(stats["made_with"])
        splits[split] = {"planned_shards": n_shards, "shards": shards,
                         "count": sum(s["count"] for s in shards)}
    complete = all(len(s["shards"]) == s["planned_shards"] for s in splits.values())
    return {"format": FORMAT, "fingerprint": fingerprint, "complete": complete, "splits": splits,
            **({"made_with": made_with} if made_with else {}), **(extra or {})}


def write_manifest(root: str | Path, manifest: dict) -> None:
    """Write the manifest atomically."""
    Path(root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(root) / MANIFEST, manifest)


def split_shards(root: str | Path, split: str) -> list[tuple[str, int]]:
    """(path, count) of a split's shards from a complete manifest; ManifestError says what to run first.

    A listed shard whose tar no longer matches its completion marker (damaged since) is named in a
    warning; its readable samples are still used, and the next `revprompt generate` writes it again.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None or split not in manifest["splits"]:
        raise ManifestError(f"{root}: no {split} shards; run `revprompt generate` first")
    if not manifest["complete"]:
        raise ManifestError(f"{root}/manifest.json: generation is incomplete; rerun `revprompt generate` to finish it")
    shards = [(root / s["name"], s["count"]) for s in manifest["splits"][split]["shards"]]
    for path, count in shards:
        marked = _marked_count(path)
        if marked is not None and marked != count:
            raise ManifestError(f"{root / MANIFEST}: lists {count} samples in {path.name} of {split}, its marker "
                                f"{marked}; rerun `revprompt generate` to rewrite the manifest")
        if not is_complete(path):
            log.warning("%s does not match its completion marker (damaged or replaced since it was written): its "
                        "readable samples are used; rerun `revprompt generate` to write it again", path)
    return [(str(path), count) for path, count in shards]


def _marked_count(tar: Path) -> int | None:
    try:
        return json.loads(stats_path(tar).read_text(encoding="utf-8"))["count"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def listed_shards(root: str | Path, splits: tuple[str, ...] | None = None) -> list[str]:
    """Paths of the shards the manifest under `root` lists (complete ones), split by split; all splits by default."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise ManifestError(f"{root}: no {MANIFEST}; not a shard root written by `revprompt generate`")
    return [str(root / s["name"]) for split, body in manifest["splits"].items() if splits is None or split in splits
            for s in body["shards"]]
