"""Near-duplicate groups of a prompt set, so that no split separates two near-duplicates.

A split by hash of the normalised text keeps only exact duplicates together: product names that differ
by punctuation ("T-shirt" / "Tshirt"), a size or a number, or the order of their words fall on both
sides, and the fine-tuned score then partly measures memorisation. Here:

- every prompt becomes a set of words (`words`); two prompts are near-duplicates when the Jaccard
  similarity of their word sets reaches the threshold (`prompts.near_duplicate_threshold`);
- MinHash signatures (datasketch, fixed seed) cut into LSH bands find the candidate pairs without
  comparing all pairs: two prompts are candidates when they agree on every MinHash value of a band;
- each candidate pair is checked on the exact word sets, read back from disk by offset, so an LSH false
  positive never joins two groups (an estimate from 128 permutations would let a pair of different
  products at Jaccard 0.75 pass a 0.8 check 9% of the time, and chain groups);
- the groups are the connected components of the checked pairs (a union-find in a numpy array; small
  buckets are checked pair by pair, large ones by sparse products of word incidence), and a group
  takes the hash split of its representative, the member with the smallest `representative_key`: a
  prompt without near-duplicates keeps exactly its hash split. The key is another part of the same
  sha256 as the split's hash, independent of it: were the representative the member with the smallest
  split hash, a group of k would land in test with probability 1 - (1 - test_fraction)^k (0.65 for 10
  members at 0.1), and large groups would fill the test split.

Leakage, for the hash and the group assignment alike: the share of test prompts with a train prompt of the
same word set, or of a word set that shares a bucket with theirs and reaches the threshold.

Memory: every per-prompt record (band keys, word set, representative key) goes to files while prompts
stream in; grouping holds a few arrays of one integer per prompt and one band at a time. Nothing depends
on the order of the prompts or the chunks they arrive in: signatures, candidates and checks are
functions of the texts alone, and neither the components nor their smallest keys depend on the order of
unions.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..shards.schema import SPLITS
from .prepared import split_of_digest, text_digest
from .sources import normalise

__all__ = ["Grouping", "LSH_WEIGHTS", "MINHASH_SEED", "NearDuplicates", "candidate_probability", "lsh_bands",
           "representative_key", "words"]

MINHASH_SEED = 1
# datasketch picks the band shape that minimises a weighted sum of false-positive and false-negative
# probability; a false positive costs one exact check here, a false negative leaves a leak, so misses
# weigh 19 times more (at threshold 0.8 and 128 permutations: 16 bands of 8 rows, which make a pair at
# exactly 0.8 a candidate with probability 0.95; the default weights give 9 x 13 and 0.40)
LSH_WEIGHTS = (0.05, 0.95)
TRAIN, VAL, TEST = (SPLITS.index(s) for s in ("train", "val", "test"))
# buckets of up to this many word sets are checked pair by pair in Python, larger ones by sparse products
SMALL_BUCKET = 24
_DIGITS = re.compile(r"\d+")
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def words(text: str) -> list[str]:
    """The sorted distinct words that near-duplicate detection compares (its shingles).

    NFKC and lower case as `normalise`; inside a word everything but letters and digits goes, so
    "T-shirt", "Tshirt" and "tshirt," are one word; each run of digits becomes "#", so sizes and numbers
    ("Size 32" / "Size 34", "Pack of 3") do not tell names apart; and a set, because product names (3 to
    10 words) put brand, colour and descriptors in no fixed order ("Black Blue" / "Blue Black"). Single
    words rather than word n-grams: in names this short one changed word would move several n-grams. A
    prompt of punctuation alone keeps its normalised words, so no prompt has an empty set.
    """
    raw = normalise(text).split()
    kept = {w for w in (_DIGITS.sub("#", "".join(c for c in w if c.isalnum())) for w in raw) if w}
    return sorted(kept or raw)


def representative_key(text: str) -> int:
    """What picks a group's representative (the smallest key): bytes 8 to 16 of the sha256 of the normalised text,
    independent of the first 8 that make its hash split (`text_digest`), so the group's split is as random as a
    single prompt's."""
    return int.from_bytes(hashlib.sha256(normalise(text).encode("utf-8")).digest()[8:16], "big")


@lru_cache(maxsize=None)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): what datasketch's MinHashLSH picks for the threshold, the permutations and
    LSH_WEIGHTS."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """The chance that two sets of this Jaccard similarity agree on every row of at least one band."""
    return 1.0 - (1.0 - similarity ** rows) ** bands


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array (wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * _C1
    x = (x ^ (x >> np.uint64(27))) * _C2
    return x ^ (x >> np.uint64(31))


def band_keys(signatures: np.ndarray, band: int, rows: int) -> np.ndarray:
    """One uint64 per signature (rows of a uint64 array) for its values in band `band`: equal values give
    equal keys; the rare equal key of unequal values only adds a candidate that the exact check drops."""
    key = np.full(len(signatures), band + 1, dtype=np.uint64)
    for column in signatures[:, band * rows:(band + 1) * rows].T:
        key = _mix(key ^ column)
    return key


@dataclass
class Grouping:
    """What `NearDuplicates.build` found: each prompt's split under groups and under the hash, and the figures
    of prompts/stats.json."""

    splits: np.ndarray  # int8 per prompt, in the order added: index into SPLITS of its group's split
    hash_splits: np.ndarray  # int8 per prompt: index into SPLITS of its own hash split
    groups: np.ndarray  # int32 per prompt: its group (equal numbers, one group)
    stats: dict

    def split(self, index: int) -> str:
        """The group split of the prompt added `index`-th."""
        return SPLITS[self.splits[index]]


class NearDuplicates:
    """Takes prompts chunk by chunk (`add`), then groups them (`build`). Its files live in `folder` under
    private temporary names (`.neardup-*.tmpPID`); `close` removes them."""

    def __init__(self, folder: Path, threshold: float, num_perm: int, val_fraction: float, test_fraction: float):
        self.threshold, self.num_perm = threshold, num_perm
        self.fractions = (val_fraction, test_fraction)
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.count = 0
        names = ["keys", "hash-splits", "sets-hi", "sets-lo", "words", "offsets"]
        names += [f"band{b:03d}" for b in range(self.bands)]
        self.paths = {name: Path(folder) / f".neardup-{name}.tmp{os.getpid()}" for name in names}
        self._files = {}
        try:
            for name in names:
                self._files[name] = open(self.paths[name], "wb")
        except BaseException:
            self.close()
            raise
        self._offset = 0

    def add(self, texts: Sequence[str]) -> None:
        """Record the next prompts: their representative keys, hash splits, word sets and band keys."""
        if not texts:
            return
        from datasketch import MinHash
        from datasketch.hashfunc import sha1_hash32

        sets = [words(t) for t in texts]
        # scheme and hash function named, not defaulted: the signatures, and so the candidates, stay those of
        # this release of datasketch's affine32 scheme
        signatures = np.stack([m.hashvalues for m in MinHash.generator(
            ([w.encode("utf-8") for w in s] for s in sets), num_perm=self.num_perm, seed=MINHASH_SEED,
            scheme="affine32", hashfunc=sha1_hash32)]).astype(np.uint64)
        for band in range(self.bands):
            self._files[f"band{band:03d}"].write(band_keys(signatures, band, self.rows).tobytes())
        keys = np.array([representative_key(t) for t in texts], dtype=np.uint64)
        self._files["keys"].write(keys.tobytes())
        codes = [SPLITS.index(split_of_digest(text_digest(t), *self.fractions)) for t in texts]
        self._files["hash-splits"].write(np.array(codes, dtype=np.int8).tobytes())
        joined = [" ".join(s).encode("utf-8") for s in sets]
        # a word set's identity: 128 bits of blake2b, so equal keys mean equal sets for any practical count
        identity = np.frombuffer(b"".join(hashlib.blake2b(j, digest_size=16).digest() for j in joined),
                                 dtype=np.uint64).reshape(-1, 2)
        self._files["sets-hi"].write(identity[:, 0].tobytes())
        self._files["sets-lo"].write(identity[:, 1].tobytes())
        lengths = np.fromiter((len(j) for j in joined), dtype=np.uint64, count=len(joined))
        starts = self._offset + np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.uint64)
        self._files["offsets"].write(starts.tobytes())
        self._files["words"].write(b"".join(joined))
        self._offset += int(lengths.sum())
        self.count += len(texts)

    def close(self) -> None:
        """Close and delete every file of the index."""
        for handle in self._files.values():
            handle.close()
        self._files = {}
        for path in self.paths.values():
            path.unlink(missing_ok=True)

    def build(self) -> Grouping:
        """Group the prompts added so far; returns each prompt's group and hash split and the figures."""
        self._files["offsets"].write(np.array([self._offset], dtype=np.uint64).tobytes())
        for handle in self._files.values():
            handle.close()
        self._files = {}
        n = self.count
        counts = {"pair_checks": 0, "pairs_at_or_above_threshold": 0}
        node_of, node_rep = self._word_sets(n)
        nodes = len(node_rep)
        with _WordSets(self.paths, node_rep, self.threshold, counts) as sets:
            root = self._components(node_rep, sets)
            group_of = root[node_of]  # per prompt: its group's root node
            del root
            hash_splits = np.fromfile(self.paths["hash-splits"], dtype=np.int8)
            order = np.lexsort((np.fromfile(self.paths["keys"], dtype=np.uint64), group_of))
            ordered = group_of[order]
            first = np.ones(n, dtype=bool)
            first[1:] = ordered[1:] != ordered[:-1]
            del ordered
            representative = order[first]  # per group: the member with the smallest representative key
            del order, first
            group_split = np.zeros(nodes, dtype=np.int8)
            group_split[group_of[representative]] = hash_splits[representative]
            splits = group_split[group_of]
            del group_split
            leakage = self._leakage({"hash": hash_splits, "group": splits}, node_of, node_rep, sets)
        sizes = np.bincount(group_of, minlength=nodes)
        stats = {
            "near_duplicate_threshold": self.threshold, "minhash_permutations": self.num_perm,
            "lsh": {"bands": self.bands, "rows": self.rows, "weights": list(LSH_WEIGHTS), "seed": MINHASH_SEED,
                    "candidate_probability_at_threshold": round(candidate_probability(self.threshold, self.bands,
                                                                                      self.rows), 4),
                    **counts},
            "prompts": n, "word_sets": nodes, "groups": len(representative),
            "largest_group": int(sizes.max()) if n else 0,
            "prompts_in_shared_groups": int(sizes[sizes > 1].sum()),
            "moved": int(np.count_nonzero(splits != hash_splits)),
            "splits": {"hash": _counts(hash_splits), "group": _counts(splits)},
            "leakage": leakage,
        }
        return Grouping(splits=splits, hash_splits=hash_splits, groups=group_of, stats=stats)

    def _bucket_lists(self, node_rep: np.ndarray):
        """Every LSH bucket of two or more nodes, band by band: the nodes whose signatures agree on the band."""
        for band in range(self.bands):
            yield from _buckets(np.fromfile(self.paths[f"band{band:03d}"], dtype=np.uint64)[node_rep])

    def _components(self, node_rep: np.ndarray, sets: "_WordSets") -> np.ndarray:
        """The root node of each node: the connected components of the pairs of word sets that share a bucket in
        some band and reach the threshold."""
        parent = np.arange(len(node_rep), dtype=np.int32)
        for bucket in self._bucket_lists(node_rep):
            if len(bucket) <= SMALL_BUCKET:
                _join([int(m) for m in bucket], sets.near, parent)
            else:
                for a, b in sets.spanning_pairs(bucket):
                    _union(parent, a, b)
        while True:  # every node to its root (pointer jumping)
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand

    def _leakage(self, assignments: dict[str, np.ndarray], node_of: np.ndarray, node_rep: np.ndarray,
                 sets: "_WordSets") -> dict:
        """For each assignment of splits: the test prompts with a train prompt of the same word set or of a word set
        that shares a bucket with theirs and reaches the threshold, searched the same way for every assignment."""
        nodes = len(node_rep)
        flags = {}
        for name, codes in assignments.items():
            has_train = np.bincount(node_of[codes == TRAIN], minlength=nodes) > 0
            has_test = np.bincount(node_of[codes == TEST], minlength=nodes) > 0
            flags[name] = has_train, has_test, has_train & has_test  # the last: leaks (so far)
        for bucket in self._bucket_lists(node_rep):
            for has_train, has_test, leaks in flags.values():
                tests = bucket[has_test[bucket] & ~leaks[bucket]]
                trains = bucket[has_train[bucket]]
                if len(tests) and len(trains) and not (len(tests) == len(trains) == 1 and tests[0] == trains[0]):
                    leaks[tests[sets.any_near(tests, trains)]] = True
        out = {}
        for (name, codes), (_, _, leaks) in zip(assignments.items(), flags.values()):
            tests = np.bincount(node_of[codes == TEST], minlength=nodes)
            total, leaked = int(tests.sum()), int(tests[leaks].sum())
            out[name] = {"test_prompts": total, "leaked": leaked, "share": round(leaked / total, 6) if total else 0.0}
        return out

    def _word_sets(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(node of each prompt, first prompt of each node): prompts with equal word sets share one node, so
        a set repeated k times costs one entry in each LSH bucket, not k (and no k x k checks)."""
        hi, lo = (np.fromfile(self.paths[name], dtype=np.uint64) for name in ("sets-hi", "sets-lo"))
        order = np.lexsort((lo, hi))  # stable: equal sets keep the order they were added in
        new = np.zeros(n, dtype=bool)  # where a new set begins, in that order
        new[:1] = True
        for column in (hi, lo):
            ordered = column[order]
            new[1:] |= ordered[1:] != ordered[:-1]
            del ordered
        del hi, lo, column
        node_of = np.empty(n, dtype=np.int32)
        node_of[order] = np.cumsum(new, dtype=np.int32) - 1
        return node_of, order[new].astype(np.int32)


def _join(members: list[int], near: Callable[[int, int], bool], parent: np.ndarray) -> None:
    """Unite the near-duplicates among a small bucket's nodes. Each node is checked against the bucket's earlier
    components, stopping in each at the first member that passes: a bucket of sets that are all near-duplicates
    costs one check a node."""
    clusters: dict[int, list[int]] = {}  # root -> this bucket's nodes in that component so far
    for m in members:
        root = _find(parent, m)
        mine = clusters.pop(root, [])  # earlier bands may have joined m to some of them already
        for other in list(clusters):
            hit = next((x for x in clusters[other] if near(m, x)), None)
            if hit is not None:
                _union(parent, m, hit)
                mine += clusters.pop(other)
                root = _find(parent, m)
        mine.append(m)
        clusters[root] = mine


def _counts(codes: np.ndarray) -> dict:
    found = np.bincount(codes, minlength=len(SPLITS))
    return {s: int(found[i]) for i, s in enumerate(SPLITS)}


def _buckets(keys: np.ndarray):
    """The index groups (of two or more) of equal values in `keys`, each in ascending index order. Holds the keys and
    their order, not a sorted copy: most keys are alone, and only the runs of equal ones are listed."""
    order = np.argsort(keys, kind="stable")
    same = np.zeros(len(keys) + 1, dtype=np.int8)  # same[i + 1]: the keys at order[i] and order[i + 1] are equal
    step, ordered = 1 << 20, None
    for start in range(0, len(keys) - 1, step):
        ordered = keys[order[start:start + step + 1]]
        same[start + 1:start + len(ordered)] = ordered[1:] == ordered[:-1]
    del keys, ordered
    change = np.diff(same, append=np.int8(0))
    del same
    for start, stop in zip(np.flatnonzero(change == 1), np.flatnonzero(change == -1) + 1):
        yield order[start:stop]


def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)


def _find(parent: np.ndarray, x: int) -> int:
    root = x
    while parent[root] != root:
        root = int(parent[root])
    while x != root:  # path compression
        parent[x], x = root, int(parent[x])
    return root


class _WordSets:
    """The exact check of candidate pairs. Reads a node's word set from the words file at the offsets its first prompt
    has in the offsets file (it holds neither), and counts the checks in `counts`."""

    def __init__(self, paths: dict, node_rep: np.ndarray, threshold: float, counts: dict):
        self.node_rep, self.threshold, self.counts = node_rep, threshold, counts
        self.words = os.open(paths["words"], os.O_RDONLY)
        self.offsets = os.open(paths["offsets"], os.O_RDONLY)
        self._cache: dict[int, frozenset] = {}

    def read(self, node: int) -> frozenset:
        """The word set of a node."""
        start, stop = struct.unpack("<QQ", os.pread(self.offsets, 16, 8 * int(self.node_rep[node])))
        return frozenset(os.pread(self.words, stop - start, start).decode("utf-8").split(" "))

    def near(self, a: int, b: int) -> bool:
        """Whether two nodes' word sets reach the threshold (the exact Jaccard similarity); the sets of the bucket
        in hand are cached."""
        x = self._cache.get(a) or self._cache.setdefault(a, self.read(a))
        y = self._cache.get(b) or self._cache.setdefault(b, self.read(b))
        if len(self._cache) > 4 * SMALL_BUCKET:
            self._cache.clear()
        self.counts["pair_checks"] += 1
        if min(len(x), len(y)) < self.threshold * max(len(x), len(y)):  # Jaccard is at most small / large
            return False
        common = len(x & y)
        passed = common / (len(x) + len(y) - common) >= self.threshold
        self.counts["pairs_at_or_above_threshold"] += passed
        return passed

    def _blocks(self, rows: np.ndarray, cols: np.ndarray):
        """(row slice, pass matrix) blocks: whether each row node's set reaches the threshold with each column
        node's, by sparse products of word incidence (C speed for buckets of thousands), about 2**18 cells each."""
        from scipy.sparse import csr_matrix

        nodes = np.unique(np.concatenate((rows, cols)))
        found = [self.read(int(m)) for m in nodes]
        vocab: dict[str, int] = {}
        indices = np.fromiter((vocab.setdefault(w, len(vocab)) for s in found for w in s), dtype=np.int32)
        sizes = np.fromiter((len(s) for s in found), dtype=np.int64, count=len(found))
        incidence = csr_matrix((np.ones(len(indices), dtype=np.int32), indices,
                                np.concatenate(([0], np.cumsum(sizes)))), shape=(len(nodes), len(vocab)))
        r, c = np.searchsorted(nodes, rows), np.searchsorted(nodes, cols)
        right = incidence[c].T.tocsc()
        step = max(1, (1 << 18) // max(len(cols), 1))
        for start in range(0, len(rows), step):
            block = slice(start, start + step)
            common = (incidence[r[block]] @ right).toarray().astype(np.float64)
            union = sizes[r[block], None] + sizes[None, c] - common
            passed = common / union >= self.threshold
            passed &= rows[block, None] != cols[None, :]  # a node is not its own near-duplicate
            yield block, passed

    def spanning_pairs(self, bucket: np.ndarray):
        """Pairs of a large bucket's nodes that reach the threshold and connect the same nodes as all such pairs
        do (a spanning forest, found by union-find over the bucket in numpy)."""
        labels = np.arange(len(bucket))
        self.counts["pair_checks"] += len(bucket) * (len(bucket) - 1) // 2
        for block, passed in self._blocks(bucket, bucket):
            i, j = np.nonzero(passed)
            i += block.start
            upper = i < j
            self.counts["pairs_at_or_above_threshold"] += int(upper.sum())
            _unite(labels, i[upper], j[upper])
        _flatten(labels)
        for m in np.flatnonzero(labels != np.arange(len(bucket))):
            yield int(bucket[m]), int(bucket[labels[m]])

    def any_near(self, tests: np.ndarray, trains: np.ndarray) -> np.ndarray:
        """For each node of `tests`: whether some other node of `trains` reaches the threshold with it."""
        if len(tests) * len(trains) <= SMALL_BUCKET * SMALL_BUCKET:
            return np.array([any(u != t and self.near(int(t), int(u)) for u in trains) for t in tests], dtype=bool)
        found = np.zeros(len(tests), dtype=bool)
        for block, passed in self._blocks(tests, trains):
            found[block] = passed.any(axis=1)
            self.counts["pair_checks"] += int(np.count_nonzero(tests[block, None] != trains[None, :]))
            self.counts["pairs_at_or_above_threshold"] += int(passed.sum())
        return found

    def __enter__(self) -> "_WordSets":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.words)
        os.close(self.offsets)


def _flatten(labels: np.ndarray) -> None:
    """Point every entry of a forest (labels[x] <= x) at its root."""
    while True:
        grand = labels[labels]
        if np.array_equal(grand, labels):
            return
        labels[:] = grand


def _unite(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Union-find over numpy arrays: join the trees of a[i] and b[i] for every i (the larger root under the
    smaller; repeated while some pair is still apart, since several pairs may claim one root at once)."""
    while len(a):
        _flatten(labels)
        ra, rb = labels[a], labels[b]
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(labels, np.maximum(ra, rb), np.minimum(ra, rb))
