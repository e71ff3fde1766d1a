"""`revprompt prepare`: read, clean, de-duplicate and split the prompt set once, into the run directory."""

from __future__ import annotations

import hashlib
import json
import logging
import os
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


def prepare(cfg: Config) -> dict:
    """Write prompts/{train,val,test}.jsonl and prompts/report.json; return the report (counts)."""
    out_dir = prompts_dir(cfg.run.dir)
    fingerprint = prepare_fingerprint(cfg)
    report_path = out_dir / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if report.get("fingerprint") == fingerprint:
            log.info("prompts already prepared (%s), reusing them", report_path)
            return report
    out_dir.mkdir(parents=True, exist_ok=True)
    p = cfg.prompts
    tokenizer = load_tokenizer(cfg.generate.model)
    max_tokens = tokenizer.model_max_length
    csv_stats = CsvStats()
    counts = dict(rows=0, empty=0, duplicates=0, too_long=0, kept=0)
    seen_text: set[bytes] = set()
    seen_ids: dict[str, int] = {}
    tmp_paths = {s: out_dir / f".{s}.jsonl.tmp{os.getpid()}" for s in SPLITS}
    handles = {s: open(path, "w", encoding="utf-8") for s, path in tmp_paths.items()}
    split_counts = dict.fromkeys(SPLITS, 0)
    source = resolve_path(p.path)
    try:
        for prompt in read_prompts(p.path, p.format, p.template, p.id_field, csv_stats):
            counts["rows"] += 1
            if not prompt.text:
                counts["empty"] += 1
                continue
            text_hash = hashlib.sha256(normalise(prompt.text).encode("utf-8")).digest()[:12]
            if text_hash in seen_text:
                counts["duplicates"] += 1
                continue
            if p.limit and counts["kept"] >= p.limit:
                break
            if prompt.id in seen_ids:
                raise PromptSourceError(f"{source}:{prompt.line}: id {prompt.id!r} already used at line "
                                        f"{seen_ids[prompt.id]} for a different prompt")
            seen_text.add(text_hash)
            seen_ids[prompt.id] = prompt.line
            if len(tokenizer(prompt.text).input_ids) > max_tokens:
                counts["too_long"] += 1
            split = split_of(prompt.text, p.val_fraction, p.test_fraction)
            handles[split].write(_record(prompt, split) + "\n")
            split_counts[split] += 1
            counts["kept"] += 1
    except BaseException:
        for handle in handles.values():
            handle.close()
        for path in tmp_paths.values():
            path.unlink(missing_ok=True)
        raise
    for split, handle in handles.items():
        handle.close()
        os.replace(tmp_paths[split], out_dir / f"{split}.jsonl")
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


def load_split(run_dir: str | Path, split: str) -> list[Prompt]:
    """The prepared prompts of one split, in source order."""
    path = prompts_dir(run_dir) / f"{split}.jsonl"
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            obj = json.loads(line)
            prompts.append(Prompt(id=obj["id"], text=obj["text"], attributes=obj["attributes"], line=obj["line"]))
    return prompts


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt prepare`."""
    from ..launch.runner import build_parser, on_main_first, run_stage

    parser = build_parser("prepare", "Read, clean, de-duplicate and split the prompt set into the run directory.")
    return run_stage("prepare", argv if argv is not None else [], parser,
                     lambda ctx: on_main_first(ctx.info, lambda: prepare(ctx.cfg)))
