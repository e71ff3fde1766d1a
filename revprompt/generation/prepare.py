"""`revprompt prepare`: read, clean, de-duplicate and split the prompt set once, into the run directory."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

from ..launch.config import Config
from ..shards.writer import write_json_atomic
from .models import load_tokenizer
from .prompts import CsvStats, Prompt, PromptSourceError, normalise, read_prompts, resolve_path

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    """train, val or test from a hash of the normalised text: stable as prompts are added or removed."""
    digest = hashlib.sha256(normalise(text).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def file_sha256(path: Path) -> str:
    """Content hash of the prompt file, so an edited file is never mistaken for the prepared one."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prompts_dir(run_dir: str | Path) -> Path:
    """Where the prepared prompt set lives."""
    return Path(run_dir) / "prompts"


def prepare_fingerprint(cfg: Config) -> str:
    """What the prepared set depends on: the [prompts] section and the prompt file's bytes."""
    try:
        content = file_sha256(resolve_path(cfg.prompts.path))
    except OSError as exc:
        raise PromptSourceError(f"{resolve_path(cfg.prompts.path)}: cannot read prompt file: "
                                f"{exc.strerror or exc}") from None
    return hashlib.sha256((cfg.fingerprint("prompts") + content).encode()).hexdigest()[:16]


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


class SplitWriter:
    """prompts/{split}.jsonl plus prompts/{split}.idx (little-endian uint64 byte offsets, one per line)."""

    def __init__(self, out_dir: Path, split: str):
        self.final = out_dir / f"{split}.jsonl", out_dir / f"{split}.idx"
        self.tmp = tuple(p.with_name(f".{p.name}.tmp{os.getpid()}") for p in self.final)
        self.data, self.index = open(self.tmp[0], "wb"), open(self.tmp[1], "wb")
        self.offset = 0
        self.count = 0

    def write(self, record: str) -> None:
        """Append one prompt's JSON line and its offset."""
        data = (record + "\n").encode("utf-8")
        self.index.write(struct.pack("<Q", self.offset))
        self.data.write(data)
        self.offset += len(data)
        self.count += 1

    def commit(self) -> None:
        """Close and move both files into place."""
        self.data.close()
        self.index.close()
        for tmp, final in zip(self.tmp, self.final):
            os.replace(tmp, final)

    def abort(self) -> None:
        """Close and delete the temporary files."""
        self.data.close()
        self.index.close()
        for tmp in self.tmp:
            tmp.unlink(missing_ok=True)


def prepare(cfg: Config, chunk: int = 1024) -> dict:
    """Write prompts/{split}.jsonl + .idx and prompts/report.json, streaming; return the report (counts).

    Memory does not grow with the prompt count: prompts are read, checked and written in chunks of
    `chunk`, and the texts and ids seen so far live in an SQLite file while this runs.
    """
    out_dir = prompts_dir(cfg.run.dir)
    fingerprint = prepare_fingerprint(cfg)
    report_path = out_dir / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if report.get("fingerprint") == fingerprint and all((out_dir / f"{s}.idx").is_file() for s in SPLITS):
            log.info("prompts already prepared (%s), reusing them", report_path)
            return report
    out_dir.mkdir(parents=True, exist_ok=True)
    p = cfg.prompts
    tokenizer = load_tokenizer(cfg.generate.model)
    max_tokens = tokenizer.model_max_length
    csv_stats = CsvStats()
    counts = dict(rows=0, empty=0, duplicates=0, too_long=0, kept=0)
    seen = SeenSet(out_dir / f".seen.sqlite{os.getpid()}")
    writers = {s: SplitWriter(out_dir, s) for s in SPLITS}
    source = resolve_path(p.path)
    pending: list[Prompt] = []

    def flush() -> None:
        if not pending:
            return
        lengths = tokenizer([q.text for q in pending], add_special_tokens=True)["input_ids"]
        for prompt, ids in zip(pending, lengths):
            counts["too_long"] += len(ids) > max_tokens
            split = split_of(prompt.text, p.val_fraction, p.test_fraction)
            writers[split].write(_record(prompt, split))
        pending.clear()

    try:
        for prompt in read_prompts(p.path, p.format, p.template, p.id_field, csv_stats):
            counts["rows"] += 1
            if not prompt.text:
                counts["empty"] += 1
                continue
            if not seen.add_text(hashlib.sha256(normalise(prompt.text).encode("utf-8")).digest()[:12]):
                counts["duplicates"] += 1
                continue
            if p.limit and counts["kept"] >= p.limit:
                break
            first = seen.add_id(prompt.id, prompt.line)
            if first is not None:
                raise PromptSourceError(f"{source}:{prompt.line}: id {prompt.id!r} already used at line "
                                        f"{first} for a different prompt")
            pending.append(prompt)
            counts["kept"] += 1
            if len(pending) == chunk:
                flush()
        flush()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        seen.close()
    for writer in writers.values():
        writer.commit()
    split_counts = {s: w.count for s, w in writers.items()}
    report = dict(fingerprint=fingerprint, source=str(source), max_tokens=max_tokens,
                  recovered_commas=csv_stats.recovered_commas, splits=split_counts, **counts)
    write_json_atomic(report_path, report)
    log.info("prepared %d prompts from %s: %s (empty %d, duplicates %d, longer than %d tokens %d, "
             "comma rows recovered %d)", counts["kept"], source, split_counts, counts["empty"],
             counts["duplicates"], max_tokens, counts["too_long"], csv_stats.recovered_commas)
    return report


def _record(prompt: Prompt, split: str) -> str:
    return json.dumps({"id": prompt.id, "text": prompt.text, "split": split, "line": prompt.line,
                       "attributes": prompt.attributes}, ensure_ascii=False, sort_keys=True)


def _prompt(line: bytes | str) -> Prompt:
    obj = json.loads(line)
    return Prompt(id=obj["id"], text=obj["text"], attributes=obj["attributes"], line=obj["line"])


def split_size(run_dir: str | Path, split: str) -> int:
    """How many prompts a split holds (from its index, without reading the prompts)."""
    return (prompts_dir(run_dir) / f"{split}.idx").stat().st_size // 8


def load_range(run_dir: str | Path, split: str, start: int, stop: int) -> list[Prompt]:
    """Prompts start..stop-1 of a split, read through the index: a rank reads only what its shards need."""
    folder = prompts_dir(run_dir)
    stop = min(stop, split_size(run_dir, split))
    if start >= stop:
        return []
    with open(folder / f"{split}.idx", "rb") as index:
        index.seek(8 * start)
        (offset,) = struct.unpack("<Q", index.read(8))
    with open(folder / f"{split}.jsonl", "rb") as data:
        data.seek(offset)
        return [_prompt(data.readline()) for _ in range(stop - start)]


def load_at(run_dir: str | Path, split: str, positions) -> list[Prompt]:
    """The prompts at `positions` (ascending) of a split, each read through the index."""
    folder = prompts_dir(run_dir)
    out = []
    with open(folder / f"{split}.idx", "rb") as index, open(folder / f"{split}.jsonl", "rb") as data:
        for position in positions:
            index.seek(8 * position)
            (offset,) = struct.unpack("<Q", index.read(8))
            data.seek(offset)
            out.append(_prompt(data.readline()))
    return out


def load_split(run_dir: str | Path, split: str) -> list[Prompt]:
    """The prepared prompts of one split, in source order (all of them: for small sets and tests)."""
    return load_range(run_dir, split, 0, split_size(run_dir, split))


def iter_split(run_dir: str | Path, split: str):
    """The prompts of one split, one at a time."""
    with open(prompts_dir(run_dir) / f"{split}.jsonl", "rb") as data:
        for line in data:
            yield _prompt(line)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt prepare`."""
    from ..launch.runner import build_parser, on_main_first, run_stage

    parser = build_parser("prepare", "Read, clean, de-duplicate and split the prompt set into the run directory.")
    return run_stage("prepare", argv if argv is not None else [], parser,
                     lambda ctx: on_main_first(ctx.info, lambda: prepare(ctx.cfg)))
