"""The Kaggle "Fashion Product Images" vocabulary and the synthetic styles.csv made from it.

`python -m revprompt.prompts.fashion --rows 3000 --seed 20261126 --out revprompt/prompts/data/fashion-styles.csv`
rebuilds the bundled prompt set byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
from pathlib import Path

COLUMNS = ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year",
           "usage", "productDisplayName")

GENDERS = {"Men": 22146, "Women": 16553, "Boys": 2558, "Unisex": 2418, "Girls": 1735}
SEASONS = {"Summer": 21476, "Fall": 14479, "Winter": 6808, "Spring": 1647}
USAGES = {"Casual": 34000, "Sports": 4000, "Ethnic": 3200, "Formal": 2300, "Smart Casual": 60, "Travel": 30,
          "Party": 30, "Home": 10}
COLOURS = {"Black": 9728, "Blue": 6956, "White": 5537, "Grey": 4058, "Red": 2838, "Green": 2460,
           "Navy Blue": 2418, "Brown": 2333, "Pink": 1746, "Purple": 1470, "Silver": 1100, "Yellow": 780,
           "Beige": 750, "Gold": 630, "Maroon": 580, "Orange": 520, "Olive": 410, "Multi": 390,
           "Cream": 380, "Steel": 310, "Charcoal": 230, "Peach": 180, "Off White": 170, "Khaki": 140,
           "Teal": 130, "Magenta": 120, "Lavender": 110, "Turquoise Blue": 70, "Mustard": 60, "Rust": 50}

# articleType: (masterCategory, subCategory, noun used in the product name, genders, approximate count)
ARTICLES = {
    "Tshirts": ("Apparel", "Topwear", "T-shirt", ("Men", "Women", "Boys", "Girls", "Unisex"), 7065),
    "Shirts": ("Apparel", "Topwear", "Shirt", ("Men", "Women", "Boys"), 3212),
    "Casual Shoes": ("Footwear", "Shoes", "Casual Shoes", ("Men", "Women", "Unisex"), 2845),
    "Watches": ("Accessories", "Watches", "Watch", ("Men", "Women", "Unisex"), 2542),
    "Sports Shoes": ("Footwear", "Shoes", "Sports Shoes", ("Men", "Women", "Unisex"), 2036),
    "Kurtas": ("Apparel", "Topwear", "Kurta", ("Men", "Women"), 1844),
    "Tops": ("Apparel", "Topwear", "Top", ("Women", "Girls"), 1762),
    "Handbags": ("Accessories", "Bags", "Handbag", ("Women",), 1759),
    "Heels": ("Footwear", "Shoes", "Heels", ("Women",), 1323),
    "Sunglasses": ("Accessories", "Eyewear", "Sunglasses", ("Men", "Women", "Unisex"), 1073),
    "Wallets": ("Accessories", "Wallets", "Wallet", ("Men", "Women", "Unisex"), 936),
    "Flip Flops": ("Footwear", "Flip Flops", "Flip Flops", ("Men", "Women", "Unisex"), 916),
    "Sandals": ("Footwear", "Sandal", "Sandals", ("Men", "Women", "Boys"), 897),
    "Briefs": ("Apparel", "Innerwear", "Briefs", ("Men", "Women"), 849),
    "Belts": ("Accessories", "Belts", "Belt", ("Men", "Women", "Unisex"), 813),
    "Backpacks": ("Accessories", "Bags", "Backpack", ("Men", "Women", "Unisex"), 724),
    "Socks": ("Accessories", "Socks", "Socks", ("Men", "Women", "Unisex", "Boys"), 686),
    "Formal Shoes": ("Footwear", "Shoes", "Formal Shoes", ("Men",), 637),
    "Perfume and Body Mist": ("Personal Care", "Fragrance", "Perfume", ("Men", "Women", "Unisex"), 614),
    "Jeans": ("Apparel", "Bottomwear", "Jeans", ("Men", "Women"), 609),
    "Shorts": ("Apparel", "Bottomwear", "Shorts", ("Men", "Women", "Boys", "Girls"), 547),
    "Trousers": ("Apparel", "Bottomwear", "Trousers", ("Men", "Women"), 530),
    "Flats": ("Footwear", "Flip Flops", "Flats", ("Women", "Girls"), 500),
    "Bra": ("Apparel", "Innerwear", "Bra", ("Women",), 477),
    "Dresses": ("Apparel", "Dress", "Dress", ("Women", "Girls"), 464),
    "Sarees": ("Apparel", "Saree", "Saree", ("Women",), 427),
    "Earrings": ("Accessories", "Jewellery", "Earrings", ("Women", "Girls"), 416),
    "Deodorant": ("Personal Care", "Fragrance", "Deodorant", ("Men", "Women", "Unisex"), 347),
    "Nail Polish": ("Personal Care", "Nails", "Nail Polish", ("Women",), 329),
    "Lipstick": ("Personal Care", "Lips", "Lipstick", ("Women",), 315),
    "Track Pants": ("Apparel", "Bottomwear", "Track Pants", ("Men", "Women", "Boys"), 304),
    "Clutches": ("Accessories", "Bags", "Clutch", ("Women",), 290),
    "Sweatshirts": ("Apparel", "Topwear", "Sweatshirt", ("Men", "Women", "Boys"), 285),
    "Caps": ("Accessories", "Headwear", "Cap", ("Men", "Unisex", "Boys"), 283),
    "Sweaters": ("Apparel", "Topwear", "Sweater", ("Men", "Women"), 277),
    "Ties": ("Accessories", "Ties", "Tie", ("Men",), 263),
    "Jackets": ("Apparel", "Topwear", "Jacket", ("Men", "Women", "Boys"), 258),
    "Innerwear Vests": ("Apparel", "Innerwear", "Vest", ("Men", "Boys"), 242),
    "Kurtis": ("Apparel", "Topwear", "Kurti", ("Women",), 234),
    "Tunics": ("Apparel", "Topwear", "Tunic", ("Women",), 229),
    "Pendant": ("Accessories", "Jewellery", "Pendant", ("Women",), 176),
    "Capris": ("Apparel", "Bottomwear", "Capris", ("Women", "Girls"), 175),
    "Leggings": ("Apparel", "Bottomwear", "Leggings", ("Women", "Girls"), 177),
    "Skirts": ("Apparel", "Bottomwear", "Skirt", ("Women", "Girls"), 128),
    "Scarves": ("Accessories", "Scarves", "Scarf", ("Women", "Unisex"), 118),
    "Blazers": ("Apparel", "Topwear", "Blazer", ("Men",), 8),
}

BRANDS = ("Nike", "Puma", "Adidas", "Reebok", "United Colors of Benetton", "Fabindia", "Peter England",
          "Turtle", "Titan", "Fastrack", "Wrangler", "Levis", "Lee", "Arrow", "Allen Solly", "Van Heusen",
          "Jockey", "Baggit", "Lavie", "Catwalk", "Inc 5", "Red Tape", "Woodland", "Provogue",
          "Flying Machine", "Spykar", "Jealous 21", "Mango", "Vero Moda", "Scullers", "Park Avenue",
          "Lotto", "Kappa", "Franco Leone", "Rocia", "Skagen", "Timex", "Q&Q", "Ray-Ban", "Police",
          "Lakme", "Elle", "Wildcraft", "Gini and Jony", "Doodle", "Chhota Bheem", "Biba", "W", "Jealous",
          "ADIDAS Originals")

# descriptors that change what the product looks like (issue 6's renderer draws them)
DESCRIPTORS = {"": 60, "Striped": 8, "Checked": 7, "Printed": 9, "Floral": 4, "Solid": 6, "Polka Dot": 2,
               "Graphic": 4}
# non-visual words the real names carry
EXTRAS = {"": 80, "Casual": 5, "Party": 3, "Slim Fit": 4, "Pack of 3": 2, "Sports": 3, "Ethnic": 3}


def _pick(rng: random.Random, weights: dict) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def make_rows(n_rows: int, seed: int, broken_commas: int = 22) -> list[list[str]]:
    """`n_rows` synthetic styles.csv rows; `broken_commas` of them get an unquoted comma in the name."""
    rng = random.Random(seed)
    weights = {name: spec[4] for name, spec in ARTICLES.items()}
    rows, seen = [], set()
    next_id = 1163
    while len(rows) < n_rows:
        article = _pick(rng, weights)
        master, sub, noun, genders, _ = ARTICLES[article]
        gender_weights = {g: GENDERS[g] for g in genders}
        gender = _pick(rng, gender_weights)
        colour = _pick(rng, COLOURS)
        brand = rng.choice(BRANDS)
        descriptor = _pick(rng, DESCRIPTORS) if master == "Apparel" else ""
        extra = _pick(rng, EXTRAS)
        usage = "Sports" if extra == "Sports" or article in ("Sports Shoes", "Track Pants") else (
            "Ethnic" if article in ("Kurtas", "Sarees", "Kurtis") else _pick(rng, USAGES))
        words = [brand, gender, extra, descriptor, colour, noun]
        name = " ".join(w for w in words if w)
        if name in seen:
            continue
        seen.add(name)
        rows.append([str(next_id), gender, master, sub, article, colour, _pick(rng, SEASONS),
                     str(rng.choice(range(2009, 2019))), usage, name])
        next_id += rng.randint(1, 40)
    # the real file's ~22 broken rows read like "Lino Perros Women Brown, Beige Handbag"
    for index in rng.sample(range(n_rows), min(broken_commas, n_rows)):
        row = rows[index]
        second = rng.choice([c for c in ("Beige", "White", "Black", "Gold") if c != row[5]])
        row[9] = row[9].replace(row[5], f"{row[5]}, {second}", 1)
    return rows


def render_csv(rows: list[list[str]]) -> str:
    """CSV text in which names with a comma stay unquoted, as in Kaggle's file."""
    out = io.StringIO()
    out.write(",".join(COLUMNS) + "\n")
    for row in rows:
        if "," in row[9]:
            out.write(",".join(row) + "\n")  # unquoted on purpose: the reader must recover these
        else:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow(row)
            out.write(buf.getvalue())
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Write the synthetic styles.csv."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = make_rows(args.rows, args.seed)
    args.out.write_text(render_csv(rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
