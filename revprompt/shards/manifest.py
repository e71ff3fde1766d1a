"""manifest.json at a run's shard root: splits, shards, counts and the config fingerprint that made them."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from . import storage
from .schema import SPLITS
from .writer import is_complete, marker_matches, read_marker, shard_name, stats_path, write_json_atomic

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
    """The manifest under `root` (a folder or a URL), checked (`validate_manifest`), or None when there is none
    yet."""
    root = storage.as_root(root)
    path = storage.join(root, MANIFEST)
    if not storage.is_url(root) and not Path(path).is_file():
        return None
    try:
        data = storage.read_bytes(path)
        if data is None:
            return None
        manifest = json.loads(data.decode("utf-8"))
    except (OSError, ValueError) as exc:
        if isinstance(exc, storage.StorageError):
            raise
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from None
    return validate_manifest(manifest, path)


def complete_markers(root: str | Path, names: list[str]) -> dict[str, dict]:
    """{shard name: its parsed stats marker} for the shards of `names` ('{split}/{index:06d}.tar') that are
    complete under `root`. A URL root costs one listing per split and one batched read of the markers, not a
    request per shard."""
    root = storage.as_root(root)
    if not storage.is_url(root):
        return {name: read_marker(Path(root) / name) for name in names if is_complete(Path(root) / name)}
    listed: dict[str, dict[str, int]] = {}
    for split in sorted({name.split("/", 1)[0] for name in names}):
        listed[split] = storage.sizes(storage.join(root, split))
    present = [n for n in names if storage.name_of(stats_path(n)) in listed[n.split("/", 1)[0]]]
    markers = storage.read_many([stats_path(storage.join(root, n)) for n in present])
    out = {}
    for name in present:
        split, tar = name.split("/", 1)
        try:
            marker = json.loads(markers.get(str(stats_path(storage.join(root, name))), b"").decode("utf-8"))
        except ValueError:
            continue
        if isinstance(marker, dict) and marker_matches(marker, listed[split].get(tar)):
            out[name] = marker
    return out


def scan_manifest(root: str | Path, fingerprint: str, planned: dict[str, int], extra: dict | None = None) -> dict:
    """Describe what is on disk (or in the store) for a plan of `planned[split]` shards, from the stats markers."""
    splits = {}
    made_with: list = []  # the distinct settings the shards were written with (their markers say)
    complete = complete_markers(root, [shard_name(split, index) for split, n in planned.items() for index in range(n)])
    for split, n_shards in planned.items():
        shards = []
        for index in range(n_shards):
            stats = complete.get(shard_name(split, index))
            if stats is not None:
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
    """Write the manifest atomically (one PUT on an object store)."""
    root = storage.as_root(root)
    if storage.is_url(root):
        data = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        storage.write_bytes(storage.join(root, MANIFEST), data.encode("utf-8"))
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(root) / MANIFEST, manifest)


def split_shards(root: str | Path, split: str) -> list[tuple[str, int]]:
    """(path, count) of a split's shards from a complete manifest; ManifestError says what to run first.

    A listed shard whose tar no longer matches its completion marker (damaged since) is named in a
    warning; its readable samples are still used, and the next `revprompt generate` writes it again.
    """
    root = storage.as_root(root)
    manifest = read_manifest(root)
    if manifest is None or split not in manifest["splits"]:
        raise ManifestError(f"{root}: no {split} shards; run `revprompt generate` first")
    if not manifest["complete"]:
        raise ManifestError(f"{root}/manifest.json: generation is incomplete; rerun `revprompt generate` to finish it")
    listed = [(s["name"], s["count"]) for s in manifest["splits"][split]["shards"]]
    complete = complete_markers(root, [name for name, _ in listed])
    for name, count in listed:
        path = storage.join(root, name)
        marker = complete.get(name) or read_marker(path)
        marked = marker.get("count") if marker is not None else None
        if marked is not None and marked != count:
            raise ManifestError(f"{storage.join(root, MANIFEST)}: lists {count} samples in {storage.name_of(path)} of "
                                f"{split}, its marker {marked}; rerun `revprompt generate` to rewrite the manifest")
        if name not in complete:
            log.warning("%s does not match its completion marker (damaged or replaced since it was written): its "
                        "readable samples are used; rerun `revprompt generate` to write it again", path)
    return [(str(storage.join(root, name)), count) for name, count in listed]


def listed_shards(root: str | Path, splits: tuple[str, ...] | None = None) -> list[str]:
    """Paths of the shards the manifest under `root` lists (complete ones), split by split; all splits by default."""
    root = storage.as_root(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise ManifestError(f"{root}: no {MANIFEST}; not a shard root written by `revprompt generate`")
    return [str(storage.join(root, s["name"])) for split, body in manifest["splits"].items() if splits is None or split in splits
            for s in body["shards"]]
