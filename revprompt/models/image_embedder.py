"""Image embeddings: CLIP image-embedding cosine, the image side of every comparison (`evaluate.image_model`).

- a hub id or a local folder: a CLIP vision tower with its projection (`from_pretrained`);
- `miniature`: the vision tower of the shipped miniature captioner, warm-started on product renders to read
  article type, colour, gender and pattern (its pooled, layer-normed CLS feature). Offline, and its cosines
  carry meaning on the tiny preset's images: on the demo's test renders the nearest train image has the same
  articleType 80% of the time (most frequent class 14%); same-articleType pairs average a cosine of 0.51,
  other pairs 0.10;
- `random-tiny`: a seeded random-initialised small CLIP vision tower: offline and the same code path as
  a real CLIP, but its embeddings carry no meaning (every pair of images scores about 0.98).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .builtin import MINIATURE, MINIATURE_CAPTIONER, RANDOM_TINY, builtin_name, load_failure

log = logging.getLogger(__name__)



def build_tiny_image_encoder(seed: int = 0):
    """A random-initialised small CLIP vision tower (seeded), for offline runs; same code path as the real one."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=8, projection_dim=64)
    model = CLIPVisionModelWithProjection(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return model, processor


class PooledVision(torch.nn.Module):
    """A BLIP vision tower answering as CLIPVisionModelWithProjection does: `image_embeds`, its pooled CLS feature."""

    def __init__(self, vision):
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values):
        from types import SimpleNamespace

        return SimpleNamespace(image_embeds=self.vision(pixel_values=pixel_values).pooler_output)


def build_miniature_image_encoder():
    """The shipped miniature captioner's vision tower (warm-started on product renders) and its image processor."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(MINIATURE_CAPTIONER)
    return PooledVision(model.vision_model).eval(), BlipProcessor.from_pretrained(MINIATURE_CAPTIONER).image_processor


@lru_cache(maxsize=2)
def load_image_encoder(name: str = RANDOM_TINY, seed: int = 0, device: str = "cpu"):
    """(model, processor) from a hub id or local directory (CLIP), or a built-in name (`miniature`, `random-tiny`)."""
    name = builtin_name("image_embedder", name)
    if name == RANDOM_TINY:
        model, processor = build_tiny_image_encoder(seed)
    elif name == MINIATURE:
        model, processor = build_miniature_image_encoder()
    else:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        try:
            model = CLIPVisionModelWithProjection.from_pretrained(name).eval()
            processor = CLIPImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise load_failure("evaluate.image_model", name, "CLIP vision model", exc) from None
    return model.to(device), processor


def embed_images(images: list[Image.Image], name: str = RANDOM_TINY, *, seed: int = 0, device: str = "cpu",
                 batch_size: int = 64) -> np.ndarray:
    """L2-normalised image embeddings, float32, one row per image."""
    if not images:
        return np.zeros((0, 0), np.float32)
    model, processor = load_image_encoder(name, seed, device)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            inputs = processor(images=images[start:start + batch_size], return_tensors="pt")
            out = model(pixel_values=inputs["pixel_values"].to(device, next(model.parameters()).dtype))
            rows.append(F.normalize(out.image_embeds.float(), dim=-1).cpu().numpy())
    return np.concatenate(rows).astype(np.float32)
