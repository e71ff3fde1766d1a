"""How a population of images (or captions) drifts, not only each sample: the measures of the model-collapse
literature, on image embeddings of the evaluation's image model (CLIP).

- `frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets (FID's formula on
  CLIP features). scipy computes the matrix square root; the formula is a few lines, written here.
- `cmmd`: the squared maximum mean discrepancy with a Gaussian kernel (CMMD, Jayasumana et al. 2024:
  bandwidth 10 on the L2-normalised CLIP embeddings, reported times 1000). Written here: no offline library
  computes it, and torchmetrics (which computes FID and KID on Inception features only) is not a dependency.
- `precision_recall`: k-nearest-neighbour precision and recall (Kynkäänniemi et al. 2019): the share of
  generated samples inside the real samples' k-NN balls, and the reverse. Written here: a dozen lines of
  distances.
- `caption_clusters`: how many distinct captions remain: connected components of the graph joining two
  captions whose text embeddings' cosine is at least `threshold` (scipy's connected_components).

Small sets give noisy figures (the Fréchet distance needs more samples than dimensions for a full-rank
covariance); every function is deterministic for the same inputs.
"""

from __future__ import annotations

import numpy as np

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float | None:
    """|mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) of the two feature sets (rows); None below 2 rows."""
    from scipy import linalg

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        return None
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    s_x, s_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    root = linalg.sqrtm(s_x @ s_y)
    if not np.isfinite(root).all():  # singular products (fewer samples than dimensions): nudge the diagonals
        eps = np.eye(len(s_x)) * 1e-6
        root = linalg.sqrtm((s_x + eps) @ (s_y + eps))
    root = np.real(root)
    return float(np.sum((mu_x - mu_y) ** 2) + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(root))


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float | None:
    """`scale` times the squared MMD between the feature sets with k(a, b) = exp(-|a - b|^2 / (2 sigma^2)), as
    CMMD's reference code computes it (the plain means of the kernel matrices, diagonals included, so a set
    against itself is exactly 0); None below 2 rows in either set."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        return None

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2 * a @ b.T
        return np.exp(-np.maximum(d2, 0.0) / (2 * sigma * sigma))

    return float(scale * (kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float | None, float | None]:
    """(precision, recall): the share of `fake` rows within some real row's distance to its k-th nearest real
    neighbour, and the share of `real` rows within some fake row's k-NN radius among the fakes; (None, None)
    when either set has k rows or fewer."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) <= k or len(fake) <= k:
        return None, None

    def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2 * a @ b.T
        return np.sqrt(np.maximum(d2, 0.0))

    def radii(a: np.ndarray) -> np.ndarray:
        return np.sort(distances(a, a), axis=1)[:, k]  # column 0 is the row itself

    def covered(points: np.ndarray, centres: np.ndarray, r: np.ndarray) -> float:
        return float(np.mean(np.any(distances(points, centres) <= r[None, :], axis=1)))

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def caption_clusters(vectors: np.ndarray, threshold: float = 0.9) -> int:
    """Groups of captions joined by cosine >= `threshold` (rows L2-normalised), counted as connected components."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    vectors = np.asarray(vectors, np.float64)
    if len(vectors) == 0:
        return 0
    joined = csr_matrix(vectors @ vectors.T >= threshold)
    return int(connected_components(joined, directed=False)[0])


def population_entry(original: np.ndarray, drawn: np.ndarray) -> dict:
    """The image-population measures of one iteration's features (`drawn`, n rows) against a reference set
    (`original`: iteration 0's, or the real photos'; n_reference rows)."""
    precision, recall = precision_recall(original, drawn)
    return {"frechet_distance": frechet_distance(original, drawn), "cmmd": cmmd(original, drawn),
            "precision": precision, "recall": recall, "n": int(len(drawn)), "n_reference": int(len(original))}
