"""The knob-aware sampling loop: every rule of fsdfm.samplers plus the training-free mask-source samplers, with
temperature, top-p, greedy-tail and semi-autoregressive blocks; and the registration of the new samplers.

`sample_with_knobs` has the contract of `fsdfm.samplers.sample` (same arguments, a `SampleOutput`) plus `knobs`.
With default knobs and a jump rule it *is* `fsdfm.samplers.sample` (so existing results stay bit-identical).

Semi-AR blocks (`block_length` b, mask source): the sequence is cut into ceil(L / b) blocks, revealed left to right;
the budget of N forwards is shared out (`uniform_counts`), and inside block j only its positions may move. A jump
rule or ReMDM runs its own time grid 0 -> t_end inside each block. The network is told the time whose revealed
fraction kappa(t) equals the sequence's current revealed fraction (and, when h-conditioned, the step to the
fraction the step aims at), because a network trained on the path only knows that correspondence; the exact
posterior of the mask source does not depend on t at all.

NFE is counted per sample (`SampleOutput.nfe_per_sample`): threshold decoding stops evaluating a row once its
block is revealed, and a step with nothing to reveal evaluates nothing.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from fsdfm.paths import MixturePath
from fsdfm.samplers import SampleNumerics, SampleOutput, _draw, get_rule, register_rule, time_grid, update
from fsdfm.samplers import sample as plain_sample
from fsdfm.samplers import update_from_logits
from fsdfm.sampling.knobs import SamplerKnobs, logits_from_probs, probs_from_logits
from fsdfm.sampling.steps import (
    confidence_step,
    draw_inverse_cdf,
    loop_fraction,
    remdm_sigma,
    remdm_step,
    reveal_top,
    scores,
    threshold_step,
    uniform_counts,
)

# Samplers that replace the whole step (not a jump probability). Registered for every mixture-path kind; they need
# the mask source, which the spec loader checks per method (fsdfm.methods.load: check_knobs).
WHOLE_STEP = ("confidence", "threshold", "remdm")


class WholeStepSampler:
    """A sampler registered as an update rule whose step is not a jump probability: `fsdfm.samplers.sample`
    hands it the whole loop (`sample_loop`). Calling it as a jump rule is an error."""

    def __init__(self, name: str, doc: str):
        self.name, self.__doc__ = name, doc

    def __call__(self, p_z, t, h, scheduler):
        raise TypeError(f"{self.name!r} is a whole-step sampler (fsdfm.sampling), not a jump-probability rule")

    def sample_loop(self, model, path, **kw) -> SampleOutput:
        return sample_with_knobs(model, path, rule=self.name, **kw)


for _name, _doc in (
    ("confidence", "Confidence-ordered unmasking (LLaDA/Dream low_confidence): reveal the k most confident per step"),
    ("threshold", "Threshold decoding (Fast-dLLM): reveal all with p(x^) > tau, >= the budget's share per step"),
    ("remdm", "ReMDM remasking (predictor-corrector; cap / rescale / loop schedules) on the MDLM step"),
):
    register_rule(_name)(WholeStepSampler(_name, _doc))


def _autocast(model: Callable, device: torch.device) -> Callable:
    def forward(x, t, h=None):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(x, t, h)

    return forward


def _blocks(seq_len: int, knobs: SamplerKnobs) -> list[tuple[int, int]]:
    b = knobs.block_length or seq_len
    return [(a, min(a + b, seq_len)) for a in range(0, seq_len, b)]


def _time_of_fraction(path: MixturePath, frac: torch.Tensor) -> torch.Tensor:
    return path.scheduler.kappa_inverse(frac.clamp(0.0, 1.0).to(torch.float64))


@torch.no_grad()
def sample_with_knobs(
    model: Callable,
    path: MixturePath,
    *,
    n_samples: int,
    seq_len: int,
    n_steps: int | None = None,
    grid: torch.Tensor | None = None,
    rule: str = "cumulative_scalar",
    knobs: SamplerKnobs | dict | None = None,
    h_conditioned: bool = False,
    generator: torch.Generator | None = None,
    precision: torch.dtype = torch.float64,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    **plain_kw,
) -> SampleOutput:
    """Sample with `rule` under `knobs` (a SamplerKnobs, a dict of non-default knobs, or None = defaults).

    Args: as `fsdfm.samplers.sample`; grid (or n_steps) is the budget: its number of intervals N is the number of
    forwards a fixed-schedule sampler makes (threshold decoding: at most N). Returns a SampleOutput whose tokens
    are (n_samples, seq_len) and whose nfe_per_sample is (n_samples,) float64."""
    knobs = knobs if isinstance(knobs, SamplerKnobs) else SamplerKnobs(**(knobs or {}))
    device = torch.device(device)
    grid = time_grid(n_steps, device=device) if grid is None else grid.to(device=device, dtype=torch.float64)
    whole = rule in WHOLE_STEP
    # precision is resolved by the caller (the `precision` argument); alone it needs no knob loop
    if not whole and not {k for k in knobs.non_default() if k != "precision"}:
        out = plain_sample(
            model, path, n_samples=n_samples, seq_len=seq_len, grid=grid, rule=rule, h_conditioned=h_conditioned,
            generator=generator, precision=precision, batch_size=batch_size, device=device, **plain_kw,
        )  # fmt: skip
        return out
    if plain_kw.get("autocast"):  # bf16 autocast of the forward only, as the plain loop does
        model = _autocast(model, device)
    mask = path.source.name == "mask"
    if (whole or knobs.block_length is not None) and not mask:
        raise ValueError(f"rule {rule!r} / block_length need the mask source; this path's source is {path.source.name}")
    blocks = _blocks(seq_len, knobs)
    n_total = grid.numel() - 1
    if n_total < len(blocks):
        raise ValueError(f"{n_total} steps cannot cover {len(blocks)} blocks of block_length {knobs.block_length}")
    per_block = uniform_counts(n_total, len(blocks))
    batch_size = batch_size or n_samples
    chunks, nfes, wall = [], [], 0.0
    for start in range(0, n_samples, batch_size):
        B = min(batch_size, n_samples - start)
        x = path.source.sample((B, seq_len), generator=generator, device=device)
        nfe = torch.zeros(B, dtype=torch.float64)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for j, (a, b) in enumerate(blocks):
            local = grid if len(blocks) == 1 else time_grid(per_block[j], t_end=float(grid[-1]), device=device)
            x = _run_block(model, path, x, a, b, local, rule, knobs, h_conditioned, generator, precision, nfe,
                           last_block=j == len(blocks) - 1, plain_times=len(blocks) == 1)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - t0
        chunks.append(x)
        nfes.append(nfe)
    nfe_all = torch.cat(nfes)
    numerics = SampleNumerics(
        logits_dtype="float32", precision=str(precision).removeprefix("torch."), step="knobs",
        certified_float32_exp=False, autocast=False,
    )  # fmt: skip
    return SampleOutput(
        tokens=torch.cat(chunks).cpu(), nfe=int(nfe_all.max()) if nfe_all.numel() else 0, time_grid=grid.cpu(),
        wall_s=wall, numerics=numerics, nfe_per_sample=nfe_all,
    )  # fmt: skip


def _run_block(model, path, x, a, b, grid, rule, knobs, h_conditioned, generator, precision, nfe, last_block,
               plain_times):  # fmt: skip
    """Run the steps of one block [a, b) on x (B, L) in place of the whole loop; nfe (B,) is incremented."""
    B, L = x.shape
    mask_id = getattr(path.source, "mask_id", None)
    n_steps = grid.numel() - 1
    n_before = a  # positions left of the block: revealed by earlier blocks
    counts = uniform_counts(b - a, n_steps)
    for i in range(n_steps):
        final = last_block and i == n_steps - 1
        t_loc, h_loc = grid[i], grid[i + 1] - grid[i]
        blk = x[:, a:b]
        if rule == "threshold":
            active = (blk == mask_id).any(-1)
        elif rule == "confidence":
            active = torch.full((B,), counts[i] > 0, device=x.device)
        else:
            active = torch.ones(B, dtype=torch.bool, device=x.device)
        if not bool(active.any()):
            continue
        kap = path.scheduler.kappa
        if rule == "remdm" and knobs.remask == "loop":
            a_t, in_loop = loop_fraction(t_loc.expand(B), knobs, kap)
            a_s, _ = loop_fraction((t_loc + h_loc).expand(B), knobs, kap)
        else:
            a_t, a_s, in_loop = kap(t_loc).expand(B), kap(t_loc + h_loc).expand(B), None
        if plain_times and rule not in ("confidence", "threshold") and not (rule == "remdm" and knobs.remask == "loop"):
            t_m, h_m = t_loc.expand(B), h_loc.expand(B)  # exactly the plain loop's times
        else:
            # only mask-source runs get here (blocks and the whole-step samplers need it): time from the fraction
            frac = (x != mask_id).sum(-1).to(torch.float64) / L
            if rule == "confidence":
                aim = frac + counts[i] / L
            elif rule == "threshold":
                left = (blk == mask_id).sum(-1)
                aim = frac + (-(-left // (n_steps - i))).to(torch.float64) / L
            else:
                aim = (n_before + a_s * (b - a)) / L
            t_m = _time_of_fraction(path, frac)
            h_m = (_time_of_fraction(path, aim) - t_m).clamp_min(0.0)
        rows = active.nonzero().squeeze(1)
        xa = x[rows]
        logits = model(xa, t_m[rows].float(), h_m[rows].float() if h_conditioned else None)
        nfe[rows.cpu()] += 1
        la = logits[:, a:b]
        greedy = knobs.greedy_tail and final
        if rule in ("confidence", "threshold", "remdm"):
            p = probs_from_logits(la, knobs, greedy, dtype=precision)
            # scores read the model's own p (LLaDA: softmax of the raw logits), not the tempered / truncated law
            ps = torch.softmax(la.to(torch.float64), -1) if (knobs.processes_logits or greedy) else p.to(torch.float64)
            xb = xa[:, a:b]
            if rule == "confidence":
                k = torch.full((rows.numel(),), counts[i], dtype=torch.long, device=x.device)
                xb = _ordered(xb, p, ps, mask_id, k, knobs.score, generator, precision, knobs.ties)
            elif rule == "threshold":
                xb = _threshold(xb, p, ps, mask_id, knobs.tau, n_steps - i, generator, precision, knobs.ties)
            else:
                sigma = remdm_sigma(a_t, a_s, knobs, in_loop)[rows] if not final else torch.zeros(rows.numel())
                if not bool((sigma > 0).any()) and not (knobs.remask == "loop"):
                    # sigma = 0: ReMDM's step is the MDLM step; run exactly that (same draws as the plain loop)
                    xb = _jump(xb, la, p, t_loc, h_loc, "cumulative_scalar", path, generator, final, precision,
                               processed=knobs.processes_logits or greedy)  # fmt: skip
                else:
                    xb = remdm_step(xb, p, mask_id, a_t[rows], a_s[rows], sigma.to(torch.float64), final, generator)
        else:
            p = probs_from_logits(la, knobs, greedy, dtype=precision) if (knobs.processes_logits or greedy) else None
            xb = _jump(
                xa[:, a:b], la, p, t_loc, h_loc, rule, path, generator, final, precision, processed=p is not None
            )
        x = x.clone()
        x[rows, a:b] = xb
    return x


def _jump(xb, la, p, t_loc, h_loc, rule, path, generator, final, precision, processed):
    """The jump-rule step of fsdfm.samplers on a block: logits (or the knob-processed p) -> tokens."""
    n = xb.shape[0]
    t, h = t_loc.expand(n), h_loc.expand(n)
    fn = get_rule(rule)
    if precision == torch.float64:
        l = logits_from_probs(p) if processed else la
        return update_from_logits(xb, l, t, h, fn, path, generator, final=final, precision=precision)
    q = p if processed else torch.softmax(la.to(precision), dim=-1)
    return update(xb, q, t, h, fn, path, generator, final=final)


def _ordered(xb, p, ps, mask_id, k, score, generator, precision, ties):
    if precision == torch.float64:
        return confidence_step(xb, p, mask_id, k, score, generator, p_score=ps, ties=ties)
    # float32: the Gumbel-max draw in float32 (the known low-precision artefact, kept for the protocol audit)
    x_hat = _draw(p, generator)
    return reveal_top(xb, x_hat, scores(ps, x_hat, score), xb == mask_id, k, ties, generator)


def _threshold(xb, p, ps, mask_id, tau, steps_left, generator, precision, ties):
    if precision == torch.float64:
        return threshold_step(xb, p, mask_id, tau, steps_left, generator, p_score=ps, ties=ties)
    masked = xb == mask_id
    x_hat = _draw(p, generator)
    conf = scores(ps, x_hat, "confidence")
    k = torch.maximum((masked & (conf > tau)).sum(-1), -(-masked.sum(-1) // steps_left))
    return reveal_top(xb, x_hat, conf, masked, k, ties, generator)


__all__ = ["WHOLE_STEP", "WholeStepSampler", "draw_inverse_cdf", "sample_with_knobs"]
