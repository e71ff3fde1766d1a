"""The embedding head (issue 14): its loss, its output, its files, the feature it reads on every captioner kind, the
README's plain transformers + torch reading of an export, and the settings it refuses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from revprompt.launch.config import ConfigError, load_config
from revprompt.launch.layout import changes, made_from
from revprompt.models.captioner import (TrainingInputs, add_lora, build_captioner, kind_of, load_exported, prompted,
                                        set_instruction)
from revprompt.models.captioner.head import (HEAD_INFO, HEAD_WEIGHTS, EmbeddingHead, HeadError, attach_head,
                                             embedding_loss, load_embedding_head, predict_embeddings,
                                             save_embedding_head)
from revprompt.training.export import save_hf_dir
from tests.captioners import BUILDERS

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["red cotton shirt for men", "blue denim jeans", "black leather handbag with a long strap"]


def images(n: int = 3, size: int = 64) -> list[Image.Image]:
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (size, size, 3), dtype=np.uint8))
            for i in range(n)]


def patterns() -> list[Image.Image]:
    """Three clearly different 64 px images: a checkerboard, a plain colour, stripes."""
    y, x = np.mgrid[0:64, 0:64]
    out = []
    for i, colour in enumerate([(20, 30, 120), (190, 190, 200), (30, 30, 30)]):
        img = np.zeros((64, 64, 3), np.uint8) + np.array(colour, np.uint8)
        if i == 0:
            img[(x // 8 + y // 8) % 2 == 0] = (240, 240, 240)
        if i == 2:
            img[(y // 6) % 2 == 0] = (250, 20, 20)
        out.append(Image.fromarray(img))
    return out


def test_cosine_loss_is_the_mean_of_one_minus_cosine():
    # by hand: cos((3,4), (4,3)) = 24/25; cos((1,0), (0,2)) = 0; the loss is ((1 - 0.96) + (1 - 0)) / 2 = 0.52
    loss = embedding_loss(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [0.0, 2.0]]))
    assert abs(loss.item() - 0.52) < 1e-6
    same = torch.nn.functional.normalize(torch.randn(5, 384), dim=-1)
    assert abs(embedding_loss(same, same).item()) < 1e-6 and abs(embedding_loss(same, -same).item() - 2) < 1e-6


@pytest.mark.parametrize("hidden", [0, 16])
def test_head_gives_unit_vectors_and_its_files_load_back_to_the_same_outputs(hidden, tmp_path: Path):
    torch.manual_seed(0)
    head = EmbeddingHead(8, 5, hidden, text_model="all-MiniLM-L6-v2", pooling="mean").eval()
    x = torch.randn(7, 8) * 10
    out = head(x)
    assert out.shape == (7, 5) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(7), atol=1e-6)
    assert load_embedding_head(tmp_path) is None  # no head in a folder without its files
    written = save_embedding_head(head, tmp_path, {"captioner_class": "X"})
    assert sorted(p.name for p in written) == [HEAD_INFO, HEAD_WEIGHTS]
    record = json.loads((tmp_path / HEAD_INFO).read_text())
    assert {k: record[k] for k in ("in_dim", "hidden", "out_dim", "pooling", "text_model", "captioner_class")} == \
        {"in_dim": 8, "hidden": hidden, "out_dim": 5, "pooling": "mean", "text_model": "all-MiniLM-L6-v2",
         "captioner_class": "X"}
    again = load_embedding_head(tmp_path)
    assert torch.equal(again(x), out)


def build(kind: str, lora: int = 0, folder: Path | None = None):
    """A captioner of `kind` (random-tiny or a tests/captioners.py builder; read from `folder` when given), ready to
    train, with LoRA adapters when asked."""
    if kind == "random-tiny" or folder is not None:
        model, processor = build_captioner(str(folder or kind))
    else:
        model, processor = BUILDERS[kind](0)
        prompted.prepare(model, processor)
    set_instruction(model, "")
    if lora:
        torch.manual_seed(0)
        model = add_lora(model, kind_of(model), lora, 16.0, [], str(folder or kind))
    return model, processor


@pytest.mark.parametrize("kind, lora", [("random-tiny", 0), ("random-tiny", 4), ("blip-2", 0), ("llava", 4),
                                        ("paligemma", 0)])
def test_the_training_forward_reads_the_feature_inference_reads(kind, lora):
    """The hook on the vision tower during the captioner's own forward sees what predict_embeddings computes from
    the vision tower alone: the head trained on one is the head used on the other (BLIP, BLIP-2: pooler output;
    Llava, PaliGemma: mean of the last hidden states; through a peft wrapper too)."""
    model, processor = build(kind, lora)
    wrapped = attach_head(model, 6, 8, "all-MiniLM-L6-v2", seed=0)
    assert wrapped.site.pooling == ("pooler" if kind in ("random-tiny", "blip-2") else "mean")
    assert sum(p.numel() for p in wrapped.parameters()) == \
        sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in wrapped.head.parameters())
    pics = images()
    wrapped.eval()
    with torch.no_grad():
        outputs, embeddings = wrapped(**TrainingInputs(model, processor, 40)(pics, PROMPTS))
    assert torch.isfinite(outputs.loss) and embeddings.shape == (3, 6)
    predicted = predict_embeddings(model, processor, wrapped.head, pics, "cpu", batch_size=2)
    assert predicted.dtype == np.float32 and np.allclose(np.linalg.norm(predicted, axis=1), 1, atol=1e-6)
    assert np.allclose(predicted, embeddings.numpy(), atol=1e-5), np.abs(predicted - embeddings.numpy()).max()
    # the same seed gives the same head (every rank builds its own before ZeRO-3 partitions it)
    twin = attach_head(model, 6, 8, "all-MiniLM-L6-v2", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(twin.head.state_dict().values(), wrapped.head.state_dict().values()))


def test_head_and_captioner_learn_together():
    """Joint loss on a fixed batch: the head's cosine to the prompts' MiniLM embeddings rises from about 0 (a random
    head) and each image's embedding ends nearest its own prompt; the language-modelling loss falls too."""
    from revprompt.models.text_embedder import embed

    model, processor = build("random-tiny")
    wrapped = attach_head(model, 384, 64, "all-MiniLM-L6-v2", seed=0)
    targets = torch.from_numpy(embed(PROMPTS))
    batch = TrainingInputs(model, processor, 40)(patterns(), PROMPTS)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-3)
    lm, cos = [], []
    for _ in range(30):
        outputs, embeddings = wrapped(**batch)
        head_loss = embedding_loss(embeddings, targets)
        (outputs.loss + head_loss).backward()
        opt.step()
        opt.zero_grad()
        lm.append(outputs.loss.item())
        cos.append(1 - head_loss.item())
    # measured: cosine -0.03 -> 0.98, LM loss 10.4 -> 1.2; each image's cosine to its own prompt 0.98, to the others
    # at most 0.42 (the prompts' own cosines to each other: 0.25 to 0.39)
    assert abs(cos[0]) < 0.2 and cos[-1] > 0.9, cos
    assert lm[-1] < 0.3 * lm[0], lm
    final = predict_embeddings(model, processor, wrapped.head, patterns(), "cpu") @ targets.numpy().T
    assert final.argmax(axis=1).tolist() == [0, 1, 2] and final.diagonal().min() > 0.9, final


def readme_snippet() -> str:
    """The README's plain transformers + torch code that reads an export's embedding head."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- embedding-head-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its embedding head snippet"
    return match.group(1)


@pytest.mark.parametrize("kind, merge", [("random-tiny", True), ("llava", False)])
def test_the_readme_snippet_reads_an_export_as_predict_embeddings_does(kind, merge, tmp_path: Path):
    """save_hf_dir writes the head beside the model and lists its files; the README's code (no revprompt import)
    gives the embeddings predict_embeddings gives on the export loaded by revprompt. Llava: LoRA, exported as the
    adapter alone (revprompt puts it on its base); the snippet reads a merged export of the same weights."""
    folder = None
    if kind != "random-tiny":
        from tests.captioners import save_captioner

        folder = save_captioner(kind, tmp_path / "base")
    model, processor = build(kind, lora=0 if merge else 4, folder=folder)
    wrapped = attach_head(model, 384, 32, "all-MiniLM-L6-v2", seed=1)
    with torch.no_grad():  # a head that is not its initialisation
        for p in wrapped.head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out = save_hf_dir(wrapped, processor, None, tmp_path / "export", {"step": 3}, merge=merge)
    listed = json.loads((out / "revprompt.json").read_text())["files"]
    assert {HEAD_WEIGHTS, HEAD_INFO} <= set(listed) and sorted(listed) == sorted(p.name for p in out.iterdir())
    record = json.loads((out / HEAD_INFO).read_text())
    assert record["step"] == 3 and record["vision_module"] == wrapped.site.path
    pics = images(size=80)  # the processors resize
    loaded, loaded_processor = load_exported(out, torch.device("cpu"))
    head = load_embedding_head(out, "cpu")
    ours = predict_embeddings(loaded, loaded_processor, head, pics, "cpu")
    assert torch.equal(head[1].weight, wrapped.head[1].weight.detach())
    if not merge:  # the snippet reads plain transformers folders: the same model with its adapters merged
        out = save_hf_dir(wrapped, processor, None, tmp_path / "merged", {"step": 3}, merge=True)
    namespace: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    theirs = namespace["head_embeddings"](str(out), pics).numpy()
    assert theirs.shape == (3, 384) and np.allclose(theirs, ours, atol=1e-5), np.abs(theirs - ours).max()


def test_settings_the_head_cannot_use_are_refused():
    with pytest.raises(ConfigError, match=r"train\.embedding_loss_weight: must be >= 0\.0, got -0\.5"):
        load_config("tiny", ["--train.embedding_loss_weight=-0.5"])
    with pytest.raises(ConfigError, match=r"train\.embedding_loss_weight: 0 with train\.embedding_head = true"):
        load_config("tiny", ["--train.embedding_head=true", "--train.embedding_loss_weight=0"])
    assert load_config("tiny", ["--train.embedding_head=false", "--train.embedding_loss_weight=0"])
    with pytest.raises(ConfigError, match=r"train\.embedding_head_hidden: must be >= 0"):
        load_config("tiny", ["--train.embedding_head_hidden=-1"])
    for preset in ("tiny", "sd2-blip"):
        assert load_config(preset).train.embedding_head is True

    # Qwen2-VL's vision tower takes patches flattened across images: no feature per image to pool
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=8),
                           text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                           vocab_size=100, bos_token_id=1, eos_token_id=2)
    with pytest.raises(HeadError, match=r"train\.embedding_head = true: Qwen2VLForConditionalGeneration has a vision "
                                        r"tower \(Qwen2VisionTransformerPretrainedModel\) that does not take "
                                        r"pixel_values"):
        attach_head(Qwen2VLForConditionalGeneration(config), 384, 16, "all-MiniLM-L6-v2", seed=0)


def test_resuming_with_other_head_settings_is_a_change_of_trajectory():
    def record(*overrides: str) -> dict:
        return made_from(load_config("tiny", list(overrides)), "shards")

    with_head = record()
    assert with_head["train"]["embedding_loss_weight"] == 1.0
    assert with_head["train"]["evaluate.text_model"] == "all-MiniLM-L6-v2"
    assert changes(with_head, record()) == []
    assert changes(with_head, record("--train.embedding_loss_weight=0.5")) == \
        ["train.embedding_loss_weight: 1.0 -> 0.5"]
    assert changes(with_head, record("--evaluate.text_model=/models/other")) == \
        ["evaluate.text_model: 'all-MiniLM-L6-v2' -> '/models/other'"]
    without = record("--train.embedding_head=false")
    assert "embedding_head" not in without["train"]  # runs without the head record what they always did
    assert "train.embedding_head: True -> '(not used)'" in changes(with_head, without)
    assert "train.embedding_head: '(not used)' -> True" in changes(without, with_head)
