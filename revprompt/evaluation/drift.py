"""`revprompt drift`: prompt -> image -> caption -> image ... for K iterations, and how far meaning drifts.

Iteration 0 is the test split itself (its prompts and images). Iteration k captions the images of
iteration k-1 with the fine-tuned captioner and redraws them from those captions with each
sample's original seed, into drift/iter_{k:02d}/{shard:06d}.tar, then writes that shard's
scores next to it ({shard:06d}.jsonl, the completion mark). Images are always read back from the
shards, never kept in memory, so a stopped run resumes at the iteration and shard where it stopped
and ends with the same bytes as one that never stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..launch import dist
from ..launch.runner import StageContext, build_parser, on_main_first, run_stage
from ..shards.manifest import read_manifest
from ..training.export import read_export_info
from ..shards.reader import ReadStats
from ..shards.writer import write_json_atomic
from .attributes import ATTRIBUTES, names_value
from .evaluate import read_json_lines, write_json_lines
from .images import embed_images, ssim
from .items import (Captioner, Item, Painter, fingerprint, image_shard_path, owned, read_images, read_items,
                    restart_if_changed, test_shards_for, write_image_shard)
from .similarity import embed
from .stats import describe, distinct_ngrams, mean_pairwise_similarity

log = logging.getLogger(__name__)


def drift_fingerprint(ctx: StageContext) -> str:
    """What every iteration depends on (not the number of iterations: more iterations continue a run)."""
    cfg = ctx.cfg.to_dict()
    manifest = read_manifest(ctx.run_dir / "shards") or {}
    export = ctx.run_dir / "captioner" / "revprompt.json"
    e = {k: cfg["evaluate"][k] for k in ("text_model", "image_model", "max_new_tokens", "num_beams",
                                          "repetition_penalty", "batch_size")}
    return fingerprint({"shards": manifest.get("fingerprint"), "generate": cfg["generate"], "evaluate": e,
                        "seed": cfg["run"]["seed"], "max_samples": cfg["drift"]["max_samples"],
                        "captioner": read_export_info(export.parent)})


def iteration_dir(run_dir: Path, k: int) -> Path:
    """drift/iter_{k:02d}/."""
    return run_dir / "drift" / f"iter_{k:02d}"


def is_drifted(ctx: StageContext) -> bool:
    """True when drift/summary.json covers drift.iterations for the current shards and captioner."""
    path = ctx.run_dir / "drift" / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    return (summary.get("fingerprint") == drift_fingerprint(ctx)
            and len(summary.get("iterations", [])) == ctx.cfg.drift.iterations + 1)


def drift_shard(k: int, items: list[Item], previous: dict[str, str], images_prev: dict, images_0: dict,
                original_vecs: np.ndarray, captioner, painter, ctx) -> tuple[list[dict], list]:
    """Iteration k of one shard: caption the previous images, redraw, score; rows and the new images.

    `original_vecs` are the image embeddings of `images_0`, in item order (the same at every iteration).
    """
    e, seed = ctx.cfg.evaluate, ctx.cfg.run.seed
    captions = captioner([images_prev[it.key] for it in items])
    images = painter(captions, [it.seed for it in items])
    prompt_vecs, caption_vecs = embed([it.prompt for it in items], e.text_model), embed(captions, e.text_model)
    previous_vecs = embed([previous[it.key] for it in items], e.text_model)
    new_vecs = embed_images(images, e.image_model, seed=seed)
    rows = []
    for i, it in enumerate(items):
        rows.append({
            "order": it.order, "key": it.key, "iteration": k, "caption": captions[i],
            "similarity_to_prompt": float(prompt_vecs[i] @ caption_vecs[i]),
            "similarity_to_previous": float(previous_vecs[i] @ caption_vecs[i]),
            "image_similarity_to_original": float(original_vecs[i] @ new_vecs[i]),
            "ssim_to_original": ssim(images[i], images_0[it.key]),
            "retained": {a: names_value(captions[i], it.attributes[a]) for a in ATTRIBUTES if it.attributes.get(a)},
            "length": len(captions[i].split()),
        })
    return rows, images


def summarise_iteration(k: int, rows: list[dict], texts: list[str], text_model: str, seed: int) -> dict:
    """One entry of drift/summary.json."""
    vectors = embed(texts, text_model) if texts else np.zeros((0, 1), np.float32)
    entry = {"iteration": k, "samples": len(texts),
             "caption_length": float(np.mean([len(t.split()) for t in texts])) if texts else None,
             "distinct_1": distinct_ngrams(texts, 1), "distinct_2": distinct_ngrams(texts, 2),
             "mean_pairwise_similarity": mean_pairwise_similarity(vectors) if len(texts) > 1 else None}
    if k == 0:
        return entry
    for key in ("similarity_to_prompt", "similarity_to_previous", "image_similarity_to_original", "ssim_to_original"):
        entry[key] = describe([r[key] for r in rows], seed=seed)
    entry["attribute_retention"] = {}
    for a in ATTRIBUTES:
        flags = [r["retained"][a] for r in rows if a in r["retained"]]
        entry["attribute_retention"][a] = sum(flags) / len(flags) if flags else None
    return entry


def run_drift(ctx: StageContext) -> dict:
    """Run the iterations for this rank's test shards, then summarise and report on rank 0."""
    cfg, info = ctx.cfg, ctx.info
    K = cfg.drift.iterations
    root = ctx.run_dir / "drift"
    shards = test_shards_for(ctx.run_dir)
    current = drift_fingerprint(ctx)

    def setup() -> None:
        iterations = sorted(p for p in root.glob("iter_[0-9]*") if p.is_dir())
        restart_if_changed(root / "fingerprint.txt", current, [root, *iterations],
                           "the shards, captioner or drift settings")

    on_main_first(info, setup)
    mine = owned(len(shards), info.rank, info.world_size)
    stats = ReadStats()
    # what each sample was made from, without its image: the images are decoded again, one shard at a
    # time, when that shard's turn comes, so memory holds one shard's images whatever the split's size
    items = {s: [replace(it, image=None) for it in read_items(shards, s, cfg.drift.max_samples, stats)]
             for s in mine}
    todo = [(k, s) for k in range(1, K + 1) for s in mine
            if not (iteration_dir(ctx.run_dir, k) / f"{s:06d}.jsonl").is_file()]
    log.info("drift: %d iterations over %d test shards; this rank has %d of %d (iteration, shard) steps left", K,
             len(shards), len(todo), K * len(mine))
    if todo:
        from tqdm import tqdm

        captioner, painter = Captioner.finetuned(ctx.run_dir, cfg, info.device), Painter(cfg, info.device)
        bar = tqdm(total=len(todo), unit="shard", desc="drift", disable=not info.is_main, dynamic_ncols=True)
        original_vecs: dict[int, np.ndarray] = {}  # per shard, embedded at its first pending iteration
        for k, s in todo:
            its = read_items(shards, s, cfg.drift.max_samples, ReadStats()) if items[s] else []
            if its:
                images_0 = {it.key: it.image for it in its}
                if k == 1:
                    images_prev, previous = images_0, {it.key: it.prompt for it in its}
                else:
                    before = iteration_dir(ctx.run_dir, k - 1)
                    images_prev = read_images(image_shard_path(before, s))
                    previous = {r["key"]: r["caption"] for r in read_json_lines(before / f"{s:06d}.jsonl")}
                if s not in original_vecs:
                    original_vecs[s] = embed_images([it.image for it in its], cfg.evaluate.image_model,
                                                    seed=cfg.run.seed)
                rows, images = drift_shard(k, its, previous, images_prev, images_0, original_vecs[s], captioner,
                                           painter, ctx)
                write_image_shard(image_shard_path(iteration_dir(ctx.run_dir, k), s), its,
                                  [r["caption"] for r in rows], images, {"source": "drift", "drift_iteration": k})
            else:
                rows = []
            write_json_lines(iteration_dir(ctx.run_dir, k) / f"{s:06d}.jsonl", rows)
            bar.update(1)
        bar.close()
    mine_rows = {k: [r for s in mine for r in read_json_lines(iteration_dir(ctx.run_dir, k) / f"{s:06d}.jsonl")]
                 for k in range(1, K + 1)}
    prompts = [(it.order, it.key, it.prompt, it.attributes) for s in mine for it in items[s]]
    gathered = dist.all_gather_object((mine_rows, prompts))

    def finish() -> dict:
        from .report import write_drift_report

        originals = sorted((p for _, part in gathered for p in part), key=lambda p: p[0])
        per_iter = {k: sorted((r for rows, _ in gathered for r in rows[k]), key=lambda r: r["order"])
                    for k in range(1, K + 1)}
        entries = [summarise_iteration(0, [], [p[2] for p in originals], cfg.evaluate.text_model, cfg.run.seed)]
        entries += [summarise_iteration(k, per_iter[k], [r["caption"] for r in per_iter[k]], cfg.evaluate.text_model,
                                        cfg.run.seed) for k in range(1, K + 1)]
        summary = {"fingerprint": current, "samples": len(originals), "iterations": entries,
                   "models": {"captioner": "captioner/ (run dir)", "generator": cfg.generate.model,
                              "text": cfg.evaluate.text_model, "image": cfg.evaluate.image_model}}
        write_json_lines(root / "results.jsonl", [
            {"key": key, "prompt": prompt, "captions": [per_iter[k][i]["caption"] for k in range(1, K + 1)],
             "similarity_to_prompt": [per_iter[k][i]["similarity_to_prompt"] for k in range(1, K + 1)]}
            for i, (_, key, prompt, _) in enumerate(originals)])
        write_drift_report(summary, originals, per_iter, ctx, shards)
        write_json_atomic(root / "summary.json", summary)
        for entry in entries:
            scalars = {f"drift/{name}": entry[name] for name in ("caption_length", "distinct_1", "distinct_2",
                                                                  "mean_pairwise_similarity") if entry[name] is not None}
            for name in ("similarity_to_prompt", "similarity_to_previous", "image_similarity_to_original",
                         "ssim_to_original"):
                if name in entry and entry[name]["mean"] is not None:
                    scalars[f"drift/{name}"] = entry[name]["mean"]
            for a, rate in entry.get("attribute_retention", {}).items():
                if rate is not None:
                    scalars[f"drift/attribute_retention/{a}"] = rate
            ctx.metrics.log(scalars, entry["iteration"])
        return summary

    summary = on_main_first(info, finish)
    last = summary["iterations"][-1]
    log.info("drift: %d samples, %d iterations; similarity to the prompt at the last iteration %s; report %s",
             summary["samples"], K, f"{last['similarity_to_prompt']['mean']:.3f}" if K else "n/a",
             root / "report.md")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt drift`."""
    parser = build_parser("drift", "Iterate prompt -> image -> caption -> image and measure how meaning drifts.")
    return run_stage("drift", argv if argv is not None else [], parser, run_drift)
