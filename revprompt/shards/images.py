"""Opening an image from a shard member or a file: bounded in memory, and always 8-bit RGB as it looks.

Every stage that reads a picture goes through `open_image`:

- the pixel count is checked from the header before anything is decoded: more than MAX_PIXELS (a
  4096 x 4096 image; the pipeline draws at most that) is refused, so a small PNG that would decode to
  gigabytes never does (Pillow's own bomb check only fires far above);
- a picture whose longer side exceeds KEEP_SIDE is reduced right after decoding (every model here
  looks at 512 px or less), so a batch holds a bounded number of bytes;
- high-bit-depth and float images are scaled to 8 bits (a 16-bit PNG is not clipped to white),
  transparent ones are composited on white (what a viewer shows), palettes and CMYK become RGB.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 4096 * 4096
KEEP_SIDE = 1024


class ImageRefused(ValueError):
    """An image too large to decode safely, or one Pillow cannot read; the message says which."""


class ImageTooLarge(ImageRefused):
    """An image with more pixels than MAX_PIXELS (or one Pillow calls a decompression bomb)."""


def readable_suffixes() -> frozenset[str]:
    """File extensions of every format Pillow can open here ('.jpg', '.tif', '.bmp', ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as the image looks: deep and float modes scaled, transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
        else:
            top = 65535.0 if values.size and values.max() > 255 else 255.0
        scaled = np.nan_to_num(values / top * 255.0, nan=0.0, posinf=255.0, neginf=0.0)
        image = Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")  # a copy even when already RGB: the opened image is closed after this


def open_image(source: bytes | str | Path, name: str = "") -> Image.Image:
    """Decode `source` (bytes of a member, or a file path) into 8-bit RGB, within the bounds above;
    ImageRefused names `name` (or the path) when it is too large or unreadable."""
    label = name or ("image" if isinstance(source, bytes) else str(source))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageTooLarge(f"{label}: {width} x {height} pixels, more than the {MAX_PIXELS} revprompt "
                                    "decodes; scale it down first")
            if max(width, height) > KEEP_SIDE:
                image.draft("RGB", (KEEP_SIDE, KEEP_SIDE))  # JPEG: decode at a reduced scale straight away
            image.load()
            rgb = to_rgb(image)
    except ImageRefused:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{label}: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageRefused(f"{label}: not an image Pillow can read ({exc})") from None
    if max(rgb.size) > KEEP_SIDE:
        rgb.thumbnail((KEEP_SIDE, KEEP_SIDE), Image.BICUBIC)
    return rgb
