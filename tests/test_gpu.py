"""The CUDA paths: the sampler steps (host-device syncs, draws that follow p), bf16-autocast training, the
FLM sampler's CUDA memory accounting and AR KV-cache sampling on a GPU.

Marked `gpu`: `make test` deselects them (CI has no GPU); run them with `pytest -m gpu` on a CUDA machine.
"""

import math
import warnings

import pytest
import torch

from fsdfm.ar import ARConfig, build_ar, sample_ar
from fsdfm.flm import FLMTime, sample_flm
from fsdfm.model import DiT, ModelConfig
from fsdfm.objectives import DFMConfig, DFMObjective
from fsdfm.paths import make_path
from fsdfm.samplers import get_rule, sample, time_grid, update, update_from_logits
from fsdfm.schedulers import PolynomialScheduler
from fsdfm.train import OptimConfig, fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with -m gpu on a GPU machine)"),
]

CUDA = torch.device("cuda")


def tiny_dit(V: int, L: int, seed: int = 0) -> DiT:
    """A tiny DiT over V tokens plus the mask, its zero-initialised layers redrawn so that logits depend on x and t."""
    torch.manual_seed(seed)
    model = DiT(
        ModelConfig(vocab_size=V, input_vocab_size=V + 1, seq_len=L, hidden=32, cond_dim=16, n_blocks=2, n_heads=2)
    )
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.3)
    return model.to(CUDA).eval()


class FixedLogits(torch.nn.Module):
    """Returns the same logits (V,) at every position and time."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x, t, h=None):
        return self.logits.expand(*x.shape, -1)


@pytest.mark.parametrize("rule", ["euler", "cumulative_scalar", "mixture_euler"])
@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_dense_step_with_a_real_dit_never_syncs_with_the_host(source, rule):
    """The GPU step loop (DiT forward under bf16 autocast, softmax, dense update) must queue kernels without
    waiting for the device: CUDA's sync debug mode raises on any implicit synchronisation (item, nonzero, a
    device-to-host copy)."""
    V, L, B = 50, 16, 4
    model, path = tiny_dit(V, L), make_path(PolynomialScheduler(1), source, V)
    grid, rule_fn = time_grid(4, device=CUDA), get_rule(rule)
    gen = torch.Generator(CUDA).manual_seed(0)
    x0 = path.source.sample((B, L), generator=gen, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = x0
        with torch.no_grad():
            for i in range(4):
                t, h = grid[i].expand(B), (grid[i + 1] - grid[i]).expand(B)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(x, t.float())
                p = torch.softmax(logits.to(torch.float64), dim=-1)
                x = update(x, p, t, h, rule_fn, path, gen, final=(i == 3), sparse=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    x = x.cpu()
    assert x.shape == (B, L) and int(x.max()) < V and int(x.min()) >= 0  # the final step leaves no mask
    assert not torch.equal(x, x0.cpu())


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_logits_step_syncs_once_per_step_at_most(source):
    """The default GPU step (`update_from_logits`) reads p only at candidate positions, found by one nonzero per
    step: CUDA's sync debug mode ("warn") sees at least one and at most one synchronisation per step, however many
    chunks the candidates fill."""
    V, L, B, steps = 50, 16, 4, 4
    model, path = tiny_dit(V, L), make_path(PolynomialScheduler(1), source, V)
    grid, rule_fn = time_grid(steps, device=CUDA), get_rule("cumulative_scalar")
    gen = torch.Generator(CUDA).manual_seed(0)
    x = path.source.sample((B, L), generator=gen, device=CUDA)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                for i in range(steps):
                    t, h = grid[i].expand(B), (grid[i + 1] - grid[i]).expand(B)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        logits = model(x, t.float())
                    x = update_from_logits(x, logits, t, h, rule_fn, path, gen, final=(i == steps - 1))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert 1 <= len(syncs) <= steps, [str(w.message) for w in syncs]
    assert int(x.max()) < V


@pytest.mark.parametrize("sparse", [None, False], ids=["logits_path", "dense"])
@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_one_step_cuda_draws_follow_p(source, sparse):
    """A 1-step run is one final draw x_1 ~ p at every position: the frequencies of 40,000 CUDA draws match p
    within 5 binomial standard deviations (both sources, both GPU step paths)."""
    V = 6
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03], dtype=torch.float64)
    model = FixedLogits(p.log().float().to(CUDA))
    out = sample(
        model,
        make_path(PolynomialScheduler(1), source, V),
        n_samples=200,
        seq_len=200,
        n_steps=1,
        device=CUDA,
        generator=torch.Generator(CUDA).manual_seed(1),
        sparse=sparse,
    )
    assert out.nfe == 1 and out.tokens.device.type == "cpu"
    n = out.tokens.numel()
    freq = torch.bincount(out.tokens.flatten(), minlength=V).double() / n
    assert freq.numel() == V  # no mask id survives the final step
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt())


@pytest.mark.parametrize("sparse", [None, False], ids=["logits_path", "dense"])
def test_cuda_and_cpu_samplers_agree_in_distribution(sparse):
    """Two steps of the cumulative-scalar rule under the mask source with a fixed p: the first step unmasks some
    positions with a draw from p, the final step draws every remaining one from p, so on both devices (the CUDA
    path as CPU's or dense) the token frequencies equal p."""
    V = 5
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    path = make_path(PolynomialScheduler(1), "mask", V)
    freqs = {}
    for dev in ("cpu", "cuda"):
        model = FixedLogits(p.log().float().to(dev))
        out = sample(
            model,
            path,
            n_samples=200,
            seq_len=100,
            n_steps=2,
            rule="cumulative_scalar",
            device=dev,
            generator=torch.Generator(dev).manual_seed(3),
            sparse=None if dev == "cpu" else sparse,
        )
        freqs[dev] = torch.bincount(out.tokens.flatten(), minlength=V).double() / out.tokens.numel()
    n = 200 * 100
    sigma = (p * (1 - p) / n).sqrt()
    for dev, f in freqs.items():
        assert torch.all((f - p).abs() < 5 * sigma), (dev, f)


def test_bf16_autocast_training_on_cuda_learns_and_keeps_fp32_weights():
    """`fit` on CUDA uses bf16 autocast (precision "auto"): the master weights stay float32 and the DFM loss on
    a deterministic cyclic language falls from ln V (zero-initialised head) well below it."""
    V, L = 16, 16
    torch.manual_seed(0)
    model = DiT(
        ModelConfig(vocab_size=V, input_vocab_size=V + 1, seq_len=L, hidden=64, cond_dim=32, n_blocks=2, n_heads=4)
    )
    data = (torch.arange(256)[:, None] + torch.arange(L)[None]) % V  # x_{i+1} = x_i + 1 (mod V)
    objective = DFMObjective(make_path(PolynomialScheduler(1), "mask", V), DFMConfig(loss="ce"))
    cfg = OptimConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10, ema_decay=None, ckpt_every=0, seed=0)
    res = fit(model, objective, data, cfg, progress=False, device=CUDA)
    assert res.losses[0] == pytest.approx(math.log(V), abs=1e-2)  # bf16 logits of an all-zero head: uniform
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters())
    # one unmasked token determines every other: the loss falls well below ln V = 2.77
    assert sum(res.losses[-10:]) / 10 < math.log(V) - 1.0, res.losses[-10:]


def test_flm_sampler_on_cuda_returns_the_constant_token_and_counts_cuda_memory():
    k, V, L = 3, 8, 6
    time = FLMTime(V, n_quadrature=60, n_table=513)

    def always_k(x, tau):
        assert x.device.type == "cuda"
        return torch.nn.functional.one_hot(torch.full(x.shape[:2], k, device=x.device), V).float() * 10.0

    one_sample = L * V * 4
    out = sample_flm(
        always_k, time, n_samples=10, seq_len=L, n_steps=4, seed=0, device=CUDA, max_state_bytes=3 * one_sample
    )
    assert bool((out.tokens == k).all()) and out.tokens.shape == (10, L)
    assert out.peak_mem_kind == "cuda_max_allocated" and out.peak_mem_bytes > 0
    assert out.chunk_size == 3 and out.nfe == 4


def test_ar_cached_and_uncached_sampling_agree_on_cuda():
    V, L = 12, 10
    torch.manual_seed(3)
    model = build_ar(ARConfig(vocab_size=V, seq_len=L, hidden=32, n_blocks=2, n_heads=2), bos_id=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    model = model.to(CUDA).eval()
    a = sample_ar(model, 6, L, 0, generator=torch.Generator(CUDA).manual_seed(5), use_cache=True)
    b = sample_ar(model, 6, L, 0, generator=torch.Generator(CUDA).manual_seed(5), use_cache=False)
    assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe == L
    assert len(set(a.tokens.flatten().tolist())) > 3


def test_flm_steps_never_sync_with_the_host():
    """FLM's sampler step on a GPU (DiT forward on the one-hot state, softmax, flow map with float gammas, as
    `sample_continuous` runs it) raises nothing under CUDA's sync debug mode "error"."""
    from fsdfm.flm import flow_map, sample_noise

    V, L, B = 50, 16, 4
    time = FLMTime(V, n_quadrature=60, n_table=513)
    torch.manual_seed(0)
    model = DiT(ModelConfig(vocab_size=V, seq_len=L, hidden=32, cond_dim=16, n_blocks=2, n_heads=2)).to(CUDA).eval()
    grid = time_grid(4, device=CUDA)
    gammas = time.gamma_of_tau(grid).tolist()
    x = sample_noise(0, 0, B, L, V, torch.float32, CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            for i in range(4):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(x, grid[i].expand(B).float())
                d = torch.softmax(logits.float(), dim=-1)
                x = flow_map(x, d, gammas[i], gammas[i + 1])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.allclose(x, d)  # the last step lands on D (gamma = 1)
