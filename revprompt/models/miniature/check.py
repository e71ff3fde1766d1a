"""Does the miniature draw what the prompt says? Colour and article type on held-out prompts.

    python -m revprompt.models.miniature.check [--weights DIR] [--limit N] [--steps 20]

For every held-out prompt (the bundled set's test split), the miniature draws one image with the
sample seed generation would use. Colour: the palette colour nearest the median of the pixels
inside the row's articleType silhouette (its outline eroded away) must be the row's baseColour
("Multi" rows are left out: no single colour is right). Article type: a nearest-centroid classifier
over foreground masks (pixels that differ from the render background), fitted on renders of the
training rows, must name the row's articleType. Writes a JSON report and a contact sheet.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from .render import BACKGROUND, SHAPES, nearest_colour, render, silhouette_mask
from ..builtin import MINIATURE_WEIGHTS as WEIGHTS
from .train import training_rows

log = logging.getLogger(__name__)


def foreground(image: Image.Image) -> np.ndarray:
    """Pixels that differ clearly from the render background (bool HxW)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.int32)
    return np.abs(arr - np.array(BACKGROUND)).sum(axis=2) > 45


class ArticleClassifier:
    """Nearest centroid over foreground masks, fitted on renders; the gender mark's corner is ignored."""

    def __init__(self, rows: list[dict]):
        masks: dict[str, list[np.ndarray]] = {}
        for row in rows:
            masks.setdefault(row["articleType"], []).append(self.features(render(row)))
        self.names = sorted(masks)
        self.centroids = np.stack([np.mean(masks[n], axis=0) for n in self.names])

    @staticmethod
    def features(image: Image.Image) -> np.ndarray:
        mask = foreground(image).astype(np.float32)
        mask[:12, :12] = 0
        return mask.reshape(-1)

    def __call__(self, image: Image.Image) -> str:
        d = ((self.centroids - self.features(image)) ** 2).sum(axis=1)
        return self.names[int(np.argmin(d))]


def garment_colour(image: Image.Image, article: str) -> str:
    """Nearest palette colour inside the articleType's silhouette, away from its outline."""
    mask = Image.fromarray((silhouette_mask(article) * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(5))
    inside = np.asarray(mask) > 127
    if inside.sum() < 8:
        inside = silhouette_mask(article)
    return nearest_colour(np.asarray(image.convert("RGB"))[inside])


def check(pipe, rows: list[tuple[str, dict]], classifier: ArticleClassifier, steps: int, guidance: float,
          seed: int = 0, batch: int = 16) -> dict:
    """Draw each prompt, score colour and article; returns counts and per-row results."""
    from ...shards.keys import sample_key, sample_seed

    results = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        gens = [torch.Generator("cpu").manual_seed(sample_seed(seed, sample_key(r["id"], 0))) for _, r in chunk]
        with torch.inference_mode():
            images = pipe(prompt=[t for t, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          height=64, width=64, generator=gens).images
        for (text, row), image in zip(chunk, images):
            results.append({"prompt": text, "baseColour": row["baseColour"], "articleType": row["articleType"],
                            "colour": garment_colour(image, row["articleType"]), "article": classifier(image),
                            "image": image})
    coloured = [r for r in results if r["baseColour"] != "Multi"]
    colour_hits = sum(r["colour"] == r["baseColour"] for r in coloured)
    article_hits = sum(r["article"] == r["articleType"] for r in results)
    return {"prompts": len(results), "colour_rate": colour_hits / max(1, len(coloured)),
            "colour_hits": colour_hits, "colour_n": len(coloured),
            "article_rate": article_hits / max(1, len(results)), "article_hits": article_hits,
            "results": results}


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionPipeline

    from ..text_to_image import make_scheduler

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--limit", type=int, default=0, help="first N held-out prompts (0 = all)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("miniature-check"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train, held_out = training_rows()
    held_out = held_out[:args.limit] if args.limit else held_out
    classifier = ArticleClassifier([row for _, row in train])
    train_acc = np.mean([classifier(render(row)) == row["articleType"] for _, row in train[:500]])
    pipe = StableDiffusionPipeline.from_pretrained(args.weights, dtype=torch.float32, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("dpmsolver++", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    report = check(pipe, held_out, classifier, args.steps, args.guidance)
    args.out.mkdir(parents=True, exist_ok=True)
    sheet = Image.new("RGB", (64 * 16, 64 * 8), "white")
    for i, r in enumerate(report["results"][:128]):
        sheet.paste(r["image"], ((i % 16) * 64, (i // 16) * 64))
    sheet.save(args.out / "held-out.png")
    summary = {k: v for k, v in report.items() if k != "results"}
    summary.update(classifier_accuracy_on_renders=float(train_acc), steps=args.steps, guidance=args.guidance,
                   article_types=len(SHAPES), weights=str(args.weights),
                   rows=[{k: v for k, v in r.items() if k != "image"} for r in report["results"]])
    (args.out / "check.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("held-out prompts %d: colour %.1f%% (%d/%d, Multi left out), articleType %.1f%% (%d/%d); "
             "classifier on renders %.1f%%", report["prompts"], 100 * report["colour_rate"], report["colour_hits"],
             report["colour_n"], 100 * report["article_rate"], report["article_hits"], report["prompts"], 100 * train_acc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
