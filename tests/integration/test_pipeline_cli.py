"""`revprompt pipeline` on the tiny preset, end to end through the CLI: every artefact exists and parses."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.conftest import run_cli


def tags(tb_dir: Path) -> dict[str, set[str]]:
    """Every tag in a TensorBoard folder, by kind."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, set[str]] = {"scalars": set(), "images": set(), "histograms": set()}
    for events_file in Path(tb_dir).glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events_file), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
        acc.Reload()
        for kind in found:
            found[kind] |= set(acc.Tags()[kind])
    return found


def check_evaluation(run_dir: Path) -> None:
    """Every test sample scored for every captioner, intervals around the means, the report and its plots."""
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "eval" / "results.jsonl").read_text().splitlines()]
    n_test = sum(1 for line in (run_dir / "prompts" / "test.jsonl").read_text().splitlines() if line.strip())
    assert summary["samples"] == len(rows) == n_test > 0
    texts = {"zero_shot", "finetuned", "constant", "retrieval", "reranked"}  # the tiny preset trains the head
    assert summary["captioners"] == ["zero_shot", "finetuned", "constant", "retrieval", "embedding_head", "reranked"]
    for row in rows:
        assert set(row["captions"]) == texts and set(row["similarity"]) == texts | {"embedding_head"}
        assert all(-1.0 <= v <= 1.0 for v in row["similarity"].values())
    for name in summary["captioners"]:
        d = summary["similarity"][name]
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    check_retrieval(run_dir, rows, summary)
    for a, b in (("finetuned", "zero_shot"), ("finetuned", "constant"), ("finetuned", "retrieval"),
                 ("embedding_head", "finetuned"), ("reranked", "finetuned")):
        # the paired differences agree with the per-sample rows
        paired = summary["paired"][f"{a} - {b}"]
        diffs = [r["similarity"][a] - r["similarity"][b] for r in rows]
        assert paired["n"] == len(rows) and abs(paired["mean"] - sum(diffs) / len(diffs)) < 1e-9
        assert paired["ci95"][0] <= paired["mean"] <= paired["ci95"][1] and 0 <= paired["p_wilcoxon"] <= 1
        assert paired["wins"] == sum(d > 0 for d in diffs) / len(diffs)
    report = (run_dir / "eval" / "report.md").read_text()
    assert "Caveat" not in report  # the tiny preset's image model is the warm-started vision tower, not a random CLIP
    assert "| retrieval (nearest train image) - " not in report and "| fine-tuned - retrieval" in report
    assert "scores below the constant caption at step 6" in report  # and 6 steps are too few: the report says so
    for heading in ("## Similarity to the original prompt", "## Attribute recovery",
                    "## Images redrawn from the recovered prompts", "recoveries"):
        assert heading in report
    for png in ("similarity", "attributes", "by_articleType", "examples_best", "examples_worst"):
        with Image.open(run_dir / "eval" / f"{png}.png") as img:
            assert img.size[0] > 100 and img.size[1] > 50
        assert f"({png}.png)" in report


def check_retrieval(run_dir: Path, rows: list[dict], summary: dict) -> None:
    """Retrieval's answer, recomputed by hand: the prompt of the train image whose cached embedding has the
    largest dot product with the test image's embedding (numpy over the shard files, not faiss)."""
    import numpy as np

    from revprompt.evaluation.items import read_items
    from revprompt.models.image_embedder import embed_images
    from revprompt.shards.manifest import split_shards
    from revprompt.shards.reader import ReadStats

    folder = run_dir / "eval" / "retrieval"
    train = split_shards(run_dir / "shards", "train")
    features = np.concatenate([np.load(folder / f"{s:06d}.features.npy") for s in range(len(train))])
    prompts = [json.loads(line)["prompt"] for s in range(len(train))
               for line in (folder / f"{s:06d}.jsonl").read_text().splitlines()]
    assert len(prompts) == features.shape[0] == sum(n for _, n in train) == summary["retrieval"]["vectors"]
    assert summary["retrieval"]["kind"] == "flat"
    test = split_shards(run_dir / "shards", "test")
    items = [it for s in range(len(test)) for it in read_items(test, s, 0, ReadStats())]
    vectors = embed_images([it.image for it in items], "miniature")
    nearest = (vectors @ features.T).argmax(axis=1)
    assert [prompts[j] for j in nearest] == [r["captions"]["retrieval"] for r in rows]

    # the head's score: its embedding of the test image (exported captioner and head, loaded again) against the
    # prompt's all-MiniLM-L6-v2 embedding
    import torch

    from revprompt.models.captioner import load_exported
    from revprompt.models.captioner.head import load_embedding_head, predict_embeddings
    from revprompt.models.text_embedder import embed

    model, processor = load_exported(run_dir / "captioner", torch.device("cpu"))
    head = predict_embeddings(model, processor, load_embedding_head(run_dir / "captioner"),
                              [it.image for it in items], "cpu")
    direct = np.sum(head * embed([it.prompt for it in items]), axis=1)
    np.testing.assert_allclose([r["similarity"]["embedding_head"] for r in rows], direct, atol=1e-5)


def test_pipeline_end_to_end(pipeline_run):
    run_dir, args, proc = pipeline_run
    stderr = proc.stderr
    assert "similarity to prompt (mean)" in stderr and f"report: {run_dir / 'eval' / 'report.md'}" in stderr
    # one bar per stage: no library bars, no DeepSpeed build chatter, no compiler probes in the rank log
    assert "Loading weights" not in stderr and "Writing model shards" not in stderr
    assert "built successfully" not in stderr + proc.stdout
    assert "compilers.C.base" not in (run_dir / "logs" / "rank-0.log").read_text()

    # the captioner loads with plain transformers
    from transformers import BlipForConditionalGeneration

    BlipForConditionalGeneration.from_pretrained(run_dir / "captioner")
    assert json.loads((run_dir / "captioner" / "revprompt.json").read_text())["step"] == 6

    check_evaluation(run_dir)
    # `revprompt caption` with the same captioner: reranked by its head as evaluate reranked, or greedy
    by_key = {json.loads(line)["key"]: json.loads(line)["captions"]
              for line in (run_dir / "eval" / "results.jsonl").read_text().splitlines()}
    for flags, method in (([], "reranked"), (["--no-rerank"], "finetuned")):
        out = run_dir.parent / f"{method}.jsonl"
        run_cli("caption", "--config", "tiny", f"--run.dir={run_dir}", str(run_dir / "shards" / "test"),
                f"--out={out}", *flags)
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(lines) == len(by_key) and all(by_key[r["key"]][method] == r["caption"] for r in lines)

    drift = json.loads((run_dir / "drift" / "summary.json").read_text())
    assert [e["iteration"] for e in drift["iterations"]] == [0, 1, 2]
    for png in ("curves", "strips"):
        with Image.open(run_dir / "drift" / f"{png}.png") as img:
            assert img.size[0] > 100
    assert "| 2 |" in (run_dir / "drift" / "report.md").read_text()

    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert set(stages) == {"generate", "train", "evaluate", "drift"}
    assert all(s["outcome"] == "ran" for s in stages.values())

    train, evaluate, drift_tb = tags(run_dir / "tb" / "train"), tags(run_dir / "tb" / "evaluate"), tags(run_dir / "tb" / "drift")
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "val/loss", "val/similarity"} <= train["scalars"]
    assert {"eval/similarity/zero_shot", "eval/similarity/finetuned", "eval/similarity/constant",
            "eval/similarity/retrieval",
            "eval/attributes/baseColour/finetuned", "eval/image/clip_regen_vs_original",
            "eval/image/ssim_regen_vs_original"} <= evaluate["scalars"]
    assert {"eval/similarity_hist/finetuned"} <= evaluate["histograms"]
    assert {"eval/examples_best", "eval/examples_worst"} <= evaluate["images"]
    assert {"drift/similarity_to_prompt", "drift/similarity_to_previous", "drift/image_similarity_to_original",
            "drift/distinct_2", "drift/mean_pairwise_similarity", "drift/attribute_retention/gender"} <= drift_tb["scalars"]
    assert "drift/strips" in drift_tb["images"]
    assert "generate/samples" in tags(run_dir / "tb" / "generate")["images"]

    # a second launch finds every stage complete and changes nothing
    before = (run_dir / "eval" / "results.jsonl").read_bytes(), (run_dir / "drift" / "summary.json").read_bytes()
    run_cli("pipeline", *args, threads=2)
    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert [stages[s]["outcome"] for s in ("train", "evaluate", "drift")] == ["skipped"] * 3
    assert before == ((run_dir / "eval" / "results.jsonl").read_bytes(), (run_dir / "drift" / "summary.json").read_bytes())
