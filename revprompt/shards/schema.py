"""What a shard's samples say, and which rank owns which shard: the one definition every stage uses.

- SPLITS: the splits a prompt set is cut into and shards are written for.
- `SampleMeta`: the `.json` member of a generated sample; `RedrawnMeta`: that of an image evaluate
  or drift redrew from a recovered prompt. Both read back through `from_json`, which checks every
  field it is given (types, ranges, finite numbers) and raises `SchemaError` naming the field, so a
  hostile or damaged sample is skipped and counted like a corrupt one instead of crashing a stage.
- `owner` / `owned`: shard s belongs to rank s % world, in every stage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SPLITS = ("train", "val", "test")
SEED_LIMIT = 1 << 63  # seeds are 63-bit (torch.Generator.manual_seed takes them)


class SchemaError(ValueError):
    """A sample's metadata that does not follow the schema; the message names the field."""


def owner(shard: int, world_size: int) -> int:
    """The rank that owns shard `shard` (its global index): shard s belongs to rank s % world."""
    return shard % world_size


def owned(n_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards of `n_shards` that rank `rank` owns."""
    return [s for s in range(n_shards) if owner(s, world_size) == rank]


def _int(obj: dict, name: str, default: int | None = None, low: int = 0, high: int = SEED_LIMIT) -> int:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise SchemaError(f"{name}: expected an integer in [{low}, {high}), got {value!r:.60}")
    return value


def _str(obj: dict, name: str, default: str | None = None) -> str:
    value = obj.get(name, default)
    if not isinstance(value, str):
        raise SchemaError(f"{name}: expected a string, got {value!r:.60}")
    return value


def _float(obj: dict, name: str, default: float) -> float:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(f"{name}: expected a finite number, got {value!r:.60}")
    return value


def _attributes(obj: dict) -> dict[str, str]:
    value = obj.get("attributes") or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SchemaError(f"attributes: expected an object of strings, got {str(value)[:60]}")
    return dict(value)


def _object(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise SchemaError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True)
class SampleMeta:
    """The `.json` member of a generated sample: what it was made from, so it can be made again."""

    key: str
    prompt_id: str
    split: str
    image_index: int
    seed: int
    attributes: dict = field(default_factory=dict)
    model: str = ""
    family: str = ""  # the diffusers pipeline class that drew it
    scheduler: str = ""
    steps: int = 0
    guidance_scale: float = 0.0
    negative_prompt: str = ""
    height: int = 0
    width: int = 0
    drift_iteration: int = 0

    def to_json(self) -> dict:
        """The object written into the shard (the writer encodes it with sorted keys)."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any, key: str) -> "SampleMeta":
        """Read and check a sample's metadata; fields other tools leave out take their defaults.

        `key` is the sample's key in the tar, which the metadata must not contradict."""
        obj = _object(obj)
        if _str(obj, "key", key) != key:
            raise SchemaError(f"key: {obj['key']!r:.60} differs from the sample's key {key!r}")
        split = _str(obj, "split", "test")
        if split not in SPLITS:
            raise SchemaError(f"split: expected one of {', '.join(SPLITS)}, got {split!r:.60}")
        return cls(key=key, prompt_id=_str(obj, "prompt_id", ""), split=split,
                   image_index=_int(obj, "image_index", 0), seed=_int(obj, "seed", 0),
                   attributes=_attributes(obj), model=_str(obj, "model", ""), family=_str(obj, "family", ""),
                   scheduler=_str(obj, "scheduler", ""),
                   steps=_int(obj, "steps", 0), guidance_scale=_float(obj, "guidance_scale", 0.0),
                   negative_prompt=_str(obj, "negative_prompt", ""), height=_int(obj, "height", 0),
                   width=_int(obj, "width", 0), drift_iteration=_int(obj, "drift_iteration", 0))


@dataclass(frozen=True)
class RedrawnMeta:
    """The `.json` member of an image redrawn from a recovered prompt (evaluate's `regenerated/`, drift's
    `iter_k/`): the test sample it stands for, and which text drew it."""

    key: str
    prompt: str
    seed: int
    attributes: dict
    source: str  # "evaluate" or "drift"
    text: str = ""  # evaluate: which caption drew it
    drift_iteration: int = 0  # drift: the iteration

    def to_json(self) -> dict:
        """The object written into the shard: evaluate records `text`, drift `drift_iteration`."""
        out = {"key": self.key, "prompt": self.prompt, "seed": self.seed, "attributes": self.attributes,
               "source": self.source}
        if self.source == "drift":
            out["drift_iteration"] = self.drift_iteration
        else:
            out["text"] = self.text
        return out
