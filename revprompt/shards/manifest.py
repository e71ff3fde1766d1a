"""manifest.json at a run's shard root: splits, shards, counts and the config fingerprint that made them."""

from __future__ import annotations

import json
from pathlib import Path

from .writer import is_complete, shard_name, stats_path, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "revprompt-shards/1"


class ManifestError(ValueError):
    """No usable manifest for what a stage needs; the message says what to run first."""


def read_manifest(root: str | Path) -> dict | None:
    """The manifest under `root`, or None when there is none yet."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from None


def scan_manifest(root: str | Path, fingerprint: str, planned: dict[str, int], extra: dict | None = None) -> dict:
    """Describe what is on disk for a plan of `planned[split]` shards, from the stats markers."""
    root = Path(root)
    splits = {}
    for split, n_shards in planned.items():
        shards = []
        for index in range(n_shards):
            tar = root / shard_name(split, index)
            if is_complete(tar):
                stats = json.loads(stats_path(tar).read_text(encoding="utf-8"))
                shards.append({"name": shard_name(split, index), "count": stats["count"],
                               "bytes": stats["bytes"], "failures": stats["failures"]})
        splits[split] = {"planned_shards": n_shards, "shards": shards,
                         "count": sum(s["count"] for s in shards)}
    complete = all(len(s["shards"]) == s["planned_shards"] for s in splits.values())
    return {"format": FORMAT, "fingerprint": fingerprint, "complete": complete, "splits": splits, **(extra or {})}


def write_manifest(root: str | Path, manifest: dict) -> None:
    """Write the manifest atomically."""
    Path(root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(root) / MANIFEST, manifest)


def split_shards(root: str | Path, split: str) -> list[tuple[str, int]]:
    """(path, count) of a split's shards from a complete manifest; ManifestError says what to run first."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None or split not in manifest["splits"]:
        raise ManifestError(f"{root}: no {split} shards; run `revprompt generate` first")
    if not manifest["complete"]:
        raise ManifestError(f"{root}/manifest.json: generation is incomplete; rerun `revprompt generate` to finish it")
    return [(str(root / s["name"]), s["count"]) for s in manifest["splits"][split]["shards"]]


def listed_shards(root: str | Path, splits: tuple[str, ...] | None = None) -> list[str]:
    """Paths of the shards the manifest under `root` lists (complete ones), split by split; all splits by default."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise ManifestError(f"{root}: no {MANIFEST}; not a shard root written by `revprompt generate`")
    return [str(root / s["name"]) for split, body in manifest["splits"].items() if splits is None or split in splits
            for s in body["shards"]]
