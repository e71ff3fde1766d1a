"""The built-in model names every model argument accepts besides a hub id or a local folder, and where the
shipped weights lie. All of them work offline.

| name | text to image (`generate.model`) | captioner (`train.captioner`) | image embedder (`evaluate.image_model`) |
| --- | --- | --- | --- |
| `miniature` | the tiny preset's latent-diffusion model, trained on product renders (miniature/weights) | BLIP-shaped, its vision tower warm-started on product renders (miniature/captioner) | - |
| `random-tiny` | a seeded random model of the same kind, for tests that only need shapes | the same architecture, random | a seeded random small CLIP vision tower: offline, but its embeddings mean nothing |

Earlier names still load, with a warning: `tiny` (the miniature text-to-image model, but a random
captioner or image embedder), `tiny-random`, `tiny-warm`. They meant different things under
different keys; the names above say what they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MINIATURE = "miniature"
RANDOM_TINY = "random-tiny"

MINIATURE_DIR = Path(__file__).resolve().parent / "miniature"
MINIATURE_WEIGHTS = MINIATURE_DIR / "weights"  # the miniature StableDiffusionPipeline
MINIATURE_CAPTIONER = MINIATURE_DIR / "captioner"  # the warm-started miniature BLIP captioner

# kind -> {earlier name: name}
EARLIER_NAMES = {
    "text_to_image": {"tiny": MINIATURE, "tiny-random": RANDOM_TINY},
    "captioner": {"tiny-warm": MINIATURE, "tiny": RANDOM_TINY},
    "image_embedder": {"tiny": RANDOM_TINY},
}
_warned: set[tuple[str, str]] = set()


def builtin_name(kind: str, name: str) -> str:
    """`name` with an earlier built-in name replaced by today's (warned about once)."""
    new = EARLIER_NAMES[kind].get(name)
    if new is None:
        return name
    if (kind, name) not in _warned:
        _warned.add((kind, name))
        log.warning("the built-in %s %r is called %r now; the old name still works", kind.replace("_", " "), name,
                    new)
    return new
