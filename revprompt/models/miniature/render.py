"""Deterministic product renders from a styles.csv row: what the tiny preset's images should show.

A render is a silhouette per articleType, filled with the baseColour, patterned by the descriptor
in the product name (striped, checked, printed, floral, polka dot, graphic, solid), with a gender
mark in the top-left corner, on a light grey ground. The same row always gives the same pixels.
They train the miniature text-to-image model and stand in for real product photos in the tiny preset.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
BACKGROUND = (228, 228, 228)
OUTLINE = (60, 60, 60)

PALETTE = {
    "Black": (25, 25, 25), "Blue": (40, 90, 210), "White": (250, 250, 250), "Grey": (128, 128, 128),
    "Red": (205, 30, 35), "Green": (35, 150, 60), "Navy Blue": (25, 35, 95), "Brown": (115, 70, 35),
    "Pink": (245, 140, 180), "Purple": (120, 45, 155), "Silver": (190, 195, 205), "Yellow": (245, 215, 40),
    "Beige": (220, 200, 160), "Gold": (205, 165, 45), "Maroon": (120, 20, 45), "Orange": (245, 130, 30),
    "Olive": (110, 115, 40), "Multi": (0, 0, 0), "Cream": (245, 235, 205), "Steel": (110, 125, 140),
    "Charcoal": (60, 65, 70), "Peach": (250, 190, 150), "Off White": (238, 234, 222), "Khaki": (185, 165, 110),
    "Teal": (20, 130, 130), "Magenta": (215, 30, 150), "Lavender": (180, 160, 225), "Turquoise Blue": (50, 200, 210),
    "Mustard": (215, 170, 30), "Rust": (180, 80, 30),
}
MULTI = ((205, 30, 35), (245, 215, 40), (40, 90, 210), (35, 150, 60))
PATTERNS = ("Striped", "Checked", "Printed", "Floral", "Polka Dot", "Graphic", "Solid")
GENDER_MARKS = {"Men": ("square", (40, 90, 210)), "Women": ("circle", (215, 30, 150)),
                "Boys": ("triangle", (40, 90, 210)), "Girls": ("triangle", (215, 30, 150)),
                "Unisex": ("diamond", (110, 110, 110))}

# articleType -> (shape family, parameters); each type gets its own outline
SHAPES = {
    "Tshirts": ("top", dict(sleeve=0.35, length=0.80, neck="round")),
    "Shirts": ("top", dict(sleeve=0.55, length=0.82, neck="collar", buttons=True)),
    "Kurtas": ("top", dict(sleeve=0.60, length=0.97, neck="slit")),
    "Tops": ("top", dict(sleeve=0.0, length=0.70, neck="round", narrow=True)),
    "Sweatshirts": ("top", dict(sleeve=0.75, length=0.78, neck="round", band=True)),
    "Sweaters": ("top", dict(sleeve=0.75, length=0.80, neck="v", band=True)),
    "Jackets": ("top", dict(sleeve=0.78, length=0.80, neck="collar", zip=True)),
    "Innerwear Vests": ("top", dict(sleeve=0.0, length=0.78, neck="scoop")),
    "Kurtis": ("top", dict(sleeve=0.45, length=0.92, neck="v", flare=0.08)),
    "Tunics": ("top", dict(sleeve=0.30, length=0.88, neck="round", flare=0.14)),
    "Blazers": ("top", dict(sleeve=0.78, length=0.85, neck="lapel", buttons=True)),
    "Jeans": ("legs", dict(length=0.95, width=0.17, gap=0.04, pockets=True)),
    "Trousers": ("legs", dict(length=0.95, width=0.20, gap=0.02)),
    "Shorts": ("legs", dict(length=0.45, width=0.22, gap=0.03)),
    "Track Pants": ("legs", dict(length=0.95, width=0.19, gap=0.03, stripe=True)),
    "Capris": ("legs", dict(length=0.70, width=0.17, gap=0.04)),
    "Leggings": ("legs", dict(length=0.95, width=0.12, gap=0.06)),
    "Skirts": ("skirt", dict(top=0.34, bottom=0.70, length=0.62)),
    "Briefs": ("briefs", {}),
    "Dresses": ("dress", {}),
    "Sarees": ("saree", {}),
    "Casual Shoes": ("shoe", dict(height=0.28, toe=0.0)),
    "Sports Shoes": ("shoe", dict(height=0.32, toe=0.0, sole=True)),
    "Formal Shoes": ("shoe", dict(height=0.22, toe=0.12)),
    "Heels": ("heel", {}),
    "Flats": ("shoe", dict(height=0.12, toe=0.06)),
    "Flip Flops": ("flipflop", {}),
    "Sandals": ("sandal", {}),
    "Handbags": ("handbag", {}),
    "Backpacks": ("backpack", {}),
    "Clutches": ("clutch", {}),
    "Wallets": ("wallet", {}),
    "Watches": ("watch", {}),
    "Sunglasses": ("sunglasses", {}),
    "Belts": ("belt", {}),
    "Socks": ("sock", {}),
    "Caps": ("cap", {}),
    "Ties": ("tie", {}),
    "Scarves": ("scarf", {}),
    "Earrings": ("earrings", {}),
    "Pendant": ("pendant", {}),
    "Bra": ("bra", {}),
    "Perfume and Body Mist": ("bottle", dict(w=0.36, h=0.46, cap=0.14)),
    "Deodorant": ("bottle", dict(w=0.24, h=0.66, cap=0.10)),
    "Nail Polish": ("bottle", dict(w=0.26, h=0.26, cap=0.26)),
    "Lipstick": ("lipstick", {}),
}


def pattern_of(name: str) -> str:
    """The descriptor the product name carries ('Solid' when none)."""
    words = name.lower()
    for pattern in PATTERNS:
        if pattern.lower() in words:
            return pattern
    return "Solid"


def colour_of(value: str) -> tuple[int, int, int]:
    """RGB of a baseColour (grey for one outside the palette)."""
    return PALETTE.get(value, (128, 128, 128))


def _p(points, s: float = SIZE) -> list[tuple[float, float]]:
    return [(x * s, y * s) for x, y in points]


def _silhouette(draw: ImageDraw.ImageDraw, family: str, k: dict) -> None:
    """Draw the shape in white (255) on an 'L' mask."""
    fill = 255
    if family == "top":
        length, sleeve = k["length"], k["sleeve"]
        half = 0.20 if k.get("narrow") else 0.25
        flare = k.get("flare", 0.0)
        body = [(0.5 - half, 0.16), (0.5 + half, 0.16), (0.5 + half + flare, length), (0.5 - half - flare, length)]
        draw.polygon(_p(body), fill=fill)
        if sleeve > 0:
            reach = 0.10 + 0.25 * sleeve
            for side in (-1, 1):
                x0 = 0.5 + side * half
                arm = [(x0, 0.16), (x0 + side * reach, 0.16 + 0.55 * sleeve), (x0 + side * (reach - 0.10),
                                                                                 0.20 + 0.58 * sleeve), (x0, 0.34)]
                draw.polygon(_p(arm), fill=fill)
        else:
            for side in (-1, 1):  # straps
                draw.rectangle(_p([(0.5 + side * 0.13 - 0.03, 0.06), (0.5 + side * 0.13 + 0.03, 0.17)]), fill=fill)
    elif family == "legs":
        w, gap, length = k["width"], k["gap"], k["length"]
        draw.rectangle(_p([(0.5 - w - gap, 0.05), (0.5 + w + gap, 0.22)]), fill=fill)
        for side in (-1, 1):
            inner, outer = 0.5 + side * gap, 0.5 + side * (w + gap)
            draw.polygon(_p([(inner, 0.20), (outer, 0.05), (outer + side * 0.02, length), (inner, length)]), fill=fill)
    elif family == "skirt":
        draw.polygon(_p([(0.5 - k["top"] / 2, 0.15), (0.5 + k["top"] / 2, 0.15), (0.5 + k["bottom"] / 2, 0.15 + k["length"]),
                         (0.5 - k["bottom"] / 2, 0.15 + k["length"])]), fill=fill)
    elif family == "briefs":
        draw.polygon(_p([(0.18, 0.32), (0.82, 0.32), (0.62, 0.68), (0.38, 0.68)]), fill=fill)
    elif family == "dress":
        draw.polygon(_p([(0.38, 0.08), (0.62, 0.08), (0.60, 0.42), (0.80, 0.95), (0.20, 0.95), (0.40, 0.42)]), fill=fill)
    elif family == "saree":
        draw.polygon(_p([(0.30, 0.06), (0.55, 0.06), (0.80, 0.95), (0.25, 0.95)]), fill=fill)
        draw.polygon(_p([(0.50, 0.06), (0.70, 0.06), (0.40, 0.55), (0.30, 0.45)]), fill=fill)
    elif family in ("shoe", "heel"):
        h = k.get("height", 0.30)
        toe = k.get("toe", 0.0)
        if family == "heel":
            draw.polygon(_p([(0.15, 0.45), (0.35, 0.40), (0.88 + 0.04, 0.70), (0.20, 0.70)]), fill=fill)
            draw.rectangle(_p([(0.15, 0.70), (0.22, 0.88)]), fill=fill)
        else:
            base = 0.72
            draw.polygon(_p([(0.10, base - h), (0.45, base - h), (0.62, base - h * 0.55), (0.90 + toe, base - 0.05),
                             (0.90 + toe, base), (0.10, base)]), fill=fill)
            if k.get("sole"):
                draw.rectangle(_p([(0.08, base), (0.92, base + 0.07)]), fill=fill)
    elif family == "flipflop":
        draw.ellipse(_p([(0.30, 0.12), (0.70, 0.92)]), fill=fill)
    elif family == "sandal":
        draw.ellipse(_p([(0.32, 0.10), (0.68, 0.92)]), fill=fill)
        for y in (0.30, 0.55):
            draw.rectangle(_p([(0.22, y), (0.78, y + 0.07)]), fill=fill)
    elif family == "handbag":
        draw.polygon(_p([(0.22, 0.42), (0.78, 0.42), (0.88, 0.88), (0.12, 0.88)]), fill=fill)
        draw.arc(_p([(0.32, 0.16), (0.68, 0.62)]), 180, 360, fill=fill, width=4)
    elif family == "backpack":
        draw.rounded_rectangle(_p([(0.24, 0.14), (0.76, 0.92)]), radius=10, fill=fill)
        draw.arc(_p([(0.38, 0.04), (0.62, 0.26)]), 180, 360, fill=fill, width=3)
    elif family == "clutch":
        draw.rectangle(_p([(0.10, 0.38), (0.90, 0.70)]), fill=fill)
    elif family == "wallet":
        draw.rectangle(_p([(0.22, 0.30), (0.78, 0.72)]), fill=fill)
    elif family == "watch":
        draw.rectangle(_p([(0.41, 0.04), (0.59, 0.96)]), fill=fill)
        draw.ellipse(_p([(0.28, 0.32), (0.72, 0.76)]), fill=fill)
    elif family == "sunglasses":
        for cx in (0.30, 0.70):
            draw.ellipse(_p([(cx - 0.17, 0.34), (cx + 0.17, 0.64)]), fill=fill)
        draw.rectangle(_p([(0.45, 0.40), (0.55, 0.44)]), fill=fill)
    elif family == "belt":
        draw.rectangle(_p([(0.04, 0.44), (0.96, 0.58)]), fill=fill)
        draw.rectangle(_p([(0.70, 0.38), (0.82, 0.64)]), fill=fill)
    elif family == "sock":
        draw.polygon(_p([(0.36, 0.06), (0.60, 0.06), (0.60, 0.62), (0.86, 0.74), (0.80, 0.92), (0.36, 0.82)]), fill=fill)
    elif family == "cap":
        draw.pieslice(_p([(0.18, 0.22), (0.82, 0.86)]), 180, 360, fill=fill)
        draw.rectangle(_p([(0.50, 0.50), (0.96, 0.58)]), fill=fill)
    elif family == "tie":
        draw.polygon(_p([(0.44, 0.06), (0.56, 0.06), (0.60, 0.78), (0.50, 0.94), (0.40, 0.78)]), fill=fill)
    elif family == "scarf":
        pts = [(0.15 + 0.70 * t, 0.45 + 0.18 * math.sin(6.0 * t)) for t in np.linspace(0, 1, 12)]
        draw.line(_p(pts), fill=fill, width=12)
    elif family == "earrings":
        for cx in (0.32, 0.68):
            draw.ellipse(_p([(cx - 0.04, 0.18), (cx + 0.04, 0.26)]), fill=fill)
            draw.polygon(_p([(cx, 0.28), (cx + 0.12, 0.62), (cx, 0.80), (cx - 0.12, 0.62)]), fill=fill)
    elif family == "pendant":
        draw.line(_p([(0.20, 0.08), (0.50, 0.52), (0.80, 0.08)]), fill=fill, width=2)
        draw.ellipse(_p([(0.36, 0.48), (0.64, 0.80)]), fill=fill)
    elif family == "bra":
        for cx in (0.31, 0.69):
            draw.pieslice(_p([(cx - 0.19, 0.30), (cx + 0.19, 0.72)]), 0, 180, fill=fill)
        draw.rectangle(_p([(0.10, 0.48), (0.90, 0.54)]), fill=fill)
    elif family == "bottle":
        w, h, cap = k["w"], k["h"], k["cap"]
        top = 0.92 - h
        draw.rectangle(_p([(0.5 - w / 2, top), (0.5 + w / 2, 0.92)]), fill=fill)
        draw.rectangle(_p([(0.5 - w / 5, top - cap), (0.5 + w / 5, top)]), fill=fill)
    elif family == "lipstick":
        draw.rectangle(_p([(0.40, 0.40), (0.60, 0.92)]), fill=fill)
        draw.polygon(_p([(0.43, 0.40), (0.57, 0.40), (0.57, 0.16), (0.43, 0.26)]), fill=fill)
    else:
        raise ValueError(f"no silhouette for shape family {family!r}")


def _details(draw: ImageDraw.ImageDraw, family: str, k: dict, colour) -> None:
    """Lines that tell similar outlines apart (collars, buttons, zips, stripes, pockets, soles)."""
    dark = tuple(max(0, int(c * 0.45)) for c in colour) if sum(colour) > 120 else (150, 150, 150)
    if family == "top":
        neck = k.get("neck")
        if neck in ("collar", "lapel"):
            draw.polygon(_p([(0.40, 0.16), (0.50, 0.30), (0.60, 0.16)]), fill=dark)
        elif neck == "v":
            draw.polygon(_p([(0.43, 0.16), (0.50, 0.28), (0.57, 0.16)]), fill=BACKGROUND)
        elif neck == "slit":
            draw.line(_p([(0.5, 0.16), (0.5, 0.40)]), fill=dark, width=2)
        else:
            draw.pieslice(_p([(0.42, 0.10), (0.58, 0.24)]), 0, 180, fill=BACKGROUND)
        if k.get("buttons"):
            for y in (0.34, 0.46, 0.58, 0.70):
                draw.point(_p([(0.5, y)]), fill=dark)
        if k.get("zip"):
            draw.line(_p([(0.5, 0.28), (0.5, k["length"])]), fill=dark, width=2)
        if k.get("band"):
            draw.line(_p([(0.27, k["length"] - 0.04), (0.73, k["length"] - 0.04)]), fill=dark, width=2)
    elif family == "legs":
        if k.get("stripe"):
            for side in (-1, 1):
                x = 0.5 + side * (k["width"] + k["gap"])
                draw.line(_p([(x, 0.06), (x + side * 0.02, k["length"])]), fill=(250, 250, 250), width=2)
        if k.get("pockets"):
            draw.line(_p([(0.5, 0.05), (0.5, 0.20)]), fill=dark, width=1)
    elif family == "shoe" and k.get("sole"):
        draw.line(_p([(0.20, 0.55), (0.55, 0.55)]), fill=(250, 250, 250), width=2)
    elif family == "flipflop":
        draw.line(_p([(0.50, 0.28), (0.32, 0.52)]), fill=dark, width=2)
        draw.line(_p([(0.50, 0.28), (0.68, 0.52)]), fill=dark, width=2)
    elif family == "wallet":
        draw.line(_p([(0.50, 0.30), (0.50, 0.72)]), fill=dark, width=1)
    elif family == "watch":
        draw.ellipse(_p([(0.36, 0.40), (0.64, 0.68)]), fill=(245, 245, 245))
        draw.line(_p([(0.50, 0.54), (0.50, 0.44)]), fill=(20, 20, 20), width=1)
        draw.line(_p([(0.50, 0.54), (0.58, 0.54)]), fill=(20, 20, 20), width=1)
    elif family == "backpack":
        draw.rectangle(_p([(0.32, 0.56), (0.68, 0.80)]), outline=dark, width=1)
    elif family == "bottle":
        draw.rectangle(_p([(0.5 - k["w"] / 5, 0.92 - k["h"] - k["cap"]), (0.5 + k["w"] / 5, 0.92 - k["h"])]),
                       fill=(30, 30, 30))


def _pattern(pattern: str, colour, rng: np.random.Generator) -> np.ndarray:
    """An RGB texture the size of the image: the colour, marked by the pattern in a contrasting tone."""
    base = np.zeros((SIZE, SIZE, 3), np.uint8)
    if colour == PALETTE["Multi"]:
        for i, c in enumerate(MULTI):
            base[:, i * SIZE // 4:(i + 1) * SIZE // 4] = c
        return base
    base[:] = colour
    lum = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    mark = (30, 30, 30) if lum > 140 else (235, 235, 235)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if pattern == "Striped":
        sel = (yy // 4) % 2 == 0
    elif pattern == "Checked":
        sel = ((yy // 6) + (xx // 6)) % 2 == 0
    elif pattern == "Polka Dot":
        sel = ((yy % 10 - 5) ** 2 + (xx % 10 - 5) ** 2) <= 4
    elif pattern == "Printed":
        sel = np.zeros((SIZE, SIZE), bool)
        for y, x in rng.integers(0, SIZE - 3, size=(40, 2)):
            sel[y:y + 2, x:x + 3] = True
    elif pattern == "Floral":
        sel = np.zeros((SIZE, SIZE), bool)
        for y, x in rng.integers(3, SIZE - 4, size=(14, 2)):
            for dy, dx in ((0, 0), (-2, 0), (2, 0), (0, -2), (0, 2)):
                sel[y + dy - 1:y + dy + 1, x + dx - 1:x + dx + 1] = True
        mark = (245, 215, 40) if lum < 200 else (205, 30, 35)
    elif pattern == "Graphic":
        sel = (abs(yy - 36) < 7) & (abs(xx - 32) < 9)
    else:
        return base
    base[sel] = mark
    return base


def _gender_mark(draw: ImageDraw.ImageDraw, gender: str) -> None:
    shape, colour = GENDER_MARKS.get(gender, ("diamond", (110, 110, 110)))
    box = (1, 1, 9, 9) if gender not in ("Boys", "Girls") else (1, 1, 7, 7)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=colour)
    else:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        draw.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=colour)


@lru_cache(maxsize=64)
def silhouette_mask(article: str) -> np.ndarray:
    """The garment pixels of an articleType's render (bool HxW): where colour is measured."""
    family, k = SHAPES.get(article, ("wallet", {}))
    mask = Image.new("L", (SIZE, SIZE), 0)
    _silhouette(ImageDraw.Draw(mask), family, k)
    return np.asarray(mask) > 127


def render(row: dict, seed: int = 0) -> Image.Image:
    """The product render of a styles.csv row (articleType, baseColour, gender, productDisplayName)."""
    article = row.get("articleType", "")
    colour = colour_of(row.get("baseColour", ""))
    name = row.get("productDisplayName", "")
    family, k = SHAPES.get(article, ("wallet", {}))
    key = f"{seed}:{row.get('id', '')}:{name}".encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    mask = Image.fromarray((silhouette_mask(article) * 255).astype(np.uint8))
    texture = Image.fromarray(_pattern(pattern_of(name), colour, rng))
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    image.paste(texture, (0, 0), mask)
    outline = mask.filter(ImageFilter.FIND_EDGES)
    image.paste(OUTLINE, (0, 0), outline.point(lambda v: 255 if v > 60 else 0))
    draw = ImageDraw.Draw(image)
    _details(draw, family, k, colour)
    _gender_mark(draw, row.get("gender", ""))
    return image


def nearest_colour(pixels: np.ndarray) -> str:
    """The palette colour nearest the median of some RGB pixels (N x 3)."""
    if len(pixels) == 0:
        return ""
    median = np.median(pixels.reshape(-1, 3).astype(np.float64), axis=0)
    names = [n for n in PALETTE if n != "Multi"]
    dists = [np.sum((median - np.array(PALETTE[n])) ** 2) for n in names]
    return names[int(np.argmin(dists))]
