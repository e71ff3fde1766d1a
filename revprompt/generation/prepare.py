"""`revprompt prepare`: read, clean, de-duplicate and split the prompt set once, into the run directory.

Two passes under `prompts.split = "group"` (the default): the first streams the unique prompts into a
private file and the near-duplicate index (revprompt.prompts.neardup), which then groups them; the second
reads the prompts back and writes each into its group's split, in source order. Under `"hash"` the split
files are written in the first pass, as before groups existed; the index still runs, for
prompts/stats.json's leakage figures. Either way prompts/stats.json says how many test prompts have a
near-duplicate in train under each split.

Prepare counts the prompts longer than the text encoder of `generate.model` takes (they are
truncated when drawn), so it loads that model's tokenizer; everything else it does depends on the
[prompts] section alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..launch.config import Config
from ..launch.layout import (RunLayout, prepared_fingerprint, private_sibling, remove_dead_siblings, remove_if_empty,
                             remove_owned, swap_folder)
from ..models.text_to_image import load_tokenizer
from ..prompts.neardup import NearDuplicates
from ..prompts.prepared import SPLITS, SplitWriter, parse, record, split_of
from ..prompts.sources import CsvStats, Prompt, PromptSourceError, normalise, read_prompts, resolve_path
from ..shards.manifest import read_manifest
from ..shards.writer import WriteError, write_error, write_json_atomic

log = logging.getLogger(__name__)


class SeenSet:
    """Texts and ids seen so far, in an SQLite file beside the output: memory stays flat at any prompt count."""

    def __init__(self, path: Path):
        import sqlite3

        path.unlink(missing_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000;"
                              "CREATE TABLE texts (h BLOB PRIMARY KEY) WITHOUT ROWID;"
                              "CREATE TABLE ids (id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID; BEGIN;")

    def add_text(self, digest: bytes) -> bool:
        """True when the text is new."""
        return self.db.execute("INSERT OR IGNORE INTO texts VALUES (?)", (digest,)).rowcount == 1

    def add_id(self, prompt_id: str, line: int) -> int | None:
        """None when the id is new, else the line that used it first."""
        if self.db.execute("INSERT OR IGNORE INTO ids VALUES (?, ?)", (prompt_id, line)).rowcount == 1:
            return None
        return self.db.execute("SELECT line FROM ids WHERE id = ?", (prompt_id,)).fetchone()[0]

    def close(self) -> None:
        """Drop the file."""
        self.db.close()
        self.path.unlink(missing_ok=True)


def unique_prompts(cfg: Config, seen: SeenSet, counts: dict, csv_stats: CsvStats) -> Iterator[Prompt]:
    """The prompt file's non-empty, first-seen prompts, up to prompts.limit; `counts` tallies what was dropped.

    A prompt id used again for another text is an error naming both lines.
    """
    p = cfg.prompts
    source = resolve_path(p.path)
    for prompt in read_prompts(p.path, p.format, p.template, p.id_field, csv_stats):
        counts["rows"] += 1
        if not prompt.text:
            counts["empty"] += 1
            continue
        if not seen.add_text(hashlib.sha256(normalise(prompt.text).encode("utf-8")).digest()[:12]):
            counts["duplicates"] += 1
            continue
        if p.limit and counts["kept"] >= p.limit:
            return
        first = seen.add_id(prompt.id, prompt.line)
        if first is not None:
            raise PromptSourceError(f"{source}:{prompt.line}: id {prompt.id!r} already used at line "
                                    f"{first} for a different prompt")
        counts["kept"] += 1
        yield prompt


def read_chunks(prompts: Iterator[Prompt], tokenizer, counts: dict, chunk: int) -> Iterator[list[Prompt]]:
    """The prompts in lists of `chunk`, each tokenised at once to count the over-long ones."""
    max_tokens = tokenizer.model_max_length
    pending: list[Prompt] = []

    def counted() -> list[Prompt]:
        for ids in tokenizer([q.text for q in pending], add_special_tokens=True)["input_ids"]:
            counts["too_long"] += len(ids) > max_tokens
        return pending

    for prompt in prompts:
        pending.append(prompt)
        if len(pending) == chunk:
            yield counted()
            pending = []
    if pending:
        yield counted()


class PrepareError(ValueError):
    """Preparing now would leave the run inconsistent; the message says what to run instead."""


def check_shards_keep_their_prompts(layout: RunLayout, fingerprint: str) -> None:
    """Refuse to prepare other prompts under shards generated from the prepared set on disk."""
    manifest = read_manifest(layout.shards)
    if manifest is None:
        return
    made_from = manifest.get("prepared")
    if made_from is None:  # manifests before the record: the shards came from the prompts prepared now
        report = json.loads(layout.prompts_report.read_text()) if layout.prompts_report.is_file() else {}
        made_from = report.get("fingerprint")
    if made_from not in (None, fingerprint):
        raise PrepareError(f"{layout.shards} holds shards generated from other prompts (prepared set {made_from}, "
                           f"now {fingerprint}): the prompt file or [prompts] changed; run `revprompt generate "
                           "--overwrite` to prepare and generate again, or choose another run.dir")


def prepare(cfg: Config, chunk: int = 1024) -> dict:
    """Write prompts/{split}.jsonl + .idx, prompts/report.json and prompts/stats.json, streaming; return the
    report (counts).

    Memory does not grow with the prompt count: prompts are read, checked and written in chunks of
    `chunk`; the texts and ids seen so far live in an SQLite file and the near-duplicate index in files
    while this runs. The new set is written into a private folder and swapped in whole, so prompts/ is
    always one prepared set; a set that shards were generated from is never replaced by another.
    """
    layout = RunLayout.of(cfg)
    fingerprint = prepared_fingerprint(cfg)
    if layout.prompts_report.is_file():
        report = json.loads(layout.prompts_report.read_text(encoding="utf-8"))
        if (report.get("fingerprint") == fingerprint and all((layout.prompts / f"{s}.idx").is_file() for s in SPLITS)
                and stats_are_current(layout, cfg)):
            log.info("prompts already prepared (%s), reusing them", layout.prompts_report)
            return report
    check_shards_keep_their_prompts(layout, fingerprint)
    layout.root.mkdir(parents=True, exist_ok=True)
    remove_dead_siblings(layout.prompts)
    out_dir = private_sibling(layout.prompts, "tmp")
    out_dir.mkdir()
    try:
        report, stats = write_prepared(cfg, out_dir, fingerprint, chunk)
        old = swap_folder(out_dir, layout.prompts)
    except OSError as exc:
        raise exc if isinstance(exc, WriteError) else write_error(layout.prompts, "the prepared prompts", exc) from None
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if old is not None:  # the previous set: revprompt's files go, anything else stays where it was
        remove_owned(old, PROMPT_PATTERNS)
        remove_if_empty(old)
        if old.exists():
            log.warning("%s kept files revprompt did not write; they are in %s now", layout.prompts, old)
    c = report
    log.info("prepared %d prompts from %s: %s (empty %d, duplicates %d, longer than the text encoder's %d tokens "
             "%d, rows whose name had unquoted commas rejoined %d)", c["kept"], c["source"], c["splits"], c["empty"],
             c["duplicates"], c["max_tokens"], c["too_long"], c["recovered_commas"])
    log.info(leakage_line(stats))
    return report


def stats_are_current(layout: RunLayout, cfg: Config) -> bool:
    """Whether prompts/stats.json was computed with the near-duplicate settings of `cfg` (under hash splits they
    are not in the fingerprint: they change the figures, not the split files)."""
    try:
        stats = json.loads(layout.prompts_stats.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    p = cfg.prompts
    return isinstance(stats, dict) and (stats.get("split"), stats.get("near_duplicate_threshold"),
                                        stats.get("minhash_permutations")) == (
        p.split, p.near_duplicate_threshold, p.minhash_permutations)


def leakage_line(stats: dict) -> str:
    """One console line: the test prompts with a train near-duplicate under hash and under group splits."""
    def share(method: str) -> str:
        leak = stats["leakage"][method]
        return f"{method} split {leak['leaked']}/{leak['test_prompts']} ({100 * leak['share']:.1f}%)"

    return (f"near-duplicate leakage (test prompts with a train prompt of word-set Jaccard >= "
            f"{stats['near_duplicate_threshold']}): {share('hash')}, {share('group')}; split by {stats['split']}: "
            f"{stats['groups']} groups, the largest {stats['largest_group']}, {stats['moved']} prompts moved from "
            "their hash split (prompts/stats.json)")


# what prepare writes into prompts/
PROMPT_PATTERNS = ("*.jsonl", "*.idx", "report.json", "stats.json", ".*.tmp*", ".seen.sqlite*")


def write_prepared(cfg: Config, out_dir: Path, fingerprint: str, chunk: int) -> tuple[dict, dict]:
    """The prepared set in `out_dir`: the split files, then report.json and stats.json; returns both records.

    Every temporary file (the SQLite de-duplication set, the near-duplicate index, the prompts staged between
    the passes) is a private name in `out_dir` matching PROMPT_PATTERNS, removed before this returns.
    """
    p = cfg.prompts
    tokenizer = load_tokenizer(cfg.generate.model)
    csv_stats = CsvStats()
    counts = dict(rows=0, empty=0, duplicates=0, too_long=0, kept=0)
    source = resolve_path(p.path)
    seen = SeenSet(out_dir / f".seen.sqlite{os.getpid()}")
    writers = {s: SplitWriter(out_dir, s) for s in SPLITS}
    staged_path = out_dir / f".staged.jsonl.tmp{os.getpid()}"
    near = staged = None
    try:
        near = NearDuplicates(out_dir, p.near_duplicate_threshold, p.minhash_permutations, p.val_fraction,
                              p.test_fraction)
        staged = None if p.split == "hash" else open(staged_path, "w+b")
        for batch in read_chunks(unique_prompts(cfg, seen, counts, csv_stats), tokenizer, counts, chunk):
            near.add([q.text for q in batch])
            for prompt in batch:
                if staged is None:  # hash splits: written now, as they always were
                    split = split_of(prompt.text, p.val_fraction, p.test_fraction)
                    writers[split].write(record(prompt, split))
                else:
                    staged.write((record(prompt, "") + "\n").encode("utf-8"))
        seen.close()
        if counts["kept"] == 0 or (counts["kept"] == 1 and counts["duplicates"]):
            what = "no prompt to prepare" if counts["kept"] == 0 else "every row repeats one prompt"
            raise PromptSourceError(f"{source}: {what} ({counts['rows']} rows: {counts['empty']} empty, "
                                    f"{counts['duplicates']} duplicates); give prompts.path a file with prompts to "
                                    "split into train, val and test")
        grouping = near.build()
        if staged is not None:  # pass 2: each prompt into its group's split, in source order
            staged.seek(0)
            for index, line in enumerate(staged):
                split = grouping.split(index)
                writers[split].write(record(parse(line), split))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        seen.close()
        if near is not None:
            near.close()
        if staged is not None:
            staged.close()
        staged_path.unlink(missing_ok=True)
    for writer in writers.values():
        writer.commit()
    report = dict(fingerprint=fingerprint, source=str(source),
                  max_tokens=tokenizer.model_max_length, recovered_commas=csv_stats.recovered_commas,
                  splits={s: w.count for s, w in writers.items()}, **counts)
    stats = dict(split=p.split, **grouping.stats)
    write_json_atomic(out_dir / "report.json", report)
    write_json_atomic(out_dir / "stats.json", stats)
    return report, stats


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt prepare`."""
    from ..launch.runner import build_parser, on_main_first, run_stage

    parser = build_parser("prepare", "Read, clean, de-duplicate and split the prompt set into the run directory.")
    return run_stage("prepare", argv if argv is not None else [], parser,
                     lambda ctx: on_main_first(ctx.info, lambda: prepare(ctx.cfg)))
