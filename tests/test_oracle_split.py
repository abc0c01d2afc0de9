"""The closed-form mask-path split (fsdfm.oracle_split) against the enumerated split of fsdfm.oracle_law on sources
small enough to enumerate: the per-position term exactly, the total correlation within its Monte-Carlo error."""

import pytest
import torch

from fsdfm.data.oracle import HMMSource, MarkovSource
from fsdfm.oracle_law import step_split
from fsdfm.oracle_posterior import ExactPosterior
from fsdfm.oracle_split import mask_step_split
from fsdfm.paths import make_path
from fsdfm.schedulers import make_scheduler


class _Blurred:
    """A denoiser that is not the exact one: the exact logits plus a fixed per-token offset (so per_position > 0)."""

    def __init__(self, exact: ExactPosterior, V: int):
        self.exact = exact
        self.offset = torch.linspace(-0.7, 0.9, V, dtype=torch.float64)

    def __call__(self, x_t, t, h=None):
        return self.exact(x_t, t).to(torch.float64).clamp_min(-30.0) + self.offset


def _sources():
    yield "markov1", MarkovSource(3, order=1, support=2, seed=7, epsilon=0.1)
    yield "markov2", MarkovSource(3, order=2, support=2, seed=1, epsilon=0.05)
    yield "hmm", HMMSource(3, n_states=2, seed=4, epsilon=0.05, mc_samples=16, mc_len=8, mc_burn_in=2)


@pytest.mark.parametrize("name", ["markov1", "markov2", "hmm"])
@pytest.mark.parametrize("rule", ["cumulative_scalar", "euler"])
def test_mask_split_matches_the_enumerated_split(name, rule):
    src = dict(_sources())[name]
    V, L, n = 3, 4, 4000
    path = make_path(make_scheduler("polynomial", n=2), "mask", V)
    exact = ExactPosterior(src, path)
    models = {"exact": exact, "blurred": _Blurred(exact, V)}
    x_1 = torch.from_numpy(src.sample(3, L, seed=0))
    gen = torch.Generator().manual_seed(0)
    for t, h in ((0.0, 0.5), (0.25, 0.375), (0.5, 0.5)):  # the last one is a final step (r = 0)
        x_t = path.sample(x_1, torch.full((3,), t), torch.Generator().manual_seed(2)).x_t
        for x in x_t:
            for mname, model in models.items():
                ref = step_split(model, src, path, x, t, h, rule)
                # n rows of the same state, 2 draws each: the mean over rows is a 2n-draw estimate of TC
                got = mask_step_split(model, src, path, x.expand(n, L), t, h, rule, draws=2, generator=gen)
                assert float(got.per_position[0]) == pytest.approx(float(ref.per_position.sum()), abs=1e-9)
                assert torch.allclose(got.per_position, got.per_position[0].expand(n))
                tc, se = float(got.tc.mean()), float(got.tc.std() / n**0.5)
                assert abs(tc - ref.tc) <= 4 * se + 1e-9, (name, rule, t, h, mname, tc, ref.tc, se)
                assert float(got.path_kl.mean()) == pytest.approx(tc + float(got.per_position[0]), abs=1e-12)
                if mname == "exact" and rule == "cumulative_scalar":
                    # the exact posterior with the cumulative-scalar rule has no per-position error (mask source)
                    assert float(got.per_position.max()) < 1e-10


def test_mask_split_fully_observed_and_one_masked_position_have_no_factorization():
    src = MarkovSource(3, order=1, support=2, seed=7, epsilon=0.1)
    path = make_path(make_scheduler("polynomial", n=2), "mask", 3)
    exact = ExactPosterior(src, path)
    x = torch.tensor([[0, 3, 2, 1], [0, 1, 2, 1]])  # one masked position; none
    got = mask_step_split(exact, src, path, x, 0.5, 0.25, "cumulative_scalar", draws=4)
    # one moving position (or none): J is its own product of marginals, every draw's integrand is exactly 0
    assert torch.allclose(got.tc, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(got.tc_se, torch.zeros(2, dtype=torch.float64), atol=1e-12)


def test_mask_split_refuses_the_uniform_source_and_a_single_draw():
    src = MarkovSource(3, order=1, support=2, seed=7, epsilon=0.1)
    uni = make_path(make_scheduler("polynomial", n=2), "uniform", 3)
    x = torch.zeros((1, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="mask source"):
        mask_step_split(ExactPosterior(src, uni), src, uni, x, 0.5, 0.25, "euler")
    mask = make_path(make_scheduler("polynomial", n=2), "mask", 3)
    with pytest.raises(ValueError, match="draws must be >= 2"):
        mask_step_split(ExactPosterior(src, mask), src, mask, x, 0.5, 0.25, "euler", draws=1)
