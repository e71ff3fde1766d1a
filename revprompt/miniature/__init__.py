"""The embedded miniatures of the tiny preset: product renders, a text-to-image model, a warm-started captioner."""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"  # the miniature StableDiffusionPipeline
CAPTIONER = Path(__file__).resolve().parent / "captioner"  # the warm-started tiny BLIP captioner
