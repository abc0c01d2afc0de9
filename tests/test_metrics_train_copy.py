"""train_copy (fsdfm.metrics.train_copy): the fraction of samples sharing an n-gram of min(16, L // 2) tokens with the
training split, on hand-counted cases, against a brute-force set of training n-grams, and exact under hash collisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsdfm.metrics import compute_metric_set, compute_metrics
from fsdfm.metrics import train_copy as tc
from fsdfm.metrics.registry import METRICS


def brute_force(samples: np.ndarray, stream: np.ndarray, n: int, lengths=None) -> np.ndarray:
    """The definition, with Python sets of tuples: any n-window of sample i (in its first lengths[i]) in the stream."""
    grams = {tuple(stream[p : p + n]) for p in range(len(stream) - n + 1)}
    lens = [samples.shape[1]] * len(samples) if lengths is None else lengths
    return np.array(
        [any(tuple(row[j : j + n]) in grams for j in range(ln - n + 1)) for row, ln in zip(samples, lens)], dtype=bool
    )


def test_n_is_sixteen_or_half_the_length():
    assert [tc.train_copy_n(L) for L in (1, 2, 8, 31, 32, 33, 64, 1024)] == [1, 1, 4, 15, 16, 16, 16, 16]


def test_a_sample_copied_from_train_scores_one_and_an_absent_token_scores_zero():
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 50, (20, 32), generator=gen)  # ids 0..49; id 60 never occurs
    copied = train.reshape(-1)[100:132].unsqueeze(0)  # crosses the boundary of blocks 3 and 4
    absent = torch.full((1, 32), 60)
    samples = torch.cat([copied, absent])
    ms = compute_metric_set(samples, None, ["train_copy"], train_tokens=train)
    assert ms.values["train_copy"] == 0.5
    assert list(ms.per_sample["train_copy"]) == [1.0, 0.0]
    assert ms.details["train_copy"] == {"n": 16, "train_tokens": 640}


def test_hand_counted_cases():
    # stream 0 1 2 3 4 5 (blocks [0 1 2] and [3 4 5]); L = 6 -> n = 3
    train = torch.tensor([[0, 1, 2], [3, 4, 5]])
    samples = torch.tensor(
        [
            [0, 1, 2, 9, 9, 9],  # (0, 1, 2): a training 3-gram -> 1
            [1, 2, 9, 3, 4, 9],  # (1,2,9) (2,9,3) (9,3,4) (3,4,9): none -> 0
            [9, 9, 9, 2, 3, 4],  # (2, 3, 4) crosses the two blocks: contiguous in the stream -> 1
            [5, 4, 3, 2, 1, 0],  # reversed: no 3-gram of the stream -> 0
        ]
    )
    assert compute_metrics(samples, None, ["train_copy"], train_tokens=train) == {"train_copy": 0.5}
    # a sample shorter than its row: sample 0 at length 2 holds no 3-gram; sample 2 at length 5 keeps (9, 2, 3) only
    got = tc.copied_from_train(samples, train.reshape(-1), 3, lengths=[2, 6, 5, 6])
    assert list(got) == [False, False, False, False]
    assert list(tc.copied_from_train(samples, train.reshape(-1), 3, lengths=[3, 6, 6, 6])) == [True, False, True, False]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_the_brute_force_definition_on_random_data(seed):
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 3, size=400)  # V = 3, n = 5: about half the random samples hit
    samples = rng.integers(0, 3, size=(60, 10))
    samples[:5] = [stream[p : p + 10] for p in rng.integers(0, 390, size=5)]
    lengths = rng.integers(1, 11, size=60)
    assert np.array_equal(tc.copied_from_train(samples, stream, 5), brute_force(samples, stream, 5))
    assert np.array_equal(
        tc.copied_from_train(samples, stream, 5, lengths), brute_force(samples, stream, 5, list(lengths))
    )


def test_exact_when_every_window_collides(monkeypatch):
    # base 0: a window's hash is its last token + 1, so hashes collide massively; the token check keeps it exact
    monkeypatch.setattr(tc, "_BASE", np.uint64(0))
    rng = np.random.default_rng(7)
    stream = rng.integers(0, 4, size=300)
    samples = rng.integers(0, 4, size=(40, 8))
    assert np.array_equal(tc.copied_from_train(samples, stream, 4), brute_force(samples, stream, 4))


def test_without_the_training_split_it_is_a_clear_error():
    with pytest.raises(ValueError, match="'train_copy' needs the training split"):
        compute_metrics(torch.zeros(2, 8, dtype=torch.long), None, ["train_copy"])


def test_registered_as_a_data_target_memorisation_metric_in_the_main_table():
    info = METRICS.get("train_copy")
    assert info.needs == ("train",) and info.goal == "data" and info.position("main") is not None
    assert "fsdfm.metrics.train_copy" in info.sources
