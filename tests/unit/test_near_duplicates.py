"""Near-duplicate groups: planted near-duplicates never straddle splits, the same prompts give the same splits in
any order and chunking, and prompts/stats.json's leakage is computed."""

from __future__ import annotations

import hashlib
import json
import random
import string
import tempfile
from itertools import combinations
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from revprompt.generation.prepare import prepare
from revprompt.launch.config import load_config
from revprompt.launch.layout import file_sha256, prepared_fingerprint, short_hash
from revprompt.prompts.neardup import NearDuplicates, representative_key, words
from revprompt.prompts.prepared import load_split, split_of
from revprompt.prompts.sources import normalise

VAL, TEST = 0.2, 0.3
# (a, b): one pair of near-duplicates each; seven of the eight fall on two sides under hash splits at VAL, TEST
PLANTED = [
    ("Nike Men Black T-shirt", "Nike Men Black Tshirt"),  # punctuation inside a word
    ("Puma Women Running Shoes Size 38", "Puma Women Running Shoes Size 39"),  # a size
    ("Titan Men Black Blue Watch", "Titan Men Blue Black Watch"),  # colour order
    ("United Colors of Benetton Men Checked Navy Blue Slim Fit Shirt",  # one extra word in a long name (11/12)
     "United Colors of Benetton Men Casual Checked Navy Blue Slim Fit Shirt"),
    ("Adidas Unisex Pack of 3 White Socks", "Adidas Unisex Pack of 5 White Socks"),  # a number
    ("Lotto Men Grey Sports Shoes", "Lotto Men Sports Shoes, Grey"),  # order and a comma
    ("Arrow Men Striped White Formal Shirt", "Arrow Men White Striped Formal Shirt"),
    ("Peter England Men Checked Blue Slim Fit Formal Shirt",  # 9/10: found by LSH, not by equal word sets
     "Peter England Casual Men Checked Blue Slim Fit Formal Shirt"),
]


def code(i: int) -> str:
    """A letters-only name for i: fillers made of such words share no word with anything else."""
    out = ""
    while True:
        out = string.ascii_lowercase[i % 26] + out
        i //= 26
        if not i:
            return out


FILLERS = [" ".join(f"{code(i)}{suffix}" for suffix in ("q", "v", "x", "z")) for i in range(60)]


def test_words_ignore_punctuation_inside_words_numbers_and_order():
    assert words("Nike Men Black T-shirt") == words("nike  MEN black tshirt,") == ["black", "men", "nike", "tshirt"]
    assert words("Shoes Size 38") == words("Shoes Size 4") == ["#", "shoes", "size"]
    assert words("Black Blue Watch") == words("Blue Black Watch")
    assert words("!!! ??") == ["!!!", "??"]  # punctuation alone is still a set, not an empty one
    assert words("Jealous 21 Women") == ["#", "jealous", "women"]


def prepared(tmp_path: Path, name: str, lines: list[str], *extra: str, chunk: int = 1024) -> Path:
    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    cfg = load_config("tiny", [f"--run.dir={tmp_path / name}", f"--prompts.path={source}", "--prompts.limit=0",
                               f"--prompts.val_fraction={VAL}", f"--prompts.test_fraction={TEST}", *extra])
    prepare(cfg, chunk=chunk)
    return tmp_path / name / "prompts"


def split_by_text(folder: Path) -> dict[str, str]:
    return {p.text: s for s in ("train", "val", "test") for p in load_split(folder, s)}


def test_planted_near_duplicates_never_straddle_and_the_leakage_is_computed(tmp_path):
    lines = [t for pair in PLANTED for t in pair] + FILLERS
    random.Random(0).shuffle(lines)
    hashed = split_by_text(prepared(tmp_path, "hash", lines, "--prompts.split=hash"))
    folder = prepared(tmp_path, "group", lines)
    grouped = split_by_text(folder)
    assert set(grouped) == set(hashed) == set(lines)
    straddling = [pair for pair in PLANTED if hashed[pair[0]] != hashed[pair[1]]]
    assert len(straddling) == 7  # the plants were chosen so: hash splits leak them
    assert all(grouped[a] == grouped[b] for a, b in PLANTED)  # group splits never do
    for a, b in PLANTED:  # the pair takes the hash split of its representative
        assert grouped[a] == hashed[min((a, b), key=representative_key)]
    assert all(grouped[t] == hashed[t] == split_of(t, VAL, TEST) for t in FILLERS)  # singletons keep theirs

    # by hand: a test prompt leaks under hash splits when its partner is in train; fillers have no partner
    hash_tests = sum(split_of(t, VAL, TEST) == "test" for t in lines)
    leaking = [x for a, b in PLANTED for x, y in ((a, b), (b, a)) if hashed[x] == "test" and hashed[y] == "train"]
    assert sorted(leaking) == sorted(["Titan Men Blue Black Watch", "Lotto Men Grey Sports Shoes",
                                      "Arrow Men Striped White Formal Shirt",
                                      "Peter England Men Checked Blue Slim Fit Formal Shirt"])
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["leakage"]["hash"] == {"test_prompts": hash_tests, "leaked": 4, "share": round(4 / hash_tests, 6)}
    group_tests = sum(s == "test" for s in grouped.values())
    assert stats["leakage"]["group"] == {"test_prompts": group_tests, "leaked": 0, "share": 0.0}
    assert stats["moved"] == len(straddling)  # one member of each straddling pair moves
    assert (stats["prompts"], stats["groups"], stats["largest_group"], stats["prompts_in_shared_groups"]) == \
        (len(lines), len(FILLERS) + len(PLANTED), 2, 2 * len(PLANTED))
    assert stats["split"] == "group" and stats["splits"]["group"]["test"] == group_tests
    assert (stats["lsh"]["bands"], stats["lsh"]["rows"]) == (16, 8)
    hash_stats = json.loads((tmp_path / "hash" / "prompts" / "stats.json").read_text())
    assert hash_stats["split"] == "hash" and hash_stats["leakage"] == stats["leakage"]

    # another chunking writes the same bytes; no temporary file of either pass is left
    again = prepared(tmp_path, "chunked", lines, chunk=3)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "train.idx", "stats.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["report.json", "stats.json"] + [f"{s}.{e}" for s in ("train", "val", "test") for e in ("jsonl", "idx")])


def test_fingerprint_follows_the_grouping_keys_only_under_group_splits(tmp_path):
    source = tmp_path / "p.txt"
    source.write_text("red shirt\nblue cap\n")
    base = [f"--run.dir={tmp_path / 'run'}", f"--prompts.path={source}"]
    fp = {args: prepared_fingerprint(load_config("tiny", base + list(args))) for args in [
        (), ("--prompts.near_duplicate_threshold=0.9",), ("--prompts.minhash_permutations=64",),
        ("--prompts.split=hash",), ("--prompts.split=hash", "--prompts.near_duplicate_threshold=0.9")]}
    assert len({fp[()], fp[("--prompts.near_duplicate_threshold=0.9",)], fp[("--prompts.minhash_permutations=64",)],
                fp[("--prompts.split=hash",)]}) == 4
    assert fp[("--prompts.split=hash",)] == fp[("--prompts.split=hash", "--prompts.near_duplicate_threshold=0.9")]
    # under hash splits the fingerprint is the one prepared sets had before the grouping keys existed
    cfg = load_config("tiny", base + ["--prompts.split=hash"])
    old = {k: v for k, v in cfg.to_dict()["prompts"].items()
           if k not in ("split", "near_duplicate_threshold", "minhash_permutations")}
    assert fp[("--prompts.split=hash",)] == hashlib.sha256(
        (short_hash({"prompts": old}, separators=(",", ":")) + file_sha256(source)).encode()).hexdigest()[:16]

    # a new threshold under hash splits recomputes stats.json and keeps the split files
    prepare(cfg)
    folder = tmp_path / "run" / "prompts"
    before = (folder / "train.jsonl").read_bytes()
    prepare(load_config("tiny", base + ["--prompts.split=hash", "--prompts.near_duplicate_threshold=0.9"]))
    assert json.loads((folder / "stats.json").read_text())["near_duplicate_threshold"] == 0.9
    assert (folder / "train.jsonl").read_bytes() == before


VOCAB = ["nike", "puma", "men", "women", "black", "blue", "navy", "white", "red", "tshirt", "shirt", "shoes",
         "casual", "sports", "striped", "printed", "slim", "fit", "watch", "bag"]


def variant(name: str, how: int, rng: random.Random) -> str:
    """A near-duplicate of `name`: its words shuffled, one word hyphenated, a number changed, or one word added."""
    parts = name.split()
    if how == 0:
        rng.shuffle(parts)
    elif how == 1:
        i = rng.randrange(len(parts))
        parts[i] = parts[i][:1] + "-" + parts[i][1:] if len(parts[i]) > 1 else parts[i]
    elif how == 2:
        parts.append(f"size {rng.randrange(1, 60)}")
    else:
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(["classic", "new", "premium"]))
    return " ".join(parts)


def group(texts: list[str], chunk: int, threshold: float = 0.8):
    with tempfile.TemporaryDirectory() as folder:
        index = NearDuplicates(Path(folder), threshold, 128, VAL, TEST)
        try:
            for start in range(0, len(texts), chunk):
                index.add(texts[start:start + chunk])
            return index.build()
        finally:
            index.close()
            assert not list(Path(folder).iterdir())  # every file of the index removed


@settings(max_examples=500, deadline=None)
@given(names=st.lists(st.lists(st.sampled_from(VOCAB), min_size=3, max_size=9), min_size=1, max_size=24),
       plants=st.lists(st.tuples(st.integers(0, 23), st.integers(0, 3)), max_size=12),
       seed=st.integers(0, 2**16), chunks=st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_groups_do_not_depend_on_order_or_chunks_and_keep_singletons_hash_split(names, plants, seed, chunks):
    rng = random.Random(seed)
    texts = [" ".join(n) + (" size 10" if len(n) % 2 else "") for n in names]
    texts += [variant(texts[i % len(texts)], how, rng) for i, how in plants]
    unique = list({normalise(t): t for t in texts}.values())  # prepare hands over first-seen unique texts
    first = group(unique, chunks[0])
    shuffled = unique[:]
    rng.shuffle(shuffled)
    second = group(shuffled, chunks[1])
    split = {t: first.split(i) for i, t in enumerate(unique)}
    assert {t: second.split(i) for i, t in enumerate(shuffled)} == split
    assert second.stats == first.stats

    members: dict[int, list[str]] = {}
    for i, t in enumerate(unique):
        members.setdefault(int(first.groups[i]), []).append(t)
    for texts_of_group in members.values():
        assert len({split[t] for t in texts_of_group}) == 1  # a group is in one split ...
        representative = min(texts_of_group, key=representative_key)
        assert split[texts_of_group[0]] == split_of(representative, VAL, TEST)  # ... its representative's
    sets = {t: frozenset(words(t)) for t in unique}
    for a, b in combinations(unique, 2):
        if sets[a] == sets[b]:  # equal word sets (shuffled, hyphenated, renumbered) always share a group
            assert first.groups[unique.index(a)] == first.groups[unique.index(b)]
    stats = first.stats
    assert sum(stats["splits"]["group"].values()) == sum(stats["splits"]["hash"].values()) == len(unique)
    assert stats["splits"]["hash"] == {s: sum(split_of(t, VAL, TEST) == s for t in unique)
                                       for s in ("train", "val", "test")}
    assert stats["leakage"]["group"]["leaked"] == 0
    # hash leakage: at least every test prompt whose word set a train prompt shares, at most every test prompt with
    # a train prompt at or above the threshold (LSH may miss a pair, never invent one)
    hashed = {t: split_of(t, VAL, TEST) for t in unique}
    trains = [t for t in unique if hashed[t] == "train"]
    tests = [t for t in unique if hashed[t] == "test"]

    def jaccard(a: str, b: str) -> float:
        return len(sets[a] & sets[b]) / len(sets[a] | sets[b])

    lower = sum(any(sets[t] == sets[u] for u in trains) for t in tests)
    upper = sum(any(jaccard(t, u) >= 0.8 for u in trains) for t in tests)
    assert lower <= stats["leakage"]["hash"]["leaked"] <= upper
    assert stats["leakage"]["hash"]["test_prompts"] == len(tests)


def test_large_groups_fall_in_test_no_more_often_than_single_prompts():
    # 300 groups of 10 names that differ by a number only: were a group's split that of its smallest split hash,
    # 1 - 0.9^10 = 65% of the groups would be test prompts; the representative key keeps them at the fraction
    texts = [f"{code(g)}a {code(g)}b size {i}" for g in range(300) for i in range(10)]
    grouping = group(texts, chunk=512, threshold=0.8)
    stats = grouping.stats
    assert (stats["groups"], stats["largest_group"]) == (300, 10)
    assert 0.2 < stats["splits"]["group"]["test"] / len(texts) < 0.4  # VAL, TEST = 0.2, 0.3
    assert 0.1 < stats["splits"]["group"]["val"] / len(texts) < 0.3


@settings(max_examples=150, deadline=None)
@given(names=st.lists(st.lists(st.sampled_from(VOCAB[:10]), min_size=3, max_size=7), min_size=2, max_size=40),
       seed=st.integers(0, 2**16))
def test_large_buckets_checked_by_sparse_products_agree_with_pair_by_pair(names, seed):
    from revprompt.prompts import neardup

    rng = random.Random(seed)
    texts = [" ".join(n) + f" size {rng.randrange(3)}" * rng.randrange(2) for n in names]
    unique = list({normalise(t): t for t in texts}.values())
    found = {}
    for small in (1, 10**6):  # every bucket by sparse products; every bucket pair by pair
        neardup.SMALL_BUCKET, saved = small, neardup.SMALL_BUCKET
        try:
            found[small] = group(unique, chunk=16, threshold=0.7)
        finally:
            neardup.SMALL_BUCKET = saved
    vector, python = found[1], found[10**6]
    assert (vector.splits == python.splits).all()
    figures = [{k: v for k, v in found[small].stats.items() if k != "lsh"} for small in (1, 10**6)]
    assert figures[0] == figures[1]
    same = [[int(g) == int(h) for h in vector.groups] for g in vector.groups]
    assert same == [[int(g) == int(h) for h in python.groups] for g in python.groups]
