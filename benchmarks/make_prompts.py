"""Write a large styles.csv-shaped prompt file for scale benchmarks, streaming (any size, flat memory).

Rows follow the bundled synthetic styles.csv (revprompt.prompts.fashion's vocabulary and
weights); a model code makes every productDisplayName unique, so N rows give N prompts after
de-duplication, and ids increase. One row in 5000 carries an unquoted comma in the name, as the
real file does.

Near-duplicates: the default model code is a number ("Style 0001234"), and near-duplicate grouping
reads every run of digits as one token, so all names of one brand, gender, descriptor, colour and
article are near-duplicates: at 2M rows 99% of the prompts share a group, the largest of 33,254 (the
bundled set: 7%, the largest of 6). That is the worst case for group sizes. `--codes letters` writes a
code of letters instead ("Style Aaaab"), a word of its own in every name, so no two names have the same
word set and nearly none reach a Jaccard of 0.8: the worst case for the number of distinct word sets.
Neither is a realistic rate; the two bound it.

    .venv/bin/python benchmarks/make_prompts.py --rows 1000000 --out /tmp/styles-1m.csv
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from revprompt.prompts.fashion import (ARTICLES, BRANDS, COLOURS, COLUMNS, DESCRIPTORS, GENDERS, SEASONS,
                                          USAGES, _pick)


def letters(i: int, width: int = 5) -> str:
    """i as a capitalised word of `width` letters (base 26): "Aaaaa", "Aaaab", ..."""
    out = []
    for _ in range(width):
        i, digit = divmod(i, 26)
        out.append(chr(ord("a") + digit))
    return "".join(reversed(out)).capitalize()


def write_rows(path: Path, rows: int, seed: int = 0, codes: str = "digits") -> int:
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
            code = f"{i:07d}" if codes == "digits" else letters(i)
            words = [rng.choice(BRANDS), gender, descriptor, colour, noun, f"Style {code}"]
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
    parser.add_argument("--codes", choices=("digits", "letters"), default="digits",
                        help="the model code that makes names unique: a number, or a word of letters")
    args = parser.parse_args(argv)
    size = write_rows(args.out, args.rows, args.seed, args.codes)
    print(f"wrote {args.rows} rows, {size / 1e6:.1f} MB, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
