"""The text metrics' convention: end-of-text markers removed, on samples and references alike."""

import pytest

from fsdfm.metrics import compute_metric_set, self_bleu
from fsdfm.metrics.texts import END_MARKERS, TEXT_CONVENTION, strip_end_markers


def test_strip_end_markers_replaces_each_marker_and_its_whitespace_by_one_space():
    texts = ["The end.<|endoftext|>Once upon", "a  <|endoftext|> <|endoftext|>", "<eos>plain", "none here"]
    assert strip_end_markers(texts) == ["The end. Once upon", "a", "plain", "none here"]
    assert strip_end_markers(texts, ()) == texts
    assert "<|endoftext|>" in TEXT_CONVENTION and "<|endoftext|>" in END_MARKERS


def test_self_bleu_sees_the_stripped_texts_and_records_the_convention():
    import torch

    texts = [
        "the cat sat on the mat<|endoftext|>",
        "a dog ran on the mat<|endoftext|><|endoftext|>",
        "the cat ran<|endoftext|>",
        "a red dog sat",
    ]
    ids = torch.arange(40).view(4, 10)
    out = compute_metric_set(ids, texts, ["self_bleu"], seed=0, self_bleu_subsample=None)
    assert out.values["self_bleu"] == pytest.approx(self_bleu(strip_end_markers(texts)).value)
    assert out.values["self_bleu"] != pytest.approx(self_bleu(texts).value)
    assert out.details["self_bleu"]["text_convention"] == TEXT_CONVENTION and out.n_samples["self_bleu"] == 4
