"""Image-side comparison: cosine of CLIP image embeddings, and SSIM."""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

TINY = "tiny"


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
def load_image_encoder(name: str = TINY, seed: int = 0, device: str = "cpu"):
    """(model, processor) from a hub id or local directory (CLIP), or `tiny`."""
    if name == TINY:
        model, processor = build_tiny_image_encoder(seed)
    else:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection.from_pretrained(name).eval()
        processor = CLIPImageProcessor.from_pretrained(name)
    return model.to(device), processor


def embed_images(images: list[Image.Image], name: str = TINY, *, seed: int = 0, device: str = "cpu",
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


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def _gray(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    if image.size != size:
        image = image.resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float64) / 255.0)[None, None]


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Structural similarity of two images on luminance (Wang et al. 2004: 11x11 Gaussian, sigma 1.5).

    Both are compared at the smaller of the two sizes.
    """
    size = min(a.size, b.size, key=lambda s: s[0] * s[1])
    x, y = _gray(a, size), _gray(b, size)
    window = _gaussian_window(min(11, size[0], size[1]) | 1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(index.mean())
