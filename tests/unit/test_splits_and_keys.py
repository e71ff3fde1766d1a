"""Splits by hash of the normalised text; sample keys that are unique and safe; seeds from keys."""

from __future__ import annotations

import random

from revprompt.prompts.fashion import make_rows
from revprompt.prompts.prepared import split_of
from revprompt.shards.keys import is_safe_key, prompt_slug, sample_key, sample_seed


def names(n: int, seed: int) -> list[str]:
    return [row[9] for row in make_rows(n, seed, broken_commas=0)]


def test_splits_are_stable_when_prompts_are_added():
    first = names(2000, 1)
    before = {t: split_of(t, 0.1, 0.1) for t in first}
    grown = first + names(3000, 2)
    random.Random(0).shuffle(grown)
    after = {t: split_of(t, 0.1, 0.1) for t in grown}
    assert all(after[t] == s for t, s in before.items())


def test_same_text_never_lands_in_two_splits():
    text = "Turtle Check Men Navy Blue Shirt"
    variants = [text, text.upper(), f"  {text}  ", text.replace(" ", "   "), text.lower()]
    assert len({split_of(v, 0.3, 0.3) for v in variants}) == 1


def test_split_ratios_are_respected():
    texts = names(5000, 3)
    counts = {s: 0 for s in ("train", "val", "test")}
    for t in texts:
        counts[split_of(t, 0.1, 0.2)] += 1
    assert abs(counts["val"] / len(texts) - 0.1) < 0.02
    assert abs(counts["test"] / len(texts) - 0.2) < 0.02
    assert split_of("anything", 0.0, 0.0) == "train"


def test_keys_are_safe_and_unique():
    hostile = ["15970", "../../x", "a/b", "..", ".hidden", "x.jpg", "nul\x00byte", "-rf", "ü-ñ", "a b",
               "a--hdeadbeef0000", "", "a" * 300, "con", "x\ny", "C:\\evil"]
    keys = [sample_key(i, 0) for i in hostile]
    assert all(is_safe_key(k) for k in keys), keys
    assert len(set(keys)) == len(keys)
    assert all("/" not in k and "." not in k and "\x00" not in k for k in keys)
    assert sample_key("15970", 3) == "15970_0003"
    assert prompt_slug("15970") == "15970"


def test_keys_of_ids_that_look_like_hashed_slugs_do_not_collide():
    hashed = prompt_slug("a b")
    assert "--h" in hashed
    assert prompt_slug(hashed) != hashed


def test_seeds_come_from_the_key_only():
    assert sample_seed(0, "15970_0000") == sample_seed(0, "15970_0000")
    assert sample_seed(0, "15970_0000") != sample_seed(1, "15970_0000")
    assert sample_seed(0, "15970_0000") != sample_seed(0, "15970_0001")
    assert 0 <= sample_seed(7, "k") < 2**63
