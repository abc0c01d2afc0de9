"""The training-free samplers and sampler knobs (fsdfm.sampling) against known answers: reveal orders, degenerate
limits, distributions (chi-square), bit-identity with the plain loop, the oracle's expected NLL, and the few-step
output law computed exactly by enumeration."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chi2 as chi2_dist

from fsdfm.data.oracle import MarkovSource
from fsdfm.oracle_posterior import ExactPosterior
from fsdfm.paths import make_path
from fsdfm.samplers import sample
from fsdfm.sampling import SamplerKnobs, sample_with_knobs
from fsdfm.sampling.knobs import knob_errors, nucleus, probs_from_logits
from fsdfm.sampling.steps import confidence_step, draw_inverse_cdf
from fsdfm.schedulers import make_scheduler


def _path(V: int):
    return make_path(make_scheduler("polynomial", n=1.0), "mask", V)


class FixedLogits:
    """A "model" whose logits (L, V) ignore x_t; records every input state (to read the reveal order)."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.seen = logits, []

    def __call__(self, x, t, h=None):
        self.seen.append(x.clone())
        return self.logits.expand(x.shape[0], *self.logits.shape).clone()


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value of counts against probs (cells of expected count < 5 pooled)."""
    n = counts.sum()
    exp = n * probs
    keep = exp >= 5
    c = np.append(counts[keep], counts[~keep].sum())
    e = np.append(exp[keep], exp[~keep].sum())
    c, e = (c[:-1], e[:-1]) if e[-1] == 0 else (c, e)
    stat = float(((c - e) ** 2 / e).sum())
    return float(chi2_dist.sf(stat, len(c) - 1))


def test_confidence_at_budget_L_reveals_one_per_step_in_confidence_order():
    """T = 0: the confidence of position i is max_v p_i(v); at budget L each step reveals exactly one position, the
    most confident still masked, so the reveal order is argsort(-max p)."""
    V, L = 5, 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(L, V, generator=g, dtype=torch.float64) * 3
    model = FixedLogits(logits)
    out = sample_with_knobs(model, _path(V), n_samples=2, seq_len=L, n_steps=L, rule="confidence",
                            knobs={"temperature": 0.0}, generator=g)  # fmt: skip
    states = model.seen + [out.tokens]
    order = [int((states[i] != states[i + 1])[0].nonzero().squeeze()) for i in range(L)]  # one change per step
    assert order == torch.argsort(-torch.softmax(logits, -1).amax(-1)).tolist()
    assert torch.equal(out.tokens[0], logits.argmax(-1)) and out.nfe == L


def test_confidence_step_reveals_the_most_confident_draw_without_noise_in_the_score():
    """T = 1: the step reveals the masked position whose drawn token has the largest p (the score reads p only):
    recomputed from the same uniforms."""
    V, L = 6, 7
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(4, L, V, generator=g, dtype=torch.float64), -1)
    x = torch.full((4, L), V)
    x[:, 2] = 1  # one position already revealed
    before = g.get_state()
    new = confidence_step(x, p, V, torch.ones(4, dtype=torch.long), "confidence", g)
    g.set_state(before)
    x_hat = draw_inverse_cdf(p, g)
    conf = p.gather(-1, x_hat[..., None]).squeeze(-1)
    conf[:, 2] = -1.0
    best = conf.argmax(-1)
    assert ((new != x).sum(-1) == 1).all()
    assert torch.equal(new[torch.arange(4), best], x_hat[torch.arange(4), best])


def test_threshold_tau_one_is_one_per_step_at_budget_L():
    V, L = 4, 5
    g = torch.Generator().manual_seed(1)
    model = FixedLogits(torch.randn(L, V, generator=g, dtype=torch.float64))
    out = sample_with_knobs(model, _path(V), n_samples=3, seq_len=L, n_steps=L, rule="threshold", knobs={"tau": 1.0},
                            generator=g)  # fmt: skip
    states = model.seen + [out.tokens]
    assert all(bool(((states[i] != states[i + 1]).sum(-1) == 1).all()) for i in range(L))
    assert out.nfe_per_sample.tolist() == [float(L)] * 3


def test_threshold_counts_nfe_per_sample():
    """A confident model (p ~ 1 everywhere) reveals everything in one forward: NFE 1 per sample, not the budget."""
    V, L = 4, 6
    logits = torch.full((L, V), -50.0, dtype=torch.float64)
    logits[:, 0] = 0.0
    out = sample_with_knobs(FixedLogits(logits), _path(V), n_samples=3, seq_len=L, n_steps=L, rule="threshold",
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.nfe_per_sample.tolist() == [1.0] * 3 and (out.tokens == 0).all()


def test_temperature_zero_is_argmax_and_one_is_unchanged():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    assert torch.equal(probs_from_logits(logits, SamplerKnobs(temperature=0.0)).argmax(-1), logits.argmax(-1))
    assert torch.allclose(
        probs_from_logits(logits, SamplerKnobs(temperature=1e-4)),
        probs_from_logits(logits, SamplerKnobs(temperature=0.0)),
    )
    assert torch.equal(probs_from_logits(logits, SamplerKnobs()), torch.softmax(logits, -1))
    V, L = 6, 3
    lg = torch.randn(L, V, generator=g, dtype=torch.float64)
    out = sample_with_knobs(FixedLogits(lg), _path(V), n_samples=4, seq_len=L, n_steps=2, knobs={"temperature": 0.0},
                            generator=g)  # fmt: skip
    assert torch.equal(out.tokens, lg.argmax(-1).expand(4, L))


def test_temperature_one_draws_softmax_chi_square():
    """Knob loop at T = 1 (block_length set so the knob loop runs): each position's tokens ~ softmax(logits)."""
    V, L, n = 5, 2, 20000
    g = torch.Generator().manual_seed(4)
    lg = torch.randn(L, V, generator=g, dtype=torch.float64)
    for rule in ("cumulative_scalar", "confidence"):
        out = sample_with_knobs(FixedLogits(lg), _path(V), n_samples=n, seq_len=L, n_steps=2, rule=rule,
                                knobs={"temperature": 1.0, "block_length": 1}, generator=g)  # fmt: skip
        for i in range(L):
            counts = np.bincount(out.tokens[:, i].numpy(), minlength=V)
            assert _chi2_pvalue(counts, torch.softmax(lg[i], -1).numpy()) > 1e-4


def test_top_p_one_is_identity_and_nucleus_known_answer():
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=torch.float64)
    assert nucleus(p, 1.0) is p
    assert torch.allclose(nucleus(p, 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]], dtype=torch.float64))
    assert torch.allclose(nucleus(p, 0.81), torch.tensor([[0.0, 0.5, 0.15, 0.3]], dtype=torch.float64) / 0.95)
    assert torch.equal(nucleus(p, 0.4), torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("schedule", ["cap", "rescale"])
def test_remdm_with_zero_remasking_is_mdlm_bit_for_bit(schedule):
    src = MarkovSource(6, order=1, support=3, seed=1, epsilon=0.01)
    model = ExactPosterior(src, _path(6))
    kw = dict(n_samples=32, seq_len=7, n_steps=5)
    base = sample(model, model.path, rule="mdlm", generator=torch.Generator().manual_seed(9), **kw)
    re = sample_with_knobs(model, model.path, rule="remdm", knobs={"remask": schedule, "eta": 0.0},
                           generator=torch.Generator().manual_seed(9), **kw)  # fmt: skip
    assert torch.equal(base.tokens, re.tokens)
    via_plain = sample(model, model.path, rule="remdm", generator=torch.Generator().manual_seed(9), **kw)
    assert via_plain.tokens.shape == (32, 7)  # the plain loop hands a whole-step sampler its own loop


def test_default_knobs_are_the_plain_loop():
    src = MarkovSource(6, order=1, support=3, seed=1)
    model = ExactPosterior(src, _path(6))
    kw = dict(n_samples=16, seq_len=5, n_steps=3, rule="cumulative_scalar")
    a = sample(model, model.path, generator=torch.Generator().manual_seed(2), **kw).tokens
    b = sample_with_knobs(model, model.path, knobs={}, generator=torch.Generator().manual_seed(2), **kw).tokens
    assert torch.equal(a, b)


# ReMDM's eta is a per-step remasking probability: at a fixed eta, more steps means more remasking (no continuous
# limit), and every remask-reveal cycle re-draws positions in parallel from product marginals. So "many steps" means
# eta N bounded: eta = 0.5 / N here.
EXACT_SAMPLERS = [
    ("cumulative_scalar", {"block_length": 2}),
    ("confidence", {"score": "top_prob"}),
    ("confidence", {"score": "margin"}),
    ("confidence", {"score": "entropy", "block_length": 2}),
    ("remdm", {"remask": "cap", "eta": 0.5 / 256}),
    ("remdm", {"remask": "rescale", "eta": 0.5 / 256}),
    ("remdm", {"remask": "loop", "eta": 0.5 / 256}),
    ("cumulative_scalar", {"greedy_tail": True}),
]


@pytest.mark.parametrize("rule,knobs", EXACT_SAMPLERS, ids=[f"{r}-{k}" for r, k in EXACT_SAMPLERS])
def test_exact_denoiser_many_steps_reproduces_the_expected_nll(rule, knobs):
    """Driven by the exact posterior at many steps, a sampler whose order depends on the state only reproduces the
    source: mean NLL within 3 standard errors of the exact expected NLL per token. (Greedy-tail: at many steps
    the last step reveals almost nothing, so its argmax costs nothing measurable.)"""
    src = MarkovSource(6, order=1, support=3, seed=2, epsilon=0.01)
    model = ExactPosterior(src, _path(6))
    Ls, n = 4, 1024  # 64 L steps: two reveals in one step (the product error) in ~2% of sequences at most
    out = sample_with_knobs(model, model.path, n_samples=n, seq_len=Ls, n_steps=64 * Ls, rule=rule, knobs=knobs,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    per_seq = -src.log_prob(out.tokens.numpy()) / Ls
    se = per_seq.std(ddof=1) / np.sqrt(n)
    assert abs(per_seq.mean() - src.expected_nll_per_token(Ls).value) < 3 * se


@pytest.mark.parametrize("rule,knobs", [("confidence", {}), ("threshold", {"tau": 0.5})])
def test_draw_dependent_order_is_sharper_than_the_source(rule, knobs):
    """Choosing positions by the probability of what was drawn there (LLaDA's low_confidence at T = 1, Fast-dLLM's
    threshold) favours likely draws: even the exact denoiser at budget L samples below the source's NLL."""
    src = MarkovSource(6, order=1, support=3, seed=2, epsilon=0.01)
    model = ExactPosterior(src, _path(6))
    Ls, n = 6, 768
    out = sample_with_knobs(model, model.path, n_samples=n, seq_len=Ls, n_steps=Ls, rule=rule, knobs=knobs,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    per_seq = -src.log_prob(out.tokens.numpy()) / Ls
    se = per_seq.std(ddof=1) / np.sqrt(n)
    assert per_seq.mean() < src.expected_nll_per_token(Ls).value - 3 * se


def _exact_law_confidence(src, V, L, counts, tau=None):
    """The output law of confidence-ordered (tau None) or threshold decoding driven by the exact posterior, by
    enumerating every state and every joint draw (numpy, independent of the sampler's code): {sequence: prob}."""
    seqs = np.array(list(itertools.product(range(V), repeat=L)))
    w_src = np.exp(src.log_prob(seqs))

    def marginals(state):  # exact p(x^i = v | revealed) by enumeration
        ok = np.all((seqs == state) | (state == V), axis=1)
        w = w_src * ok
        return np.stack([np.bincount(seqs[:, i], weights=w, minlength=V) for i in range(L)]) / w.sum()

    law = {tuple([V] * L): 1.0}
    for step, k in enumerate(counts):
        nxt = {}
        for state, pr in law.items():
            st = np.array(state)
            masked = np.flatnonzero(st == V)
            if len(masked) == 0:
                nxt[state] = nxt.get(state, 0.0) + pr
                continue
            m = marginals(st)
            for draw in itertools.product(range(V), repeat=len(masked)):
                q = np.prod([m[i, d] for i, d in zip(masked, draw)])
                if q == 0:
                    continue
                conf = np.array([m[i, d] for i, d in zip(masked, draw)])
                rank_conf = np.round(conf * 2.0**36) / 2.0**36  # the sampler's tie grid (equal marginals tie)
                if tau is None:
                    kk = k
                else:
                    kk = max(int((conf > tau).sum()), -(-len(masked) // (len(counts) - step)))
                order = sorted(range(len(masked)), key=lambda j: (-rank_conf[j], masked[j]))[:kk]
                new = st.copy()
                for j in order:
                    new[masked[j]] = draw[j]
                nxt[tuple(new)] = nxt.get(tuple(new), 0.0) + pr * q
        law = nxt
    return law


@pytest.mark.parametrize("tau", [None, 0.6])
def test_few_step_law_matches_enumeration(tau):
    """V^L = 27: the 2-step output law of confidence-ordered / threshold decoding computed exactly equals the
    Monte-Carlo frequencies (chi-square)."""
    V, L, n = 3, 3, 12000
    src = MarkovSource(V, order=1, support=2, seed=5, epsilon=0.05)
    model = ExactPosterior(src, _path(V))
    rule, knobs = ("confidence", {}) if tau is None else ("threshold", {"tau": tau})
    out = sample_with_knobs(model, model.path, n_samples=n, seq_len=L, n_steps=2, rule=rule, knobs=knobs,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    law = _exact_law_confidence(src, V, L, [2, 1], tau)
    seqs = list(itertools.product(range(V), repeat=L))
    probs = np.array([law.get(s, 0.0) for s in seqs])
    assert abs(probs.sum() - 1) < 1e-12
    idx = (out.tokens.numpy() * V ** np.arange(L - 1, -1, -1)).sum(1)
    counts = np.bincount(idx, minlength=V**L)
    assert counts[probs == 0].sum() == 0
    assert _chi2_pvalue(counts, probs) > 1e-4


def test_tied_scores_go_left_by_default_and_uniformly_at_random_with_ties_random():
    """Every position ties (the same p everywhere, the exact denoiser's first step on a stationary source): `left`
    reveals the leftmost k, `random` reveals each position with probability k / L (chi-square over many rows)."""
    V, L, k, rows = 5, 8, 2, 4000
    p = torch.softmax(torch.randn(V, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), -1)
    p = p.expand(rows, L, V).clone()
    x = torch.full((rows, L), V)
    kk = torch.full((rows,), k)
    left = confidence_step(x, p, V, kk, "top_prob", torch.Generator().manual_seed(1))
    assert ((left != V)[:, :k]).all() and not (left != V)[:, k:].any()
    rand = confidence_step(x, p, V, kk, "top_prob", torch.Generator().manual_seed(1), ties="random")
    assert ((rand != V).sum(-1) == k).all()
    counts = (rand != V).sum(0).double().numpy()
    assert _chi2_pvalue(counts, np.full(L, 1.0 / L)) > 1e-3
    # the drawn tokens are the same x^ either way (the tie key is drawn after them)
    revealed = rand != V
    assert torch.equal(rand[revealed], draw_inverse_cdf(p, torch.Generator().manual_seed(1))[revealed])


def test_random_ties_leave_untied_orders_alone():
    """Distinct scores: `random` reveals exactly what `left` reveals (the key only orders equal scores)."""
    V, L = 6, 7
    p = torch.softmax(torch.randn(50, L, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64), -1)
    x = torch.full((50, L), V)
    kk = torch.full((50,), 3)
    a = confidence_step(x, p, V, kk, "margin", torch.Generator().manual_seed(5))
    b = confidence_step(x, p, V, kk, "margin", torch.Generator().manual_seed(5), ties="random")
    assert torch.equal(a, b)


def test_ties_is_a_validated_knob_of_the_ordered_rules_only():
    assert SamplerKnobs(ties="random").non_default() == {"ties": "random"}
    with pytest.raises(ValueError, match="ties must be one of left, random"):
        SamplerKnobs(ties="rightmost")
    assert knob_errors({"ties": "random"}, ("confidence",), "mask") == []
    assert [k for k, _ in knob_errors({"ties": "random"}, ("mdlm",), "mask")] == ["ties"]
