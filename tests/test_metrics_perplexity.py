"""gen_ppl / gen_ppl_seq_mean against a straightforward per-sample loop with a manual log-softmax."""

import math

import pytest
import torch

from fsdfm.metrics.evaluator import Evaluator, EvaluatorError, load_evaluator
from fsdfm.metrics.perplexity import gen_ppl, gen_ppl_seq_mean, scored_mask
from metrics_fixtures import WORDS, gpt2_evaluator, word_evaluator

WORD_TEXTS = [
    "the cat sat on the mat",
    "a dog ran <eos> the cat sat",  # EOS in the middle: scored once, text after it still scored
    "big red dog <eos> <eos> a cat <eos>",  # second and third EOS unscored
    "<eos> the dog sat <eos> on",  # EOS at position 0 is the first EOS (and unscored as position 0)
    "small",  # one token: nothing to score, still counted as a sample
    "blue and red and blue and red cat dog mat on a",
    "the the the the",
]


@torch.no_grad()
def reference_nll(texts, evaluator):
    """Independent computation: one text at a time, no padding, manual log-softmax, python EOS bookkeeping."""
    eos = evaluator.tokenizer.eos_token_id
    total, count = 0.0, 0
    for text in texts:
        ids = evaluator.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            continue
        logits = evaluator.model(torch.tensor([ids])).logits[0].double()
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        seen_eos = ids[0] == eos
        for j in range(1, len(ids)):
            if ids[j] != eos or not seen_eos:
                total += -float(logp[j - 1, ids[j]])
                count += 1
            seen_eos = seen_eos or ids[j] == eos
    return total, count


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_gen_ppl_matches_per_sample_loop(batch_size):
    ev = word_evaluator()
    result = gen_ppl(WORD_TEXTS, ev, batch_size=batch_size)
    total, count = reference_nll(WORD_TEXTS, ev)
    assert result.n_samples == len(WORD_TEXTS)
    assert result.n_tokens == count
    # counted by hand: 5 + 6 + 5 (red dog <eos> a cat) + 4 (the dog sat on) + 0 + 11 + 3 scored targets
    assert count == 34
    assert result.nll_sum == pytest.approx(total, rel=1e-5)
    assert result.value == pytest.approx(math.exp(total / count), rel=1e-5)


def test_gen_ppl_gpt2_tokenizer_with_eos_in_the_middle():
    ev = gpt2_evaluator()
    texts = [
        "Once upon a time, there was a little girl.<|endoftext|>She liked cats.",
        "The end.<|endoftext|><|endoftext|><|endoftext|>",
        "Tom and Sue went to the park to play on the swings and the slide.",
        "Hi",
    ]
    result = gen_ppl(texts, ev, batch_size=3)  # a remainder batch of one
    total, count = reference_nll(texts, ev)
    assert result.n_samples == 4 and result.n_tokens == count
    assert result.value == pytest.approx(math.exp(total / count), rel=1e-5)


def test_scored_mask_first_eos_only():
    ids = torch.tensor([[5, 1, 6, 1, 7, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0]])
    # targets are positions 1..5: EOS(first) yes, 6 yes, EOS(second) no, 7 yes, padding no
    assert scored_mask(ids, valid, eos_id=1).tolist() == [[True, True, False, True, False]]
    assert scored_mask(ids, valid, eos_id=None).tolist() == [[True, True, True, True, False]]


def test_gen_ppl_truncates_to_max_length_and_counts_it():
    ev = word_evaluator()
    with pytest.warns(UserWarning, match="truncated"):
        result = gen_ppl(["the cat sat on the mat", "a dog"], ev, max_length=3)
    assert result.n_truncated == 1
    assert result.n_tokens == 2 + 1


def test_gen_ppl_errors():
    ev = word_evaluator()
    with pytest.raises(ValueError, match="no texts"):
        gen_ppl([], ev)
    with pytest.raises(ValueError, match="scorable"):
        gen_ppl(["cat", ""], ev)


class Uniform(torch.nn.Module):
    """A 'language model' whose every prediction is uniform over V tokens: perplexity exactly V."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab_size) + self.dummy


def test_gen_ppl_seq_mean_uniform_model_is_vocab_size():
    ids = torch.randint(0, 11, (5, 9))
    result = gen_ppl_seq_mean(ids, Uniform(11), batch_size=2)
    assert result.value == pytest.approx(11.0)
    assert result.n_samples == 5 and result.n_tokens == 5 * 8


@torch.no_grad()
def test_gen_ppl_seq_mean_matches_per_sample_loop():
    ev = word_evaluator(seed=1)
    ids = torch.randint(0, len(WORDS), (7, 12), generator=torch.Generator().manual_seed(0))
    ids[2, 4] = ev.eos_token_id  # raw-id convention: EOS is an ordinary token here
    expected = []
    for row in ids:
        logits = ev.model(row[None]).logits[0].double()
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        nll = [-float(logp[j - 1, row[j]]) for j in range(1, len(row))]
        expected.append(math.exp(sum(nll) / len(nll)))
    for model in (ev, ev.model):
        result = gen_ppl_seq_mean(ids, model, batch_size=3)
        assert result.value == pytest.approx(sum(expected) / len(expected), rel=1e-5)
        assert result.n_samples == 7


def test_gen_ppl_seq_mean_errors():
    ev = word_evaluator()
    with pytest.raises(ValueError, match="vocabulary"):
        gen_ppl_seq_mean(torch.full((2, 4), len(WORDS)), ev)
    with pytest.raises(ValueError, match="shape"):
        gen_ppl_seq_mean(torch.zeros((2, 1), dtype=torch.long), ev)


def test_load_evaluator_roundtrip(tmp_path):
    ev = word_evaluator(seed=3)
    ev.model.save_pretrained(tmp_path)
    ev.tokenizer.save_pretrained(tmp_path)
    loaded = load_evaluator(tmp_path)
    assert isinstance(loaded, Evaluator) and loaded.eos_token_id == ev.eos_token_id
    assert loaded.max_length == 64 and loaded.vocab_size == len(WORDS)
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert gen_ppl(WORD_TEXTS, loaded).value == pytest.approx(gen_ppl(WORD_TEXTS, ev).value, rel=1e-6)


def test_load_evaluator_fails_fast_offline(tmp_path):
    with pytest.raises(EvaluatorError, match="does not exist"):
        load_evaluator(tmp_path / "missing")
    with pytest.raises(EvaluatorError, match=r"'fsdfm-no-such-model-xyz' is not available offline .*local path"):
        load_evaluator("fsdfm-no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluatorError, match="cannot load"):
        load_evaluator(tmp_path / "empty")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_per_sample_nlls_summed_and_pooled_reproduce_gen_ppl_exactly(batch_size):
    ev = word_evaluator()
    result = gen_ppl(WORD_TEXTS, ev, batch_size=batch_size)
    # per-sample, in input order: each row's own summed NLL and scored-token count
    for i, text in enumerate(WORD_TEXTS):
        total, count = reference_nll([text], ev)
        assert result.sample_tokens[i] == count
        assert result.sample_nll[i] == pytest.approx(total, rel=1e-5, abs=1e-9)
    assert result.sample_tokens.tolist() == [5, 6, 5, 4, 0, 11, 3]
    assert math.exp(math.fsum(result.sample_nll.tolist()) / int(result.sample_tokens.sum())) == result.value
    assert not result.sample_truncated.any()


def test_per_sample_truncation_flags():
    ev = word_evaluator()
    with pytest.warns(UserWarning, match="1 of 2 texts exceed 3"):
        result = gen_ppl(["the cat sat on the mat", "the cat"], ev, max_length=3)
    assert result.n_truncated == 1 and result.sample_truncated.tolist() == [True, False]
    assert result.sample_tokens.tolist() == [2, 1]
