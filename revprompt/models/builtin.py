"""The built-in model names every model argument accepts besides a hub id or a local folder, and where the
shipped weights lie. All of them work offline.

- `miniature`: for `generate.model`, the tiny preset's latent-diffusion model, trained on product renders
  (miniature/weights); for `train.captioner`, a BLIP-shaped captioner whose vision tower was warm-started
  on product renders (miniature/captioner); for `evaluate.image_model`, that vision tower alone.
- `random-tiny`: a seeded random model of the same kind, for tests that only need shapes (`generate.model`,
  `train.captioner`); for `evaluate.image_model`, a seeded random small CLIP vision tower: offline, but its
  embeddings mean nothing.

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


class ModelLoadError(RuntimeError):
    """A model argument that cannot be loaded: the message names the key, the value, where it looked, and how
    to give a local copy."""


def load_failure(key: str, value: str, kind: str, exc: BaseException) -> ModelLoadError:
    """The one-line error for `key = value` (a `kind` model) that failed to load with `exc`."""
    import os

    path = Path(value).expanduser()
    detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    if path.is_dir():
        where = f"the folder {path} holds no {kind} that loads ({detail})"
        fix = f"point {key} at a folder written by save_pretrained (a download of the model)"
    elif path.exists() or value.startswith((".", "/", "~")) or os.sep in value and value.count("/") != 1:
        where = f"no such folder {path}" if not path.exists() else f"{path} is not a folder"
        fix = f"point {key} at the folder that holds the model"
    else:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        reach = "the hub is switched off here (HF_HUB_OFFLINE=1)" if offline else f"the hub did not give it ({detail})"
        where = f"not on disk (no such folder, not in the hub cache) and {reach}"
        fix = (f"download it where there is a network (`huggingface-cli download {value} --local-dir DIR`) and set "
               f"{key}=DIR, or copy the hub cache (HF_HOME) to this machine")
    return ModelLoadError(f"{key} = {value!r}: {where}; {fix}")
