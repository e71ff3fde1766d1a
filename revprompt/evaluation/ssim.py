"""SSIM: the structural similarity of two images, the pixel-level side of the image comparisons."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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
