"""True divergences of few-step samplers on sources small enough to enumerate, and the per-step chain-rule split.

oracle_nll is a cross-entropy: E_q[-log p(x)] / L = [KL(q || p) + H(q)] / L, so oracle_nll - H_L =
KL(q || p) / L - (H(p) - H(q)) / L ("CE excess"): a more diffuse sampler scores worse at equal KL. Where the
state space is small (A^L states, A = V + 1 under the mask source, V under the uniform source) the sampler's output
law q is computed exactly here and the divergences read off it.

Output law (`output_law`). One step of the sampling loop (`fsdfm.samplers`) from state x at t to t + h is a
product over positions of per-position kernels (the "product kernel")

    k_i(y | x) = (1 - j_i) 1[y = x^i] + j_i d_i(y),   j_i = rule(p_i(x^i), t, h)   (0 at a position that cannot move)
    d_i(y)     = p_i(y) / (1 - p_i(x^i)) for y != x^i (p_i(y) over all y on the last step, where j_i = 1),

with p_i = p_{1|t}(. | x) the model's (softmax of its logits, float64). So the law after the step is
q'(y) = sum_x q(x) prod_i k_i(y^i | x): a dense pass over the support of q, O(steps * |supp q| * A^L) work.

Chain-rule split (`step_split`). Along the exact process (x_{t+h} drawn from J(y | x_t) = sum_{x_1} p(x_1 | x_t)
prod_i b_i(y^i | x_t^i, x_1^i), b the path's bridge of `fsdfm.oracle_joint`, whose time marginals are the path's),
the KL of one step of a product sampler Q = prod_i Q_i splits exactly as

    KL(J || prod_i Q_i) = TC(J) + sum_i KL(J_i || Q_i),       TC(J) = KL(J || prod_i J_i)  (total correlation)

with J_i the marginals of J: TC is the factorization term (what no product sampler removes at this step), the sum
the per-position term (the update rule's discretization and the model's error, zero for the exact denoiser with a
rule that reproduces the bridge's marginals, e.g. cumulative scalar under the mask source). Summed over the steps,
averaged over x_t from the path, it is the KL between the trajectory laws of the exact and the product sampler, an
upper bound on KL(p || q) of the outputs (data processing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fsdfm.data.oracle import OracleSource
from fsdfm.oracle_posterior import evidence
from fsdfm.paths import MixturePath
from fsdfm.samplers import get_rule

__all__ = ["LawDivergences", "OutputLaw", "StepSplit", "divergences", "output_law", "product_kernel", "step_split"]

MAX_STATES = 1 << 20  # A^L beyond this is not enumerable here (memory: a dense law and A^L-wide kernels)


def _states(alphabet: int, seq_len: int) -> torch.Tensor:
    """Every sequence of `seq_len` symbols < alphabet, first position most significant: (alphabet^L, L) long."""
    n = alphabet**seq_len
    if n > MAX_STATES:
        raise ValueError(f"{alphabet}^{seq_len} = {n} states exceed the enumeration limit {MAX_STATES}")
    idx = torch.arange(n)
    powers = alphabet ** torch.arange(seq_len - 1, -1, -1)
    return (idx[:, None] // powers) % alphabet


def product_kernel(
    x: torch.Tensor, p: torch.Tensor, t: float, h: float, rule: str, path: MixturePath, final: bool
) -> torch.Tensor:
    """The per-position kernels k_i(y | x) of one sampler step (module docstring).

    Args:
        x: (B, L) states; p: (B, L, V) p_{1|t}(. | x) (float64, rows summing to 1); t, h: the step; rule: a name of
        `fsdfm.samplers.UPDATE_RULES`; final: the last step (every movable position draws from p).
    Returns:
        (B, L, A) float64, A = path.source.input_vocab_size (the mask id V is column V under the mask source).
    """
    B, L, V = p.shape
    A = path.source.input_vocab_size
    movable = path.source.movable(x)
    in_vocab = x < V
    z = x.clamp(max=V - 1)
    p_z = p.gather(-1, z[..., None]).squeeze(-1) * in_vocab
    stay = torch.nn.functional.one_hot(x, A).to(torch.float64)
    dest = torch.zeros((B, L, A), dtype=torch.float64)
    dest[..., :V] = p
    if final:
        jump = movable.to(torch.float64)
    else:
        tt, hh = torch.full((B,), float(t), dtype=torch.float64), torch.full((B,), float(h), dtype=torch.float64)
        jump = get_rule(rule)(p_z, tt, hh, path.scheduler) * movable
        dest = dest * (1 - stay * in_vocab[..., None])  # a move changes the token
        dest = dest / dest.sum(-1, keepdim=True).clamp_min(1e-300)
    return (1 - jump)[..., None] * stay + jump[..., None] * dest


def _outer(k: torch.Tensor) -> torch.Tensor:
    """(R, L, A) per-position laws -> (R, A^L) their product law, first position most significant."""
    out = k[:, 0]
    for i in range(1, k.shape[1]):
        out = (out[:, :, None] * k[:, i, None, :]).reshape(k.shape[0], -1)
    return out


@dataclass(frozen=True)
class OutputLaw:
    """The exact law of a sampler's output over V^L: probs (V^L,) float64 indexed like `states` (V^L, L)."""

    states: torch.Tensor
    probs: torch.Tensor


@torch.no_grad()
def output_law(
    model: Callable,
    path: MixturePath,
    seq_len: int,
    grid: torch.Tensor,
    rule: str,
    h_conditioned: bool = False,
    chunk_elements: int = 1 << 22,
) -> OutputLaw:
    """The exact output law of the sampling loop (model, path, rule, time grid) by the dense forward pass over
    states (module docstring). model(x_t, t, h) -> logits (B, L, V), as in `fsdfm.samplers.sample`."""
    V, A = path.vocab_size, path.source.input_vocab_size
    states = _states(A, seq_len)
    q = torch.zeros(len(states), dtype=torch.float64)
    if path.source.name == "mask":
        q[-1] = 1.0  # all-mask: every digit A - 1 = V
    else:
        q[:] = 1.0 / len(states)
    n_steps = grid.numel() - 1
    rows_per_chunk = max(1, chunk_elements // len(states))
    for i in range(n_steps):
        t, h = float(grid[i]), float(grid[i + 1] - grid[i])
        support = q.nonzero().squeeze(1)
        new = torch.zeros_like(q)
        for s in range(0, len(support), rows_per_chunk):
            rows = support[s : s + rows_per_chunk]
            x = states[rows]
            tt = torch.full((len(x),), t)
            args = (x, tt, torch.full((len(x),), h)) if h_conditioned else (x, tt, None)
            p = torch.softmax(model(*args).to(torch.float64), -1)
            k = product_kernel(x, p, t, h, rule, path, final=i == n_steps - 1)
            new += q[rows] @ _outer(k)
        q = new
    clean = (states < V).all(1)
    return OutputLaw(states=states[clean], probs=q[clean])


@dataclass(frozen=True)
class LawDivergences:
    """Per token (nats / L): kl_qp = KL(q || p), kl_pq = KL(p || q) (inf where q misses mass of p), entropy_q = H(q),
    entropy_p = H(p) (the source's H_L), cross_entropy = E_q[-log p] = H(q) + KL(q || p) (oracle_nll's mean)."""

    kl_qp: float
    kl_pq: float
    entropy_q: float
    entropy_p: float
    cross_entropy: float


def divergences(law: OutputLaw, source: OracleSource) -> LawDivergences:
    """KL(q || p), KL(p || q), H(q), H(p) and E_q[-log p] per token of an exact output law q against the source p."""
    L = law.states.shape[1]
    with np.errstate(divide="ignore"):
        log_p = torch.from_numpy(np.asarray(source.log_prob(law.states.numpy()), dtype=np.float64))
    q, p = law.probs, log_p.exp()
    log_q = torch.where(q > 0, q.clamp_min(1e-300).log(), torch.tensor(-math.inf, dtype=torch.float64))
    on_q, on_p = q > 0, p > 0
    kl_qp = float((q[on_q] * (log_q[on_q] - log_p[on_q])).sum())
    kl_pq = math.inf if bool((on_p & ~on_q).any()) else float((p[on_p] * (log_p[on_p] - log_q[on_p])).sum())
    h_q = float(-(q[on_q] * log_q[on_q]).sum())
    h_p = float(-(p[on_p] * log_p[on_p]).sum())
    ce = float(-(q[on_q] * log_p[on_q]).sum())
    return LawDivergences(kl_qp / L, kl_pq / L, h_q / L, h_p / L, ce / L)


# ------------------------------------------------------------------------------------------- the split
@dataclass(frozen=True)
class StepSplit:
    """One step's KL(J || prod Q_i) (path_kl, nats) = tc (factorization) + per_position.sum(); per_position (L,)."""

    path_kl: float
    tc: float
    per_position: np.ndarray


def _exact_step_law(source: OracleSource, path: MixturePath, x_t: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """J(y | x_t) over A^L by enumerating x_1 over V^L: (A^L,) float64 (one state x_t: (L,))."""
    V, A, L = path.vocab_size, path.source.input_vocab_size, x_t.shape[0]
    x1 = _states(V, L)
    kappa = path.scheduler.kappa(torch.tensor([t], dtype=torch.float64))
    e = evidence(x_t[None], kappa, V, path.source.name)[0]  # (L, V)
    with np.errstate(divide="ignore"):
        w = torch.from_numpy(np.exp(np.asarray(source.log_prob(x1.numpy()), dtype=np.float64)))
    w = w * e[torch.arange(L), x1].prod(1)
    w = w / w.sum()
    final = t + h >= 1.0 - 1e-12
    r = 0.0 if final else float(path.scheduler.survival_ratio(torch.tensor([t]).double(), torch.tensor([h]).double()))
    # per x_1 and position: stay at x_t^i (w.p. r, or 1 when already at x_1^i), else move to x_1^i
    at = x1 == x_t[None]
    b = torch.zeros((len(x1), L, A), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)  # python scalars in torch.where would give float32
    b.scatter_(-1, x1[..., None], torch.where(at, one, one - r)[..., None])
    b += torch.nn.functional.one_hot(x_t, A).to(torch.float64)[None] * torch.where(at, 0 * one, r * one)[..., None]
    law = torch.zeros(A**L, dtype=torch.float64)
    rows = max(1, (1 << 22) // A**L)
    for s in range(0, len(x1), rows):
        law += w[s : s + rows] @ _outer(b[s : s + rows])
    return law


@torch.no_grad()
def step_split(
    model: Callable,
    source: OracleSource,
    path: MixturePath,
    x_t: torch.Tensor,
    t: float,
    h: float,
    rule: str,
    h_conditioned: bool = False,
) -> StepSplit:
    """KL(J || prod_i Q_i) = TC(J) + sum_i KL(J_i || Q_i) at one state x_t (L,) for the step t -> t + h
    (module docstring); Q_i the sampler's product kernel with the model's p_{1|t}, J the exact step law."""
    A, L = path.source.input_vocab_size, x_t.shape[0]
    J = _exact_step_law(source, path, x_t, t, h)
    tt = torch.full((1,), float(t))
    logits = model(x_t[None], tt, torch.full((1,), float(h)) if h_conditioned else None)
    p = torch.softmax(logits.to(torch.float64), -1)
    Q = product_kernel(x_t[None], p, t, h, rule, path, final=t + h >= 1.0 - 1e-12)[0]  # (L, A)
    Ji = J.view((A,) * L)
    marg = torch.stack([Ji.sum(dim=tuple(d for d in range(L) if d != i)) for i in range(L)])  # (L, A)

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        on = a > 0
        if bool((on & (b <= 0)).any()):
            return math.inf
        return float((a[on] * (a[on].log() - b[on].log())).sum())

    per_pos = np.array([kl(marg[i], Q[i]) for i in range(L)])
    return StepSplit(path_kl=kl(J, _outer(Q[None])[0]), tc=kl(J, _outer(marg[None])[0]), per_position=per_pos)
