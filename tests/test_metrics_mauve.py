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
    assert set(FEATURIZERS.names()) >= {"evaluator", "minilm"}


class BagOfWords:
    """A tiny fake featurizer: L2-normalised word counts over a fixed vocabulary (d = len(vocab))."""

    name = "bag_of_words"

    def __init__(self, vocab):
        self.index = {w: i for i, w in enumerate(vocab)}

    def __call__(self, texts):
        feats = np.zeros((len(texts), len(self.index)), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in t.split():
                feats[r, self.index[w]] += 1
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-9)

    def weights_sha256(self):
        return "0" * 64


LEFT = ["cat", "dog", "sat", "mat", "ran", "red"]
RIGHT = ["one", "two", "six", "ten", "zero", "nine"]


def _texts(vocab, n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(5)) for _ in range(n)]


def test_mauve_is_one_on_identical_sets_and_near_zero_on_disjoint_vocabularies():
    feat = BagOfWords(LEFT + RIGHT)
    left = _texts(LEFT, 24, 0)
    same = mauve_score(left, list(left), featurizer=feat, num_buckets=4, seed=3, n_seeds=5)
    assert same.seeds == (3, 4, 5, 6, 7) and len(same.values) == 5
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in same.values) and same.value == pytest.approx(1.0, abs=1e-6)
    apart = mauve_score(left, _texts(RIGHT, 24, 1), featurizer=feat, num_buckets=4, seed=0, n_seeds=6)
    assert len(apart.values) == 6 and max(apart.values) < 0.05
    # the stored mean and std are those of the per-seed values (sample std, ddof 1)
    assert apart.value == pytest.approx(np.mean(apart.values)) and apart.std == pytest.approx(
        np.std(apart.values, ddof=1)
    )
    rec = apart.record()
    assert rec["n_per_side"] == 24 and rec["num_buckets"] == 4 and rec["featurizer"] == "bag_of_words"
    assert rec["featurizer_sha256"] == "0" * 64 and rec["seeds"] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="n_seeds must be an int >= 5"):
        mauve_score(left, left, featurizer=feat, n_seeds=1)


def test_minilm_weights_hash_is_the_safetensors_sha256():
    import hashlib

    expected = hashlib.sha256((minilm_model_dir() / "model.safetensors").read_bytes()).hexdigest()
    assert get_featurizer("minilm").weights_sha256() == expected
