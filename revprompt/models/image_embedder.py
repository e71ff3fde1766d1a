"""Image embeddings: CLIP image-embedding cosine, the image side of every comparison (`evaluate.image_model`).

`random-tiny` is a seeded random-initialised small CLIP vision tower: offline and the same code path as
a real CLIP (`from_pretrained` of a hub id or a local directory), but its embeddings carry no meaning.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .builtin import RANDOM_TINY, builtin_name, load_failure

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


@lru_cache(maxsize=2)
def load_image_encoder(name: str = RANDOM_TINY, seed: int = 0, device: str = "cpu"):
    """(model, processor) from a hub id or local directory (CLIP), or `tiny`."""
    if builtin_name("image_embedder", name) == RANDOM_TINY:
        model, processor = build_tiny_image_encoder(seed)
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
