"""The exact denoiser of an oracle source: p_{1|t}(x_1^i = v | x_t) by forward-backward, and a model that returns it.

On the mixture path every position is observed through an independent noisy channel given the clean token,

    mask source:     P(x_t^i = y | x_1^i = v) = kappa 1[y = v]  (y a token),   1 - kappa  (y = mask)
    uniform source:  P(x_t^i = y | x_1^i = v) = kappa 1[y = v] + (1 - kappa) / V

so the evidence factor e_i(v) = P(x_t^i | x_1^i = v) is, up to a constant in v, 1[v = y] (mask source, observed y),
1 (mask source, masked) or kappa 1[v = y] + (1 - kappa) / V (uniform source). The exact posterior marginal

    p_{1|t}(x_1^i = v | x_t)  proportional to  sum_{x_1: x_1^i = v} p_source(x_1) prod_j e_j(x_1^j)

is a forward-backward pass over the source's latent chain:

* `MarkovSource` of order k: the latent state at position i >= k - 1 is the context c_i = (x^{i-k+1}, ..., x^i)
  (C = V^k states, oldest digit most significant, as in fsdfm.data.oracle.markov); the chain starts from the stationary pi over
  contexts at i = k - 1 and moves c -> (c mod V^{k-1}) V + x with P(x | c). State c_i carries the evidence of its
  newest digit (and c_{k-1} that of all k digits). Token marginals: p(x^i = v) = sum of the state posterior over
  contexts whose newest digit is v (i >= k - 1), or whose digit i is v (i < k - 1, read off c_{k-1}).
* `HMMSource`: the latent state is the hidden h_i, with evidence E_i(h) = sum_v B[h, v] e_i(v); then
  p(x^i = v | x_t) = sum_h gamma_i(h) B[h, v] e_i(v) / E_i(h), gamma_i the hidden-state posterior.

The recursions run on normalised messages (the scaled forward-backward): every alpha_i and beta_i is divided by its
sum, and the log normaliser log p(x_t) is the sum of the logs of those scales, so nothing under- or overflows however
long the sequence (this is the log-space computation without a logsumexp per entry). It is vectorised over the batch
and the states in torch; a step costs B C V multiply-adds (B V^2 at order 1).

`ExactPosterior` wraps it as a "model": `model(x_t, t, h=None)` returns logits log p_{1|t} (B, L, V), with the
impossible tokens at a large negative finite value (exp gives exactly 0), so the sampling loop, every update rule and
the FS-DFM shortcut compositions can use it where they use a network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fsdfm.data.oracle import HMMSource, MarkovSource, OracleSource
from fsdfm.paths import MixturePath

__all__ = ["ExactPosterior", "NEG_LOGIT", "Posterior", "evidence", "posterior"]

NEG_LOGIT = -1.0e4  # the logit of an impossible token: finite (no NaN in softmax or KL), exp() is exactly 0


@dataclass(frozen=True)
class Posterior:
    """probs: (B, L, V) the exact p_{1|t}(x_1^i = v | x_t); log_evidence: (B,) log P(x_t) up to a constant in x_1
    (the evidence factors drop v-independent constants such as the masking probability)."""

    probs: torch.Tensor
    log_evidence: torch.Tensor


def evidence(
    x_t: torch.Tensor, kappa: torch.Tensor, vocab_size: int, source: str, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Evidence factors e_i(v) = P(x_t^i | x_1^i = v) up to a constant in v: (B, L, V).

    Args:
        x_t: (B, L) long states; under the mask source id V is the mask.
        kappa: (B,) kappa(t) per row.
        vocab_size: V.
        source: "mask" or "uniform".
    Returns:
        (B, L, V) non-negative factors in `dtype`.
    """
    V = vocab_size
    B, L = x_t.shape
    onehot = torch.zeros((B, L, V), dtype=dtype, device=x_t.device)
    observed = x_t < V
    onehot.scatter_(-1, x_t.clamp(max=V - 1)[..., None], observed[..., None].to(dtype))
    if source == "mask":
        return torch.where(observed[..., None], onehot, torch.ones((), dtype=dtype, device=x_t.device))
    if source == "uniform":
        if bool((~observed).any()):
            raise ValueError(f"uniform source: x_t holds ids >= vocab_size {V} (a mask id on the uniform path?)")
        k = kappa.to(dtype)[:, None, None]
        return k * onehot + (1.0 - k) / V
    raise ValueError(f"source must be mask or uniform, got {source!r}")


def _normalise(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m (B, ...) -> (m / s, log s) with s the per-row sum. A row with no mass (evidence impossible under the
    source) stays all zero, with log s = -inf; `posterior` makes its marginals uniform at the end."""
    s = m.sum(dim=tuple(range(1, m.dim())), keepdim=True)
    return m / s.clamp_min(torch.finfo(m.dtype).tiny), torch.log(s.flatten())


def _markov_tables(src: MarkovSource, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi (C,), T (C, V) with T[c, x] = P(x | c) including the epsilon mixture) as torch tensors, cached."""
    key = ("_posterior_tables", dtype, str(device))
    cache = src.__dict__.setdefault("_torch_cache", {})
    if key not in cache:
        C, V = src.n_contexts, src.vocab_size
        T = torch.zeros((C, V), dtype=torch.float64)
        T.scatter_add_(1, torch.from_numpy(src.next_tokens), torch.from_numpy((1 - src.epsilon) * src.next_probs))
        T += src.epsilon / V
        cache[key] = (torch.from_numpy(src.stationary).to(dtype=dtype, device=device), T.to(dtype=dtype, device=device))
    return cache[key]


def _markov_posterior(src: MarkovSource, e: torch.Tensor) -> Posterior:
    """Forward-backward over contexts. e: (B, L, V) evidence -> Posterior."""
    B, L, V = e.shape
    k, C = src.order, src.n_contexts
    if L < k:
        raise ValueError(f"the exact posterior of an order-{k} Markov source needs seq_len >= {k}; got {L}")
    pi, T = _markov_tables(src, e.dtype, e.device)
    S = C // V  # V^{k-1} shifted prefixes s; a context is (a, s) = (oldest digit, rest) or (s, x) = (rest, newest)
    T3 = T.view(V, S, V)  # T3[a, s, x] = P(x | (a, s))
    # evidence of the first state c_{k-1}: the product of its k digits' factors (digit j is position j)
    e0 = torch.ones((B, C), dtype=e.dtype, device=e.device)
    for j in range(k):
        e0 = (e0.view(B, V**j, V, V ** (k - 1 - j)) * e[:, j].view(B, 1, V, 1)).view(B, C)
    n = L - k + 1  # latent states c_{k-1}, ..., c_{L-1}
    alpha = torch.empty((n, B, C), dtype=e.dtype, device=e.device)
    a, log_z = _normalise(pi * e0)
    alpha[0] = a
    for m in range(1, n):
        # alpha(s, x) = e(x) sum_a alpha(a, s) P(x | (a, s))
        pred = (
            (alpha[m - 1] @ T).view(B, 1, V) if k == 1 else torch.einsum("bas,asx->bsx", alpha[m - 1].view(B, V, S), T3)
        )
        a, ls = _normalise(pred * e[:, k - 1 + m].view(B, 1, V))
        alpha[m] = a.reshape(B, C)
        log_z = log_z + ls
    probs = torch.empty((B, L, V), dtype=e.dtype, device=e.device)
    beta = torch.ones((B, C), dtype=e.dtype, device=e.device)
    for m in range(n - 1, -1, -1):
        gamma, _ = _normalise(alpha[m] * beta)  # posterior of c_{k-1+m}
        probs[:, k - 1 + m] = gamma.reshape(B, S, V).sum(1)  # newest digit
        if m == 0:
            for j in range(k - 1):  # earlier digits of the first context
                probs[:, j] = gamma.view(B, V**j, V, V ** (k - 1 - j)).sum((1, 3))
            break
        # beta(a, s) = sum_x P(x | (a, s)) e(x) beta(s, x)
        w = e[:, k - 1 + m].view(B, 1, V) * beta.view(B, S, V)
        beta, _ = _normalise(w.view(B, V) @ T.T if k == 1 else torch.einsum("asx,bsx->bas", T3, w).reshape(B, C))
    return Posterior(probs=probs, log_evidence=log_z)


def _hmm_posterior(src: HMMSource, e: torch.Tensor) -> Posterior:
    """Forward-backward over hidden states. e: (B, L, V) evidence -> Posterior."""
    B, L, V = e.shape
    A = torch.as_tensor(src.transition, dtype=e.dtype, device=e.device)
    Bm = torch.as_tensor(src.emission, dtype=e.dtype, device=e.device)
    pi = torch.as_tensor(src.stationary, dtype=e.dtype, device=e.device)
    E = torch.einsum("blv,hv->blh", e, Bm)  # E_i(h) = sum_v B[h, v] e_i(v)
    alpha = torch.empty((L, B, src.n_states), dtype=e.dtype, device=e.device)
    a, log_z = _normalise(pi * E[:, 0])
    alpha[0] = a
    for i in range(1, L):
        a, ls = _normalise((alpha[i - 1] @ A) * E[:, i])
        alpha[i] = a
        log_z = log_z + ls
    probs = torch.empty((B, L, V), dtype=e.dtype, device=e.device)
    beta = torch.ones((B, src.n_states), dtype=e.dtype, device=e.device)
    for i in range(L - 1, -1, -1):
        gamma, _ = _normalise(alpha[i] * beta)
        # p(x^i = v) = sum_h gamma(h) B[h, v] e_i(v) / E_i(h); E_i(h) = 0 only where gamma(h) = 0
        ratio = gamma / torch.where(E[:, i] > 0, E[:, i], 1.0)
        probs[:, i] = (ratio @ Bm) * e[:, i]
        if i > 0:
            beta, _ = _normalise((E[:, i] * beta) @ A.T)
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    return Posterior(probs=probs, log_evidence=log_z)


def posterior(
    oracle: OracleSource, x_t: torch.Tensor, kappa: torch.Tensor, source: str, dtype: torch.dtype = torch.float64
) -> Posterior:
    """The exact posterior marginals p_{1|t}(x_1^i = v | x_t) of `oracle` under the mask or uniform source.

    Args:
        oracle: a MarkovSource (any order) or an HMMSource.
        x_t: (B, L) long states on the path (mask id V under the mask source).
        kappa: (B,) kappa(t) per row (or a scalar).
        source: "mask" or "uniform".
        dtype: float64 (exact tests) or float32.
    Returns:
        Posterior with probs (B, L, V) summing to 1 over V, and log_evidence (B,).
    """
    V = oracle.vocab_size
    kappa = torch.as_tensor(kappa, dtype=dtype, device=x_t.device).expand(x_t.shape[0])
    e = evidence(x_t, kappa, V, source, dtype)
    if isinstance(oracle, MarkovSource):
        out = _markov_posterior(oracle, e)
    elif isinstance(oracle, HMMSource):
        out = _hmm_posterior(oracle, e)
    else:
        raise TypeError(f"no exact posterior for {type(oracle).__name__}")
    # a state impossible under the source (no x_1 explains it) gets uniform marginals rather than NaN
    dead = torch.isneginf(out.log_evidence)
    if bool(dead.any()):
        out = Posterior(
            torch.where(dead[:, None, None], torch.full_like(out.probs, 1.0 / V), out.probs), out.log_evidence
        )
    return out


class ExactPosterior:
    """A "model" whose p_{1|t} is the exact posterior: `model(x_t, t, h=None)` -> logits (B, L, V).

    The step size h is ignored (the exact p_{1|t} does not depend on the sampler's step). Logits are
    log p_{1|t} with impossible tokens at NEG_LOGIT, in the dtype of `dtype` (float64 by default).
    """

    def __init__(self, oracle: OracleSource, path: MixturePath, dtype: torch.dtype = torch.float64):
        if path.vocab_size != oracle.vocab_size:
            raise ValueError(f"path vocab_size {path.vocab_size} != oracle vocab_size {oracle.vocab_size}")
        self.oracle, self.path, self.dtype = oracle, path, dtype

    def probs(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """p_{1|t}(. | x_t): (B, L, V). t: (B,) or a scalar."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        kappa = self.path.scheduler.kappa(t)
        return posterior(self.oracle, x_t, kappa, self.path.source.name, self.dtype).probs

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        p = self.probs(x_t, t)
        return torch.where(p > 0, torch.log(p), torch.full_like(p, NEG_LOGIT))

    def eval(self) -> "ExactPosterior":  # the model protocol of the sampling loop and the trainers
        return self
