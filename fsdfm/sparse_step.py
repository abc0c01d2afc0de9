"""The chunked kernels of the sampler's sparse step (`fsdfm.samplers.update_from_logits`): inverse-CDF destination
draws from block sums, the float64 chunk, and the float32 chunk with its certificate. They know a rule only as a
function of (p(z), t, h, scheduler) that is non-increasing in p(z); they know nothing about models, paths or the
sampling loop.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from fsdfm.samplers import Rule
    from fsdfm.schedulers import Scheduler

# Inverse-CDF draws search block sums first, then one block of _BLOCK tokens (chunk sizes: fsdfm.samplers).
_BLOCK = 64


def _final_rows(final: torch.Tensor | bool, B: int, device: torch.device) -> torch.Tensor:
    """final as a (B,) bool tensor on device; a Python bool is filled there (as_tensor would copy it from the host,
    a synchronising copy on a GPU)."""
    if isinstance(final, bool):
        return torch.full((B,), final, dtype=torch.bool, device=device)
    return torch.as_tensor(final, device=device).expand(B)


def _inverse_cdf(
    blocks: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    block_sums: torch.Tensor,
    u: torch.Tensor,
    vocab_size: int,
    return_gap: bool = False,
):
    """x = min{k : c_k > u c_V} per row, c_k = sum_{j <= k} w_j: a draw with P(x = k) = w_k / sum_j w_j.

    blocks: (c, n_blocks, _BLOCK) non-negative weights w (zero past vocab_size), or a function j (c,) -> (c, _BLOCK)
    giving each row's block j (the weights recomputed from the logits); block_sums: (c, n_blocks) their sums;
    u: (c,) uniforms in [0, 1) -> (c,) long. Searches the cumulative block sums, then the cumulative weights inside the
    chosen block. return_gap: also return (c,) min(u c_V - c_{x-1}, c_x - u c_V), the distance of the target from
    the chosen token's interval ends (how far the weights may move before the draw changes)."""
    c = block_sums.shape[0]
    cum = block_sums.cumsum(-1)
    total = cum[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # u c_V rounded up stays < c_V
    # searchsorted(right=True) on a non-decreasing row is the count of entries <= target; a comparison and a sum
    # vectorise where a per-row binary search does not (~4x cheaper on CPU)
    j = (cum <= target[:, None]).sum(-1).clamp_(max=block_sums.shape[1] - 1)
    below = torch.where(j > 0, cum.gather(-1, (j - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    inner = (blocks(j) if callable(blocks) else blocks[torch.arange(c, device=j.device), j]).to(block_sums.dtype)
    inner_cum = inner.cumsum(-1)
    k = (inner_cum <= (target - below)[:, None]).sum(-1)
    # summation-order rounding can put the target past the block's last positive weight: take that weight
    last = ((inner > 0) * torch.arange(1, _BLOCK + 1, device=j.device)).amax(-1) - 1
    k = torch.minimum(k, last)
    x = (j * _BLOCK + k).clamp_(0, vocab_size - 1)  # clamp: only rows that never jump
    if not return_gap:
        return x
    k = k.clamp(0, _BLOCK - 1)[:, None]
    hi = below + inner_cum.gather(-1, k).squeeze(-1) - target
    lo = target - below - torch.where(k > 0, inner_cum.gather(-1, (k - 1).clamp(min=0)), 0.0).squeeze(-1)
    return x, torch.minimum(lo, hi)


def _chunk_float64(
    l: torch.Tensor,
    w: torch.Tensor,
    z_c: torch.Tensor,
    read_c: torch.Tensor,
    u_c: torch.Tensor,
    u_dest_c: torch.Tensor,
    t_c: torch.Tensor,
    h_c: torch.Tensor,
    rule: Rule,
    scheduler: Scheduler,
    on_cpu: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step at c candidate rows with weights in w's dtype (float64 by default): exp, p(z), the jump, the
    destination by inverse CDF.

    l: (c, V) logits (never modified); w: (c, n_blocks * _BLOCK) work buffer (zero past V); z_c: (c, 1) current
    tokens; read_c: (c,) rows whose jump reads p(z); u_c, u_dest_c: (c,) the jump and destination uniforms; t_c, h_c:
    (c,). Returns (dest (c,) long, jump (c,) bool, or None when every row jumps)."""
    c, V = l.shape
    # w = exp(l - m), m the row max (largest weight 1). On CPU, exp(l) when every row's max is within +-600 (no
    # overflow; the weights differ from exp(l - m) by a common factor per row only) saves a pass and the check
    # costs nothing; on a GPU it would cost a sync per chunk, and one fused op writes l - m instead.
    m = l.amax(-1, keepdim=True)
    if on_cpu:
        w_v = w[:, :V].copy_(l)
        if not bool((m.abs() <= 600.0).all()):
            w_v.sub_(m.to(w.dtype))
    else:
        w_v = torch.sub(l, m.to(w.dtype), out=w[:, :V])
    w_v.exp_()
    # block sums: the inverse CDF then searches n_blocks sums and one block of _BLOCK weights instead of a cumsum
    # over all V (a (c, V) float64 cumsum is the largest pass otherwise); they also give the total for p(z)
    blocks = w.view(c, -1, _BLOCK)
    block_sums = blocks.sum(-1)
    jump = None  # every candidate jumps unless its probability reads p(z)
    if not on_cpu or bool(read_c.any()):  # on a GPU, always: the check would cost a sync per chunk
        w_z = w.gather(-1, z_c)
        p_z = w_z / block_sums.sum(-1, keepdim=True)  # (c, 1)
        prob = rule(p_z, t_c, h_c, scheduler).squeeze(-1)
        jump = ~read_c | (u_c < prob)
        _drop_current(w, blocks, block_sums, z_c, w_z, read_c)
    return _inverse_cdf(blocks, block_sums, u_dest_c, V), jump


def _padded_block_weights(l: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(l - m) in float64 as (c, n_blocks, _BLOCK), zero past V. Args: l (c, V) logits (any float dtype); m (c, 1)
    float64 row maxima. The same values as `_chunk_float64`'s device path (l - m promoted to float64, then exp)."""
    c, V = l.shape
    pad = -V % _BLOCK
    w = torch.exp(l.double() - m)
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))  # exp(-inf) would be 0 too; a zero pad is one op fewer
    return w.view(c, -1, _BLOCK)


def _block_sums_eager(l: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(c, n_blocks) float64 sums of exp(l - m) over blocks of _BLOCK tokens (see `_padded_block_weights`)."""
    return _padded_block_weights(l, m).sum(-1)


_COMPILED_BLOCK_SUMS: list = []  # [fn] once compiled (CUDA only); [None] when compilation failed once


def compiled_block_sums() -> bool:
    """Whether the sampler's block sums go through torch.compile on CUDA: FSDFM_SAMPLER_COMPILE=1 (off by default, so
    that a study's tokens stay those of the eager float64 step; the sample stage records the setting)."""
    return os.environ.get("FSDFM_SAMPLER_COMPILE", "0") == "1"


def _block_sums(l: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """`_block_sums_eager`, through torch.compile on CUDA when `compiled_block_sums()`: one kernel that reads each
    logit once (2 bytes in bf16) and writes only the block sums, instead of writing and re-reading float64 weights
    (~34 bytes per logit). The compiled reduction may round the last bit differently from the eager one (a token
    differs only when a target falls within ~1e-16 of an interval end). NOT YET RUN ON A GPU (issue 28: no GPU was
    lent); on any failure to compile it falls back to the eager function for the rest of the process."""
    if l.device.type != "cuda" or not compiled_block_sums():
        return _block_sums_eager(l, m)
    if not _COMPILED_BLOCK_SUMS:
        _COMPILED_BLOCK_SUMS.append(torch.compile(_block_sums_eager, dynamic=True))
    fn = _COMPILED_BLOCK_SUMS[0]
    if fn is not None:
        try:
            return fn(l, m)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager function computes the same sums
            warnings.warn(f"sampler block sums: torch.compile failed ({type(e).__name__}: {e}); eager from now on")
            _COMPILED_BLOCK_SUMS[0] = None
    return _block_sums_eager(l, m)


def _chunk_from_logits(
    l: torch.Tensor,
    z_c: torch.Tensor,
    read_c: torch.Tensor,
    u_c: torch.Tensor,
    u_dest_c: torch.Tensor,
    t_c: torch.Tensor,
    h_c: torch.Tensor,
    rule: Rule,
    scheduler: Scheduler,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_chunk_float64`'s device path (on_cpu=False: no host checks, weights exp(l - m)) without the (c, V) float64
    weight buffer: the block sums come from one pass over the logits (`_block_sums`), and only the blocks the step
    needs -- the chosen block of each row, and the current token's block when it is dropped -- are recomputed from
    their _BLOCK logits. The same float64 values in the same order as `_chunk_float64(..., on_cpu=False)`, so the
    same tokens from the same uniforms (eager; see `_block_sums` for the compiled sums).

    l: (c, V) logits (never modified); the other arguments as `_chunk_float64`'s. Returns (dest (c,) long, jump (c,)
    bool)."""
    V = l.shape[1]
    m = l.amax(-1, keepdim=True).double()
    pad = -V % _BLOCK
    lp = torch.nn.functional.pad(l, (0, pad), value=-float("inf")) if pad else l  # exp(-inf - m) = 0 past V

    def block(j: torch.Tensor) -> torch.Tensor:  # (c,) -> (c, _BLOCK) float64 weights of each row's block j
        idx = j[:, None] * _BLOCK + torch.arange(_BLOCK, device=l.device)
        return torch.exp(lp.gather(-1, idx).double() - m)

    block_sums = _block_sums(l, m)
    w_z = torch.exp(l.gather(-1, z_c).double() - m)  # (c, 1)
    p_z = w_z / block_sums.sum(-1, keepdim=True)
    jump = ~read_c | (u_c < rule(p_z, t_c, h_c, scheduler).squeeze(-1))
    # drop z where read_c (a move must change the token): its block's sum recomputed without it, as _drop_current
    zb, zk = z_c.squeeze(-1) // _BLOCK, z_c.squeeze(-1) % _BLOCK
    dropped = read_c[:, None] & (torch.arange(_BLOCK, device=l.device) == zk[:, None])  # (c, _BLOCK)
    zsum = block(zb).masked_fill_(dropped, 0.0).sum(-1, keepdim=True)
    block_sums.scatter_(-1, zb[:, None], zsum)

    def chosen(j: torch.Tensor) -> torch.Tensor:
        return block(j).masked_fill_(dropped & (j == zb)[:, None], 0.0)

    return _inverse_cdf(chosen, block_sums, u_dest_c, V), jump


def _drop_current(w, blocks, block_sums, z_c, w_z, read_c) -> None:
    """Drop z where read_c (a move must change the token); its block's sum is recomputed, not decremented, so that a
    block left with no weight sums to exactly 0."""
    c = w.shape[0]
    w.scatter_(-1, z_c, w_z.masked_fill_(read_c[:, None], 0.0))
    zb = z_c // _BLOCK
    zb_sums = blocks[torch.arange(c, device=w.device), zb.squeeze(-1)].sum(-1, keepdim=True)
    block_sums.scatter_(-1, zb, zb_sums.to(block_sums.dtype))


# The certified chunk (`_chunk_certified`): weights exp(l) computed and summed by blocks of _BLOCK in float32, the
# block sums and everything after them in float64. torch's vectorised float32 exp is within 1 ulp (2^-23 relative);
# we allow 2^-22. Outputs below ~2^-126 may be flushed or rounded to a subnormal: at most 2^-125 absolute each. A
# float32 sum of _BLOCK non-negative terms is within (_BLOCK - 1) 2^-24 of the exact sum, in any order. Rows whose
# total leaves [2^-60, 2^100] take the float64 step (float32 exp overflows above l ~ 88.7; a tiny total would let
# the absolute error dominate).
_EXP32_REL = 2.0**-22
_EXP32_ABS = 2.0**-125
_BLOCK_SUM32_REL = (_BLOCK - 1) * 2.0**-24
_CERTIFIED_MIN_ELEMENTS = 1 << 19
_SUM_REL = 2.0**-40  # float64 sums of <= 2^16 terms (and the float64 step's own rounding), with room to spare


def _chunk_certified(
    w: torch.Tensor,
    vocab_size: int,
    z_c: torch.Tensor,
    read_c: torch.Tensor,
    u_c: torch.Tensor,
    u_dest_c: torch.Tensor,
    t_c: torch.Tensor,
    h_c: torch.Tensor,
    rule: Rule,
    scheduler: Scheduler,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_chunk_float64`'s step with float32 weights, plus a certificate: the rows where the float64 step could decide
    otherwise. Its exp and sums cost about half the float64 chunk's on CPU (AVX2, one thread).

    w: (c, n_blocks * _BLOCK) float32: the logits, -inf past vocab_size V; overwritten by the weights exp(l). Each
    weight is within eps w + a of the float64 weight (eps = 2^-22, a = 2^-125), and each block sum within a further
    (_BLOCK - 1) 2^-24 of its terms' sum, so every cumulative sum c_k and the total (hence the target u c_V) are within
    D = (eps + 63 2^-24 + 2^-40) c_V + V a of the float64 step's. A row is certain when
      * its jump is: u < rule(p_hi) or u >= rule(p_lo), [p_lo, p_hi] the interval of p(z) consistent with those
        bounds (every rule is non-increasing in p(z)); rows that never read p(z) jump anyway;
      * and, if it may jump, its destination is: the target is more than 4 D inside the chosen token's interval
        [c_{x-1}, c_x), so the float64 step's target falls in the same interval.
    The float64 step then gives the same tokens from the same uniforms; only the other rows (`unsure`, a fraction
    ~ 8 D / w_x, a few per cent at V = 2,048 for flat logits) need it. Returns (dest, jump, unsure), each (c,)."""
    c, V = w.shape[0], vocab_size
    w.exp_()  # float32: half the bytes and twice the SIMD lanes of the float64 chunk's exp, its cost on CPU
    blocks = w.view(c, -1, _BLOCK)
    # each block summed in float32 (error bounded by _BLOCK_SUM32_REL), everything after in float64, so the
    # rounding of the long sums over V stays at float64's _SUM_REL
    block_sums = blocks.sum(-1).double()
    total = block_sums.sum(-1)
    unsure = ~((total >= 2.0**-60) & (total <= 2.0**100))  # also catches inf and nan
    delta = total * (_EXP32_REL + _BLOCK_SUM32_REL + _SUM_REL) + V * _EXP32_ABS
    jump = torch.ones_like(read_c)
    if bool(read_c.any()):
        w_z32 = w.gather(-1, z_c)
        w_z = w_z32.double()
        err_z = w_z * (_EXP32_REL + _SUM_REL) + _EXP32_ABS
        tot = total[:, None]
        p_lo = ((w_z - err_z) / (tot + delta[:, None])).clamp_(0.0, 1.0)
        p_hi = ((w_z + err_z) / (tot - delta[:, None]).clamp_min(0.0)).nan_to_num_(1.0).clamp_(0.0, 1.0)
        prob_lo = rule(p_hi, t_c, h_c, scheduler).squeeze(-1) - _SUM_REL  # rule(p) >= prob_lo for p in [p_lo, p_hi]
        prob_hi = rule(p_lo, t_c, h_c, scheduler).squeeze(-1) + _SUM_REL
        sure_jump = u_c < prob_lo
        jump = ~read_c | sure_jump
        unsure |= read_c & ~sure_jump & (u_c < prob_hi)
        _drop_current(w, blocks, block_sums, z_c, w_z32, read_c)
    dest, gap = _inverse_cdf(blocks, block_sums, u_dest_c, V, return_gap=True)
    # rows certain to stay keep their token whatever the destination; the others need a certain destination
    staying = read_c & ~unsure & ~jump
    unsure |= ~staying & ~(gap > 4.0 * delta)
    return dest, jump, unsure
