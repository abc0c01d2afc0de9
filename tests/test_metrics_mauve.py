"""MAUVE on our own features: ordering of same- vs different-distribution texts, recorded n and buckets."""

import random

import numpy as np
import pytest

from fsdfm.metrics.mauve import FEATURIZERS, get_featurizer, mauve_score, minilm_model_dir, resolve_num_buckets
from fsdfm.registry import UnknownNameError
from metrics_fixtures import gpt2_evaluator, tinystories

STORIES = tinystories("valid", n=40, words=30)
SAMPLES, REFERENCES = STORIES[:20], STORIES[20:]


def gibberish(n, seed=0):
    """Texts from another distribution: random lowercase 'words'."""
    rng = random.Random(seed)
    letters = "bcdfghjklmnpqrstvwxz"

    def word():
        return "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))

    return [" ".join(word() for _ in range(30)) for _ in range(n)]


def test_minilm_features_are_unit_norm_and_order_independent():
    featurize = get_featurizer("minilm")
    assert (minilm_model_dir() / "model.safetensors").is_file()
    feats = featurize(SAMPLES[:5])
    assert feats.shape == (5, 384) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    # batching is by length; rows must come back in input order
    np.testing.assert_allclose(featurize(SAMPLES[:5][::-1]), feats[::-1], atol=1e-5)


def test_mauve_minilm_same_distribution_beats_different():
    same = mauve_score(SAMPLES, REFERENCES, featurizer="minilm", seed=1)
    different = mauve_score(gibberish(20), REFERENCES, featurizer="minilm", seed=1)
    assert same.value > different.value
    assert same.n == 20 and same.featurizer == "minilm" and same.num_buckets == 2  # 'auto' = max(2, round(20 / 10))
    assert 0.0 < different.value <= same.value <= 1.0


def test_mauve_evaluator_featurizer_and_fixed_buckets():
    ev = gpt2_evaluator()
    feats = get_featurizer("evaluator", evaluator=ev)(SAMPLES[:4])
    assert feats.shape == (4, 32)
    result = mauve_score(SAMPLES, REFERENCES, featurizer="evaluator", evaluator=ev, num_buckets=4, seed=0)
    assert result.featurizer == "evaluator" and result.num_buckets == 4 and result.n == 20
    assert 0.0 < result.value <= 1.0


def test_mauve_errors():
    with pytest.raises(ValueError, match="as many references as samples"):
        mauve_score(SAMPLES, REFERENCES[:10])
    with pytest.raises(ValueError, match="no samples"):
        mauve_score([], [])
    with pytest.raises(UnknownNameError, match="did you mean 'minilm'"):
        mauve_score(SAMPLES, REFERENCES, featurizer="minilmm")
    with pytest.raises(ValueError, match="needs an evaluator"):
        get_featurizer("evaluator")
    with pytest.raises(ValueError, match="num_buckets"):
        resolve_num_buckets(1, 30)
    assert resolve_num_buckets("auto", 500) == 50 and resolve_num_buckets("auto", 4) == 2
    assert FEATURIZERS.names() == ["evaluator", "minilm"]
