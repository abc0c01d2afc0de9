"""The sampler: jump probabilities of the three update rules, destinations, the sampling loop and its bookkeeping.

Statistical checks count jumps over many independent positions with a fixed-logits fake and allow 5 binomial
standard errors (fixed seeds, so they are deterministic).
"""

import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fsdfm.paths import MaskSource, MixturePath, UniformSource
from fsdfm import samplers
from fsdfm.registry import UnknownNameError
from fsdfm.samplers import UPDATE_RULES, SampleOutput, get_rule, sample, time_grid, update, update_from_logits
from fsdfm.schedulers import CosineScheduler, PolynomialScheduler

V = 5
P = [0.1, 0.15, 0.2, 0.25, 0.3]  # p_{1|t} at every position; the last token (V - 1) has the most mass
Z = 2  # the token held by every position under the uniform source; p(z) = 0.2
ROWS, COLS = 4, 12_500  # 50k positions per configuration
SIGMAS = 5.0


def _tol(p: float, n: int) -> float:
    return SIGMAS * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def _path(source: str, sched=None) -> MixturePath:
    sched = sched or PolynomialScheduler(1)
    return MixturePath(sched, MaskSource(V) if source == "mask" else UniformSource(V))


def _start(source: str) -> torch.Tensor:
    return torch.full((ROWS, COLS), V if source == "mask" else Z)


def _probs(probs=P) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).expand(ROWS, COLS, len(probs))


def _step(source, rule, t, h, sched=None, sparse=True, seed=0, final=False):
    path = _path(source, sched)
    x = _start(source)
    tt = torch.full((ROWS,), t, dtype=torch.float64)
    hh = torch.full((ROWS,), h, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return x, update(x, _probs(), tt, hh, get_rule(rule), path, gen, final=final, sparse=sparse)


def _assert_fraction(observed: torch.Tensor, expected: float, what: str):
    n = observed.numel()
    frac = float(observed.double().mean())
    assert abs(frac - expected) <= _tol(expected, n), f"{what}: observed {frac:.5f}, expected {expected:.5f} (n={n})"


def _assert_destinations(x_old, x_new, expected_probs, what):
    """Among the positions that changed, token frequencies match expected_probs (per-token 5-sigma)."""
    moved = x_new[x_new != x_old]
    n = moved.numel()
    assert n > 1000, what
    counts = torch.bincount(moved, minlength=V + 1).double() / n
    for v in range(V + 1):
        exp = expected_probs[v] if v < len(expected_probs) else 0.0
        observed = float(counts[v])
        assert abs(observed - exp) <= _tol(exp, n) + 1e-12, f"{what}: token {v}: {observed:.4f} vs {exp:.4f}"


# kappa(t) by hand (independent of the scheduler classes) for the schedules used below
KAPPA = {
    "poly1": (PolynomialScheduler(1), lambda t: t),
    "poly2": (PolynomialScheduler(2), lambda t: t * t),
    "cosine": (CosineScheduler(), lambda t: math.sin(math.pi * t / 2) ** 2),
}
STEPS = [(0.0, 0.25), (0.5, 0.125), (0.3, 0.5), (0.25, 0.75), (0.9, 0.05)]


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("sched_name", list(KAPPA))
@pytest.mark.parametrize("t,h", STEPS)
def test_cumulative_scalar_jump_probability_masked(t, h, sched_name, sparse):
    sched, kappa = KAPPA[sched_name]
    expected = (kappa(t + h) - kappa(t)) / (1 - kappa(t))  # the path's own unmasking probability
    x, y = _step("mask", "cumulative_scalar", t, h, sched, sparse=sparse, seed=1)
    _assert_fraction(y != x, expected, f"masked jump at t={t}, h={h}")
    # destinations: p over the data tokens (the mask is no data token, nothing is removed)
    _assert_destinations(x, y, P, "masked destinations")


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("sched_name", ["poly1", "cosine"])
@pytest.mark.parametrize("t,h", STEPS)
def test_cumulative_scalar_jump_probability_uniform(t, h, sched_name, sparse):
    sched, kappa = KAPPA[sched_name]
    r = (1 - kappa(t + h)) / (1 - kappa(t))
    expected = 1 - r ** (1 - P[Z])
    x, y = _step("uniform", "cumulative_scalar", t, h, sched, sparse=sparse, seed=2)
    _assert_fraction(y != x, expected, f"uniform jump at t={t}, h={h}")
    # a move changes the token: destinations follow p over x != z, renormalised
    dest = [0.0 if v == Z else P[v] / (1 - P[Z]) for v in range(V)]
    _assert_destinations(x, y, dest, "uniform destinations")


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_euler_under_moves_at_large_steps(sparse):
    # kappa = t, g(0) = 1: from t = 0 with h = 1/2 a mask moves w.p. 1 - exp(-1/2) ~ 0.393, not the exact 0.5
    x, y = _step("mask", "euler", 0.0, 0.5, sparse=sparse, seed=3)
    _assert_fraction(y != x, 1 - math.exp(-0.5), "euler masked")
    assert abs(1 - math.exp(-0.5) - 0.3935) < 1e-4
    _assert_destinations(x, y, P, "euler masked destinations")
    x, y = _step("mask", "cumulative_scalar", 0.0, 0.5, sparse=sparse, seed=3)
    _assert_fraction(y != x, 0.5, "cumulative masked")


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("t,h", [(0.0, 0.5), (0.5, 0.25), (0.2, 0.1)])
def test_euler_jump_probability_uniform(t, h, sparse):
    g = 1 / (1 - t)  # kappa = t
    x, y = _step("uniform", "euler", t, h, sparse=sparse, seed=4)
    _assert_fraction(y != x, (1 - P[Z]) * (1 - math.exp(-h * g)), f"euler uniform t={t} h={h}")


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("t,h", [(0.0, 0.5), (0.5, 0.125), (0.25, 0.75), (0.9, 0.01)])
def test_mixture_euler_ignores_t_and_h(source, t, h):
    p_z = 0.0 if source == "mask" else P[Z]
    x, y = _step(source, "mixture_euler", t, h, seed=5)
    _assert_fraction(y != x, 1 - math.exp(-(1 - p_z)), f"mixture_euler {source} t={t} h={h}")


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_final_step_draws_x1_from_p_everywhere(source, sparse):
    x, y = _step(source, "cumulative_scalar", 0.5, 0.1, sparse=sparse, seed=6, final=True)
    # every movable position is redrawn from p itself (the current token is not excluded)
    assert bool((y < V).all())
    counts = torch.bincount(y.flatten(), minlength=V).double() / y.numel()
    for v in range(V):
        assert abs(float(counts[v]) - P[v]) <= _tol(P[v], y.numel()), (v, float(counts[v]))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_unmasked_tokens_never_move_and_final_may_be_per_row(sparse):
    path = _path("mask")
    gen = torch.Generator().manual_seed(7)
    x = torch.full((2, 2000), V)
    x[:, ::2] = 1  # half the positions already unmasked
    t, h = torch.zeros(2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    y = update(
        x,
        _probs()[:2, :2000],
        t,
        h,
        get_rule("cumulative_scalar"),
        path,
        gen,
        final=torch.tensor([True, False]),
        sparse=sparse,
    )
    assert bool((y[:, ::2] == 1).all())
    assert bool((y[0] < V).all())  # the final row is fully unmasked
    _assert_fraction(y[1, 1::2] != V, 0.5, "non-final row")


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_a_token_with_all_the_mass_never_moves(sparse):
    path = _path("uniform")
    x = torch.full((ROWS, 100), 3)
    one_hot = torch.zeros(ROWS, 100, V, dtype=torch.float64)
    one_hot[..., 3] = 1.0
    t, h = torch.zeros(ROWS, dtype=torch.float64), torch.full((ROWS,), 0.5, dtype=torch.float64)
    for rule in UPDATE_RULES.names():
        if hasattr(get_rule(rule), "sample_loop"):  # a whole-step sampler (fsdfm.sampling) has no jump probability
            continue
        y = update(x, one_hot, t, h, get_rule(rule), path, torch.Generator().manual_seed(0), sparse=sparse)
        assert torch.equal(y, x), rule


@pytest.mark.parametrize("sched_name", ["poly2", "cosine"])
def test_cumulative_scalar_tracks_the_path_marginal_on_a_grid(sched_name):
    # with a mask source the cumulative-scalar rule is exact: after each step the unmasked fraction is kappa(t)
    sched, kappa = KAPPA[sched_name]
    path = _path("mask", sched)
    grid = [0.0, 0.2, 0.45, 0.7, 0.9]
    x = _start("mask")
    gen = torch.Generator().manual_seed(8)
    for a, b in zip(grid[:-1], grid[1:]):
        t, h = torch.full((ROWS,), a, dtype=torch.float64), torch.full((ROWS,), b - a, dtype=torch.float64)
        x = update(x, _probs(), t, h, get_rule("cumulative_scalar"), path, gen)
        _assert_fraction(x != V, kappa(b), f"unmasked fraction at t={b}")


# ---------------------------------------------------------------------------------------------- the sampling loop


class FixedLogits:
    """model(x, t, h) -> the same logits at every position; records each call's (x, t, h)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.calls = []

    def __call__(self, x, t, h=None):
        self.calls.append((x.clone(), t.clone(), None if h is None else h.clone()))
        return self.logits.expand(x.shape[0], x.shape[1], self.logits.numel()).clone()


class AllMassOn:
    """model(x, t, h) -> row b puts all its mass on token targets[b]: log of a one-hot, so p is exactly one-hot."""

    def __init__(self, targets: list[int], seq_len: int):
        logits = torch.full((len(targets), seq_len, V), float("-inf"), dtype=torch.float64)
        for b, c in enumerate(targets):
            logits[b, :, c] = 0.0
        self.logits = logits

    def __call__(self, x, t, h=None):
        return self.logits


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("rule", ["euler", "cumulative_scalar", "mixture_euler"])
@pytest.mark.parametrize("n_steps", [1, 2, 8, 1024])
def test_all_mass_on_one_token_ends_there(n_steps, rule, source, sparse):
    seq_len = 3 if n_steps == 1024 else 16
    targets = [0, V - 1, 2]  # V - 1 is the index a mask id is clamped to
    out = sample(
        AllMassOn(targets, seq_len),
        _path(source),
        n_samples=3,
        seq_len=seq_len,
        n_steps=n_steps,
        rule=rule,
        generator=torch.Generator().manual_seed(n_steps),
        sparse=sparse,
    )
    assert out.tokens.shape == (3, seq_len) and out.nfe == n_steps
    assert torch.equal(out.tokens, torch.tensor(targets)[:, None].expand(3, seq_len)), out.tokens


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("rule", ["euler", "cumulative_scalar"])
def test_mask_sampler_output_follows_p(rule, sparse):
    # a model that ignores its input: each position is unmasked once, by a draw from p, so the output ~ p
    model = FixedLogits(torch.tensor(P).log())
    out = sample(
        model,
        _path("mask"),
        n_samples=100,
        seq_len=200,
        n_steps=8,
        rule=rule,
        generator=torch.Generator().manual_seed(9),
        sparse=sparse,
    )
    counts = torch.bincount(out.tokens.flatten(), minlength=V + 1).double() / out.tokens.numel()
    assert float(counts[V]) == 0.0  # nothing stays masked
    for v in range(V):
        assert abs(float(counts[v]) - P[v]) <= _tol(P[v], out.tokens.numel()), (v, float(counts[v]))


@pytest.mark.parametrize("scale", [3.0, 2000.0], ids=["moderate_logits", "huge_logits"])
@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("rule", ["euler", "cumulative_scalar", "mixture_euler"])
@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_logits_step_without_host_checks_draws_the_same_tokens(source, rule, final, scale):
    """The GPU branch of `update_from_logits` (no host-side checks: always l - m, always read p(z), no boolean
    indexing) consumes the same uniforms as the CPU branch, so from the same generator it must move exactly the
    same positions to the same tokens; huge logits (|l| > 600) take the CPU branch's max-shift too."""
    Vb, B, L = 300, 3, 40  # V > _BLOCK: several blocks in the inverse-CDF search
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(B, L, Vb, generator=gen) * scale
    path = MixturePath(PolynomialScheduler(1), MaskSource(Vb) if source == "mask" else UniformSource(Vb))
    x = path.source.sample((B, L), generator=gen)
    x[:, :10] = torch.randint(Vb, (B, 10), generator=gen)  # some positions already hold data tokens
    t, h = torch.full((B,), 0.3, dtype=torch.float64), torch.full((B,), 0.4, dtype=torch.float64)
    outs = [
        update_from_logits(
            x, logits, t, h, get_rule(rule), path, torch.Generator().manual_seed(1), final=final, host_checks=checks
        )
        for checks in (True, False)
    ]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], x)  # the step moved something, so the comparison means something


def test_sample_reports_nfe_and_time_grid():
    model = FixedLogits(torch.zeros(V))
    out = sample(model, _path("mask"), n_samples=3, seq_len=4, n_steps=5, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, SampleOutput)
    assert out.nfe == 5 == len(model.calls)
    assert out.time_grid.dtype == torch.float64
    assert torch.allclose(out.time_grid, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    assert out.tokens.dtype == torch.long and out.wall_s >= 0.0
    assert torch.allclose(time_grid(4, 0.0, 0.999), torch.linspace(0, 0.999, 5, dtype=torch.float64))


@pytest.mark.parametrize("h_conditioned", [True, False])
def test_explicit_grid_is_honoured(h_conditioned):
    grid = torch.tensor([0.0, 0.1, 0.35, 0.6, 0.999], dtype=torch.float64)
    model = FixedLogits(torch.zeros(V))
    out = sample(
        model,
        _path("uniform"),
        n_samples=2,
        seq_len=4,
        grid=grid,
        h_conditioned=h_conditioned,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.nfe == 4 and torch.equal(out.time_grid, grid)
    assert len(model.calls) == 4
    for i, (x, t, h) in enumerate(model.calls):
        assert t.shape == (2,) and torch.allclose(t, torch.full((2,), float(grid[i])))
        if h_conditioned:
            assert torch.allclose(h, torch.full((2,), float(grid[i + 1] - grid[i])))
        else:
            assert h is None


def test_batching_returns_exactly_n_samples():
    model = FixedLogits(torch.zeros(V))
    out = sample(
        model,
        _path("mask"),
        n_samples=7,
        seq_len=4,
        n_steps=2,
        batch_size=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.tokens.shape == (7, 4) and out.nfe == 2
    assert [c[0].shape[0] for c in model.calls] == [3, 3, 3, 3, 1, 1]
    assert bool((out.tokens < V).all())


def test_same_seed_same_tokens_and_alias():
    def run(seed, rule="cumulative_scalar"):
        return sample(
            FixedLogits(torch.zeros(V)),
            _path("mask"),
            n_samples=6,
            seq_len=20,
            n_steps=4,
            rule=rule,
            generator=torch.Generator().manual_seed(seed),
        ).tokens

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    # MDLM-style sampling is the cumulative-scalar rule under another name
    assert torch.equal(run(3, "mdlm"), run(3))
    with pytest.raises(UnknownNameError, match="did you mean 'euler'"):
        run(3, "eulr")


def test_x_init_is_the_start_state():
    model = FixedLogits(torch.zeros(V))
    x_init = torch.full((2, 6), V)
    x_init[:, :3] = torch.tensor([4, 0, 2])
    out = sample(
        model,
        _path("mask"),
        n_samples=2,
        seq_len=6,
        n_steps=3,
        x_init=x_init,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(model.calls[0][0], x_init)
    assert torch.equal(out.tokens[:, :3], x_init[:, :3])  # unmasked tokens are final under the mask source


def test_bad_grids_are_rejected():
    model = FixedLogits(torch.zeros(V))
    for grid in (torch.tensor([0.0, 0.5, 0.5, 1.0]), torch.tensor([0.0]), torch.tensor([[0.0, 1.0]])):
        with pytest.raises(ValueError, match="time grid"):
            sample(model, _path("mask"), n_samples=1, seq_len=2, grid=grid)
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        sample(model, _path("mask"), n_samples=1, seq_len=2, n_steps=0)
    with pytest.raises(ValueError, match="t_start < t_end"):
        time_grid(3, 0.5, 0.2)


# ---------------------------------------------------------------------------------------------- no host syncs


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero")


@pytest.mark.parametrize("rule", ["euler", "cumulative_scalar", "mixture_euler"])
@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_dense_step_loop_has_no_host_device_sync(source, rule):
    """item()/bool()/nonzero inside the step loop would stall a GPU every step. The grid check before the loop
    may sync once, so compare a 1-step with a 4-step run: equal sync counts mean none happen per step."""
    model = FixedLogits(torch.tensor(P).log())

    def count(n_steps):
        with OpCounter() as ops:
            sample(
                model,
                _path(source),
                n_samples=3,
                seq_len=8,
                n_steps=n_steps,
                rule=rule,
                sparse=False,
                generator=torch.Generator().manual_seed(0),
            )
        return {op: ops.counts[op] for op in SYNC_OPS}, ops.counts

    one, ops_one = count(1)
    four, ops_four = count(4)
    assert ops_four["aten.softmax"] + ops_four["aten._softmax"] == 4  # the counter does see the loop
    assert one == four, (one, four)
    assert four["aten.nonzero"] == 0
    assert four["aten._local_scalar_dense"] <= 1


def test_float32_exp_is_within_the_certified_error():
    """`_chunk_certified` relies on torch's float32 exp being within 2^-22 relative (+ 2^-125 absolute) of exp."""
    from fsdfm.sparse_step import _EXP32_ABS, _EXP32_REL

    l = torch.cat([torch.linspace(-104.0, 88.7, 2_000_003), torch.tensor([-float("inf"), 0.0, -1e-30])])
    exact = l.double().exp()
    for out in (l.exp().double(), torch.exp(l, out=torch.empty_like(exact))):  # both ways the sampler may write
        assert bool(((out - exact).abs() <= exact * _EXP32_REL + _EXP32_ABS).all())


@pytest.mark.parametrize("chunk_rows", [None, 100], ids=["one_chunk", "chunks_of_100"])
@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("rule", ["euler", "cumulative_scalar", "mixture_euler"])
@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_certified_float32_step_draws_the_float64_tokens(source, rule, final, chunk_rows, monkeypatch):
    """The default CPU step (float32 exp, float64 sums, certificate, float64 step where uncertain) gives exactly the
    tokens of the float64 step from the same generator: flat logits (p(z) ~ 1/V, the hard case for the certificate),
    peaked ones, -inf entries, rows beyond float32 exp's range (|l| > 88: the fallback) and V not a multiple of the
    inverse-CDF block; in one chunk of rows and in several (work buffers reused)."""
    Vb, B, L = 333, 4, 256
    if chunk_rows:
        monkeypatch.setattr(samplers, "_CHUNK_ELEMENTS", {"cpu": chunk_rows * Vb, "cuda": 1 << 27})
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(B, L, Vb, generator=gen) * torch.tensor([0.02, 1.0, 8.0, 1.0])[:, None, None]
    logits[3, :20] += 95.0  # exp overflows in float32: these rows take the float64 step
    logits[3, 20:40] -= 120.0  # tiny totals: so do these
    logits[1, :, 5] = -float("inf")
    path = MixturePath(PolynomialScheduler(1), MaskSource(Vb) if source == "mask" else UniformSource(Vb))
    x = path.source.sample((B, L), generator=gen)
    x[:, ::3] = torch.randint(Vb, (B, (L + 2) // 3), generator=gen)
    t, h = torch.full((B,), 0.2, dtype=torch.float64), torch.full((B,), 0.5, dtype=torch.float64)
    for seed in range(3):
        outs = [
            update_from_logits(
                x, logits, t, h, get_rule(rule), path, torch.Generator().manual_seed(seed), final=final, certified=c
            )
            for c in (True, False)
        ]
        assert torch.equal(outs[0], outs[1])
        assert int((outs[0] != x).sum()) > B * L // 10  # many positions moved: the comparison means something
        assert not bool((outs[0][1][outs[0][1] != x[1]] == 5).any())  # a token without mass is never drawn


def test_certificate_leaves_few_rows_to_the_float64_step():
    """On flat logits at V = 2,048 (the benchmark's case) the certificate settles all but a few per cent of the rows
    (~ 8 D / w_x = 8 (2^-22 + 63 2^-24) V = 6.5%)."""
    from fsdfm.sparse_step import _chunk_certified

    c, Vb = 2000, 2048
    gen = torch.Generator().manual_seed(3)
    l = torch.randn(c, Vb, generator=gen) * 0.05
    z = torch.randint(Vb, (c, 1), generator=gen)
    read = torch.ones(c, dtype=torch.bool)
    u, u_dest = torch.rand(c, dtype=torch.float64, generator=gen), torch.rand(c, dtype=torch.float64, generator=gen)
    t, h = torch.zeros(c, dtype=torch.float64), torch.full((c,), 0.5, dtype=torch.float64)
    _, jump, unsure = _chunk_certified(
        l.clone(), Vb, z, read, u, u_dest, t, h, get_rule("mixture_euler"), PolynomialScheduler(1)
    )
    assert 0.4 < float(jump.double().mean()) < 0.8  # 1 - exp(-(1 - 1/V)) = 0.63 of the rows jump
    assert float(unsure.double().mean()) < 0.1


def test_sample_records_its_numerics():
    model = FixedLogits(torch.zeros(V))
    path = _path("uniform")
    out = sample(model, path, n_samples=2, seq_len=3, n_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.numerics.to_dict() == {
        "logits_dtype": "float32",
        "precision": "float64",
        "step": "logits",
        "certified_float32_exp": True,
        "autocast": False,
    }
    out = sample(
        model,
        path,
        n_samples=2,
        seq_len=3,
        n_steps=2,
        precision=torch.float32,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.numerics.to_dict() == {
        "logits_dtype": "float32",
        "precision": "float32",
        "step": "softmax",
        "certified_float32_exp": False,
        "autocast": False,
    }


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("rule", ["euler", "cumulative_scalar", "mixture_euler"])
def test_sample_with_and_without_the_certified_chunk_gives_the_same_tokens(source, rule):
    """The whole loop (8 steps, the final all-positions draw included) with the certified chunk forced on, and with
    the float64 chunk throughout: the same tokens from the same seed."""
    Vb = 200
    logits = torch.randn(6, 40, Vb, generator=torch.Generator().manual_seed(4)) * 1.5
    path = MixturePath(PolynomialScheduler(1), MaskSource(Vb) if source == "mask" else UniformSource(Vb))
    outs = [
        sample(
            lambda x, t, h=None: logits,
            path,
            n_samples=6,
            seq_len=40,
            n_steps=8,
            rule=rule,
            certified=c,
            generator=torch.Generator().manual_seed(9),
        )
        for c in (True, False)
    ]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert outs[0].numerics.certified_float32_exp and not outs[1].numerics.certified_float32_exp
