"""One sampling loop for the mixture path, with pluggable per-step update rules.

At step i the model gives p = p_{1|t}(. | x_t) (float64 by default). A position holding z that may
still move (see `Source.movable`) jumps with a rule-specific probability, and its destination is drawn
proportional to p(x) over x != z. Deciding the jump from p(z) first and drawing destinations only where
a jump happens keeps the sampler's own cost small; by default (float64) `sample` goes further and reads the
logits directly (`update_from_logits`: p(z) only where the jump is undecided, inverse-CDF destinations, no
(B, L, V) softmax), on CPU and GPU alike: on an H100 the dense (B, L, V) float64 step cost twice the forward of a
170M-parameter DiT at V = 50,257 (benchmarks/results/README.md). The last step draws x_1 ~ p directly at every
movable position.

Update rules (jump probability of a position holding z, step t -> t + h):
    euler              (1 - p(z)) * (1 - exp(-h g(t)))        the DFM baseline: draw x^_1 ~ p, move w.p. 1 - e^{-h g}
    cumulative_scalar  1 - r^(1 - p(z)),  r = (1 - kappa(t + h)) / (1 - kappa(t))      FS-DFM; never overshoots
    mixture_euler      1 - exp(-(1 - p(z)))                   independent of t and h (ablation)
For a masked token (p(z) = 0) the cumulative-scalar probability is (kappa(t+h) - kappa(t)) / (1 - kappa(t)),
exactly the path's unmasking probability.

The chunked kernels of the sparse step (inverse-CDF draws, the float64 chunk, the certified float32 chunk) are
`fsdfm.sparse_step`; this module holds the rules, the step and the loop.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from fsdfm.paths import MixturePath
from fsdfm.registry import Registry
from fsdfm.schedulers import Scheduler
from fsdfm.sparse_step import (
    _BLOCK,
    _CERTIFIED_MIN_ELEMENTS,
    _chunk_certified,
    _chunk_float64,
    _chunk_from_logits,
    _final_rows,
)
from fsdfm.progress import bar as progress_bar

# The logits path processes rows in chunks whose work buffers (float64 weights) are allocated once per step and
# reused. On CPU a chunk is ~8 MiB, so the sampler's own work stays in cache instead of streaming (B, L, V) float64
# temporaries through memory; on a GPU a chunk is ~1 GiB, so that a step launches few kernels.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 27}

# A rule maps (p_z (B, L), t (B,), h (B,), scheduler) to jump probabilities (B, L), elementwise over positions and
# non-increasing in p(z) (more mass on the current token, less reason to leave it): `update_from_logits` relies on
# both, evaluating p(z) only where u < rule(0) and calling the rule on (n, 1) candidates with their rows' t and h.
UPDATE_RULES: Registry = Registry("update rule", discover=("fsdfm.samplers", "fsdfm.sampling"))
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Scheduler], torch.Tensor]


@dataclass(frozen=True)
class SampleNumerics:
    """The numerics of one `sample` call, recorded with every sample (fsdfm.methods.evaluate's sample stage).

    logits_dtype: the model's output dtype (float32 unless bf16 autocast is on); precision: dtype of p(z), the jump
    probabilities and the draws; step: "logits" (`update_from_logits`) or "softmax" (p = softmax, then `update`);
    certified_float32_exp: the logits step may compute its weights by float32 exp under a certificate
    (`_chunk_certified`; the tokens are the float64 step's); autocast: bf16 autocast of the forward."""

    logits_dtype: str
    precision: str
    step: str
    certified_float32_exp: bool
    autocast: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SampleOutput:
    """tokens: (N, L) long; nfe: network evaluations per sample; time_grid: (steps + 1,) float64;
    wall_s: sampling wall-clock (CUDA synchronised, warm-up excluded by the caller); numerics: how the discrete
    sampler computed (None for samplers that do not record it)."""

    tokens: torch.Tensor
    nfe: int
    time_grid: torch.Tensor
    wall_s: float = 0.0
    numerics: SampleNumerics | None = None
    nfe_per_sample: torch.Tensor | None = None  # (N,) where NFE varies per sample (fsdfm.sampling: threshold)


# Which method kinds a rule applies to. A kind that samples the mixture path with the loop below claims every
# registered rule (fsdfm.methods.base.declared_rules); a rule may restrict itself to some kinds (`kinds=`) or opt
# out of some (`exclude=`). Names, not imports: the library floor knows no method code.
RULE_KINDS: dict[str, tuple[str, ...] | None] = {}  # rule -> the kinds it is restricted to; None: every mixture kind
RULE_EXCLUDES: dict[str, tuple[str, ...]] = {}  # rule -> the mixture kinds it does not apply to
UPDATE_ALIASES: dict[str, str] = {}


def register_rule(
    name: str, kinds: tuple[str, ...] | None = None, alias_of: str | None = None, exclude: tuple[str, ...] = ()
) -> Callable:
    """`@register_rule("name")` on a jump-probability function (p_z, t, h, scheduler) -> (B, L): a rule of every
    mixture-path kind; `kinds=(...)` restricts it to those kinds, `exclude=(...)` keeps it from those;
    `register_rule("alias", kinds=..., alias_of="rule")` names an existing rule again (for some kinds)."""
    RULE_KINDS[name] = None if kinds is None else tuple(kinds)
    RULE_EXCLUDES[name] = tuple(exclude)
    if alias_of is not None:
        UPDATE_RULES.get(alias_of)  # an alias of an unknown rule is an error here, not at sampling time
        UPDATE_ALIASES[name] = alias_of
        return lambda fn: fn
    return UPDATE_RULES.register(name)


def rule_applies(rule: str, kind: str) -> bool:
    """Whether the registered `rule` applies to the mixture-path method kind `kind` (its restriction, its opt-outs)."""
    kinds = RULE_KINDS.get(rule, ())
    return (kinds is None or kind in kinds) and kind not in RULE_EXCLUDES.get(rule, ())


def rules_for(kind: str) -> list[str]:
    """Every registered rule (aliases included) that applies to the mixture-path kind `kind`, in registration order;
    finds the rules first (`UPDATE_RULES.discover`: rule modules and plugins)."""
    UPDATE_RULES.discover()
    return [r for r in RULE_KINDS if rule_applies(r, kind)]


@register_rule("euler")
def euler_jump_prob(p_z, t, h, scheduler):
    """(1 - p(z)) (1 - exp(-h g(t))). p_z: (B, L); t, h: (B,) -> (B, L)."""
    g = scheduler(t).rate
    return (1.0 - p_z) * (1.0 - torch.exp(-h * g))[:, None]


@register_rule("cumulative_scalar")
def cumulative_scalar_jump_prob(p_z, t, h, scheduler):
    """1 - r^(1 - p(z)) with r = (1 - kappa(t + h)) / (1 - kappa(t)) in [0, 1]."""
    r = scheduler.survival_ratio(t, h)[:, None]
    return 1.0 - r ** (1.0 - p_z)


@register_rule("mixture_euler")
def mixture_euler_jump_prob(p_z, t, h, scheduler):
    """1 - exp(-(1 - p(z))), independent of t and h."""
    return 1.0 - torch.exp(-(1.0 - p_z))


# MDLM-style sampling is the mask-source DFM with the cumulative-scalar (exact ancestral) rule.
register_rule("mdlm", kinds=("dfm", "exact"), alias_of="cumulative_scalar")


def get_rule(name: str) -> Rule:
    return UPDATE_RULES.get(UPDATE_ALIASES.get(name, name))


def time_grid(n_steps: int, t_start: float = 0.0, t_end: float = 1.0, device=None) -> torch.Tensor:
    """Uniform grid t_i = t_start + i (t_end - t_start) / n_steps, i = 0..n_steps (float64)."""
    if not (isinstance(n_steps, int) and n_steps >= 1):
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
    return torch.linspace(t_start, t_end, n_steps + 1, dtype=torch.float64, device=device)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Categorical draw per row of probs (..., V) by Gumbel-max in probs' dtype (no host sync)."""
    u = torch.rand(probs.shape, dtype=probs.dtype, device=probs.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(probs.dtype).tiny)))
    return torch.argmax(torch.log(probs) + gumbel, dim=-1)


def update_from_logits(
    x: torch.Tensor,
    logits: torch.Tensor,
    t: torch.Tensor,
    h: torch.Tensor,
    rule: Rule,
    path: MixturePath,
    generator: torch.Generator | None,
    final: torch.Tensor | bool = False,
    precision: torch.dtype = torch.float64,
    host_checks: bool | None = None,
    certified: bool | None = None,
) -> torch.Tensor:
    """The sparse step of `update` read from logits (B, L, V) instead of p: the same jump rule and the same
    distribution, computed in `precision`, without a (B, L, V) softmax (the default path of `sample`).

    Every rule's jump probability is non-increasing in p(z), so prob(p(z)) <= prob(0), and a position whose uniform
    u >= prob(0) stays whatever p(z) is. p(z) = exp(l_z - m) / sum_j exp(l_j - m) (m = max_j l_j) is therefore
    computed only at the candidates u < prob(0) (a fraction ~ h g(t) of the positions under the uniform source; none
    under the mask source, where movable positions hold the mask and p(z) = 0), and the destination ~ p over x != z
    (over all x at the final step) by inverse CDF (`_inverse_cdf`, one uniform per position) from the same weights.
    One host sync per step on a GPU (the candidates' nonzero), wherever the chunks fall. host_checks (default: on
    CPU, where syncs cost nothing) lets host-side checks skip work a chunk does not need; the draws are the same.
    certified (default: with host_checks, float64 precision, float32 logits and >= 2^19 candidate weights, where it
    is 1.4-1.6x cheaper on CPU than the float64 chunk; False forces the float64 chunk): float32 exp, float64 sums and a
    certificate (`_chunk_certified`); the few rows it cannot certify take the float64 step, so the tokens are the
    float64 step's.
    """
    B, L, V = logits.shape
    device = x.device
    on_cpu = device.type == "cpu" if host_checks is None else host_checks
    can_certify = on_cpu and precision == torch.float64 and logits.dtype == torch.float32
    if certified and not can_certify:
        raise ValueError("certified=True needs host_checks, float64 precision and float32 logits")
    final = _final_rows(final, B, device)
    movable = path.source.movable(x)
    in_vocab = x < V
    z = x.clamp(max=V - 1).flatten()
    reads_p = (in_vocab & ~final[:, None]).flatten()  # prob depends on p(z); a move must change the token
    u = torch.rand((B, L), dtype=precision, device=device, generator=generator)
    bound = torch.where(final[:, None], 1.0, rule(torch.zeros_like(u), t, h, path.scheduler))  # prob at p(z) = 0
    # candidates; all other positions stay. Under the mask source the movable positions hold the mask (p(z) = 0),
    # so every movable one is a candidate with probability bound; under the uniform source ~h g(t) of them are
    rows = (movable & (u < bound)).flatten().nonzero().squeeze(1)
    n = rows.numel()
    u_dest = torch.rand(n, dtype=precision, device=device, generator=generator)  # one per candidate
    x0 = x.flatten()
    x = x0.clone()
    if n == 0:
        return x.view(B, L)
    u_rows, t_rows, h_rows = u.flatten()[rows], t[rows // L], h[rows // L]
    if certified is None:  # its few extra small ops pay off from about 2^19 weights (measured on a 2-core Xeon)
        certified = can_certify and n * V >= _CERTIFIED_MIN_ELEMENTS
    flat = logits.reshape(B * L, V)
    every_row = n == B * L  # e.g. the final step: read the logits by slices, no gather
    # chunks of ~_CHUNK_ELEMENTS weights; the certified chunk's are float32, half the bytes: twice the rows
    chunk_elements = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cuda"]) * (2 if certified else 1)
    step = min(max(1, chunk_elements // V), n)
    n_blocks = -(-V // _BLOCK)
    l_buf = None if every_row or certified else torch.empty((step, V), dtype=logits.dtype, device=device)
    # without host checks (a GPU) the float64 step recomputes weights from the logits: no (c, V) weight buffer
    from_logits_only = not on_cpu and precision == torch.float64
    if not from_logits_only:
        w_buf = torch.empty((step, n_blocks * _BLOCK), dtype=torch.float32 if certified else precision, device=device)
        w_buf[:, V:] = 0.0  # padding up to whole blocks keeps weight 0
    open_rows = []  # certified mode: indices into rows that the certificate leaves to the float64 step
    # the weight pass: chunks bound the (c, V) weight buffer (memory ~ _CHUNK_ELEMENTS, not n x V) while keeping
    # each chunk large enough that exp and the block sums run vectorised; the uniforms were drawn for all candidates
    # above, so the tokens do not depend on where the chunks fall
    for s in range(0, n, step):
        c = min(step, n - s)
        r, z_c, read_c = rows[s : s + c], z[rows[s : s + c], None], reads_p[rows[s : s + c]]
        args = (z_c, read_c, u_rows[s : s + c], u_dest[s : s + c], t_rows[s : s + c], h_rows[s : s + c])
        if certified:
            w = w_buf[:c]
            w[:, V:] = -float("inf")  # the certified chunk exponentiates in place: the padding's weight stays 0
            if every_row:
                w[:, :V].copy_(flat[s : s + c])
            elif V == w.shape[1]:
                torch.index_select(flat, 0, r, out=w)
            else:
                w[:, :V] = flat[r]
            dest, jump, unsure = _chunk_certified(w, V, *args, rule, path.scheduler)
            if bool(unsure.any()):
                open_rows.append(unsure.nonzero().squeeze(1) + s)
        else:
            # l is a slice or a copy of the model's logits, never modified
            l = flat[s : s + c] if every_row else torch.index_select(flat, 0, r, out=l_buf[:c])
            if from_logits_only:  # block sums in one pass over the logits, no float64 weights written and re-read
                dest, jump = _chunk_from_logits(l, *args, rule, path.scheduler)
            else:
                dest, jump = _chunk_float64(l, w_buf[:c], *args, rule, path.scheduler, on_cpu=on_cpu)
        x[r] = dest if jump is None else torch.where(jump, dest, x[r])  # no boolean indexing: no sync
    if open_rows:  # the float64 step at the open rows of all chunks at once (few: one call per step, not per chunk)
        i_all = torch.cat(open_rows)
        for s in range(0, i_all.numel(), step):
            i = i_all[s : s + step]
            r = rows[i]
            w64 = torch.zeros((i.numel(), n_blocks * _BLOCK), dtype=torch.float64, device=device)
            args = (z[r, None], reads_p[r], u_rows[i], u_dest[i], t_rows[i], h_rows[i])
            dest, jump = _chunk_float64(flat[r], w64, *args, rule, path.scheduler, on_cpu=True)
            x[r] = dest if jump is None else torch.where(jump, dest, x0[r])
    return x.view(B, L)


def update(
    x: torch.Tensor,
    p: torch.Tensor,
    t: torch.Tensor,
    h: torch.Tensor,
    rule: Rule,
    path: MixturePath,
    generator: torch.Generator | None,
    final: torch.Tensor | bool = False,
    sparse: bool | None = None,
) -> torch.Tensor:
    """One step of the sampler: x (B, L) at time t -> x at t + h.

    p: (B, L, V) probabilities p_{1|t}; t, h: (B,); final: bool or (B,) bool — rows whose step ends the
    trajectory draw x_1 ~ p at every movable position. sparse: draw destinations only at jumping
    positions (default on CPU, where the boolean gather costs no host-device synchronisation).
    """
    B, L, V = p.shape
    final = _final_rows(final, B, x.device)
    movable = path.source.movable(x)
    in_vocab = x < V
    z = x.clamp(max=V - 1)
    p_at_z = p.gather(-1, z[..., None]).squeeze(-1)  # at a mask position: p(V - 1), the clamped index
    p_z = p_at_z * in_vocab
    prob = torch.where(final[:, None], torch.ones_like(p_z), rule(p_z, t, h, path.scheduler))
    u = torch.rand((B, L), dtype=p.dtype, device=x.device, generator=generator)
    jump = movable & (u < prob)
    # Destinations: p with the current token removed (a non-final move must change the token).
    drop_z = in_vocab & ~final[:, None]
    if sparse is None:
        sparse = x.device.type == "cpu"
    if sparse:
        idx = jump.nonzero(as_tuple=True)
        q = p[idx]
        q[torch.arange(q.shape[0], device=q.device), z[idx]] *= (~drop_z[idx]).to(q.dtype)
        x = x.clone()
        x[idx] = _draw(q, generator)
        return x
    # Write back p_at_z, not p_z: at a mask position z is the clamped V - 1 and its mass must stay.
    q = p.scatter(-1, z[..., None], torch.where(drop_z, 0.0, p_at_z)[..., None].to(p.dtype))
    q = torch.where(q.sum(-1, keepdim=True) > 0, q, p)  # rows with p(z) = 1 never jump; keep them valid
    return torch.where(jump, _draw(q, generator), x)


@torch.no_grad()
def sample(
    model: Callable,
    path: MixturePath,
    *,
    n_samples: int,
    seq_len: int,
    n_steps: int | None = None,
    grid: torch.Tensor | None = None,
    rule: str = "cumulative_scalar",
    h_conditioned: bool = False,
    generator: torch.Generator | None = None,
    precision: torch.dtype = torch.float64,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    x_init: torch.Tensor | None = None,
    autocast: bool = False,
    sparse: bool | None = None,
    certified: bool | None = None,
) -> SampleOutput:
    """Sample n_samples sequences of length seq_len on a time grid (a uniform grid of n_steps on [0, 1],
    or an explicit `grid` of increasing times). `model(x_t, t, h)` returns logits (B, L, V); h is passed
    only when `h_conditioned` (the FS-DFM student is told the step size at every step).

    x_init: (n_samples, L) start state at grid[0] (default: a draw from the source at t = grid[0] = 0).
    With float64 precision (the default) and sparse left None or True, each step reads the logits directly
    (`update_from_logits`, on any device); otherwise p = softmax(logits) in `precision`, then `update` (sparse=False:
    the dense step, no host sync at all). Same distribution. certified: `update_from_logits`'s (None: its default;
    False: the float64 chunk throughout; the tokens are the same either way).
    """
    device = torch.device(device)
    grid = time_grid(n_steps, device=device) if grid is None else grid.to(device=device, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("time grid must be a 1-D increasing tensor with at least 2 points")
    rule_fn = get_rule(rule)
    if hasattr(rule_fn, "sample_loop"):  # a whole-step sampler (fsdfm.sampling) runs its own loop: same contract
        return rule_fn.sample_loop(
            model, path, n_samples=n_samples, seq_len=seq_len, grid=grid, h_conditioned=h_conditioned,
            generator=generator, precision=precision, batch_size=batch_size, device=device,
        )  # fmt: skip
    # The logits path (the default) needs no (B, L, V) softmax. Other precisions keep softmax + Gumbel-max, so that
    # a low-precision ablation reproduces exactly the known low-precision artefact.
    from_logits = sparse is not False and precision == torch.float64
    batch_size = batch_size or n_samples
    n_total = grid.numel() - 1
    chunks, wall = [], 0.0

    bar = progress_bar(n_total * -(-n_samples // batch_size), f"sample {rule} x {n_total} steps", unit="step")
    for start in range(0, n_samples, batch_size):
        B = min(batch_size, n_samples - start)
        if x_init is not None:
            x = x_init[start : start + B].to(device)
        else:
            x = path.source.sample((B, seq_len), generator=generator, device=device)
        # CUDA kernels run asynchronously: synchronise on both sides so that wall_s times the steps themselves,
        # not the queue of kernels launched before (the source draw) or still running after
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i in range(n_total):  # one network evaluation per step: NFE = n_total per sample
            t, h = grid[i].expand(B), (grid[i + 1] - grid[i]).expand(B)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(x, t.float(), h.float() if h_conditioned else None)
            if from_logits:
                x = update_from_logits(
                    x,
                    logits,
                    t,
                    h,
                    rule_fn,
                    path,
                    generator,
                    final=(i == n_total - 1),  # the last step lands at t = 1: no position may stay in the source
                    precision=precision,
                    certified=certified,
                )
            else:
                p = torch.softmax(logits.to(precision), dim=-1)
                x = update(x, p, t, h, rule_fn, path, generator, final=(i == n_total - 1), sparse=sparse)
            if bar is not None:
                bar.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - t0
        chunks.append(x)
    if bar is not None:
        bar.close()
    numerics = SampleNumerics(
        logits_dtype=str(logits.dtype).removeprefix("torch."),
        precision=str(precision).removeprefix("torch."),
        step="logits" if from_logits else "softmax",
        certified_float32_exp=(
            from_logits and device.type == "cpu" and logits.dtype == torch.float32 and certified is not False
        ),
        autocast=autocast,
    )
    return SampleOutput(
        tokens=torch.cat(chunks).cpu(), nfe=n_total, time_grid=grid.cpu(), wall_s=wall, numerics=numerics
    )
