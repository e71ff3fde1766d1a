"""BLIP's attention through torch's SDPA (revprompt.models.captioner.attention) computes what transformers' eager
attention computes: a training step (loss, logits, every gradient) in fp32, a bf16 forward, greedy captions
through the key/value cache; attention probabilities still come out when asked for; the weights and exports are
untouched; train.attention and evaluate.attention choose what the stages load."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import BlipConfig, BlipForConditionalGeneration
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

from revprompt.launch.config import load_config
from revprompt.launch.layout import RunLayout, evaluation_fingerprint
from revprompt.models.captioner import BLIP, TrainingInputs, add_lora, build_captioner, load_exported, set_attention
from revprompt.models.captioner.attention import SdpaBlipAttention, SdpaBlipTextSelfAttention, is_sdpa, use_sdpa

BOS = 30522  # BLIP-base's [DEC]
LENGTHS = (12, 5)  # two prompts, the second padded
SHARPEN = 4.0


def sharpen(model) -> None:
    """Scale every query and key weight by SHARPEN. Random initialisation attends almost uniformly (the mean
    largest probability over 577 patches is 0.004), which would hide a wrong mask or scale; scaled, attention
    peaks as a trained model's does (mean largest probability 0.54 in vision and cross-attention, 0.85 in the
    decoder's self-attention)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BlipAttention):
                module.qkv.weight[:2 * module.embed_dim].mul_(SHARPEN)
            elif isinstance(module, BlipTextSelfAttention):
                module.query.weight.mul_(SHARPEN)
                module.key.weight.mul_(SHARPEN)


@pytest.fixture(scope="module")
def eager():
    """BLIP-base's shapes (768 wide, 12 heads, 384 px in 16 px patches, BERT's vocabulary) with 2 layers a side,
    no dropout, seeded; as transformers builds it: eager attention."""
    config = BlipConfig(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=2,
                           image_size=384, patch_size=16, attention_dropout=0.0,
                           initializer_range=0.02),  # BlipVisionConfig's own 1e-10 leaves the vision tower all zero
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=2,
                         vocab_size=30524, encoder_hidden_size=768, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    sharpen(model)
    return model


@pytest.fixture(scope="module")
def sdpa(eager):
    """A copy of `eager` switched to SDPA."""
    model = copy.deepcopy(eager)
    assert use_sdpa(model) == 6  # 2 vision layers + 2 text layers x (self, cross)
    return model


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Two 384 px images and prompts of 12 and 5 tokens, padded to 12 (mask 0, label -100), [DEC] first."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (len(LENGTHS), max(LENGTHS)), generator=g)
    ids[:, 0] = BOS
    mask = (torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    return {"pixel_values": torch.randn(len(LENGTHS), 3, 384, 384, generator=g), "input_ids": ids,
            "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@contextmanager
def attention_calls(model):
    """Record each attention module call as (module name, query length, whether it returned probabilities)."""
    calls, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, (BlipAttention, BlipTextSelfAttention)):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: calls.append((name, out[0].shape[1], out[1] is not None))))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def attention_classes(model) -> Counter:
    """How many attention modules of each class `model` holds."""
    return Counter(type(m) for m in model.modules() if isinstance(m, (BlipAttention, BlipTextSelfAttention)))


def test_use_sdpa_switches_six_modules_and_leaves_the_weights(eager, sdpa):
    assert attention_classes(eager) == {BlipAttention: 2, BlipTextSelfAttention: 4}  # the original untouched
    assert attention_classes(sdpa) == {SdpaBlipAttention: 2, SdpaBlipTextSelfAttention: 4}
    assert use_sdpa(sdpa) == 6 and attention_classes(sdpa) == {SdpaBlipAttention: 2,
                                                                SdpaBlipTextSelfAttention: 4}  # idempotent
    assert attention_classes(copy.deepcopy(sdpa)) == attention_classes(sdpa)
    before, after = eager.state_dict(), sdpa.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_training_step_equals_eager_in_fp32(eager, sdpa, batch):
    outputs, grads = {}, {}
    for name, model in (("eager", eager), ("sdpa", sdpa)):
        model.train()
        model.zero_grad(set_to_none=True)
        with attention_calls(model) as calls:
            out = model(**batch)
            out.loss.backward()
        # SDPA returns no probabilities; eager does: the SDPA forward ran, not the fallback
        assert [c[2] for c in calls] == [name == "eager"] * 6, calls
        outputs[name] = out
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    loss, want = outputs["sdpa"].loss.item(), outputs["eager"].loss.item()
    logits_diff = (outputs["sdpa"].logits - outputs["eager"].logits).abs().max().item()
    # measured (torch 2.13, CPU): loss 10.730485 against 10.730486, relative difference 9e-8; logits (up to about 3
    # in magnitude) differ by at most 2.7e-6
    assert abs(loss - want) <= 1e-5 * abs(want), (loss, want)
    assert logits_diff < 3e-5, logits_diff
    assert grads["sdpa"].keys() == grads["eager"].keys() == {n for n, _ in eager.named_parameters()}
    # measured: the largest gradient difference is 8.6e-7; at rtol 1e-4 the gradients need atol 7.1e-7. The key
    # biases' gradients are 0 in exact arithmetic (softmax ignores a shift shared by all keys), about 1e-9 of
    # rounding either way, so only the absolute part of the tolerance can hold them
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["sdpa"][n], g, rtol=1e-4, atol=7e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_a_bf16_forward_is_as_close_to_fp32_as_eager(eager, sdpa, batch):
    with torch.no_grad():
        reference = eager.eval()(**batch).logits
        logits = {}
        for name, model in (("eager", eager), ("sdpa", sdpa)):
            half = copy.deepcopy(model).to(torch.bfloat16).eval()
            logits[name] = half(**{**batch, "pixel_values": batch["pixel_values"].bfloat16()}).logits.float()
            del half

    def loss(x: torch.Tensor) -> float:  # the model's loss, in fp32 from the logits (a bf16 loss has 3 digits)
        return F.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), batch["labels"][:, 1:].reshape(-1)).item()

    want = loss(reference)
    # measured: fp32 10.73048, bf16 eager 10.73145, bf16 SDPA 10.73153 (relative 9e-5 from fp32, 8e-6 from each
    # other); the largest logit error against fp32 0.048 eager, 0.039 SDPA (bf16 keeps 3 significant digits)
    assert abs(loss(logits["sdpa"]) - loss(logits["eager"])) <= 1e-3 * want
    assert abs(loss(logits["sdpa"]) - want) <= 1e-3 * want
    eager_error = (logits["eager"] - reference).abs().max().item()
    sdpa_error = (logits["sdpa"] - reference).abs().max().item()
    assert sdpa_error <= 2 * eager_error, (sdpa_error, eager_error)


def test_greedy_captions_through_the_cache_equal_eager(eager, sdpa, batch):
    ids = {}
    for name, model in (("eager", eager), ("sdpa", sdpa)):
        with attention_calls(model) as calls:
            ids[name] = model.eval().generate(pixel_values=batch["pixel_values"], max_new_tokens=10)
        if name == "sdpa":  # SDPA all along, the decoder one token at a time through its cache
            assert calls and not any(c[2] for c in calls)
            assert sum(1 for c in calls if ".attention.self" in c[0] and c[1] == 1) >= 2 * 9
    assert ids["sdpa"].shape[1] > 5
    assert torch.equal(ids["sdpa"], ids["eager"]), (ids["sdpa"], ids["eager"])
    assert len({tuple(row) for row in ids["eager"].tolist()}) > 1  # the captions depend on the image


def test_attention_probabilities_still_come_out(eager, sdpa, batch):
    eager.eval(), sdpa.eval()
    with torch.no_grad():
        want = eager(**batch, output_attentions=True)  # the vision tower's, as BlipForConditionalGeneration gives them
        got = sdpa(**batch, output_attentions=True)
        assert len(got.attentions) == 2 and got.attentions[0].shape == (2, 12, 577, 577)
        for a, b in zip(got.attentions, want.attentions):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "encoder_hidden_states": want.image_embeds}
        want_text = eager.text_decoder(**text, output_attentions=True)
        got_text = sdpa.text_decoder(**text, output_attentions=True)
        assert len(got_text.attentions) == 2 and got_text.attentions[0].shape == (2, 12, 12, 12)
        assert len(got_text.cross_attentions) == 2 and got_text.cross_attentions[0].shape == (2, 12, 12, 577)
        for a, b in zip(got_text.attentions + got_text.cross_attentions,
                        want_text.attentions + want_text.cross_attentions):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        with attention_calls(sdpa) as calls:  # and the next call without them runs SDPA again
            sdpa.text_decoder(**text)
    assert len(calls) == 4 and not any(c[2] for c in calls)


# ------------------------------------------------------------------ a small BLIP: LoRA, exports, the settings
PROMPTS = ["red cotton shirt for men", "blue denim jeans", "black leather handbag with a long strap"]


def images() -> list[Image.Image]:
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(3)]


def test_a_lora_wrapped_captioner_switches_and_trains_the_same(tmp_path):
    model, processor = build_captioner("random-tiny", attention="eager")
    torch.manual_seed(0)
    eager = add_lora(model, BLIP, 4, 16.0, [], "random-tiny")
    sdpa = copy.deepcopy(eager)
    assert use_sdpa(sdpa) == 6
    batch = TrainingInputs(eager, processor, 16)(images(), PROMPTS)
    grads = {}
    for name, wrapped in (("eager", eager), ("sdpa", sdpa)):
        wrapped.train()
        loss = wrapped(**batch).loss
        loss.backward()
        grads[name] = {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
        grads[name]["loss"] = loss.detach()
    assert len(grads["eager"]) > 1 and grads["sdpa"].keys() == grads["eager"].keys()
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["sdpa"][n], g, rtol=1e-4, atol=1e-6)
    # an export of a switched captioner is a plain BLIP: eager once loaded, the same weights and logits
    plain, _ = build_captioner("random-tiny")
    assert attention_classes(plain) == {SdpaBlipAttention: 2, SdpaBlipTextSelfAttention: 4}
    plain.save_pretrained(tmp_path / "out")
    loaded = BlipForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert attention_classes(loaded) == {BlipAttention: 2, BlipTextSelfAttention: 4}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in plain.state_dict().items())
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, plain.eval()(**inputs).logits,
                                   rtol=1e-5, atol=1e-5)


def test_train_and_evaluate_attention_choose_the_loaded_modules(tmp_path, caplog):
    from revprompt.evaluation.items import zero_shot_captioner
    from revprompt.training.loop import build_model

    sdpa_classes = {SdpaBlipAttention: 2, SdpaBlipTextSelfAttention: 4}
    eager_classes = {BlipAttention: 2, BlipTextSelfAttention: 4}
    model, processor = build_captioner("random-tiny", attention="eager")
    model.save_pretrained(tmp_path / "captioner")
    processor.save_pretrained(tmp_path / "captioner")
    cpu = torch.device("cpu")
    fingerprints = set()
    for choice, classes in (("sdpa", sdpa_classes), ("eager", eager_classes)):
        cfg = load_config("tiny", ["--train.captioner=random-tiny", "--train.embedding_head=false",
                                   f"--train.attention={choice}", f"--evaluate.attention={choice}"])
        fingerprints.add(evaluation_fingerprint(RunLayout(tmp_path / "run"), cfg))
        with caplog.at_level(logging.INFO, logger="revprompt.models.captioner"):
            caplog.clear()
            trained, _ = build_model(cfg)
        assert attention_classes(trained) == classes
        said = [r.getMessage() for r in caplog.records if "BLIP attention" in r.getMessage()]
        assert said == (["BLIP attention: 6 modules run SDPA (train.attention = 'sdpa')"] if choice == "sdpa" else [])
        exported, _ = load_exported(tmp_path / "captioner", cpu, attention=cfg.evaluate.attention)
        assert attention_classes(exported) == classes
        assert attention_classes(zero_shot_captioner(cfg, cpu).model) == classes
    assert len(fingerprints) == 1  # the same numbers either way: an evaluation done under one stays done
    with pytest.raises(ValueError, match="evaluate.attention: 'flash' is not one of sdpa, eager"):
        set_attention(model, "flash", "evaluate.attention")
    assert not any(is_sdpa(m) for m in model.modules())
