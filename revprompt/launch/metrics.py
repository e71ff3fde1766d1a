"""One metrics interface for every stage: TensorBoard on rank 0, a no-op on the other ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Metrics:
    """`log(dict, step)`, `log_image`, `log_text`, `close()`; writes to `tb_dir` only when `enabled`."""

    def __init__(self, tb_dir: str | Path, enabled: bool):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            Path(tb_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(tb_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Scalars under their tags, e.g. {'perf/images_per_s': 6.7}."""
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, float(value), step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """One HxWx3 uint8 image."""
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC")

    def log_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        """A histogram of `values` (TensorBoard's histograms and distributions tabs)."""
        if self._writer is not None and len(values):
            self._writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Markdown text shown in TensorBoard's text tab."""
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


FONT_SIZE = 13  # px: legible in a saved grid ("cat shirt" stays two words), unlike Pillow's 10 px bitmap font


def wrap_to_width(text: str, font, width: float) -> list[str]:
    """Greedy word wrap of `text` into lines no wider than `width` pixels in `font` (a longer word is cut)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while font.getlength(word) > width and len(word) > 1:  # a word longer than the cell: cut it
            cut = max(1, int(len(word) * width / font.getlength(word)))
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    return lines + ([current] if current else [])


def captioned_grid(images: np.ndarray, captions: list[str], columns: int = 4, caption_lines: int = 3) -> np.ndarray:
    """Tile NHWC uint8 images with their (wrapped) captions under each, as one HxWx3 uint8 image."""
    from PIL import Image, ImageDraw, ImageFont

    n, height, width = images.shape[:3]
    font = ImageFont.load_default(size=FONT_SIZE)
    cell_w = max(width, 200)
    line_h = FONT_SIZE + 4
    cell_h = height + caption_lines * line_h + 6
    cols = min(columns, n)
    rows = -(-n // cols)
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (pixels, caption) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        canvas.paste(Image.fromarray(pixels), (x + (cell_w - width) // 2, y))
        for j, line in enumerate(wrap_to_width(caption, font, cell_w - 6)[:caption_lines]):
            draw.text((x + 3, y + height + 2 + j * line_h), line, fill="black", font=font)
    return np.asarray(canvas)
