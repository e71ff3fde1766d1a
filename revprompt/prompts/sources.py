"""Prompt sources: Kaggle styles.csv, JSONL and plain text, read as a stream with file:line errors."""

from __future__ import annotations

import csv
import hashlib
import json
import string
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

DEFAULT_TEMPLATES = {"csv": "{productDisplayName}", "jsonl": "{prompt}", "txt": "{prompt}"}


class PromptSourceError(ValueError):
    """A prompt file that cannot be used; the message names the file and line."""


@dataclass
class Prompt:
    """One prompt with its stable id, its source attributes and where it came from."""

    id: str
    text: str
    attributes: dict = field(default_factory=dict)
    line: int = 0


def normalise(text: str) -> str:
    """The form used for de-duplication and splitting: NFKC, lower case, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def clean_text(text: str) -> str:
    """The prompt as used: surrounding and repeated whitespace removed, case kept."""
    return " ".join(text.split())


def text_id(text: str) -> str:
    """A stable id for prompts without one: a hash of the normalised text."""
    return "t" + hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:16]


def bundled_path() -> Path:
    """The synthetic fashion prompt set shipped with revprompt (styles.csv shape)."""
    return Path(str(resources.files("revprompt.prompts") / "data" / "fashion-styles.csv"))


def resolve_path(path: str) -> Path:
    """`bundled` or a file path."""
    return bundled_path() if path == "bundled" else Path(path)


def prompt_file(path: str) -> Path:
    """The prompt file `path` names, checked to be a regular file: a FIFO or a device would be read twice (once
    for its hash, once for its prompts) and block, a folder cannot be read."""
    file = resolve_path(path)
    if not file.exists():
        raise PromptSourceError(f"{file}: prompt file not found (prompts.path)")
    if not file.is_file():
        raise PromptSourceError(f"{file}: cannot read prompt file: not a regular file (a folder, FIFO or device); "
                                "prompts.path must name a prompt file")
    return file


def detect_format(path: Path, fmt: str = "auto") -> str:
    """csv, jsonl or txt: as given, or by file extension."""
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    for name, suffixes in (("csv", (".csv",)), ("jsonl", (".jsonl", ".ndjson")), ("txt", (".txt",))):
        if suffix in suffixes:
            return name
    raise PromptSourceError(f"{path}: cannot tell the format from the extension {suffix!r}; "
                            "set prompts.format to csv, jsonl or txt")


def template_fields(template: str) -> list[str]:
    """Column names a str.format template refers to."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise PromptSourceError(f"prompts.template: invalid template {template!r}: {exc}") from None


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, streaming; invalid bytes stop with the line named."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise PromptSourceError(f"{path}: cannot read prompt file: {exc.strerror or exc}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptSourceError(f"{path}:{number}: invalid UTF-8 at byte {exc.start} of the line "
                                        f"({raw[max(0, exc.start - 10):exc.start + 10]!r})") from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield number, line


def _render(template: str, row: dict, where: str) -> str:
    try:
        return template.format_map(row)
    except KeyError as exc:
        raise PromptSourceError(f"{where}: prompts.template uses {exc.args[0]!r}, which this row lacks "
                                f"(has: {', '.join(sorted(row))})") from None


class CsvStats:
    """What reading a CSV had to repair."""

    def __init__(self) -> None:
        self.recovered_commas = 0


def read_csv(path: Path, template: str, id_field: str, stats: CsvStats | None = None) -> Iterator[Prompt]:
    """styles.csv-shaped rows; a row with extra fields has unquoted commas in its last column, rejoined."""
    stats = stats or CsvStats()
    lines = _decoded_lines(path)
    numbered: list[int] = [0]

    def feed() -> Iterator[str]:
        for number, line in lines:
            numbered[0] = number
            yield line

    reader = csv.reader(feed())
    try:
        header = next(reader)
    except StopIteration:
        raise PromptSourceError(f"{path}: empty file, expected a header row") from None
    header = [h.strip() for h in header]
    missing = [name for name in template_fields(template) if name not in header]
    if missing:
        raise PromptSourceError(f"{path}:1: column {missing[0]!r} used by prompts.template is missing "
                                f"(columns: {', '.join(header)})")
    width = len(header)
    for fields in reader:
        number = numbered[0]
        if not fields or all(not f.strip() for f in fields):
            yield Prompt(id="", text="", line=number)
            continue
        if len(fields) > width:
            # Kaggle's styles.csv leaves commas inside productDisplayName (the last column) unquoted:
            # the first width-1 commas are separators, the rest belong to the name.
            fields = fields[: width - 1] + [",".join(fields[width - 1:])]
            stats.recovered_commas += 1
        elif len(fields) < width:
            raise PromptSourceError(f"{path}:{number}: row has {len(fields)} fields, the header has {width}")
        row = {name: value.strip() for name, value in zip(header, fields)}
        text = clean_text(_render(template, row, f"{path}:{number}"))
        prompt_id = row.get(id_field, "") or text_id(text)
        yield Prompt(id=prompt_id, text=text, attributes=row, line=number)


def read_jsonl(path: Path, template: str, id_field: str) -> Iterator[Prompt]:
    """One JSON object a line: {"id", "prompt", ...attributes}."""
    for number, line in _decoded_lines(path):
        if not line.strip():
            yield Prompt(id="", text="", line=number)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSourceError(f"{path}:{number}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(obj, dict):
            raise PromptSourceError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        row = {k: v if isinstance(v, str) else json.dumps(v) for k, v in obj.items()}
        text = clean_text(_render(template, row, f"{path}:{number}"))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON may escape half a UTF-16 pair ("\ud800"): no text holds that
            raise PromptSourceError(f"{path}:{number}: invalid text: a lone surrogate {text[exc.start]!r} at "
                                    f"character {exc.start} (half of a UTF-16 pair)") from None
        prompt_id = str(obj.get(id_field, "") or "") or text_id(text)
        yield Prompt(id=prompt_id, text=text, attributes=row, line=number)


def read_txt(path: Path, template: str) -> Iterator[Prompt]:
    """One prompt a line; ids from the text."""
    for number, line in _decoded_lines(path):
        text = clean_text(_render(template, {"prompt": line.strip()}, f"{path}:{number}"))
        yield Prompt(id=text_id(text) if text else "", text=text, attributes={}, line=number)


def read_prompts(path: str, fmt: str = "auto", template: str = "auto", id_field: str = "id",
                 csv_stats: CsvStats | None = None) -> Iterator[Prompt]:
    """Stream every row of a prompt file (empty rows come through with empty text, for counting)."""
    file = prompt_file(path)
    fmt = detect_format(file, fmt)
    template = DEFAULT_TEMPLATES[fmt] if template == "auto" else template
    template_fields(template)
    if fmt == "csv":
        return read_csv(file, template, id_field, csv_stats)
    if fmt == "jsonl":
        return read_jsonl(file, template, id_field)
    return read_txt(file, template)

