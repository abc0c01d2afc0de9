"""The sampler's device weight pass (issue 28): `_chunk_from_logits` (block sums from one pass over the logits, only
the needed blocks recomputed) against `_chunk_float64`'s device path (the float64 (c, V) weights written, then
re-read), which it replaces on a GPU: the same float64 values in the same order, so the same tokens bit for bit."""

import pytest
import torch

from fsdfm.samplers import get_rule
from fsdfm.schedulers import PolynomialScheduler
from fsdfm.sparse_step import _BLOCK, _block_sums, _chunk_float64, _chunk_from_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [64, 300, 2049])
@pytest.mark.parametrize("rule", ["euler", "cumulative_scalar", "mixture_euler"])
def test_chunk_from_logits_draws_the_float64_steps_tokens(dtype, V, rule):
    c = 257
    gen = torch.Generator().manual_seed(V)
    sched = PolynomialScheduler(1)
    dests, jumps = 0, 0
    for scale in (0.5, 4.0, 40.0):  # flat to peaked rows
        l = (torch.randn(c, V, generator=gen) * scale).to(dtype)
        z = torch.randint(V, (c, 1), generator=gen)
        z[:8, 0] = l[:8].float().argmax(-1)  # rows sitting on their most likely token (p(z) large)
        read = torch.rand(c, generator=gen) < 0.8  # the others: final rows or mask positions (no p(z) read)
        u, u_dest = torch.rand(c, dtype=torch.float64, generator=gen), torch.rand(c, dtype=torch.float64, generator=gen)
        t = torch.rand(c, dtype=torch.float64, generator=gen) * 0.9
        h = torch.full((c,), 0.05, dtype=torch.float64)
        args = (z, read, u, u_dest, t, h, get_rule(rule), sched)
        w = torch.zeros(c, -(-V // _BLOCK) * _BLOCK, dtype=torch.float64)
        ref_dest, ref_jump = _chunk_float64(l, w, *args, on_cpu=False)
        dest, jump = _chunk_from_logits(l, *args)
        assert torch.equal(dest, ref_dest) and torch.equal(jump, ref_jump)
        assert bool((dest[read] != z[read, 0]).all())  # a move changes the token ...
        dests += int(dest.unique().numel())
        jumps += int(jump.sum())
    assert dests > 3 and 0 < jumps < 3 * c  # ... and the comparison covered varied draws, jumping and staying


def test_block_sums_known_answer():
    """exp(l - m) summed over blocks of 64 with zero past V: logits 0 and m = 0 give 64 per full block, V % 64 in
    the last one."""
    V = 150
    sums = _block_sums(torch.zeros(2, V), torch.zeros(2, 1, dtype=torch.float64))
    assert sums.dtype == torch.float64 and sums.tolist() == [[64.0, 64.0, 22.0]] * 2


def test_compiled_block_sums_is_opt_in_and_cuda_only(monkeypatch):
    """FSDFM_SAMPLER_COMPILE=1 asks for the compiled sums (off by default); on a CPU the eager sums are used anyway."""
    from fsdfm.sparse_step import _block_sums_eager, compiled_block_sums

    monkeypatch.delenv("FSDFM_SAMPLER_COMPILE", raising=False)
    assert not compiled_block_sums()
    monkeypatch.setenv("FSDFM_SAMPLER_COMPILE", "1")
    assert compiled_block_sums()
    l, m = torch.randn(5, 130), torch.zeros(5, 1, dtype=torch.float64)
    assert torch.equal(_block_sums(l, m), _block_sums_eager(l, m))
