"""What people look at: report.md with tables, PNG plots, and example images for evaluate and drift."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..launch.metrics import captioned_grid
from .attributes import ATTRIBUTES

log = logging.getLogger(__name__)

LABELS = {"zero_shot": "zero-shot", "finetuned": "fine-tuned", "constant": "constant caption",
          "retrieval": "retrieval (nearest train image)", "embedding_head": "embedding head (its vector scored)",
          "reranked": "fine-tuned, reranked by the head"}


def _names(summary: dict) -> list[str]:
    """The captioners of a summary, in table order (summaries before retrieval list none: the first three)."""
    return summary.get("captioners") or ["zero_shot", "finetuned", "constant"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def plot_similarity_hist(rows: list[dict], names: list[str], path: Path) -> Path:
    """Overlaid histograms of prompt similarity, one per captioner."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-0.2, 1.0, 49)
    for name in names:
        values = [r["similarity"][name] for r in rows]
        ax.hist(values, bins=bins, alpha=0.45, label=f"{LABELS.get(name, name)} (mean {np.mean(values):.3f})")
    ax.set_xlabel("cosine similarity to the original prompt (all-MiniLM-L6-v2)")
    ax.set_ylabel("test samples")
    ax.yaxis.set_major_locator(_integer_ticks())
    ax.legend()
    return _save(plt, fig, path)


def plot_attributes(summary: dict, path: Path) -> Path:
    """Grouped bars: attribute recovery rate per captioner, with the majority-value floor."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [n for n in _names(summary) if n in summary["attributes"]]
    width = 0.8 / (len(names) + 1)
    x = np.arange(len(ATTRIBUTES))
    for i, name in enumerate(names):
        rates = [summary["attributes"][name][a]["rate"] or 0 for a in ATTRIBUTES]
        ax.bar(x + i * width, rates, width, label=LABELS.get(name, name))
    chance = [summary["attribute_chance"][a] or 0 for a in ATTRIBUTES]
    ax.bar(x + len(names) * width, chance, width, label="most frequent value", color="lightgrey")
    ax.set_xticks(x + len(names) * width / 2, ATTRIBUTES)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recovered prompt names the value")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_groups(summary: dict, key: str, path: Path) -> Path:
    """Horizontal bars: mean similarity per group of every captioner (as the table), the constant caption in grey."""
    plt = _pyplot()
    groups = summary[key]["finetuned"]
    names = sorted(groups, key=lambda g: groups[g]["mean"])
    methods = [m for m in _names(summary) if m in summary[key]][::-1]
    height = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.12 * len(methods) * len(names) + 1)))
    y = np.arange(len(names))
    for i, method in enumerate(methods):
        ax.barh(y + (i - (len(methods) - 1) / 2) * height, [summary[key][method][n]["mean"] for n in names], height,
                label=LABELS.get(method, method), **({"color": "grey"} if method == "constant" else {}))
    ax.set_yticks(y, [f"{n} ({groups[n]['n']})" for n in names], fontsize=7)
    ax.set_xlabel("mean similarity to the prompt")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8)  # top to bottom, as the bars of a group and the table
    return _save(plt, fig, path)


def example_grid(rows: list[dict], originals: dict, redrawn: dict) -> np.ndarray | None:
    """Original image, then the image redrawn from the recovered prompt, with prompt and caption, per row."""
    from PIL import Image

    cells, texts = [], []
    for r in rows:
        if r["key"] not in originals:
            continue
        first = originals[r["key"]]
        second = redrawn.get(r["key"], Image.new("RGB", first.size, "white"))
        size = (96, 96)
        cells += [np.asarray(first.resize(size)), np.asarray(second.resize(size))]
        caption = r["captions"]["finetuned"].strip() or "(empty caption)"
        texts += [f"P: {r['prompt']}", f"C ({r['similarity']['finetuned']:.2f}): {caption}"]
    if not cells:
        return None
    return captioned_grid(np.stack(cells), texts, columns=4, caption_lines=4)


def example_images(rows: list[dict], ctx, shards: list[tuple[str, int]], redrawn_path) -> tuple[dict, dict]:
    """The original and redrawn images of `rows` (by key), decoding those samples alone."""
    from .items import read_images, read_originals, shard_of, shard_offsets

    offsets = shard_offsets(shards)
    by_shard: dict[int, set[str]] = {}
    for r in rows:
        by_shard.setdefault(shard_of(r["order"], offsets), set()).add(r["key"])
    originals: dict = {}
    redrawn: dict = {}
    for index, keys in sorted(by_shard.items()):
        originals.update(read_originals(shards, index, keys))
        path = redrawn_path(index)
        if path.is_file():
            redrawn.update(read_images(path, keys))
    return originals, redrawn


def write_eval_report(rows: list[dict], summary: dict, ctx, shards: list[tuple[str, int]]) -> Path:
    """eval/report.md with its PNGs; best and worst recoveries shown with their images."""
    from PIL import Image

    out = ctx.layout.eval
    out.mkdir(parents=True, exist_ok=True)
    k = ctx.cfg.evaluate.examples
    ranked = sorted(rows, key=lambda r: (-r["similarity"]["finetuned"], r["order"]))
    best, worst = ranked[:k], ranked[::-1][:k]
    originals, redrawn = example_images(best + worst, ctx, shards, ctx.layout.eval_images)
    plots = {"similarity": plot_similarity_hist(rows, _names(summary), out / "similarity.png"),
             "attributes": plot_attributes(summary, out / "attributes.png")}
    if summary["by_articleType"]["finetuned"]:
        plots["by_articleType"] = plot_groups(summary, "by_articleType", out / "by_articleType.png")
    examples = {}
    for name, chosen in (("best", best), ("worst", worst)):
        grid = example_grid(chosen, originals, redrawn)
        if grid is not None:
            Image.fromarray(grid).save(out / f"examples_{name}.png")
            examples[name] = out / f"examples_{name}.png"
            ctx.metrics.log_image(f"eval/examples_{name}", grid, summary["captioner_step"] or 0)
    path = out / "report.md"
    path.write_text(_eval_markdown(summary, plots, examples, best, worst), encoding="utf-8")
    return path


def md(text: str) -> str:
    """`text` safe inside a Markdown table cell or sentence: no HTML, links, images, emphasis or column breaks
    of its own; an empty text says so."""
    if not text.strip():
        return "*(empty)*"
    text = " ".join(text.split()).replace("\\", "\\\\")
    for char in "|`*_[]!#":
        text = text.replace(char, "\\" + char)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# measured on the tiny preset (1,500 prompts, full schedule per run; README "Fine-tuning the captioner")
STEPS_NEEDED = ("On the tiny preset it passes the constant caption after 300 to 400 steps of a full schedule "
                "(measured: 0.38 at 300 steps, 0.45 at 400, against the constant caption's 0.42; the preset trains "
                "1,000); on other data, train longer before reading this comparison.")
RANDOM_IMAGE_MODELS = ("random-tiny", "tiny")  # a random CLIP: its image similarities mean nothing


def _image_caveat(model: str | None) -> list[str]:
    if model not in RANDOM_IMAGE_MODELS:
        return []
    return [f"**Caveat:** `{model}` is a random CLIP vision tower (offline, shapes only): its similarities sit near "
            "1 for any two images and say nothing about them. Set `evaluate.image_model` to a real CLIP "
            "(`openai/clip-vit-base-patch32`) for image scores that mean something.", ""]


def _similarity_section(summary: dict, plots: dict) -> list[str]:
    s, g = summary["similarity"], summary["gain"]
    lines = ["## Similarity to the original prompt", "",
             "| captioner | mean | median | std | 95% CI of the mean |", "|---|---|---|---|---|"]
    for name in _names(summary):
        d = s[name]
        lines.append(f"| {LABELS.get(name, name)} | {_fmt(d['mean'])} | {_fmt(d['median'])} | {_fmt(d['std'])} | "
                     f"[{_fmt(d['ci95'][0])}, {_fmt(d['ci95'][1])}] |")
    lines += ["", f"Fine-tuned minus zero-shot: **{_fmt(g['finetuned_minus_zero_shot'])}**; fine-tuned minus "
              f"constant caption: **{_fmt(g['finetuned_minus_constant'])}**. The constant caption is the train "
              f"prompt nearest the mean of all train prompts: \"{md(summary['constant_caption'])}\".", ""]
    lines += _retrieval_note(summary) + _head_note(summary)
    lines += _paired_table(summary)
    if (g["finetuned_minus_constant"] or 0) < 0:
        lines += [f"The fine-tuned captioner scores below the constant caption at step {summary['captioner_step']}: "
                  f"it has not learnt enough yet. {STEPS_NEEDED}", ""]
    return lines + [f"![similarity]({plots['similarity'].name})", ""]


def _retrieval_note(summary: dict) -> list[str]:
    """What the retrieval baseline is, and how the fine-tuned captioner stands against it."""
    record, s = summary.get("retrieval"), summary["similarity"]
    if not record or "retrieval" not in s:
        return []
    kind = "exact inner product" if record["kind"] == "flat" else "an inverted-file (IVF) index"
    lines = [f"Retrieval answers each test image with the prompt of its nearest train image by "
             f"`{summary['models']['retrieval']}` image-embedding cosine ({record['vectors']} train images, {kind}; "
             "no training): the Kaggle competition's strong simple method."]
    gap = (s["finetuned"]["mean"] or 0) - (s["retrieval"]["mean"] or 0)
    if gap < 0:
        lines.append(f"The fine-tuned captioner scores {-gap:.3f} below retrieval: on these test images a lookup of "
                     "the nearest train image's prompt recovers more than the captioner has learnt to write.")
    return lines + [""]


def _head_note(summary: dict) -> list[str]:
    """What the two embedding-head rows are."""
    if "embedding_head" not in summary["similarity"]:
        return []
    k = summary["decoding"].get("rerank_candidates")
    return ["The embedding head, trained with the captioner, regresses the prompt's sentence embedding from the "
            "image: its vector is scored by the metric directly (no text), and it picks the caption nearest that "
            f"vector among the greedy caption and the {k} best beams (reranked).", ""]


def _paired_table(summary: dict) -> list[str]:
    """Per-sample differences between captioners: is the gap real, over these test samples?"""
    paired = summary.get("paired")
    if not paired:
        return []
    lines = ["Differences on the same test samples (a minus b): the mean, its 95% interval by a seeded paired "
             "bootstrap, the share of samples where a scores higher, and the two-sided Wilcoxon signed-rank p-value.",
             "", "| a - b | mean difference | 95% CI | a better on | Wilcoxon p | n |", "|---|---|---|---|---|---|"]
    for key, d in paired.items():
        a, b = (LABELS.get(part, part) for part in key.split(" - ", 1))
        lines.append(f"| {a} - {b} | {_fmt(d['mean'])} | [{_fmt(d['ci95'][0])}, {_fmt(d['ci95'][1])}] | "
                     f"{_pct(d['wins'])} | {_p(d['p_wilcoxon'])} | {d['n']} |")
    return lines + [""]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _p(value: float | None) -> str:
    """A p-value as people read one: 3 significant digits, or '< 1e-4'."""
    if value is None:
        return "-"
    return "< 1e-4" if value < 1e-4 else f"{value:.3g}"


def _attribute_section(summary: dict, plots: dict) -> list[str]:
    texts = [n for n in _names(summary) if n in summary["attributes"]]  # the methods that write a caption
    lines = ["## Attribute recovery", "",
             "How often the recovered prompt names the source row's value (whole words, singular or plural).", "",
             f"| attribute | {' | '.join(LABELS.get(n, n) for n in texts)} | most frequent value |",
             "|---" * (len(texts) + 2) + "|"]
    for a in ATTRIBUTES:
        cells = [_fmt(summary["attributes"][name][a]["rate"]) for name in texts]
        lines.append(f"| {a} | {' | '.join(cells)} | {_fmt(summary['attribute_chance'][a])} |")
    return lines + ["", f"![attributes]({plots['attributes'].name})", ""]


def _group_sections(summary: dict, plots: dict) -> list[str]:
    lines: list[str] = []
    for key in ("by_gender", "by_articleType"):
        groups = summary[key]["finetuned"]
        if not groups:
            continue
        names = _names(summary)
        lines += [f"## Similarity {key.replace('_', ' ')}", "",
                  f"| group | n | {' | '.join(LABELS.get(n, n) for n in names)} |", "|---" * (len(names) + 2) + "|"]
        for name, d in groups.items():
            cells = " | ".join(_fmt(summary[key][n][name]["mean"]) for n in names)
            lines.append(f"| {md(name)} | {d['n']} | {cells} |")
        if key in plots:
            lines += ["", f"![{key}]({plots[key].name})"]
        lines.append("")
    return lines


def _image_section(summary: dict) -> list[str]:
    if not summary["image"]:
        return []
    lines = ["## Images redrawn from the recovered prompts", "",
             f"Each test image redrawn from its fine-tuned caption with the original seed; image embeddings by "
             f"`{summary['models']['image']}`.", "", *_image_caveat(summary["models"]["image"]),
             "| comparison | mean | median | 95% CI |", "|---|---|---|---|"]
    for key, d in summary["image"].items():
        interval = f"[{_fmt(d['ci95'][0])}, {_fmt(d['ci95'][1])}]"
        lines.append(f"| {key} | {_fmt(d['mean'])} | {_fmt(d['median'])} | {interval} |")
    return lines + [""]


def _eval_markdown(summary: dict, plots: dict, examples: dict, best: list[dict], worst: list[dict]) -> str:
    lines = ["# Prompt recovery on the test split", "",
             f"{summary['samples']} test samples; fine-tuned captioner at step {summary['captioner_step']}; "
             f"text similarity by `{summary['models']['text']}`; decoding: {summary['decoding']}.", ""]
    lines += _similarity_section(summary, plots) + _attribute_section(summary, plots)
    lines += _group_sections(summary, plots) + _image_section(summary)
    for name, chosen in (("best", best), ("worst", worst)):
        lines += [f"## The {len(chosen)} {name} recoveries", ""]
        if name in examples:
            lines += ["Left: the original image; right: redrawn from the recovered prompt.", "",
                      f"![{name}]({examples[name].name})", ""]
        lines += ["| similarity | prompt | recovered |", "|---|---|---|"]
        lines += [f"| {r['similarity']['finetuned']:.3f} | {md(r['prompt'])} | {md(r['captions']['finetuned'])} |"
                  for r in chosen]
        lines.append("")
    return "\n".join(lines)


DRIFT_CURVES = (("similarity_to_prompt", "caption vs the original prompt"),
                ("similarity_to_previous", "caption vs the previous text"),
                ("image_similarity_to_original", "image vs the iteration-0 image"))


def plot_drift(summary: dict, path: Path) -> Path:
    """Curves over iterations with 95% bands: similarities, attribute retention, and diversity."""
    plt = _pyplot()
    entries = summary["iterations"]
    later = [e for e in entries if e["iteration"] > 0]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ax = axes[0]
    for key, label in DRIFT_CURVES:
        x = [0] + [e["iteration"] for e in later]
        mean = [1.0] + [e[key]["mean"] for e in later]
        low = [1.0] + [e[key]["ci95"][0] for e in later]
        high = [1.0] + [e[key]["ci95"][1] for e in later]
        ax.plot(x, mean, marker="o", label=label)
        ax.fill_between(x, low, high, alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cosine similarity")
    ax.legend(fontsize=7)
    ax = axes[1]
    for a in ATTRIBUTES:
        ax.plot([0] + [e["iteration"] for e in later],
                [1.0] + [e["attribute_retention"][a] or 0 for e in later], marker="o", label=a)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("iteration")
    ax.set_ylabel("attribute still named")
    ax.legend(fontsize=7)
    ax = axes[2]
    x = [e["iteration"] for e in entries]
    ax.plot(x, [e["distinct_2"] for e in entries], marker="o", label="distinct bigrams")
    ax.plot(x, [e["mean_pairwise_similarity"] or 0 for e in entries], marker="o",
            label="mean pairwise similarity (collapse)")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=7)
    ax = axes[3]  # the image population against iteration 0's: 0 and 1 at iteration 0 by definition
    for key, label, start in (("cmmd", "CMMD", 0.0), ("precision", "k-NN precision", 1.0),
                              ("recall", "k-NN recall", 1.0)):
        values = [(e.get("population") or {}).get(key) for e in later]
        if all(v is not None for v in values):
            ax.plot(x, [start] + values, marker="o", label=label)
    for key, label in (("precision", "k-NN precision vs real photos"), ("recall", "k-NN recall vs real photos")):
        values = [(e.get("population_vs_real") or {}).get(key) for e in entries]
        if all(v is not None for v in values):
            ax.plot(x, values, marker="s", linestyle="--", label=label)
    clusters = [e["caption_clusters"] for e in entries]
    if clusters[0]:
        ax.plot(x, [c / clusters[0] for c in clusters], marker="o", label="caption clusters / iteration 0's")
    ax.set_xlabel("iteration")
    ax.set_title("population", fontsize=9)
    ax.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(plt, fig, path)


def drift_strip(prompt: str, images: list, captions: list[str]) -> np.ndarray:
    """prompt -> image -> caption -> image ... as one row of captioned cells."""
    cells = np.stack([np.asarray(img.resize((96, 96))) for img in images])
    texts = [f"0: {prompt}"] + [f"{k}: {c.strip() or '(empty caption)'}" for k, c in enumerate(captions, start=1)]
    return captioned_grid(cells, texts, columns=len(cells), caption_lines=4)


def drift_strips(originals: list[tuple], per_iter: dict[int, list[dict]], ctx, shards: list[tuple[str, int]]
                 ) -> np.ndarray | None:
    """prompt -> image -> caption -> image ... rows of the first drift.examples samples, stacked."""
    from .items import read_images, read_originals, shard_of, shard_offsets

    K, layout = len(per_iter), ctx.layout
    chosen = originals[:ctx.cfg.drift.examples]
    if not chosen or not K:
        return None
    offsets = shard_offsets(shards)
    by_shard: dict[int, set[str]] = {}
    for order, key, _, _ in chosen:
        by_shard.setdefault(shard_of(order, offsets), set()).add(key)
    images: dict[str, list] = {key: [] for _, key, _, _ in chosen}
    for index, keys in sorted(by_shard.items()):
        for key, image in read_originals(shards, index, keys).items():
            images[key].append(image)
        for k in range(1, K + 1):
            for key, image in read_images(layout.drift_images(k, index), keys).items():
                images[key].append(image)
    captions = {k: {r["key"]: r["caption"] for r in per_iter[k]} for k in range(1, K + 1)}
    strips = [drift_strip(prompt, images[key], [captions[k][key] for k in range(1, K + 1)])
              for _, key, prompt, _ in chosen if len(images[key]) == K + 1]
    if not strips:
        return None
    canvas = np.full((sum(s.shape[0] for s in strips), max(s.shape[1] for s in strips), 3), 255, np.uint8)
    y = 0
    for strip in strips:
        canvas[y:y + strip.shape[0], :strip.shape[1]] = strip
        y += strip.shape[0]
    return canvas


def write_drift_report(summary: dict, originals: list[tuple], per_iter: dict[int, list[dict]], ctx,
                       shards: list[tuple[str, int]]) -> Path:
    """drift/report.md with curves.png and strips of a few examples."""
    from PIL import Image

    out = ctx.layout.drift
    K = len(per_iter)
    curves = plot_drift(summary, out / "curves.png") if K else None
    strips = drift_strips(originals, per_iter, ctx, shards)
    if strips is not None:
        Image.fromarray(strips).save(out / "strips.png")
        ctx.metrics.log_image("drift/strips", strips, K)
    lines = _drift_table(summary, K) + _population_table(summary)
    if curves is not None:
        lines += ["", f"![curves]({curves.name})"]
    if strips is not None:
        lines += ["", "## Examples", "", "Each row: the prompt's image, then each iteration's image with the caption "
                  "that drew it.", "", "![strips](strips.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _population_table(summary: dict) -> list[str]:
    """The population measures per iteration (image embeddings of `evaluate.image_model` against iteration 0's)."""
    later = [e for e in summary["iterations"] if e["iteration"] > 0]
    if not later:
        return []
    lines = ["", "## The population of images and captions", "",
             "Each iteration's images against iteration 0's, on the image model's embeddings: Fréchet distance and "
             "CMMD (0 = the same distribution), k-NN precision (the share of new images that look like some "
             "original) and recall (the share of originals still covered). Caption clusters: groups of captions "
             "whose text embeddings' cosine is at least 0.9 (iteration 0: the prompts); fewer clusters, fewer "
             "distinct things said.", "",
             "| iteration | Fréchet distance | CMMD | precision | recall | caption clusters |", "|---|---|---|---|---|---|",
             f"| 0 | 0 | 0 | 1 | 1 | {summary['iterations'][0]['caption_clusters']} |"]
    for e in later:
        p = e.get("population") or {}
        cells = [_fmt(p.get(k)) for k in ("frechet_distance", "cmmd", "precision", "recall")]
        lines.append(f"| {e['iteration']} | " + " | ".join(cells) + f" | {e['caption_clusters']} |")
    if any(e.get("population_vs_real") for e in summary["iterations"]):
        lines += ["", "Against the real photos (`evaluate.real_images`), iteration 0 being the test images themselves: "
                  "how far each iteration's images sit from real products, and whether they still cover them.", "",
                  "| iteration | Fréchet distance | CMMD | precision | recall | photos |", "|---|---|---|---|---|---|"]
        for e in summary["iterations"]:
            p = e.get("population_vs_real") or {}
            cells = [_fmt(p.get(k)) for k in ("frechet_distance", "cmmd", "precision", "recall")]
            lines.append(f"| {e['iteration']} | " + " | ".join(cells) + f" | {p.get('n_reference', '-')} |")
    return lines


def _drift_table(summary: dict, K: int) -> list[str]:
    lines = ["# Drift: prompt -> image -> caption -> image ...", "",
             f"{summary['samples']} test prompts, {K} iterations. Iteration 0 is the test split itself.", "",
             *_image_caveat(summary["models"]["image"]),
             "| iteration | sim. to prompt | 95% CI | sim. to previous | image sim. to iteration 0 | SSIM | "
             + " | ".join(f"{a} kept" for a in ATTRIBUTES) + " | words | distinct-2 | mean pairwise sim. |",
             "|" + "---|" * (9 + len(ATTRIBUTES))]
    for e in summary["iterations"]:
        if e["iteration"] == 0:
            cells = ["1.000", "", "1.000", "1.000", "1.000"] + ["1.000"] * len(ATTRIBUTES)
        else:
            cells = [_fmt(e["similarity_to_prompt"]["mean"]),
                     f"[{_fmt(e['similarity_to_prompt']['ci95'][0])}, {_fmt(e['similarity_to_prompt']['ci95'][1])}]",
                     _fmt(e["similarity_to_previous"]["mean"]), _fmt(e["image_similarity_to_original"]["mean"]),
                     _fmt(e["ssim_to_original"]["mean"])] + [_fmt(e["attribute_retention"][a]) for a in ATTRIBUTES]
        cells += [_fmt(e["caption_length"], 1), _fmt(e["distinct_2"]), _fmt(e["mean_pairwise_similarity"])]
        lines.append(f"| {e['iteration']} | " + " | ".join(cells) + " |")
    return lines
