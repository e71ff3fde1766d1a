"""Sample keys and seeds: globally unique, safe as file names, independent of rank and batch position."""

from __future__ import annotations

import hashlib
import re

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def prompt_slug(prompt_id: str) -> str:
    """A file-name-safe form of a prompt id: the id itself when safe, else a cleaned prefix plus its hash.

    Dots and slashes never survive (WebDataset splits keys at the first dot; a slash would leave the
    shard's namespace), nor do NUL bytes or a leading '-'.
    """
    if _SAFE_ID.fullmatch(prompt_id) and "--" not in prompt_id:
        return prompt_id
    cleaned = re.sub(r"[^A-Za-z0-9]+", "-", prompt_id).strip("-")[:40]
    digest = hashlib.sha256(prompt_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    # the '--h' separator cannot occur in an id that was kept as it is, so slugs never collide
    return f"{cleaned}--h{digest}" if cleaned else f"h{digest}--h{digest}"


def sample_key(prompt_id: str, image_index: int) -> str:
    """The sample's key: prompt slug and image index, e.g. '15970_0000'."""
    if image_index < 0:
        raise ValueError(f"image_index must be >= 0, got {image_index}")
    return f"{prompt_slug(prompt_id)}_{image_index:04d}"


def is_safe_key(key: str) -> bool:
    """True when `key` can be used as a tar member stem without escaping or splitting."""
    return bool(_SAFE_KEY.fullmatch(key))


def sample_seed(global_seed: int, key: str) -> int:
    """The sample's noise seed: a hash of the run seed and the key (never the rank or batch position)."""
    digest = hashlib.sha256(f"{global_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
