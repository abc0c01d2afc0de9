"""Di4C's mixture student (fsdfm.di4c): one component is the product student bit for bit; the mixture likelihood."""

from __future__ import annotations

import math

import pytest
import torch

from fsdfm.di4c import Di4CConfig, LambdaModel, draw_lambda, mixture_nll
from fsdfm.model import DiT, model_config, student_from_teacher
from fsdfm.paths import make_path
from fsdfm.samplers import sample
from fsdfm.schedulers import make_scheduler

V, L = 5, 6


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    cfg = model_config("tiny", V, L, hidden=16, cond_dim=8, n_blocks=1, n_heads=2, input_vocab_size=V + 1)
    model = student_from_teacher(DiT(cfg), "raw")
    with torch.no_grad():  # as if trained: DiT zero-initialises its output layers and the fresh lambda path
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def draw(model, seed):
    path = make_path(make_scheduler("polynomial", n=1), "mask", V)
    gen = torch.Generator().manual_seed(seed)
    return sample(model, path, n_samples=12, seq_len=L, n_steps=3, generator=gen, batch_size=5).tokens


def test_a_one_component_mixture_samples_as_the_product_student_bit_for_bit(student):
    mixture = LambdaModel(student, 1, None)

    def product(x, t, h=None):  # the product student: the network at its one latent value, no mixture
        return student(x, t, torch.full((x.shape[0],), 0.5))

    assert torch.equal(draw(mixture, 3), draw(product, 3))
    # and lambda matters: the logits move with it, and a continuous mixture samples otherwise
    x, t = torch.full((2, L), V), torch.full((2,), 0.3)
    assert not torch.allclose(student(x, t, torch.zeros(2)), student(x, t, torch.ones(2)))
    assert not torch.equal(draw(LambdaModel(student, 0, torch.Generator().manual_seed(3)), 3), draw(product, 3))


def test_lambda_is_drawn_once_per_row_at_each_call(student):
    gen = torch.Generator().manual_seed(0)
    lam = draw_lambda(10_000, 4, gen)
    assert set(lam.unique().tolist()) == {0.125, 0.375, 0.625, 0.875}
    seen = []
    m = LambdaModel(lambda x, t, lam: seen.append(lam) or torch.zeros(x.shape[0], L, V), 0, gen)
    m(torch.zeros(3, L, dtype=torch.long), torch.zeros(3))
    m(torch.zeros(3, L, dtype=torch.long), torch.zeros(3))
    assert seen[0].shape == (3,) and not torch.equal(seen[0], seen[1])


def test_the_mixture_likelihood():
    logp = torch.log(torch.tensor([[0.2], [0.6]], dtype=torch.float64))  # two components, one row
    assert mixture_nll(logp).item() == pytest.approx(-math.log(0.4))
    same = torch.log(torch.tensor([[0.3], [0.3], [0.3]], dtype=torch.float64))
    assert mixture_nll(same).item() == pytest.approx(-math.log(0.3))  # identical components: the product's


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="components"):
        Di4CConfig(components=-1)
    with pytest.raises(ValueError, match="lambda_samples"):
        Di4CConfig(lambda_samples=0)
