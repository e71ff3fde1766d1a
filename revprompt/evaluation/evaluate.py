"""`revprompt evaluate`: how close recovered prompts come to the originals, text side and image side.

Each rank takes the test shards s % world, captions them with the captioner before fine-tuning
(zero-shot) and after, scores them and the constant-caption baseline against the prompt, redraws
each image from its fine-tuned caption with the original seed and compares the images. A shard's
rows go to eval/parts/ (and its redrawn images to eval/regenerated/) when it is done, so a stopped
evaluation resumes by shard. Rank 0 gathers the rows in split order and writes results.jsonl,
summary.json, report.md, plots and TensorBoard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..launch import dist
from ..launch.runner import StageContext, StageError, build_parser, on_main_first, run_stage
from ..shards.manifest import read_manifest
from ..training.export import read_export_info
from ..shards.reader import ReadStats
from ..shards.writer import write_json_atomic
from .attributes import ATTRIBUTES, chance_rates, grouped_mean, names_value, recovery
from .images import embed_images, ssim
from .items import (Captioner, Item, Painter, fingerprint, image_shard_path, owned, read_items, restart_if_changed,
                    test_shards_for, write_image_shard)
from .similarity import embed
from .stats import describe

log = logging.getLogger(__name__)

CAPTIONERS = ("zero_shot", "finetuned", "constant")


def eval_fingerprint(ctx: StageContext) -> str:
    """What the evaluation depends on: the shards, the fine-tuned captioner, and the settings that score."""
    cfg = ctx.cfg
    manifest = read_manifest(ctx.run_dir / "shards") or {}
    export = ctx.run_dir / "captioner" / "revprompt.json"
    e = cfg.to_dict()["evaluate"]
    e.pop("examples")
    return fingerprint({"shards": manifest.get("fingerprint"), "evaluate": e, "seed": cfg.run.seed,
                        "zero_shot": cfg.train.captioner, "generate": cfg.to_dict()["generate"],
                        "captioner": read_export_info(export.parent)})


def is_evaluated(ctx: StageContext) -> bool:
    """True when eval/summary.json exists for the current shards, captioner and settings."""
    path = ctx.run_dir / "eval" / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("fingerprint") == eval_fingerprint(ctx)


def constant_caption(run_dir: Path, text_model: str, at_most: int = 20000) -> str:
    """The train prompt nearest the mean of the train prompts' embeddings (the best single answer).

    Up to `at_most` train prompts, evenly spaced through the split, stand for a larger split.
    """
    from ..generation.prepare import load_at, load_range, split_size

    n = split_size(run_dir, "train")
    if n == 0:
        raise StageError(f"{run_dir}/prompts/train.jsonl: no train prompts for the constant-caption baseline")
    chosen = (load_range(run_dir, "train", 0, n) if n <= at_most
              else load_at(run_dir, "train", sorted({i * n // at_most for i in range(at_most)})))
    prompts = sorted({p.text for p in chosen})
    vectors = embed(prompts, text_model)
    return prompts[int(np.argmax(vectors @ vectors.mean(axis=0)))]


def score_shard(items: list[Item], captioners: dict, constant: str, constant_vec: np.ndarray, painter, ctx,
                real: dict) -> tuple[list[dict], list]:
    """Rows for one shard's items (and the redrawn images, or [] when evaluate.regenerate is off)."""
    e = ctx.cfg.evaluate
    images = [it.image for it in items]
    prompts = [it.prompt for it in items]
    captions = {name: cap(images) for name, cap in captioners.items()}
    captions["constant"] = [constant] * len(items)
    prompt_vecs = embed(prompts, e.text_model)
    sims = {name: np.sum(prompt_vecs * embed(captions[name], e.text_model), axis=1)
            for name in ("zero_shot", "finetuned")}
    sims["constant"] = prompt_vecs @ constant_vec
    image_scores: list[dict] = [{} for _ in items]
    redrawn: list = []
    if painter is not None:
        redrawn = painter(captions["finetuned"], [it.seed for it in items])
        original_vecs = embed_images(images, e.image_model, seed=ctx.cfg.run.seed)
        redrawn_vecs = embed_images(redrawn, e.image_model, seed=ctx.cfg.run.seed)
        with_photo = [it.key for it in items if it.key in real]
        photo_vecs = dict(zip(with_photo, embed_images([real[k] for k in with_photo], e.image_model,
                                                       seed=ctx.cfg.run.seed)))
        for i, (it, new) in enumerate(zip(items, redrawn)):
            scores = image_scores[i]
            scores["clip_regen_vs_original"] = float(original_vecs[i] @ redrawn_vecs[i])
            scores["ssim_regen_vs_original"] = ssim(new, it.image)
            photo = real.get(it.key)
            if photo is not None:
                photo_vec = photo_vecs[it.key]
                scores["clip_regen_vs_real"] = float(photo_vec @ redrawn_vecs[i])
                scores["clip_original_vs_real"] = float(photo_vec @ original_vecs[i])
                scores["ssim_regen_vs_real"] = ssim(new, photo)
    rows = []
    for i, it in enumerate(items):
        rows.append({
            "order": it.order, "key": it.key, "prompt": it.prompt, "seed": it.seed,
            "attributes": {k: it.attributes.get(k) for k in ("id", *ATTRIBUTES) if it.attributes.get(k)},
            "captions": {name: captions[name][i] for name in CAPTIONERS},
            "similarity": {name: float(sims[name][i]) for name in CAPTIONERS},
            "recovered": {name: {a: names_value(captions[name][i], it.attributes[a])
                                 for a in ATTRIBUTES if it.attributes.get(a)} for name in CAPTIONERS},
            "image": image_scores[i],
        })
    return rows, redrawn


def real_photos(folder: str, items: list[Item]) -> dict:
    """key -> real product photo for the items that have one: {prompt id}.jpg in `folder`, or, for
    `renders`, the product render of the item's source row (the tiny preset's stand-in for photos)."""
    from PIL import Image

    if not folder:
        return {}
    if folder == "renders":
        from ..miniature.render import render

        return {it.key: render(dict(it.attributes, productDisplayName=it.prompt)) for it in items
                if it.attributes.get("articleType")}
    out = {}
    for it in items:
        photo_id = str(it.attributes.get("id", ""))
        path = Path(folder) / f"{photo_id}.jpg"
        if photo_id and "/" not in photo_id and path.is_file():
            try:
                with Image.open(path) as img:
                    out[it.key] = img.convert("RGB")
            except OSError as exc:
                log.warning("unreadable real photo %s: %s", path, exc)
    return out


def summarise(rows: list[dict], ctx: StageContext, constant: str, stats: dict) -> dict:
    """summary.json from all rows in split order."""
    e, seed = ctx.cfg.evaluate, ctx.cfg.run.seed
    sims = {name: [r["similarity"][name] for r in rows] for name in CAPTIONERS}
    attrs = [r["attributes"] for r in rows]
    image_keys = sorted({k for r in rows for k in r["image"]})
    export = ctx.run_dir / "captioner" / "revprompt.json"
    return {
        "samples": len(rows),
        "fingerprint": eval_fingerprint(ctx),
        "captioner_step": json.loads(export.read_text()).get("step") if export.is_file() else None,
        "constant_caption": constant,
        "similarity": {name: describe(sims[name], seed=seed) for name in CAPTIONERS},
        "gain": {"finetuned_minus_zero_shot": _mean_diff(sims["finetuned"], sims["zero_shot"]),
                 "finetuned_minus_constant": _mean_diff(sims["finetuned"], sims["constant"])},
        "attributes": {name: recovery([r["captions"][name] for r in rows], attrs) for name in CAPTIONERS},
        "attribute_chance": chance_rates(attrs),
        "by_articleType": {name: grouped_mean(sims[name], [a.get("articleType", "") for a in attrs])
                           for name in CAPTIONERS},
        "by_gender": {name: grouped_mean(sims[name], [a.get("gender", "") for a in attrs]) for name in CAPTIONERS},
        "image": {k: describe([r["image"][k] for r in rows if k in r["image"]], seed=seed) for k in image_keys},
        "decoding": {"max_new_tokens": e.max_new_tokens, "num_beams": e.num_beams,
                     "repetition_penalty": e.repetition_penalty, "greedy": e.num_beams == 1},
        "models": {"text": e.text_model, "image": e.image_model if e.regenerate else None,
                   "zero_shot": ctx.cfg.train.captioner, "finetuned": "captioner/ (run dir)",
                   "generator": ctx.cfg.generate.model},
        "read": stats,
    }


def _mean_diff(a: list[float], b: list[float]) -> float | None:
    return float(np.mean(np.asarray(a) - np.asarray(b))) if a else None


def run_evaluation(ctx: StageContext) -> dict:
    """Evaluate this rank's test shards, gather, and report on rank 0; returns the summary."""
    cfg, info = ctx.cfg, ctx.info
    out = ctx.run_dir / "eval"
    parts, regen_root = out / "parts", out / "regenerated"
    shards = test_shards_for(ctx.run_dir)
    current = eval_fingerprint(ctx)

    def setup() -> str:
        restart_if_changed(parts / "fingerprint.txt", current, [parts, regen_root],
                           "the evaluation settings, shards or captioner")
        return constant_caption(ctx.run_dir, cfg.evaluate.text_model)

    constant = on_main_first(info, setup)
    constant_vec = embed([constant], cfg.evaluate.text_model)[0]
    mine = owned(len(shards), info.rank, info.world_size)
    pending = [s for s in mine if not (parts / f"{s:06d}.jsonl").is_file()]
    log.info("evaluating %d test shards (%d on this rank, %d pending); constant caption %r", len(shards), len(mine),
             len(pending), constant)
    stats = ReadStats()
    if pending:
        captioners = {"zero_shot": Captioner.zero_shot(cfg, info.device),
                      "finetuned": Captioner.finetuned(ctx.run_dir, cfg, info.device)}
        painter = Painter(cfg, info.device) if cfg.evaluate.regenerate else None
        bar = _bar(info, len(pending), "evaluate")
        for index in pending:
            items = read_items(shards, index, cfg.evaluate.max_samples, stats)
            rows, redrawn = score_shard(items, captioners, constant, constant_vec, painter, ctx,
                                        real_photos(cfg.evaluate.real_images, items))
            if painter is not None and items:
                write_image_shard(image_shard_path(regen_root, index), items, [r["captions"]["finetuned"]
                                                                               for r in rows], redrawn,
                                  {"source": "evaluate", "text": "finetuned caption"})
            write_json_lines(parts / f"{index:06d}.jsonl", rows)
            bar.update(1)
        bar.close()
    rows = [row for s in mine for row in read_json_lines(parts / f"{s:06d}.jsonl")]
    gathered = dist.all_gather_object((rows, stats.as_dict()))

    def finish() -> dict:
        from .report import write_eval_report

        every = sorted((r for part, _ in gathered for r in part), key=lambda r: r["order"])
        read = {k: sum(s[k] for _, s in gathered) for k in stats.as_dict()}
        summary = summarise(every, ctx, constant, read)
        write_json_lines(out / "results.jsonl", [{k: v for k, v in r.items() if k != "order"} for r in every])
        write_eval_report(every, summary, ctx, shards, regen_root)
        write_json_atomic(out / "summary.json", summary)
        _log_tb(ctx, every, summary)
        return summary

    summary = on_main_first(info, finish)
    s = summary["similarity"]
    log.info("evaluated %d samples: similarity zero-shot %.3f, fine-tuned %.3f, constant %.3f; report %s",
             summary["samples"], s["zero_shot"]["mean"] or 0, s["finetuned"]["mean"] or 0,
             s["constant"]["mean"] or 0, out / "report.md")
    return summary


def _bar(info, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc=desc, disable=not info.is_main, dynamic_ncols=True)


def write_json_lines(path: Path, rows: list[dict]) -> None:
    """Rows as JSON lines, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def read_json_lines(path: Path) -> list[dict]:
    """The rows of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _log_tb(ctx: StageContext, rows: list[dict], summary: dict) -> None:
    step = summary["captioner_step"] or 0
    m = ctx.metrics
    scalars = {f"eval/similarity/{name}": summary["similarity"][name]["mean"] for name in CAPTIONERS
               if summary["similarity"][name]["mean"] is not None}
    for name in CAPTIONERS:
        for attr, rec in summary["attributes"][name].items():
            if rec["rate"] is not None:
                scalars[f"eval/attributes/{attr}/{name}"] = rec["rate"]
    for key, desc in summary["image"].items():
        if desc["mean"] is not None:
            scalars[f"eval/image/{key}"] = desc["mean"]
    m.log(scalars, step)
    for name in CAPTIONERS:
        m.log_histogram(f"eval/similarity_hist/{name}", np.array([r["similarity"][name] for r in rows]), step)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt evaluate`."""
    parser = build_parser("evaluate", "Score recovered prompts on the test split: text, attributes and images.")
    return run_stage("evaluate", argv if argv is not None else [], parser, run_evaluation)

