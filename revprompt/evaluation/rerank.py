"""The fine-tuned captioner's embedding head at evaluation and captioning time (`train.embedding_head`).

Used twice, as the top Kaggle entries did: (a) its embedding of the image is itself an answer, scored
by the metric directly (cosine to the prompt's sentence embedding: `embedding_head`); (b) it chooses
among captions: the greedy caption and the `evaluate.num_candidates` best beams, each embedded by the
sentence model, the one nearest the head's embedding wins (`reranked`). So the text output gains
from the head too; ties keep the greedy caption.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models.captioner import Captioner
from ..models.captioner.head import load_embedding_head, predict_embeddings, read_head_info
from ..models.text_embedder import MINILM_ALIASES, embed

log = logging.getLogger(__name__)


def same_text_model(a: str, b: str) -> bool:
    """True when two `text_model` values name the same sentence model."""
    return a == b or (a in MINILM_ALIASES and b in MINILM_ALIASES)


def head_fits(folder: Path, text_model: str) -> bool:
    """True when the export in `folder` has an embedding head trained against `text_model` (the metric's model):
    only then is its embedding comparable with the prompt's. A head for another model is left out, with a warning."""
    record = read_head_info(folder)
    if record is None:
        return False
    if not same_text_model(record.get("text_model", ""), text_model):
        log.warning("%s: the embedding head was trained against %r, but evaluate.text_model is %r: its embedding "
                    "is not comparable and is left out", folder, record.get("text_model"), text_model)
        return False
    return True


class HeadAnswers:
    """The head's embedding of images, and the caption among candidates nearest it."""

    def __init__(self, captioner: Captioner, folder: Path, text_model: str, num_candidates: int,
                 device: torch.device):
        self.captioner, self.text_model, self.k, self.device = captioner, text_model, num_candidates, device
        self.head = load_embedding_head(folder, device)
        if self.head is None:
            raise FileNotFoundError(f"{folder}: no embedding head (embedding_head.safetensors and .json)")

    def embeddings(self, images: list[Image.Image]) -> np.ndarray:
        """(N, width) unit vectors, in chunks of the captioner's batch size."""
        return predict_embeddings(self.captioner.model, self.captioner.processor, self.head, images, self.device,
                                  self.captioner.batch_size)

    def rerank(self, images: list[Image.Image], greedy: list[str], vectors: np.ndarray) -> list[str]:
        """For each image, the caption nearest its head embedding among the greedy one and the k best beams."""
        beams = self.captioner.candidates(images, self.k) if self.k > 1 and images else [[] for _ in images]
        options = [list(dict.fromkeys([first, *more])) for first, more in zip(greedy, beams)]
        flat = [text for choice in options for text in choice]
        scores = embed(flat, self.text_model) @ vectors.T if flat else np.zeros((0, len(images)))
        out, start = [], 0
        for i, choice in enumerate(options):
            column = scores[start:start + len(choice), i]
            out.append(choice[int(np.argmax(column))])  # the first of equals: the greedy caption
            start += len(choice)
        return out
