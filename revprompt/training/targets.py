"""The embedding head's targets: each prompt's embedding under the metric's sentence model (evaluate.text_model).

Computed in the training step, on the rank's own device, once per distinct prompt text and then
served from a cache. Not in the DataLoader workers: each of them (ranks x train.num_workers) would
load its own copy of the sentence model, spend the CPU time the image decoding needs, and keep a
cache the others cannot see. Prompts come back every epoch (and once per image of a prompt), so
after the first epoch the targets cost a dict lookup; the first epoch pays a sentence-model forward
over a micro-batch's new prompts (a few ms on a GPU, next to a captioner step of tens to hundreds).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..models.text_embedder import embed, embedding_width

log = logging.getLogger(__name__)


class PromptEmbeddings:
    """prompts -> (N, width) float32 unit vectors on `device`, each prompt embedded once (until `limit` are held)."""

    def __init__(self, text_model: str, device: torch.device, limit: int = 100_000):
        self.text_model, self.device, self.limit = text_model, device, limit
        # the sentence model runs where training does; embed() keeps one loaded copy per (model, device)
        self.where = str(device)
        self.width = embedding_width(text_model, self.where)
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """The embedding of each prompt, in order."""
        # sorted: the same new prompts are embedded in the same batch, whatever order the micro-batch has them in
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            if len(self.cache) + len(missing) > self.limit:
                # 100,000 rows of 384 float32 are 150 MB per rank: a larger prompt set starts the cache again
                log.info("prompt embedding cache full (%d prompts): starting it again", len(self.cache))
                self.cache.clear()
            self.cache.update(zip(missing, embed(missing, self.text_model, self.where)))
        rows = np.stack([self.cache[p] for p in prompts])
        return torch.from_numpy(rows).to(self.device, non_blocking=True)
