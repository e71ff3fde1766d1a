"""Attribute recovery for fashion prompts: does the recovered prompt name the source row's value?"""

from __future__ import annotations

import re
from collections import defaultdict

ATTRIBUTES = ("gender", "baseColour", "articleType")


def _words(text: str) -> str:
    """Lower case, runs of anything but letters and digits as one space, padded for whole-word search."""
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "


def value_forms(value: str) -> set[str]:
    """The padded word sequences that count as naming `value`: itself and its singular ("Kurtas" -> "kurta")."""
    base = _words(value).strip()
    if not base:
        return set()
    forms = {base}
    head, _, last = base.rpartition(" ")
    for suffix in ("es", "s"):
        if last.endswith(suffix) and len(last) > len(suffix) + 2:
            forms.add(f"{head} {last[:-len(suffix)]}".strip())
    return {f" {f} " for f in forms}


def names_value(text: str, value: str) -> bool:
    """True when `text` names `value` as whole words ("Women" does not name "Men")."""
    padded = _words(text)
    return any(form in padded for form in value_forms(value))


def recovery(texts: list[str], rows: list[dict], attributes: tuple[str, ...] = ATTRIBUTES) -> dict:
    """Per attribute: {'hits', 'n', 'rate'} over the rows that have the attribute."""
    out = {}
    for name in attributes:
        pairs = [(t, r[name]) for t, r in zip(texts, rows) if r.get(name)]
        hits = sum(names_value(t, v) for t, v in pairs)
        out[name] = {"hits": hits, "n": len(pairs), "rate": hits / len(pairs) if pairs else None}
    return out


def chance_rates(rows: list[dict], attributes: tuple[str, ...] = ATTRIBUTES) -> dict:
    """What always naming the most frequent value would score, per attribute (the floor to beat)."""
    out = {}
    for name in attributes:
        counts: dict[str, int] = defaultdict(int)
        for r in rows:
            if r.get(name):
                counts[r[name]] += 1
        total = sum(counts.values())
        out[name] = max(counts.values()) / total if total else None
    return out


def grouped_mean(values: list[float], groups: list[str]) -> dict[str, dict]:
    """{group: {'n', 'mean'}} sorted by group name; rows without a group are left out."""
    buckets: dict[str, list[float]] = defaultdict(list)
    for v, g in zip(values, groups):
        if g:
            buckets[g].append(v)
    return {g: {"n": len(v), "mean": sum(v) / len(v)} for g, v in sorted(buckets.items())}
