"""Sampler knobs: the recorded settings of every discrete sampler (temperature, top-p, greedy-tail, semi-AR blocks,
the confidence score, the Fast-dLLM threshold, the ReMDM schedule), their validation, and the logits processing.

A knob is a setting of the *sampler*, not of the model: a spec sets it per method (`methods.<name>.knobs`), the
planner writes only the non-default ones into the sample stage's config (so a stage without knobs keeps its id),
and the record and the results columns carry them. Each knob declares the rules it applies to (`KNOB_RULES`;
None = every rule of the discrete sampling loop) and whether it needs the mask source.

Logits processing (`probs_from_logits`), in float64 (the float32 categorical draw is a known artefact):

    p_T(v) = softmax(l / T)(v)                        temperature T > 0; T = 0 is the argmax (a point mass)
    nucleus: keep the smallest set S of tokens, highest p_T first, with sum_{v in S} p_T(v) >= top_p;
             p(v) = p_T(v) 1[v in S] / sum_{w in S} p_T(w)     (top_p = 1 is the identity: nothing is touched)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from fsdfm.registry import did_you_mean

SCORES = ("confidence", "top_prob", "margin", "entropy")
TIES = ("left", "random")
REMASK_SCHEDULES = ("cap", "rescale", "loop")
# ReMDM (Schiff et al. 2025, arXiv 2503.00307) defaults per schedule: eta (eta_cap / eta_rescale) and, for loop, the
# window [t_on, t_off] in the paper's reverse time (1 -> 0) during which the revealed fraction is held at alpha_on.
REMDM_DEFAULT_ETA = {"cap": 0.04, "rescale": 0.015, "loop": 0.02}


@dataclass(frozen=True)
class SamplerKnobs:
    """Every sampler setting; the defaults reproduce the plain sampler exactly.

    temperature: T >= 0 (0 = argmax); top_p: nucleus mass in (0, 1]; greedy_tail: the last step takes the argmax
    (Duo); block_length: semi-autoregressive blocks of this many positions, left to right (mask source; None = one
    block); score: the order of confidence-ordered unmasking (confidence = p of the drawn token, margin = top-1 minus
    top-2 probability, entropy = minus the entropy of p); ties: how positions of equal score are ordered (left: the
    leftmost first; random: a uniform random order, one extra uniform per position); tau: the threshold of threshold
    decoding; remask: the ReMDM schedule; eta: its remasking strength (None = the paper's default for the schedule);
    t_on, t_off, alpha_on: the loop schedule's window and held revealed fraction (paper's reverse time); precision:
    the dtype of p and the draws for this method (None = the spec's sampling.precision; float32 reproduces the known
    low-precision categorical draw, for the protocol audit).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    greedy_tail: bool = False
    block_length: int | None = None
    score: str = "confidence"
    ties: str = "left"
    tau: float = 0.9
    remask: str = "cap"
    eta: float | None = None
    t_on: float = 0.55
    t_off: float = 0.05
    alpha_on: float = 0.9
    precision: str | None = None

    def __post_init__(self):
        def num(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or v > hi:
                raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")

        num("temperature", 0.0, 1e6)
        num("top_p", 0.0, 1.0, lo_open=True)
        num("tau", 0.0, 1.0)
        if not isinstance(self.greedy_tail, bool):
            raise ValueError(f"greedy_tail must be true or false, got {self.greedy_tail!r}")
        bl = self.block_length
        if bl is not None and (isinstance(bl, bool) or not isinstance(bl, int) or bl < 1):
            raise ValueError(f"block_length must be a positive integer, got {bl!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.ties not in TIES:
            raise ValueError(f"ties must be one of {', '.join(TIES)}, got {self.ties!r}")
        if self.remask not in REMASK_SCHEDULES:
            raise ValueError(f"remask must be one of {', '.join(REMASK_SCHEDULES)}, got {self.remask!r}")
        if self.eta is not None:
            num("eta", 0.0, 1.0)
        num("alpha_on", 0.0, 1.0, lo_open=True)
        if self.precision not in (None, "float64", "float32"):
            raise ValueError(f"precision must be float64 or float32, got {self.precision!r}")
        if not 0.0 <= self.t_off < self.t_on <= 1.0:
            raise ValueError(f"need 0 <= t_off < t_on <= 1, got t_off={self.t_off!r}, t_on={self.t_on!r}")

    @property
    def remask_eta(self) -> float:
        return REMDM_DEFAULT_ETA[self.remask] if self.eta is None else float(self.eta)

    @property
    def processes_logits(self) -> bool:
        """Whether p differs from softmax(logits) at a non-final step."""
        return self.temperature != 1.0 or self.top_p != 1.0

    def non_default(self) -> dict:
        """The knobs set away from their defaults (what goes into a stage config: an empty dict adds no key)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Which rules each knob applies to (None: every rule of the discrete sampling loop) and whether it needs the
# mask source (blocks and unmasking orders only make sense where a position is revealed once).
KNOB_RULES: dict[str, tuple | None] = {
    "temperature": None,
    "top_p": None,
    "greedy_tail": None,
    "block_length": None,
    "score": ("confidence",),
    "ties": ("confidence", "threshold"),
    "tau": ("threshold",),
    "remask": ("remdm",),
    "eta": ("remdm",),
    "t_on": ("remdm",),
    "t_off": ("remdm",),
    "alpha_on": ("remdm",),
    "precision": None,
}
MASK_ONLY_KNOBS = ("block_length",)


def knob_errors(raw: dict, rules: tuple, source: str) -> list[tuple[str, str]]:
    """Problems with a method's knobs: a list of (key, message), empty when every knob is known, valid, used by
    one of the method's `rules` and allowed for its `source`. The spec loader turns them into spec errors."""

    out = []
    if not isinstance(raw, dict):
        return [("", f"knobs must be a mapping of sampler settings, got {raw!r}")]
    for key in raw:
        if key not in KNOB_RULES:
            out.append(
                (
                    key,
                    f"unknown sampler knob {key!r}{did_you_mean(key, list(KNOB_RULES))}; allowed: {', '.join(KNOB_RULES)}",
                )
            )
            continue
        applies = KNOB_RULES[key]
        if applies is not None and not set(rules) & set(applies):
            out.append(
                (
                    key,
                    f"knob {key!r} applies only to rule(s) {', '.join(applies)}; this method samples with {', '.join(rules)}",
                )
            )
        if key in MASK_ONLY_KNOBS and source != "mask":
            out.append(
                (
                    key,
                    f"knob {key!r} needs the mask source (a position is revealed once); this method's source is {source}",
                )
            )
    if not out:
        try:
            SamplerKnobs(**raw)
        except (TypeError, ValueError) as e:
            bad = next((k for k in raw if k in str(e)), "")
            out.append((bad, str(e)))
    return out


def nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filtering of probabilities p (..., V): the smallest highest-first set with mass >= top_p, renormalised.
    top_p = 1 returns p itself (bit for bit)."""
    if top_p >= 1.0:
        return p
    sorted_p, order = torch.sort(p, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly above each token in the order
    keep_sorted = before < top_p  # the first token always stays (before = 0 < top_p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    q = torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))
    return q / q.sum(-1, keepdim=True)


def argmax_probs(logits: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The point mass at argmax_v l(v): (..., V) in dtype."""
    out = torch.zeros(logits.shape, dtype=dtype, device=logits.device)
    return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)


def probs_from_logits(
    logits: torch.Tensor, knobs: SamplerKnobs, greedy: bool = False, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """p from logits (..., V) under temperature and top-p, in dtype; greedy (or T = 0): the argmax point mass."""
    if greedy or knobs.temperature == 0.0:
        return argmax_probs(logits, dtype)
    l = logits.to(dtype)
    if knobs.temperature != 1.0:
        l = l / knobs.temperature
    return nucleus(torch.softmax(l, dim=-1), knobs.top_p)


def logits_from_probs(p: torch.Tensor) -> torch.Tensor:
    """log p with exact zeros at -inf: logits whose softmax is p (for the jump-rule step, which reads logits)."""
    return torch.where(p > 0, torch.log(p), torch.full((), -float("inf"), dtype=p.dtype, device=p.device))
