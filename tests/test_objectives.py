"""The DFM and FS-DFM objectives: the step-size distribution, the time grid, and each loss recomputed by hand
from what a spy model was shown."""

import math

import pytest
import torch

from fsdfm.model import DiT, ModelConfig
from fsdfm.objectives import (
    DFMConfig,
    DFMObjective,
    FSDFMConfig,
    FSDFMObjective,
    expected_h_weights,
    sample_step_sizes,
    step_size_probs,
)
from fsdfm.paths import MaskSource, MixturePath, UniformSource
from fsdfm.schedulers import PolynomialScheduler
from fsdfm.train import StepContext

V, L = 4, 6
P_STUDENT = [0.1, 0.2, 0.3, 0.4]
P_TEACHER = [0.4, 0.3, 0.2, 0.1]


def _tol(p: float, n: int) -> float:
    return 5 * math.sqrt(max(p * (1 - p), 1e-12) / n)


# ------------------------------------------------------------------------------------------- step sizes and times

N_DRAWS = 200_000


def _check_h_frequencies(cfg: FSDFMConfig, expected: dict, progress: float = 0.0, seed: int = 0):
    h, t = sample_step_sizes(cfg, N_DRAWS, torch.Generator().manual_seed(seed), progress)
    assert h.shape == t.shape == (N_DRAWS,) and h.dtype == t.dtype == torch.float64
    assert set(h.unique().tolist()) <= set(expected)
    for value, p in expected.items():
        freq = float((h == value).double().mean())
        assert abs(freq - p) <= _tol(p, N_DRAWS), (value, freq, p)
    return h, t


def test_inv_h_step_sizes_follow_one_over_h():
    K = 4
    norm = sum(2.0**k for k in range(K + 1))  # sum of 1/h over h = 2^-k
    expected = {2.0**-k: 2.0**k / norm for k in range(K + 1)}
    _check_h_frequencies(FSDFMConfig(K=K, h_distribution="inv_h"), expected)
    assert expected_h_weights(FSDFMConfig(K=K)) == pytest.approx(expected)


def test_uniform_and_annealed_to_end_step_sizes():
    K = 3
    uniform = {2.0**-k: 1 / (K + 1) for k in range(K + 1)}
    _check_h_frequencies(FSDFMConfig(K=K, h_distribution="uniform"), uniform)
    inv_h = {2.0**-k: 2.0**k / 15 for k in range(K + 1)}
    annealed = FSDFMConfig(K=K, h_distribution="annealed_to_end")
    _check_h_frequencies(annealed, inv_h, progress=0.0)  # starts at 1/h
    _check_h_frequencies(annealed, uniform, progress=1.0)  # ends uniform
    half = {2.0**-k: 2.0 ** (k / 2) / sum(2.0 ** (j / 2) for j in range(K + 1)) for k in range(K + 1)}
    _check_h_frequencies(annealed, half, progress=0.5)  # P ~ h^(-1/2) halfway
    h, p = step_size_probs(annealed, progress=2.0)  # clamped past the end
    assert torch.allclose(p, torch.full((K + 1,), 1 / (K + 1), dtype=torch.float64))
    # at 40% of training it is still far from uniform: P(h = 1) = 1 / sum_k 2^(0.6 k) = 0.0054 for K = 10
    _, p = step_size_probs(FSDFMConfig(K=10, h_distribution="annealed_to_end"), progress=0.4)
    assert float(p[0]) == pytest.approx(1 / sum(2.0 ** (0.6 * k) for k in range(11)), rel=1e-12)
    assert float(p[0]) == pytest.approx(0.0054, abs=5e-5)


def test_annealed_follows_the_official_doubling_schedule():
    """The official code (apple/ml-fs-dfm, dt_weights_2): weights [1, 2, ..., 1024] for h = 1, 1/2, ..., 1/1024,
    each doubled once every 20,000 of 500,000 steps and capped at 1024 - uniform after 10 doublings, at 40%."""
    cfg = FSDFMConfig(K=10, h_distribution="annealed")
    official_total, official_interval = 500_000, 20_000
    for step in (0, 19_999, 20_000, 100_000, 199_999, 200_000, 350_000, 500_000):
        doublings = step // official_interval
        w = [min(2**k * 2**doublings, 1024) for k in range(11)]
        _, p = step_size_probs(cfg, progress=step / official_total)
        assert p.tolist() == pytest.approx([x / sum(w) for x in w], rel=1e-12), step
    _, p = step_size_probs(cfg, progress=0.4)
    assert float(p[0]) == pytest.approx(1 / 11) and round(float(p[0]), 3) == 0.091  # uniform at 40%
    _, p = step_size_probs(cfg, progress=0.0)
    assert float(p[0]) == pytest.approx(1 / 2047)  # starts at 1/h
    # sampled frequencies follow it (K = 3: uniform from 40%; at 20%, floor(0.2 * 3 / 0.4) = 1 doubling)
    small = FSDFMConfig(K=3, h_distribution="annealed")
    _check_h_frequencies(small, {2.0**-k: 1 / 4 for k in range(4)}, progress=0.4)
    w = [2, 4, 8, 8]
    _check_h_frequencies(small, {2.0**-k: w[k] / 22 for k in range(4)}, progress=0.2)


def test_fixed_budget_step_sizes():
    _check_h_frequencies(FSDFMConfig(K=4, h_distribution="fixed:4"), {0.25: 0.5, 2.0**-4: 0.5})
    # the finest budget is the anchor itself
    _check_h_frequencies(FSDFMConfig(K=4, h_distribution="fixed:16"), {2.0**-4: 1.0})
    assert FSDFMConfig(K=4, h_distribution="fixed:8").fixed_budget == 8


@pytest.mark.parametrize("anchor_weight", ["g", "G/h"])
def test_t_lies_on_the_grid_with_t_plus_h_at_most_one(anchor_weight):
    K = 3
    cfg = FSDFMConfig(K=K, h_distribution="uniform", anchor_weight=anchor_weight)
    h, t = sample_step_sizes(cfg, N_DRAWS, torch.Generator().manual_seed(1))
    grid = 2**K
    assert torch.equal(t * grid, (t * grid).round())
    assert bool((t >= 0).all()) and bool((t + h <= 1.0).all())
    anchor = h == 2.0**-K
    if anchor_weight == "G/h":
        # G_{t,h} is infinite at t + h = 1: anchor rows stop one grid point short
        assert bool((t[anchor] + h[anchor] < 1.0).all())
    # given h, t is uniform over its allowed slots {0, 1/grid, ..., 1 - h (- h_min for G/h anchors)}
    for k in range(K + 1):
        hk = 2.0**-k
        rows = h == hk
        n_slots = round((1 - hk) * grid) + 1 - (1 if anchor_weight == "G/h" and k == K else 0)
        slots = (t[rows] * grid).round().long()
        assert int(slots.max()) == n_slots - 1
        counts = torch.bincount(slots, minlength=n_slots).double() / int(rows.sum())
        for c in counts.tolist():
            assert abs(c - 1 / n_slots) <= _tol(1 / n_slots, int(rows.sum()))
    # non-anchor rows do reach t + h = 1
    assert bool((t + h == 1.0)[~anchor].any())


def test_fsdfm_config_validation():
    with pytest.raises(ValueError, match="K must be in 1..20"):
        FSDFMConfig(K=0)
    for bad in ("fixed:3", "fixed:32", "fixed:x", "zipf"):
        with pytest.raises(ValueError, match="h_distribution"):
            FSDFMConfig(K=4, h_distribution=bad)
    with pytest.raises(ValueError, match="anchor_weight"):
        FSDFMConfig(anchor_weight="G")
    with pytest.raises(ValueError, match="G/h is infinite"):
        FSDFMConfig(shortcut="none", anchor_weight="G/h")
    with pytest.raises(KeyError, match="did you mean 'rk4'"):
        FSDFMConfig(shortcut="rk5")
    with pytest.raises(KeyError):
        FSDFMConfig(anchor_loss="mse")
    for frozen in ("frozen_dfm", "frozen_dfm_rk4"):
        with pytest.raises(ValueError, match="frozen DFM teacher"):
            FSDFMObjective(MixturePath(PolynomialScheduler(1), MaskSource(V)), FSDFMConfig(shortcut=frozen))
    with pytest.raises(ValueError, match="eps"):
        DFMConfig(eps=1.0)


# ------------------------------------------------------------------------------------------------- spy models


class SpyModel(torch.nn.Module):
    """Fixed logits log(probs) everywhere (with a trainable offset so the loss has a gradient); records calls."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.tensor(probs).log()
        self.offset = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, h=None):
        self.calls.append((x.clone(), t.clone(), None if h is None else h.clone()))
        return self.logits.expand(x.shape[0], x.shape[1], len(self.logits)) + self.offset


def _ctx(model, ema=None, B=16, seed=0, source_vocab=V):
    batch = torch.randint(source_vocab, (B, L), generator=torch.Generator().manual_seed(100 + seed))
    return StepContext(
        model=model, ema=ema, batch=batch, generator=torch.Generator().manual_seed(seed), step=0, total_steps=10
    )


def _gkl(p, x_1, x_t, g):
    """-g [p(x_t) - 1{x_t = x_1} + (1 - 1{x_t = x_1}) log p(x_1)] with p(mask) = 0."""
    same = 1.0 if x_t == x_1 else 0.0
    p_xt = p[x_t] if x_t < len(p) else 0.0
    return -g * (p_xt - same + (1 - same) * math.log(p[x_1]))


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_dfm_objective_ce_by_hand(source):
    path = MixturePath(PolynomialScheduler(1), MaskSource(V) if source == "mask" else UniformSource(V))
    model = SpyModel(P_STUDENT)
    ctx = _ctx(model)
    loss = DFMObjective(path, DFMConfig(loss="ce", eps=0.01))(ctx)
    ((x_t, t, h),) = model.calls
    assert h is None and t.shape == (16,) and bool(((t >= 0) & (t <= 0.99)).all())
    x_1 = ctx.batch
    assert bool(((x_t == x_1) | (x_t == V if source == "mask" else x_t < V)).all())
    terms = [
        -math.log(P_STUDENT[int(x_1[b, i])])
        for b in range(16)
        for i in range(L)
        if source == "uniform" or int(x_t[b, i]) == V
    ]  # mask source: the loss is on masked positions
    assert len(terms) > 0
    assert float(loss.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    loss.backward()
    assert model.offset.grad is not None


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_dfm_objective_gkl_by_hand(source):
    path = MixturePath(PolynomialScheduler(1), MaskSource(V) if source == "mask" else UniformSource(V))
    model = SpyModel(P_STUDENT)
    ctx = _ctx(model, seed=1)
    loss = DFMObjective(path, DFMConfig(loss="gkl"))(ctx)
    ((x_t, t, _),) = model.calls
    x_1 = ctx.batch
    terms = [
        _gkl(P_STUDENT, int(x_1[b, i]), int(x_t[b, i]), 1 / (1 - float(t[b])))  # kappa = t: g = 1 / (1 - t)
        for b in range(16)
        for i in range(L)
    ]
    assert float(loss.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def _fsdfm_by_hand(cfg, x_1, x_t, t, h, kl_shortcut, source):
    """The FS-DFM loss recomputed from what the student saw. kl_shortcut: per-position KL(target || student)."""
    K_min = 2.0**-cfg.K
    num, den = 0.0, 0.0
    for b in range(x_1.shape[0]):
        tb, hb = float(t[b]), float(h[b])
        anchor = cfg.shortcut == "none" or hb <= K_min
        if anchor:  # kappa = t: g = 1 / (1 - t); G_{t,h} / h = ln[(1 - t) / (1 - t - h)] / h
            g = 1 / (1 - tb) if cfg.anchor_weight == "g" else math.log((1 - tb) / (1 - tb - hb)) / hb
        for i in range(x_1.shape[1]):
            movable = source == "uniform" or int(x_t[b, i]) == V
            if anchor and cfg.anchor_loss == "gkl":
                term = _gkl(P_STUDENT, int(x_1[b, i]), int(x_t[b, i]), g)
            elif anchor:
                term = -math.log(P_STUDENT[int(x_1[b, i])])
            else:
                term = kl_shortcut
            # gkl anchors count every position; CE anchors, "none" and shortcut rows only movable ones
            w = 1.0 if (anchor and cfg.anchor_loss == "gkl" and cfg.shortcut != "none") else float(movable)
            num += w * term
            den += w
    return num / max(den, 1.0)


KL_T_S = sum(q * math.log(q / p) for q, p in zip(P_TEACHER, P_STUDENT))


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("shortcut", ["rk4", "heun", "rk4_time_consistent"])
@pytest.mark.parametrize("anchor_weight,anchor_loss", [("g", "gkl"), ("G/h", "gkl"), ("g", "ce")])
def test_fsdfm_objective_by_hand(source, shortcut, anchor_weight, anchor_loss):
    path = MixturePath(PolynomialScheduler(1), MaskSource(V) if source == "mask" else UniformSource(V))
    cfg = FSDFMConfig(
        K=2, h_distribution="inv_h", anchor_weight=anchor_weight, anchor_loss=anchor_loss, shortcut=shortcut
    )
    student, ema = SpyModel(P_STUDENT), SpyModel(P_TEACHER)
    ctx = _ctx(student, ema, seed=2)
    loss = FSDFMObjective(path, cfg)(ctx)
    assert len(student.calls) == 1
    x_t, t, h = student.calls[0]
    anchor = h == 0.25
    assert bool(anchor.any()) and bool((~anchor).any())  # both kinds of rows in this draw
    # the EMA teacher is evaluated on the shortcut rows only, at h/2, starting from (x_t, t)
    n_calls = {"rk4": 4, "rk4_time_consistent": 4, "heun": 2}[shortcut]
    assert len(ema.calls) == n_calls
    x0, t0, h0 = ema.calls[0]
    assert torch.equal(x0, x_t[~anchor]) and torch.equal(t0, t[~anchor]) and torch.equal(h0, h[~anchor] / 2)
    assert all(torch.equal(c[2], h[~anchor] / 2) for c in ema.calls)
    # a constant teacher: every k_i is log P_TEACHER, so the target is P_TEACHER and the KL is KL(teacher || student)
    expected = _fsdfm_by_hand(cfg, ctx.batch, x_t, t, h, KL_T_S, source)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.offset.grad is not None and ema.offset.grad is None


def test_fsdfm_objective_without_shortcut_trains_every_row_on_data():
    path = MixturePath(PolynomialScheduler(1), MaskSource(V))
    cfg = FSDFMConfig(K=2, shortcut="none")
    student, ema = SpyModel(P_STUDENT), SpyModel(P_TEACHER)
    ctx = _ctx(student, ema, seed=3)
    loss = FSDFMObjective(path, cfg)(ctx)
    x_t, t, h = student.calls[0]
    assert len(ema.calls) == 0 and bool((h > 0.25).any())
    assert float(loss.detach()) == pytest.approx(_fsdfm_by_hand(cfg, ctx.batch, x_t, t, h, None, "mask"), rel=1e-5)


def test_fsdfm_objective_without_ema_uses_the_live_student():
    path = MixturePath(PolynomialScheduler(1), UniformSource(V))
    student = SpyModel(P_STUDENT)
    loss = FSDFMObjective(path, FSDFMConfig(K=2, shortcut="heun"))(_ctx(student, None, seed=2))
    assert len(student.calls) == 1 + 2
    # teacher = student: the shortcut KL is 0 and only the anchor rows remain
    x_t, t, h = student.calls[0]
    cfg = FSDFMConfig(K=2, shortcut="heun")
    expected = _fsdfm_by_hand(cfg, _ctx(student, seed=2).batch, x_t, t, h, 0.0, "uniform")
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_fsdfm_objective_frozen_rk4_teacher_is_called_without_h():
    path = MixturePath(PolynomialScheduler(1), MaskSource(V))
    frozen, student, ema = SpyModel(P_TEACHER), SpyModel(P_STUDENT), SpyModel(P_STUDENT)
    cfg = FSDFMConfig(K=2, shortcut="frozen_dfm_rk4")
    ctx = _ctx(student, ema, seed=2)
    loss = FSDFMObjective(path, cfg, frozen_teacher=frozen)(ctx)
    assert len(ema.calls) == 0 and len(frozen.calls) == 4  # the RK-4 composition on the frozen teacher
    assert all(c[2] is None for c in frozen.calls)
    x_t, t, h = student.calls[0]
    assert float(loss.detach()) == pytest.approx(_fsdfm_by_hand(cfg, ctx.batch, x_t, t, h, KL_T_S, "mask"), rel=1e-5)


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_fsdfm_objective_frozen_teacher_only_at_the_finest_step(source):
    """shortcut = frozen_dfm: the frozen teacher is called once, on the h = h_min rows only, at their (x_t, t);
    those rows learn KL(teacher || student), the coarser rows the EMA student's RK-4 target; no data term."""
    path = MixturePath(PolynomialScheduler(1), MaskSource(V) if source == "mask" else UniformSource(V))
    frozen, student, ema = SpyModel(P_TEACHER), SpyModel(P_STUDENT), SpyModel(P_STUDENT)
    cfg = FSDFMConfig(K=2, shortcut="frozen_dfm")
    ctx = _ctx(student, ema, seed=2)
    loss = FSDFMObjective(path, cfg, frozen_teacher=frozen)(ctx)
    x_t, t, h = student.calls[0]
    finest = h == 0.25
    assert bool(finest.any()) and bool((~finest).any())
    ((fx, ft, fh),) = frozen.calls  # one call, at the finest step only
    assert fh is None and torch.equal(fx, x_t[finest]) and torch.equal(ft, t[finest].float())
    assert len(ema.calls) == 4 and all(torch.equal(c[2], h[~finest] / 2) for c in ema.calls)
    # the EMA equals the student (coarse KL 0); finest rows: KL(teacher || student) on movable positions
    movable = (x_t == V) if source == "mask" else torch.ones_like(x_t, dtype=torch.bool)
    expected = KL_T_S * float(movable[finest].sum()) / float(movable.sum())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.offset.grad is not None and frozen.offset.grad is None


def test_fsdfm_objective_runs_on_a_dit_student():
    path = MixturePath(PolynomialScheduler(1), MaskSource(V))
    cfg = ModelConfig(
        vocab_size=V,
        input_vocab_size=V + 1,
        seq_len=L,
        hidden=16,
        cond_dim=8,
        n_blocks=1,
        n_heads=2,
        h_embedding="log2",
    )
    student = DiT(cfg)
    ema = DiT(cfg).requires_grad_(False)
    ema.load_state_dict(student.state_dict())
    loss = FSDFMObjective(path, FSDFMConfig(K=3))(_ctx(student, ema, B=8, seed=4))
    # fresh head: uniform predictions; the teacher equals the student, so shortcut rows contribute 0 and the loss
    # is finite and non-negative
    assert torch.isfinite(loss) and float(loss.detach()) >= 0.0
    loss.backward()
    assert student.head.weight.grad is not None


def test_every_shortcut_is_a_registry_entry_carrying_what_the_objective_branches_on():
    from fsdfm.objectives import FROZEN_TEACHER_SHORTCUTS, SHORTCUTS
    from fsdfm.teachers import COMPOSITIONS

    assert set(SHORTCUTS.names()) >= {
        "rk4",
        "rk4_x1",
        "rk4_time_consistent",
        "heun",
        "none",
        "frozen_dfm",
        "frozen_dfm_rk4",
    }
    assert FROZEN_TEACHER_SHORTCUTS == ("frozen_dfm", "frozen_dfm_rk4")
    flags = {
        n: (
            s.composition,
            s.uses_frozen_teacher,
            s.frozen_evaluates,
            s.finest_from_teacher,
            s.anchor_everywhere,
            s.x1_at_end,
        )
        for n, s in ((n, SHORTCUTS.get(n)) for n in SHORTCUTS.names())
    }
    assert flags == {
        "rk4": ("rk4", False, False, False, False, False),
        "rk4_x1": ("rk4_x1", False, False, False, False, True),
        "rk4_time_consistent": ("rk4_time_consistent", False, False, False, False, False),
        "heun": ("heun", False, False, False, False, False),
        "none": (None, False, False, False, True, False),
        "frozen_dfm": ("rk4", True, False, True, False, False),
        "frozen_dfm_rk4": ("rk4", True, True, False, False, False),
    }
    for s in map(SHORTCUTS.get, SHORTCUTS.names()):
        assert s.composition is None or s.composition in COMPOSITIONS


def test_h_distributions_are_one_table():
    from fsdfm.objectives import H_DISTRIBUTIONS, FSDFMConfig, step_size_probs

    assert list(H_DISTRIBUTIONS) == ["inv_h", "uniform", "annealed", "annealed_to_end"]
    for name in H_DISTRIBUTIONS:
        h, p = step_size_probs(FSDFMConfig(K=2, h_distribution=name), progress=0.0)
        assert torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    # known answers at progress 0: inv_h and annealed give P(h) ~ 1/h = (1, 2, 4) / 7; uniform 1/3 each
    assert torch.allclose(
        step_size_probs(FSDFMConfig(K=2, h_distribution="inv_h"))[1], torch.tensor([1, 2, 4], dtype=torch.float64) / 7
    )
    assert torch.allclose(
        step_size_probs(FSDFMConfig(K=2, h_distribution="annealed"))[1],
        torch.tensor([1, 2, 4], dtype=torch.float64) / 7,
    )
    assert torch.allclose(
        step_size_probs(FSDFMConfig(K=2, h_distribution="uniform"))[1], torch.full((3,), 1 / 3, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="h_distribution must be one of"):
        FSDFMConfig(h_distribution="inverse")
