"""`revprompt evaluate`: how close recovered prompts come to the originals, text side and image side.

Each rank takes the test shards it owns, captions them with the captioner before fine-tuning
(zero-shot) and after, scores them and the constant-caption baseline against the prompt, redraws
each image from its fine-tuned caption with the original seed and compares the images. A shard's
rows go to eval/parts/ (and its redrawn images to eval/regenerated/) when it is done, so a stopped
evaluation resumes by shard. Rank 0 gathers the rows in split order and writes results.jsonl,
summary.json, report.md, plots and TensorBoard.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..launch import dist
from ..launch.layout import evaluation_fingerprint
from ..launch.runner import StageContext, StageError, build_parser, on_main_first, run_stage
from ..models.image_embedder import embed_images
from ..models.text_embedder import embed
from ..prompts.prepared import load_at, load_range, split_size
from ..shards.reader import ReadStats
from ..shards.schema import owned
from ..shards.writer import write_json_atomic
from .attributes import ATTRIBUTES, chance_rates, grouped_mean, names_value, recovery
from .items import (Item, Painter, finetuned_captioner, read_items, read_json_lines, real_photos, restart_if_changed,
                    shard_offsets, test_shards, write_image_shard, write_json_lines, zero_shot_captioner)
from .report import write_eval_report
from .rerank import HeadAnswers, head_fits
from .retrieval import Retrieval, prepare_retrieval
from .ssim import ssim
from .stats import describe, paired_difference

log = logging.getLogger(__name__)

# every method scored against the prompt, in the order tables show them: all but `embedding_head` answer with a
# text. A method that does not apply (evaluate.retrieval = false; an export without an embedding head) is left out
METHODS = ("zero_shot", "finetuned", "constant", "retrieval", "embedding_head", "reranked")
HEAD_METHODS = ("embedding_head", "reranked")
# what each method is compared with, sample by sample
PAIRED = (("finetuned", "zero_shot"), ("finetuned", "constant"), ("finetuned", "retrieval"),
          ("embedding_head", "finetuned"), ("reranked", "finetuned"), ("reranked", "retrieval"))


def methods(cfg, layout) -> tuple[str, ...]:
    """The methods this evaluation scores."""
    head = head_fits(layout.captioner, cfg.evaluate.text_model)
    return tuple(name for name in METHODS if (name != "retrieval" or cfg.evaluate.retrieval)
                 and (name not in HEAD_METHODS or head))


def captioning(names: tuple[str, ...]) -> tuple[str, ...]:
    """The methods among `names` that write a caption."""
    return tuple(name for name in names if name != "embedding_head")


def constant_caption(prompts_dir: Path, text_model: str, at_most: int = 20000) -> str:
    """The train prompt nearest the mean of the train prompts' embeddings (the best single answer).

    Up to `at_most` train prompts, evenly spaced through the split, stand for a larger split.
    """
    n = split_size(prompts_dir, "train")
    if n == 0:
        raise StageError(f"{prompts_dir}/train.jsonl: no train prompts for the constant-caption baseline")
    chosen = (load_range(prompts_dir, "train", 0, n) if n <= at_most
              else load_at(prompts_dir, "train", sorted({i * n // at_most for i in range(at_most)})))
    prompts = sorted({p.text for p in chosen})
    vectors = embed(prompts, text_model)
    return prompts[int(np.argmax(vectors @ vectors.mean(axis=0)))]


def image_scores(items: list[Item], redrawn: list, real: dict, image_model: str, seed: int,
                 originals: np.ndarray) -> list[dict]:
    """Per item: CLIP cosine and SSIM of its redrawn image against the original and the real photo (`originals`:
    the items' image embeddings).

    An item whose redrawn image came out non-finite (None) gets no image scores."""
    drawn = [i for i, image in enumerate(redrawn) if image is not None]
    original_vecs = originals[drawn]
    redrawn_vecs = embed_images([redrawn[i] for i in drawn], image_model, seed=seed)
    with_photo = [items[i].key for i in drawn if items[i].key in real]
    photo_vecs = dict(zip(with_photo, embed_images([real[k] for k in with_photo], image_model, seed=seed)))
    scores: list[dict] = [{} for _ in items]
    for row, i in enumerate(drawn):
        it, new = items[i], redrawn[i]
        out = scores[i]
        out["clip_regen_vs_original"] = float(original_vecs[row] @ redrawn_vecs[row])
        out["ssim_regen_vs_original"] = ssim(new, it.image)
        photo = real.get(it.key)
        if photo is not None:
            out["clip_regen_vs_real"] = float(photo_vecs[it.key] @ redrawn_vecs[row])
            out["clip_original_vs_real"] = float(photo_vecs[it.key] @ original_vecs[row])
            out["ssim_regen_vs_real"] = ssim(new, photo)
    return scores


@dataclass
class Baselines:
    """The answers besides the two captioners' own: the constant caption (and its embedding), the retrieval index,
    and the fine-tuned captioner's embedding head."""

    constant: str
    constant_vec: np.ndarray
    retrieval: Retrieval | None = None
    head: HeadAnswers | None = None  # the fine-tuned captioner's embedding head, loaded with it


def score_shard(items: list[Item], names: tuple[str, ...], captioners: dict, baselines: Baselines, painter, ctx,
                real: dict) -> tuple[list[dict], list]:
    """Rows for one shard's items, scored by the methods `names` (and the redrawn images, or [] when
    evaluate.regenerate is off)."""
    e, seed = ctx.cfg.evaluate, ctx.cfg.run.seed
    images_in = [it.image for it in items]
    captions = {name: cap(images_in) for name, cap in captioners.items()}
    captions["constant"] = [baselines.constant] * len(items)
    head_vecs = None
    if baselines.head is not None:
        head_vecs = baselines.head.embeddings(images_in)
        captions["reranked"] = baselines.head.rerank(images_in, captions["finetuned"], head_vecs)
    need_vectors = baselines.retrieval is not None or painter is not None
    image_vecs = embed_images(images_in, e.image_model, seed=seed) if need_vectors and items else None
    if baselines.retrieval is not None:
        captions["retrieval"] = baselines.retrieval(image_vecs) if items else []
    prompt_vecs = embed([it.prompt for it in items], e.text_model)
    sims = {name: np.sum(prompt_vecs * embed(captions[name], e.text_model), axis=1)
            for name in captioning(names) if name != "constant"}
    sims["constant"] = prompt_vecs @ baselines.constant_vec
    if head_vecs is not None:  # the head's embedding is an answer of its own, scored by the metric directly
        sims["embedding_head"] = np.sum(prompt_vecs * head_vecs, axis=1)
    redrawn = painter(captions["finetuned"], [it.seed for it in items]) if painter is not None else []
    images = (image_scores(items, redrawn, real, e.image_model, seed, image_vecs) if painter
              else [{} for _ in items])
    rows = []
    for i, it in enumerate(items):
        rows.append({
            "order": it.order, "key": it.key, "prompt": it.prompt, "seed": it.seed,
            "attributes": {k: it.attributes.get(k) for k in ("id", *ATTRIBUTES) if it.attributes.get(k)},
            "captions": {name: captions[name][i] for name in captioning(names)},
            "similarity": {name: float(sims[name][i]) for name in names},
            "recovered": {name: {a: names_value(captions[name][i], it.attributes[a])
                                 for a in ATTRIBUTES if it.attributes.get(a)} for name in captioning(names)},
            "image": images[i],
        })
    return rows, redrawn


def summarise(rows: list[dict], ctx: StageContext, constant: str, stats: dict) -> dict:
    """summary.json from all rows in split order."""
    e, seed = ctx.cfg.evaluate, ctx.cfg.run.seed
    names = methods(ctx.cfg, ctx.layout)
    texts = captioning(names)
    sims = {name: [r["similarity"][name] for r in rows] for name in names}
    attrs = [r["attributes"] for r in rows]
    image_keys = sorted({k for r in rows for k in r["image"]})
    return {
        "samples": len(rows),
        "fingerprint": evaluation_fingerprint(ctx.layout, ctx.cfg),
        "captioner_step": ctx.layout.exported_step(),
        "constant_caption": constant,
        "captioners": list(names),
        "similarity": {name: describe(sims[name], seed=seed) for name in names},
        "gain": {"finetuned_minus_zero_shot": _mean_diff(sims["finetuned"], sims["zero_shot"]),
                 "finetuned_minus_constant": _mean_diff(sims["finetuned"], sims["constant"])},
        # the same samples scored by two captioners: paired differences, their interval and a signed-rank test
        "paired": {f"{a} - {b}": paired_difference(sims[a], sims[b], seed=seed) for a, b in PAIRED
                   if a in sims and b in sims},
        "attributes": {name: recovery([r["captions"][name] for r in rows], attrs) for name in texts},
        "attribute_chance": chance_rates(attrs),
        "by_articleType": {name: grouped_mean(sims[name], [a.get("articleType", "") for a in attrs])
                           for name in names},
        "by_gender": {name: grouped_mean(sims[name], [a.get("gender", "") for a in attrs]) for name in names},
        "image": {k: describe([r["image"][k] for r in rows if k in r["image"]], seed=seed) for k in image_keys},
        "decoding": {"max_new_tokens": e.max_new_tokens, "num_beams": e.num_beams,
                     "repetition_penalty": e.repetition_penalty, "greedy": e.num_beams == 1,
                     **({"rerank_candidates": e.num_candidates} if "reranked" in names else {})},
        "models": {"text": e.text_model, "image": e.image_model if e.regenerate else None,
                   "zero_shot": ctx.cfg.train.captioner, "finetuned": "captioner/ (run dir)",
                   "generator": ctx.cfg.generate.model,
                   "retrieval": e.image_model if e.retrieval else None,
                   "embedding_head": "captioner/embedding_head.safetensors" if "embedding_head" in names else None},
        "retrieval": retrieval_record(ctx) if e.retrieval else None,
        "read": stats,
    }


def _mean_diff(a: list[float], b: list[float]) -> float | None:
    return float(np.mean(np.asarray(a) - np.asarray(b))) if a else None


def pending_samples(shards: list[tuple[str, int]], pending: list[int], max_samples: int) -> list[int]:
    """How many samples each pending shard holds, within the split's first `max_samples` (the manifest's counts)."""
    offsets = shard_offsets(shards)
    limit = max_samples or sum(count for _, count in shards)
    return [max(0, min(shards[i][1], limit - offsets[i])) for i in pending]


def retrieval_record(ctx: StageContext) -> dict | None:
    """index.json of the retrieval index: how many train images, and exact or IVF."""
    path = ctx.layout.eval_retrieval / "index.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def evaluate_shards(ctx: StageContext, shards: list[tuple[str, int]], pending: list[int],
                    baselines: Baselines) -> None:
    """Score this rank's pending test shards, writing each one's rows, read counts and redrawn images when it is
    done."""
    cfg, info, layout = ctx.cfg, ctx.info, ctx.layout
    if not pending:
        return
    captioners = {"zero_shot": zero_shot_captioner(cfg, info.device),
                  "finetuned": finetuned_captioner(layout, cfg, info.device)}
    names = methods(cfg, layout)  # once: whether the export has a head is read from its folder
    if "embedding_head" in names:
        baselines.head = HeadAnswers(captioners["finetuned"], layout.captioner, cfg.evaluate.text_model,
                                     cfg.evaluate.num_candidates, info.device)
    painter = Painter(cfg, info.device) if cfg.evaluate.regenerate else None
    # a sample count (with an ETA) for what this rank has to do; rank 0's bar stands for the job
    bar = _bar(info, sum(pending_samples(shards, pending, cfg.evaluate.max_samples)), "evaluate")
    for index in pending:
        stats = ReadStats()
        items = read_items(shards, index, cfg.evaluate.max_samples, stats)
        rows, redrawn = score_shard(items, names, captioners, baselines, painter, ctx,
                                    real_photos(cfg.evaluate.real_images, items))
        if painter is not None and items:
            write_image_shard(layout.eval_images(index), items, [r["captions"]["finetuned"] for r in rows], redrawn,
                              {"source": "evaluate", "text": "finetuned caption"})
        write_json_atomic(layout.eval_part_reads(index), stats.as_dict())
        write_json_lines(layout.eval_part(index), rows)  # last: the shard's completion mark
        bar.update(len(items))
    bar.close()


def run_evaluation(ctx: StageContext) -> dict:
    """Evaluate this rank's test shards, gather, and report on rank 0; returns the summary."""
    cfg, info, layout = ctx.cfg, ctx.info, ctx.layout
    shards = test_shards(layout, cfg)
    if not layout.prompts_report.is_file():  # shards on a URL can be read from another run.dir; these cannot
        raise StageError(f"{layout.prompts}: no prepared prompts in this run.dir, and evaluate reads the train prompts "
                         f"(its constant-caption baseline) that `revprompt generate` prepared beside the shards at "
                         f"{layout.shards}: run it with the run.dir that generated them, or copy that prompts/ here")
    current = evaluation_fingerprint(layout, cfg)

    def setup() -> str:
        restart_if_changed(layout.eval_parts / "fingerprint.txt", current, [layout.eval_parts, layout.eval_regenerated],
                           "the evaluation settings, shards or captioner")
        return constant_caption(layout.prompts, cfg.evaluate.text_model)

    constant = on_main_first(info, setup)
    baselines = Baselines(constant, embed([constant], cfg.evaluate.text_model)[0])
    mine = owned(len(shards), info.rank, info.world_size)
    pending = [s for s in mine if not layout.eval_part(s).is_file()]
    # every rank takes part in embedding the train images, even one with no test shard pending
    if cfg.evaluate.retrieval and any(dist.all_gather_object(bool(pending))):
        baselines.retrieval = prepare_retrieval(ctx)
    log.info("evaluating %d test shards (%d on this rank, %d pending); constant caption %r", len(shards), len(mine),
             len(pending), constant)
    evaluate_shards(ctx, shards, pending, baselines)
    rows = [row for s in mine for row in read_json_lines(layout.eval_part(s))]
    reads = [_read_counts(layout.eval_part_reads(s)) for s in mine]  # every launch's, not only this one's
    gathered = dist.all_gather_object((rows, {k: sum(r.get(k, 0) for r in reads) for k in ReadStats().as_dict()}))

    def finish() -> dict:
        every = sorted((r for part, _ in gathered for r in part), key=lambda r: r["order"])
        read = {k: sum(s[k] for _, s in gathered) for k in ReadStats().as_dict()}
        summary = summarise(every, ctx, constant, read)
        write_json_lines(layout.eval / "results.jsonl", [{k: v for k, v in r.items() if k != "order"} for r in every])
        write_eval_report(every, summary, ctx, shards)
        write_json_atomic(layout.eval_summary, summary)
        _log_tb(ctx, every, summary)
        return summary

    summary = on_main_first(info, finish)
    s = summary["similarity"]
    log.info("evaluated %d samples: similarity %s; report %s", summary["samples"],
             ", ".join(f"{name} {s[name]['mean'] or 0:.3f}" for name in summary["captioners"]), layout.eval / "report.md")
    return summary


def _read_counts(path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a part from before the counts were kept
        return {}


def _bar(info, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not info.is_main, dynamic_ncols=True)


def _log_tb(ctx: StageContext, rows: list[dict], summary: dict) -> None:
    step = summary["captioner_step"] or 0
    m = ctx.metrics
    names = summary["captioners"]
    scalars = {f"eval/similarity/{name}": summary["similarity"][name]["mean"] for name in names
               if summary["similarity"][name]["mean"] is not None}
    for name in summary["attributes"]:
        for attr, rec in summary["attributes"][name].items():
            if rec["rate"] is not None:
                scalars[f"eval/attributes/{attr}/{name}"] = rec["rate"]
    for key, desc in summary["image"].items():
        if desc["mean"] is not None:
            scalars[f"eval/image/{key}"] = desc["mean"]
    m.log(scalars, step)
    for name in names:
        m.log_histogram(f"eval/similarity_hist/{name}", np.array([r["similarity"][name] for r in rows]), step)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt evaluate`."""
    parser = build_parser("evaluate", "Score recovered prompts on the test split: text, attributes and images.")
    return run_stage("evaluate", argv if argv is not None else [], parser, run_evaluation)
