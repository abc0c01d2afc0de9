"""The protocol-audit perplexity conventions (fsdfm.metrics.protocol), each against an independent computation."""

import math

import torch

from fsdfm.metrics import compute_metrics
from fsdfm.metrics.perplexity import _token_nll
from metrics_fixtures import WORDS, word_evaluator

TEXTS = ["the cat sat on the mat", "a dog ran on a big red mat", "the the dog sat small blue cat on", "a cat ran"]


def _ids(ev, texts):
    return ev.tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_a_uniform_evaluator_gives_V_under_every_convention():
    ev = word_evaluator()
    with torch.no_grad():
        ev.model.lm_head.weight.zero_()  # logits 0: p = 1 / V for every token, in every context
    ids = torch.tensor([r[:3] for r in _ids(ev, TEXTS)])
    names = ["gen_ppl", "gen_ppl_raw", "gen_ppl_seq_mean", "gen_ppl_first_scored", "gen_ppl_short_ctx"]
    out = compute_metrics(ids, TEXTS, names, evaluator=ev)
    V = ev.model.config.vocab_size
    for n in names:
        assert math.isclose(out[n], V, rel_tol=1e-5), n


def test_first_scored_is_gen_ppl_of_bos_plus_text_with_every_token_scored():
    """Independently: one unpadded forward per sample on [BOS] + tokens, every target scored (the BOS also shifts
    the context of every later token, so this is not gen_ppl plus the first tokens' NLL)."""
    ev = word_evaluator(seed=1)
    enc = _ids(ev, TEXTS)
    ids = torch.tensor([r[:3] for r in enc])
    first = compute_metrics(ids, TEXTS, ["gen_ppl_first_scored"], evaluator=ev)["gen_ppl_first_scored"]
    with torch.no_grad():
        nll = [float(_token_nll(ev, torch.tensor([[ev.eos_token_id] + e]), None).sum()) for e in enc]
    assert math.isclose(first, math.exp(sum(nll) / sum(len(e) for e in enc)), rel_tol=1e-6)


def test_raw_pooled_vs_per_sample_mean_differ_only_in_pooling():
    ev = word_evaluator(seed=2)
    ids = torch.randint(2, len(WORDS), (5, 7), generator=torch.Generator().manual_seed(0))
    out = compute_metrics(ids, None, ["gen_ppl_raw", "gen_ppl_seq_mean"], evaluator=ev)
    with torch.no_grad():
        per = [float(_token_nll(ev, ids[i : i + 1], None).double().mean()) for i in range(5)]
    assert math.isclose(out["gen_ppl_raw"], math.exp(sum(per) / 5), rel_tol=1e-6)
    assert math.isclose(out["gen_ppl_seq_mean"], sum(math.exp(p) for p in per) / 5, rel_tol=1e-6)
    assert out["gen_ppl_raw"] <= out["gen_ppl_seq_mean"]  # Jensen


def test_short_context_scores_each_chunk_from_scratch():
    ev = word_evaluator(seed=3)
    text = ["the cat sat on the mat a dog"]  # 8 tokens: 4 chunks of 2, each scores its second token only
    e = _ids(ev, text)[0]
    got = compute_metrics(torch.tensor([e]), text, ["gen_ppl_short_ctx"], evaluator=ev)["gen_ppl_short_ctx"]
    with torch.no_grad():
        nll = [float(_token_nll(ev, torch.tensor([e[a : a + 2]]), None)[0, 0]) for a in range(0, 8, 2)]
    assert math.isclose(got, math.exp(sum(nll) / 4), rel_tol=1e-6)
