"""The reference preset's models with real architectures and random weights, laid out as `revprompt download` leaves
them: DIR/{owner}--{name}/ with the download marker. Built once per test session (about a minute, 3 GB)."""

from __future__ import annotations

from pathlib import Path

from revprompt.models.download import folder_name, mark_complete
from revprompt.models.reference import REFERENCE, build_reference


def build_reference_dir(out: Path) -> Path:
    """Every reference model under `out`, each marked complete as a finished download marks it."""
    for hub_id in REFERENCE:
        folder = build_reference(hub_id, out / folder_name(hub_id))
        mark_complete(folder, hub_id, sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
    return out
