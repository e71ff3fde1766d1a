"""The population measures of drift, each against a value worked out by hand on a small case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from revprompt.evaluation.population import caption_clusters, cmmd, frechet_distance, precision_recall


def test_frechet_distance_by_hand():
    # 1-D: means 1 and 6, variances (ddof 1) 2 and 8: 25 + 2 + 8 - 2 * sqrt(16) = 27
    assert frechet_distance(np.array([[0.0], [2.0]]), np.array([[4.0], [8.0]])) == pytest.approx(27.0)
    # a set against itself shifted by (3, 4): only the means differ, by 5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + np.array([3.0, 4.0, 0.0])) == pytest.approx(25.0, abs=1e-6)
    assert frechet_distance(x[:1], x) is None


def test_cmmd_by_hand():
    # scale 1, sigma 1: k = exp(-d^2 / 2); x = {0, 1}, y = {0, 2}; the means of the 2 x 2 kernel matrices
    within_x = (2 + 2 * math.exp(-0.5)) / 4
    within_y = (2 + 2 * math.exp(-2.0)) / 4
    across = (1 + math.exp(-2.0) + math.exp(-0.5) + math.exp(-0.5)) / 4
    got = cmmd(np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]]), sigma=1.0, scale=1.0)
    assert got == pytest.approx(within_x + within_y - 2 * across)
    same = np.random.default_rng(1).normal(size=(20, 4))
    same /= np.linalg.norm(same, axis=1, keepdims=True)  # as CLIP embeddings are
    assert cmmd(same, same) == pytest.approx(0.0, abs=1e-9) and cmmd(same, same[::-1]) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(same, np.roll(same, 1, axis=1)) > 0
    assert cmmd(same[:1], same) is None


def test_precision_and_recall_by_hand():
    # real {0, 1, 10, 11}: every 1-NN radius is 1. fake {0.5, 5, 10.2, 20}: 0.5 and 10.2 fall in a ball (precision
    # 1/2); the fakes' radii are 4.5, 4.5, 5.2, 9.8 and every real point lies within one of them (recall 1)
    real = np.array([[0.0], [1.0], [10.0], [11.0]])
    fake = np.array([[0.5], [5.0], [10.2], [20.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    assert precision_recall(real, real, k=1) == (1.0, 1.0)
    assert precision_recall(real[:1], fake, k=1) == (None, None)


def test_caption_clusters_by_hand():
    a, b, c = np.array([1.0, 0.0]), np.array([0.99, math.sqrt(1 - 0.99 ** 2)]), np.array([0.0, 1.0])
    assert caption_clusters(np.stack([a, b, c]), threshold=0.9) == 2  # a ~ b, c alone
    # a chain joins: a ~ m and m ~ c while a and c are far apart
    m = np.array([math.cos(math.pi / 8), math.sin(math.pi / 8)])
    far = np.array([math.cos(math.pi / 4), math.sin(math.pi / 4)])
    assert caption_clusters(np.stack([a, m, far]), threshold=0.9) == 1
    assert caption_clusters(np.zeros((0, 2))) == 0
