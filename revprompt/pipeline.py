"""`revprompt pipeline`: generate -> train -> evaluate -> drift in one launch.

Every stage resumes by itself (shards, checkpoints, evaluation and drift parts), so the pipeline
only has to run them in order in one process group: a complete stage costs a check, a partial one
continues, and a requeued Slurm job or a rerun picks up where the last one stopped. Each stage
keeps its own TensorBoard folder (tb/<stage>/) and the times of the stages go to
pipeline.json next to the headline numbers.
"""

from __future__ import annotations

import json
import logging
import time

from .evaluation.drift import run_drift
from .evaluation.evaluate import run_evaluation
from .generation.job import run_generation
from .launch.layout import RunLayout, is_done
from .launch.metrics import Metrics
from .launch.runner import StageContext, build_parser, run_stage
from .shards.writer import write_json_atomic
from .training.loop import run_training

log = logging.getLogger(__name__)

STAGES = ("generate", "train", "evaluate", "drift")
BODIES = {"generate": run_generation, "train": run_training, "evaluate": run_evaluation, "drift": run_drift}


def _run(name: str, ctx: StageContext) -> str:
    """Run one stage with its own metrics unless the run layout says it is done; returns 'ran' or 'skipped'."""
    if is_done(name, ctx.layout, ctx.cfg):
        return "skipped"
    metrics = Metrics(ctx.layout.tb(name), enabled=ctx.info.is_main)
    try:
        BODIES[name](StageContext(ctx.cfg, ctx.info, metrics, ctx.args))
    finally:
        metrics.close()
    return "ran"


def headline(layout: RunLayout) -> list[str]:
    """The short table printed at the end: similarity per captioner, attributes, drift at the last iteration."""
    summary = json.loads(layout.eval_summary.read_text())
    s, a = summary["similarity"], summary["attributes"]
    names = summary.get("captioners") or ["zero_shot", "finetuned", "constant"]
    labels = {"zero_shot": "zero-shot", "finetuned": "fine-tuned", "constant": "constant", "retrieval": "retrieval",
              "embedding_head": "emb. head", "reranked": "reranked"}
    widths = [max(10, len(labels.get(n, n)) + 2) for n in names]
    lines = [f"{'':28s}" + "".join(f"{labels.get(n, n):>{w}s}" for n, w in zip(names, widths)),
             f"{'similarity to prompt (mean)':28s}" + "".join(f"{s[n]['mean']:{w}.3f}" for n, w in zip(names, widths))]
    for attr in ("gender", "baseColour", "articleType"):
        rates = [a[n][attr]["rate"] if n in a else None for n in names]
        lines.append(f"{attr + ' named':28s}" + "".join(
            f"{'n/a' if r is None else f'{r:.2f}':>{w}s}" for r, w in zip(rates, widths)))
    if layout.drift_summary.is_file():
        entries = json.loads(layout.drift_summary.read_text())["iterations"]
        if len(entries) > 1:
            sims = " -> ".join(f"{e['similarity_to_prompt']['mean']:.3f}" for e in entries[1:])
            lines.append(f"{'drift: sim. to prompt by iteration':36s} {sims}")
    lines.append(f"report: {layout.eval / 'report.md'}  drift: {layout.drift / 'report.md'}")
    return lines


def run_pipeline(ctx: StageContext) -> None:
    """The four stages in order, timed; the headline table on rank 0 at the end."""
    times = {}
    for name in STAGES:
        start = time.monotonic()
        log.info("pipeline: %s", name)
        outcome = _run(name, ctx)
        times[name] = {"seconds": round(time.monotonic() - start, 2), "outcome": outcome}
        log.info("pipeline: %s %s in %.1f s", name, outcome, times[name]["seconds"])
    if ctx.info.is_main:
        total = sum(t["seconds"] for t in times.values())
        write_json_atomic(ctx.layout.pipeline_record, {"stages": times, "seconds": round(total, 2)})
        table = headline(ctx.layout)
        shares = ", ".join(f"{n} {t['seconds']:.0f} s ({t['seconds'] / max(total, 1e-9):.0%})" for n, t in times.items())
        log.info("pipeline done in %.0f s: %s\n%s", total, shares, "\n".join(table))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt pipeline`."""
    parser = build_parser("pipeline", "Run generate, train, evaluate and drift in one launch, resuming each stage.")
    parser.add_argument("--overwrite", action="store_true", help="replace shards made under another generation config")
    return run_stage("pipeline", argv if argv is not None else [], parser, run_pipeline)
