"""The built-in model names every model argument accepts besides a hub id or a local folder, and where the
shipped weights lie. Offline, all of them.

- text to image (`generate.model`): `tiny`, the miniature latent-diffusion model of the tiny preset,
  trained on product renders (models/miniature/weights); `tiny-random`, a seeded random model of the same
  kind, for tests that only need shapes.
- captioner (`train.captioner`): `tiny-warm`, the miniature BLIP captioner whose vision tower was
  warm-started on product renders (models/miniature/captioner); `tiny`, the same architecture random.
- image embedder (`evaluate.image_model`): `tiny`, a seeded random small CLIP vision tower.
"""

from __future__ import annotations

from pathlib import Path

MINIATURE_DIR = Path(__file__).resolve().parent / "miniature"
MINIATURE_WEIGHTS = MINIATURE_DIR / "weights"  # the miniature StableDiffusionPipeline
MINIATURE_CAPTIONER = MINIATURE_DIR / "captioner"  # the warm-started tiny BLIP captioner
