"""Write a large styles.csv-shaped prompt file for scale benchmarks, streaming (any size, flat memory).

Rows follow the bundled synthetic styles.csv (revprompt.prompts.fashion's vocabulary and
weights); a model code makes every productDisplayName unique, so N rows give N prompts after
de-duplication, and ids increase. One row in 5000 carries an unquoted comma in the name, as the
real file does.

    .venv/bin/python benchmarks/make_prompts.py --rows 1000000 --out /tmp/styles-1m.csv
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from revprompt.prompts.fashion import (ARTICLES, BRANDS, COLOURS, COLUMNS, DESCRIPTORS, GENDERS, SEASONS,
                                          USAGES, _pick)


def write_rows(path: Path, rows: int, seed: int = 0) -> int:
    """Write `rows` data rows (plus the header) to `path`; returns the bytes written."""
    rng = random.Random(seed)
    weights = {name: spec[4] for name, spec in ARTICLES.items()}
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for i in range(rows):
            article = _pick(rng, weights)
            master, sub, noun, genders, _ = ARTICLES[article]
            gender = _pick(rng, {g: GENDERS[g] for g in genders})
            colour = _pick(rng, COLOURS)
            descriptor = _pick(rng, DESCRIPTORS) if master == "Apparel" else ""
            words = [rng.choice(BRANDS), gender, descriptor, colour, noun, f"Style {i:07d}"]
            name = " ".join(w for w in words if w)
            row = [str(100000 + i), gender, master, sub, article, colour, _pick(rng, SEASONS),
                   str(rng.randrange(2009, 2019)), _pick(rng, USAGES), name]
            if i % 5000 == 4999:
                row[9] = name.replace(colour, f"{colour}, White", 1)
                handle.write(",".join(row) + "\n")  # unquoted, as in Kaggle's file
            else:
                writer.writerow(row)
        return handle.tell()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = write_rows(args.out, args.rows, args.seed)
    print(f"wrote {args.rows} rows, {size / 1e6:.1f} MB, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
