"""`revprompt drift`: prompt -> image -> caption -> image ... for K iterations, and how far meaning drifts.

Iteration 0 is the test split itself (its prompts and images). Iteration k captions the images of
iteration k-1 with the fine-tuned captioner and redraws them from those captions with each
sample's original seed, into drift/iter_{k:02d}/{shard:06d}.tar, then writes that shard's scores
next to it ({shard:06d}.jsonl, the completion mark). A rank works shard by shard: it decodes a
shard's test images once, then runs that shard's pending iterations, reading each iteration's
images back from the shard the previous one wrote. A stopped run resumes at the shard and iteration
where it stopped and ends with the same bytes as one that never stopped.

A redrawn image that comes out non-finite ends that sample's chain: it has no image scores at that
iteration and takes no part in later ones (see models.text_to_image).
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from ..launch import dist
from ..launch.layout import drift_fingerprint
from ..launch.runner import StageContext, build_parser, on_main_first, run_stage
from ..models.image_embedder import embed_images
from ..models.text_embedder import embed
from ..shards.reader import ReadStats
from ..shards.schema import owned
from ..shards.writer import write_json_atomic
from .attributes import ATTRIBUTES, names_value
from .items import (Item, Painter, finetuned_captioner, read_images, read_items, read_json_lines, real_photos,
                    restart_if_changed, test_shards, write_features, write_image_shard, write_json_lines)
from .population import caption_clusters, population_entry
from .report import write_drift_report
from .ssim import ssim
from .stats import describe, distinct_ngrams, mean_pairwise_similarity

log = logging.getLogger(__name__)

SCORES = ("similarity_to_prompt", "similarity_to_previous", "image_similarity_to_original", "ssim_to_original")


def drift_shard(k: int, items: list[Item], previous: dict[str, str], images_prev: dict, images_0: dict,
                original_vecs: dict[str, np.ndarray], captioner, painter, ctx) -> tuple[list[dict], list, np.ndarray]:
    """Iteration k of one shard's `items`: caption the previous images, redraw, score; rows, the new images and the
    image embeddings of those drawn (in order).

    `original_vecs` are the image embeddings of `images_0` by key (the same at every iteration).
    """
    e, seed = ctx.cfg.evaluate, ctx.cfg.run.seed
    captions = captioner([images_prev[it.key] for it in items])
    images = painter(captions, [it.seed for it in items])
    prompt_vecs, caption_vecs = embed([it.prompt for it in items], e.text_model), embed(captions, e.text_model)
    previous_vecs = embed([previous[it.key] for it in items], e.text_model)
    drawn = [i for i, image in enumerate(images) if image is not None]
    new_vecs = dict(zip(drawn, embed_images([images[i] for i in drawn], e.image_model, seed=seed)))
    rows = []
    for i, it in enumerate(items):
        ok = images[i] is not None
        rows.append({
            "order": it.order, "key": it.key, "iteration": k, "caption": captions[i],
            "similarity_to_prompt": float(prompt_vecs[i] @ caption_vecs[i]),
            "similarity_to_previous": float(previous_vecs[i] @ caption_vecs[i]),
            "image_similarity_to_original": float(original_vecs[it.key] @ new_vecs[i]) if ok else None,
            "ssim_to_original": ssim(images[i], images_0[it.key]) if ok else None,
            "retained": {a: names_value(captions[i], it.attributes[a]) for a in ATTRIBUTES if it.attributes.get(a)},
            "length": len(captions[i].split()),
        })
    return rows, images, np.stack([new_vecs[i] for i in drawn]) if drawn else np.zeros((0, 0), np.float32)


def iterate_shard(ctx: StageContext, shards: list[tuple[str, int]], s: int, iterations: list[int], captioner,
                  painter) -> Iterator[int]:
    """Run the pending `iterations` of test shard `s`, decoding its test images once; yields each iteration's
    sample count."""
    cfg, layout = ctx.cfg, ctx.layout
    items = read_items(shards, s, cfg.drift.max_samples, ReadStats())
    images_0 = {it.key: it.image for it in items}
    original_vecs = dict(zip(images_0, embed_images(list(images_0.values()), cfg.evaluate.image_model,
                                                    seed=cfg.run.seed))) if items else {}
    if items and not layout.drift_features(0, s).is_file():  # iteration 0's population, for the drift measures
        write_features(layout.drift_features(0, s), np.stack([original_vecs[it.key] for it in items]))
    if items and cfg.evaluate.real_images and not layout.drift_real_features(s).is_file():  # the real photos' too
        photos = real_photos(cfg.evaluate.real_images, items)
        keys = [it.key for it in items if it.key in photos]
        write_features(layout.drift_real_features(s), embed_images([photos[k] for k in keys], cfg.evaluate.image_model,
                                                                   seed=cfg.run.seed) if keys else np.zeros((0, 0)))
    for k in iterations:
        if k == 1:
            images_prev, previous = images_0, {it.key: it.prompt for it in items}
        else:
            images_prev = read_images(layout.drift_images(k - 1, s))
            previous = {r["key"]: r["caption"] for r in read_json_lines(layout.drift_part(k - 1, s))}
        alive = [it for it in items if it.key in images_prev]  # a chain ends at a non-finite image
        rows: list[dict] = []
        if alive:
            rows, images, features = drift_shard(k, alive, previous, images_prev, images_0, original_vecs, captioner,
                                                 painter, ctx)
            write_image_shard(layout.drift_images(k, s), alive, [r["caption"] for r in rows], images,
                              {"source": "drift", "drift_iteration": k})
            write_features(layout.drift_features(k, s), features)
        write_json_lines(layout.drift_part(k, s), rows)
        yield len(alive)


def run_iterations(ctx: StageContext, shards: list[tuple[str, int]], todo: dict[int, list[int]], total: int) -> None:
    """This rank's pending (shard, iterations), with a progress bar over samples."""
    from tqdm import tqdm

    cfg, info = ctx.cfg, ctx.info
    captioner, painter = finetuned_captioner(ctx.layout, cfg, info.device), Painter(cfg, info.device)
    bar = tqdm(total=total, unit="img", desc="drift", disable=not info.is_main, dynamic_ncols=True)
    for s, iterations in todo.items():
        for done in iterate_shard(ctx, shards, s, iterations, captioner, painter):
            bar.update(done)
    bar.close()


def summarise_iteration(k: int, rows: list[dict], texts: list[str], text_model: str, seed: int) -> dict:
    """One entry of drift/summary.json."""
    vectors = embed(texts, text_model) if texts else np.zeros((0, 1), np.float32)
    entry = {"iteration": k, "samples": len(texts),
             "caption_length": float(np.mean([len(t.split()) for t in texts])) if texts else None,
             "distinct_1": distinct_ngrams(texts, 1), "distinct_2": distinct_ngrams(texts, 2),
             "mean_pairwise_similarity": mean_pairwise_similarity(vectors) if len(texts) > 1 else None,
             "caption_clusters": caption_clusters(vectors) if texts else 0}
    if k == 0:
        return entry
    for key in SCORES:
        entry[key] = describe([r[key] for r in rows if r[key] is not None], seed=seed)
    entry["attribute_retention"] = {}
    for a in ATTRIBUTES:
        flags = [r["retained"][a] for r in rows if a in r["retained"]]
        entry["attribute_retention"][a] = sum(flags) / len(flags) if flags else None
    return entry


def summarise_drift(ctx: StageContext, gathered: list, K: int, shards: list[tuple[str, int]]) -> dict:
    """On rank 0: summary.json, results.jsonl, the report and TensorBoard from every rank's rows."""
    cfg, layout = ctx.cfg, ctx.layout
    originals = sorted((p for _, part in gathered for p in part), key=lambda p: p[0])
    per_iter = {k: sorted((r for rows, _ in gathered for r in rows[k]), key=lambda r: r["order"])
                for k in range(1, K + 1)}
    entries = [summarise_iteration(0, [], [p[2] for p in originals], cfg.evaluate.text_model, cfg.run.seed)]
    entries += [summarise_iteration(k, per_iter[k], [r["caption"] for r in per_iter[k]], cfg.evaluate.text_model,
                                    cfg.run.seed) for k in range(1, K + 1)]
    add_population(entries, layout, len(shards), cfg.evaluate.real_images)
    summary = {"fingerprint": drift_fingerprint(layout, cfg), "samples": len(originals), "iterations": entries,
               "models": {"captioner": "captioner/ (run dir)", "generator": cfg.generate.model,
                          "text": cfg.evaluate.text_model, "image": cfg.evaluate.image_model}}
    by_key = {k: {r["key"]: r for r in per_iter[k]} for k in range(1, K + 1)}
    write_json_lines(layout.drift / "results.jsonl", [
        {"key": key, "prompt": prompt,
         "captions": [by_key[k][key]["caption"] for k in range(1, K + 1) if key in by_key[k]],
         "similarity_to_prompt": [by_key[k][key]["similarity_to_prompt"] for k in range(1, K + 1) if key in by_key[k]]}
        for _, key, prompt, _ in originals])
    write_drift_report(summary, originals, per_iter, ctx, shards)
    write_json_atomic(layout.drift_summary, summary)
    _log_tb(ctx, entries)
    return summary


def read_features(layout, k: int | None, n_shards: int) -> np.ndarray | None:
    """Iteration k's image embeddings over every test shard, in shard order (k = None: the real photos'); None where
    a shard's are missing (an iteration run before revprompt kept them)."""
    parts = []
    for s in range(n_shards):
        path = layout.drift_features(k, s) if k is not None else layout.drift_real_features(s)
        if k is None and not path.is_file():
            return None
        if path.is_file():
            parts.append(np.load(path, allow_pickle=False))
        elif layout.drift_part(max(k, 1), s).is_file() and read_json_lines(layout.drift_part(max(k, 1), s)):
            return None  # the shard has samples at this iteration, but not their embeddings
    parts = [p for p in parts if p.size]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, 1))


def add_population(entries: list[dict], layout, n_shards: int, real_images: str = "") -> None:
    """Each later iteration's image population against iteration 0's: Fréchet distance, CMMD, k-NN precision and
    recall (see population.py); None where the embeddings are missing. With real photos (`real_images`), every
    iteration's, iteration 0 included, against the photos' too (`population_vs_real`: precision, the share of
    images that look like some real photo; recall, the share of photos still covered)."""
    original = read_features(layout, 0, n_shards)
    real = read_features(layout, None, n_shards) if real_images else None
    for entry in entries:
        drawn = original if entry["iteration"] == 0 else read_features(layout, entry["iteration"], n_shards)
        if entry["iteration"] and (original is None or drawn is None):
            log.warning("drift iteration %d: image embeddings missing (an earlier revprompt drew it): no population "
                        "measures; `revprompt drift` after removing drift/ computes them", entry["iteration"])
            entry["population"] = None
        elif entry["iteration"]:
            entry["population"] = population_entry(original, drawn)
        if real is not None and len(real) and drawn is not None:  # iteration 0: the test images against the photos
            entry["population_vs_real"] = population_entry(real, drawn)


POPULATION = ("frechet_distance", "cmmd", "precision", "recall")


def _log_tb(ctx: StageContext, entries: list[dict]) -> None:
    for entry in entries:
        scalars = {f"drift/{name}": entry[name] for name in ("caption_length", "distinct_1", "distinct_2",
                                                              "mean_pairwise_similarity") if entry[name] is not None}
        for name in SCORES:
            if name in entry and entry[name]["mean"] is not None:
                scalars[f"drift/{name}"] = entry[name]["mean"]
        for a, rate in entry.get("attribute_retention", {}).items():
            if rate is not None:
                scalars[f"drift/attribute_retention/{a}"] = rate
        scalars["drift/caption_clusters"] = entry["caption_clusters"]
        for name in POPULATION:
            for key in ("population", "population_vs_real"):
                value = (entry.get(key) or {}).get(name)
                if value is not None:
                    scalars[f"drift/{key}/{name}"] = value
        ctx.metrics.log(scalars, entry["iteration"])


def run_drift(ctx: StageContext) -> dict:
    """Plan (what each owned test shard holds, no image decoded), iterate, then summarise on rank 0."""
    cfg, info, layout = ctx.cfg, ctx.info, ctx.layout
    K = cfg.drift.iterations
    shards = test_shards(layout, cfg)
    on_main_first(info, lambda: restart_if_changed(layout.drift / "fingerprint.txt", drift_fingerprint(layout, cfg),
                                                   [layout.drift, *layout.drift_iterations(), layout.drift / "real"],
                                                   "the shards, captioner or drift settings"))
    mine = owned(len(shards), info.rank, info.world_size)
    items = {s: read_items(shards, s, cfg.drift.max_samples, ReadStats(), images=False) for s in mine}
    todo = {s: [k for k in range(1, K + 1) if not layout.drift_part(k, s).is_file()] for s in mine if items[s]}
    todo = {s: ks for s, ks in todo.items() if ks}
    for s in mine:  # an empty shard still marks its iterations done
        for k in range(1, K + 1):
            if not items[s] and not layout.drift_part(k, s).is_file():
                write_json_lines(layout.drift_part(k, s), [])
    left = sum(len(ks) * len(items[s]) for s, ks in todo.items())
    log.info("drift: %d iterations over %d test shards; this rank has %d of %d (iteration, shard) steps left", K,
             len(shards), sum(len(ks) for ks in todo.values()), K * len(mine))
    if todo:
        run_iterations(ctx, shards, todo, left)
    mine_rows = {k: [r for s in mine for r in read_json_lines(layout.drift_part(k, s))] for k in range(1, K + 1)}
    prompts = [(it.order, it.key, it.prompt, it.attributes) for s in mine for it in items[s]]
    gathered = dist.all_gather_object((mine_rows, prompts))
    summary = on_main_first(info, lambda: summarise_drift(ctx, gathered, K, shards))
    last = summary["iterations"][-1]
    log.info("drift: %d samples, %d iterations; similarity to the prompt at the last iteration %s; report %s",
             summary["samples"], K, f"{last['similarity_to_prompt']['mean']:.3f}" if K else "n/a",
             layout.drift / "report.md")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of `revprompt drift`."""
    parser = build_parser("drift", "Iterate prompt -> image -> caption -> image and measure how meaning drifts.")
    return run_stage("drift", argv if argv is not None else [], parser, run_drift)
