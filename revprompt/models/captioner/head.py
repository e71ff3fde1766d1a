"""An embedding head on the captioner's vision output, trained jointly with it (issue 14).

The best Kaggle entries regressed the prompt's all-MiniLM-L6-v2 embedding straight from the image; the
head does that beside the captioner: the vision tower's pooled feature (BLIP and BLIP-2: its pooler
output, the normalised class token; an image-text-to-text model: the mean of its last hidden states)
through LayerNorm and a small MLP to the sentence model's width, L2-normalised. Its feature is taken
by a forward hook during the captioner's own forward, so the vision tower runs once per step.

An export holds `embedding_head.safetensors` (an `nn.Sequential`'s weights: plain torch loads them)
and `embedding_head.json` (widths, pooling, the vision module's name in the transformers model, the
sentence model) beside the Hugging Face captioner.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import BLIP, BLIP2, base_model, image_size_of, kind_of, preprocess_images, prompted

HEAD_WEIGHTS = "embedding_head.safetensors"
HEAD_INFO = "embedding_head.json"
HEAD_FORMAT = "revprompt-embedding-head/1"
POOLER, MEAN = "pooler", "mean"  # the vision output's pooler_output; the mean of its last_hidden_state over tokens


class HeadError(ValueError):
    """A captioner the embedding head cannot attach to, or a head record that cannot be read."""


class EmbeddingHead(nn.Sequential):
    """Pooled vision feature -> LayerNorm -> Linear -> GELU -> Linear (or one Linear when `hidden` is 0) ->
    L2-normalised float32 embedding of width `out_dim`.

    A plain `nn.Sequential` underneath, so its weights load into one built with torch alone.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0, *, text_model: str = "", pooling: str = POOLER):
        if pooling not in (POOLER, MEAN):
            raise HeadError(f"embedding head: pooling {pooling!r} is not one of {POOLER}, {MEAN}")
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        layers += [nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim)] if hidden else \
            [nn.Linear(in_dim, out_dim)]
        super().__init__(*layers)
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        self.text_model, self.pooling = text_model, pooling

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) features to (N, out_dim) unit vectors, in float32 whatever the weights' dtype."""
        return F.normalize(super().forward(features).float(), dim=-1)

    def record(self) -> dict:
        """What rebuilds this head (its weights aside)."""
        return {"format": HEAD_FORMAT, "in_dim": self.in_dim, "hidden": self.hidden, "out_dim": self.out_dim,
                "text_model": self.text_model, "pooling": self.pooling}


def embedding_loss(embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(embedding, target)) over the batch, in float32."""
    return (1 - F.cosine_similarity(embeddings.float(), targets.float(), dim=-1)).mean()


# ------------------------------------------------------------------ where the feature comes from
@dataclass(frozen=True)
class VisionSite:
    """The vision module the head reads: its name in the transformers model, how it is pooled, its width."""

    path: str
    pooling: str
    width: int


def _refuse(model, why: str) -> HeadError:
    return HeadError(f"train.embedding_head = true: {type(base_model(model)).__name__} {why}; turn the head off "
                     "(train.embedding_head = false) for this captioner")


def vision_site(model) -> VisionSite:
    """Where the head attaches on a captioner of any kind (a peft wrapper counts as its base model); HeadError naming
    train.embedding_head and the class when it cannot."""
    base = base_model(model)
    kind = kind_of(base)
    module = base.vision_model if kind in (BLIP, BLIP2) else prompted.vision_module(base)
    if module is None:
        raise _refuse(model, "has no vision tower revprompt can find (vision_model, vision_tower, visual, "
                             "vision_encoder)")
    # a tower that takes patches already flattened across images (Qwen2-VL's `visual`) gives no feature per image
    if "pixel_values" not in inspect.signature(module.forward).parameters:
        raise _refuse(model, f"has a vision tower ({type(module).__name__}) that does not take pixel_values: its "
                             "features are not one row of tokens per image, which the head pools")
    width = getattr(getattr(module, "config", None), "hidden_size", None) or \
        getattr(getattr(base.config, "vision_config", None), "hidden_size", None)
    if not isinstance(width, int):
        raise _refuse(model, f"has a vision tower ({type(module).__name__}) whose width (hidden_size) is unknown")
    path = next(name for name, m in base.named_modules() if m is module)
    return VisionSite(path, POOLER if kind in (BLIP, BLIP2) else MEAN, width)


def pooled(output, pooling: str) -> torch.Tensor:
    """One feature row per image from a vision module's output (a ModelOutput or its tuple form)."""
    if pooling == POOLER:
        feature = output.pooler_output if hasattr(output, "pooler_output") else output[1]
    else:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        feature = hidden.mean(dim=1) if torch.is_tensor(hidden) and hidden.dim() == 3 else None
    if not torch.is_tensor(feature) or feature.dim() != 2:
        shape = tuple(feature.shape) if torch.is_tensor(feature) else type(feature).__name__
        raise HeadError(f"train.embedding_head: the vision tower's output gives no (images, width) feature to pool "
                        f"({pooling}: {shape})")
    return feature


class CaptionerWithHead(nn.Module):
    """The captioner and its embedding head as one module: what DeepSpeed wraps, shards, checkpoints and resumes.

    forward(**captioner inputs) -> (the captioner's outputs, the head's (N, out_dim) embeddings).
    """

    def __init__(self, captioner: nn.Module, head: EmbeddingHead):
        super().__init__()
        self.captioner, self.head = captioner, head
        self.site = vision_site(captioner)  # a name, not the module: a second reference would repeat its weights
        if (self.site.width, self.site.pooling) != (head.in_dim, head.pooling):
            raise HeadError(f"embedding head of width {head.in_dim}, pooling {head.pooling}: the captioner's vision "
                            f"tower {self.site.path} gives width {self.site.width}, pooling {self.site.pooling}")

    def forward(self, **inputs):
        features: list[torch.Tensor] = []
        vision = base_model(self.captioner).get_submodule(self.site.path)
        # pooled inside the hook: some models (Llava) rewrite the tower's output object after the call
        handle = vision.register_forward_hook(lambda _m, _a, out: features.append(pooled(out, self.site.pooling)))
        try:
            outputs = self.captioner(**inputs)
        finally:
            handle.remove()
        images = inputs["pixel_values"].shape[0] if "pixel_values" in inputs else inputs["input_ids"].shape[0]
        if len(features) != 1 or features[0].shape[0] != images:
            rows = [tuple(f.shape) for f in features]
            raise HeadError(f"train.embedding_head: {type(base_model(self.captioner)).__name__}'s vision tower "
                            f"{self.site.path} gave {rows} for {images} images; the head needs one call, one row "
                            "per image")
        return outputs, self.head(features[0].to(self.head[0].weight.dtype))


def captioner_of(module: nn.Module) -> nn.Module:
    """The captioner itself, with or without a head around it."""
    return module.captioner if isinstance(module, CaptionerWithHead) else module


def attach_head(captioner: nn.Module, out_dim: int, hidden: int, text_model: str, seed: int) -> CaptionerWithHead:
    """`captioner` with a new head, initialised from `seed` (every rank builds the same one: ZeRO-3 partitions each
    rank's own copy)."""
    site = vision_site(captioner)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = EmbeddingHead(site.width, out_dim, hidden, text_model=text_model, pooling=site.pooling)
    return CaptionerWithHead(captioner, head)


# ------------------------------------------------------------------ files
def build_embedding_head(record: dict) -> EmbeddingHead:
    """An (untrained) head of the shape a record (embedding_head.json) describes."""
    try:
        return EmbeddingHead(int(record["in_dim"]), int(record["out_dim"]), int(record.get("hidden", 0)),
                             text_model=str(record.get("text_model", "")), pooling=record.get("pooling", POOLER))
    except (KeyError, TypeError, ValueError) as exc:
        raise HeadError(f"embedding head record {record!r}: {exc}") from None


def write_head_info(head: EmbeddingHead, folder: str | Path, info: dict | None = None) -> Path:
    """embedding_head.json in `folder`: the head's record and `info` (the captioner's class, the vision module)."""
    path = Path(folder) / HEAD_INFO
    path.write_text(json.dumps({**(info or {}), **head.record()}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_head_info(folder: str | Path) -> dict | None:
    """The record of the head in `folder`, or None when there is none."""
    path = Path(folder) / HEAD_INFO
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HeadError(f"{path}: unreadable ({exc})") from None
    if not isinstance(record, dict):
        raise HeadError(f"{path}: not a JSON object")
    return record


def save_embedding_head(head: EmbeddingHead, folder: str | Path, info: dict | None = None) -> list[Path]:
    """Write embedding_head.safetensors (float32) and embedding_head.json beside a Hugging Face model in `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    weights = folder / HEAD_WEIGHTS
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()},
              str(weights), metadata={"format": "pt"})
    return [weights, write_head_info(head, folder, info)]


def load_embedding_head(folder: str | Path, device: torch.device | str = "cpu") -> EmbeddingHead | None:
    """The head saved in `folder` (an export), in float32 on `device`, in eval mode; None when `folder` has none."""
    from safetensors.torch import load_file

    record = read_head_info(folder)
    if record is None or not (Path(folder) / HEAD_WEIGHTS).is_file():
        return None
    head = build_embedding_head(record)
    try:
        head.load_state_dict(load_file(str(Path(folder) / HEAD_WEIGHTS)))
    except RuntimeError as exc:
        raise HeadError(f"{Path(folder) / HEAD_WEIGHTS}: does not fit {HEAD_INFO} ({str(exc).splitlines()[0]})") \
            from None
    return head.to(device).eval()


# ------------------------------------------------------------------ inference
def pixel_values(model, processor, images: list[Image.Image]) -> torch.Tensor:
    """The images as the captioner's training fed them: BLIP through revprompt's preprocessing, the others through
    the processor's image processor."""
    if kind_of(model) == BLIP:
        return preprocess_images(images, image_size_of(base_model(model)))
    return processor.image_processor(images=prompted.rgb(images), return_tensors="pt")["pixel_values"]


def predict_embeddings(model, processor, head: EmbeddingHead, images: list[Image.Image], device: torch.device | str,
                       batch_size: int = 32) -> np.ndarray:
    """The head's embedding of each image: (N, out_dim) float32, L2-normalised. `model` (an export as
    `load_exported` gives it, or a live captioner) and `head` are on `device`; only the vision tower runs, in
    inference mode, `batch_size` images at a time."""
    site = vision_site(model)
    if (site.width, site.pooling) != (head.in_dim, head.pooling):
        raise HeadError(f"embedding head of width {head.in_dim}, pooling {head.pooling} does not fit "
                        f"{type(base_model(model)).__name__} ({site.path}: width {site.width}, {site.pooling})")
    vision = base_model(model).get_submodule(site.path)
    param = next(vision.parameters())
    model.eval()
    head.eval()
    rows = [np.zeros((0, head.out_dim), np.float32)]
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels = pixel_values(model, processor, images[start:start + batch_size]).to(device, param.dtype)
            feature = pooled(vision(pixel_values=pixels), site.pooling)
            rows.append(head(feature.to(head[0].weight)).cpu().numpy())
    return np.concatenate(rows)
