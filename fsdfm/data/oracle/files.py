"""Bring your own exact source: a Markov chain (any order) or an HMM read from `.npy` files.

    data:
      kind: oracle
      seq_len: 32
      oracle: {source: markov_file, transition: my_chain/P.npy, initial: my_chain/pi.npy, n_train: 20000}
      oracle: {source: hmm_file, transition: A.npy, emission: B.npy, initial: pi.npy}

Markov (`markov_file`): `transition` holds P(x | context) as (V^k, V) (context index = its k tokens read as a base-V
number, oldest digit most significant, as `MarkovSource`) or as a (k + 1)-dimensional (V, ..., V) array indexed
[x_{i-k}, ..., x_{i-1}, x_i]; the order k follows from the shape. HMM (`hmm_file`): `transition` (S, S) A[h, h'],
`emission` (S, V) B[h, v]. `initial` (optional) is the law of the first context (V^k,) or (V,) * k, resp. of the
first hidden state (S,); it must be the chain's stationary distribution (every oracle metric assumes a stationary
process: each position has the same marginal, H_L = (H(pi) + (L - k) H) / L); omitted, the stationary distribution
is computed. Relative paths resolve against the spec file's folder (`fsdfm.study.paths`), and the files' sha256
enter the stage ids (`fsdfm.fingerprint`).

Validated when the spec loads, one message per defect naming the file: shape, finite non-negative entries, rows
summing to 1 (tolerance ROW_TOL), `initial` a distribution and stationary, and sizes within the exact posterior's
limits (forward-backward over C = V^k contexts costs B C V per position: C V <= MAX_TABLE; HMM S V <= MAX_TABLE).
Everything else (sampling, log_prob, the exact posterior, the joint sampler, the exact output law) is the
generic `MarkovSource` / `HMMSource` code on dense tables.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fsdfm.data.oracle.hmm import HMMSource
from fsdfm.data.oracle.markov import MarkovSource
from fsdfm.data.oracle.sources import ORACLES

__all__ = ["HMMFileSource", "MarkovFileSource", "MAX_TABLE", "ROW_TOL"]

ROW_TOL = 1e-6  # |row sum - 1|; a float32 file of probabilities sums to 1 within ~1e-7 per row
STATIONARY_TOL = 1e-6  # |pi P - pi|_1
MAX_TABLE = 1 << 22  # contexts x vocabulary (Markov) or states x vocabulary (HMM): the exact posterior's tables


def _load(path: Any, what: str) -> np.ndarray:
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"{what}: give the path of a .npy file, got {path!r}")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: file not found: {p}")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{what}: {p} is not a readable .npy array ({e})") from None
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{what}: {p} holds {arr.dtype} values; expected real probabilities")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise ValueError(f"{what}: {p} has a non-finite entry at index {idx}")
    if (arr < 0).any():
        idx = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        raise ValueError(f"{what}: {p} has a negative entry {arr[idx]:.3g} at index {idx}")
    return arr


def _check_rows(table: np.ndarray, what: str, path: Any) -> None:
    sums = table.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_TOL)
    if len(bad):
        raise ValueError(
            f"{what}: {path}: row {int(bad[0])} sums to {sums[bad[0]]:.8g}, not 1 (tolerance {ROW_TOL:g}); "
            f"{len(bad)} row(s) off"
        )


def _check_initial(pi: np.ndarray, step, n: int, what: str, path: Any) -> np.ndarray:
    pi = pi.reshape(-1)
    if len(pi) != n:
        raise ValueError(f"{what}: {path}: {len(pi)} entries, expected {n}")
    if abs(pi.sum() - 1.0) > ROW_TOL:
        raise ValueError(f"{what}: {path}: sums to {pi.sum():.8g}, not 1 (tolerance {ROW_TOL:g})")
    residual = float(np.abs(step(pi) - pi).sum())
    if residual > STATIONARY_TOL:
        raise ValueError(
            f"{what}: {path}: not the chain's stationary distribution (|pi P - pi|_1 = {residual:.3g} > "
            f"{STATIONARY_TOL:g}); every oracle metric assumes a stationary process: omit `initial` to use it"
        )
    return pi / pi.sum()


class MarkovFileSource(MarkovSource):
    """An order-k Markov chain over V tokens from `.npy` files (module docstring); a dense `MarkovSource`."""

    def __init__(self, transition: str, initial: str | None = None, seed: int = 0):
        what = "oracle.transition"
        T = _load(transition, what)
        if T.ndim < 2:
            raise ValueError(f"{what}: {transition}: shape {T.shape}; expected (V^k, V) or (V,) * (k + 1)")
        V = T.shape[-1]
        if V < 2:
            raise ValueError(f"{what}: {transition}: vocabulary of {V} token(s); need at least 2")
        if T.ndim > 2 and any(d != V for d in T.shape):
            raise ValueError(f"{what}: {transition}: shape {T.shape}; every axis of a (V,) * (k + 1) array is V")
        C = int(np.prod(T.shape[:-1]))
        k = round(math.log(C, V)) if C > 1 else 0
        if k < 1 or V**k != C:
            raise ValueError(f"{what}: {transition}: {C} rows is not a power V^k (k >= 1) of V = {V} contexts")
        if C * V > MAX_TABLE:
            raise ValueError(
                f"{what}: {transition}: {C} contexts x {V} tokens = {C * V} exceeds the exact posterior's limit "
                f"{MAX_TABLE}; use a smaller vocabulary or order"
            )
        T = T.reshape(C, V)
        _check_rows(T, what, transition)
        self.vocab_size, self.order, self.support, self.n_contexts = V, k, V, C
        self.seed, self.concentration, self.epsilon = int(seed), None, 0.0  # seed: of the corpus draws only
        self.next_tokens = np.tile(np.arange(V, dtype=np.int64), (C, 1))
        self.next_probs = T
        self.transition_file, self.initial_file = str(transition), None if initial is None else str(initial)
        if initial is None:
            self.stationary = self._stationary()
        else:
            pi = _load(initial, "oracle.initial")
            self.stationary = _check_initial(pi, self._transition, C, "oracle.initial", initial)

    @property
    def config(self) -> dict[str, Any]:
        return {"transition": self.transition_file, "initial": self.initial_file, "seed": self.seed}


class HMMFileSource(HMMSource):
    """A hidden Markov model from `.npy` files (module docstring); H_L and the entropy rate are Monte-Carlo
    estimates with a standard error, as for `HMMSource`."""

    def __init__(
        self,
        transition: str,
        emission: str,
        initial: str | None = None,
        mc_samples: int = 1024,
        mc_len: int = 256,
        mc_burn_in: int = 64,
        mc_seed: int = 1,
        seed: int = 0,
    ):
        A = _load(transition, "oracle.transition")
        B = _load(emission, "oracle.emission")
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"oracle.transition: {transition}: shape {A.shape}; expected (S, S)")
        if B.ndim != 2 or B.shape[0] != A.shape[0] or B.shape[1] < 2:
            raise ValueError(
                f"oracle.emission: {emission}: shape {B.shape}; expected (S, V) with S = {A.shape[0]} (the "
                "transition's states) and V >= 2"
            )
        if B.size > MAX_TABLE:
            raise ValueError(f"oracle.emission: {emission}: {B.size} entries exceed the exact posterior's limit")
        _check_rows(A, "oracle.transition", transition)
        _check_rows(B, "oracle.emission", emission)
        self.n_states, self.vocab_size = A.shape[0], B.shape[1]
        self.transition, self.emission = A, B
        self.seed, self.epsilon = int(seed), 0.0  # seed: of the corpus draws only
        self.emission_support, self.transition_concentration, self.emission_concentration = B.shape[1], None, None
        self.mc_samples, self.mc_len, self.mc_burn_in, self.mc_seed = mc_samples, mc_len, mc_burn_in, mc_seed
        if not 0 <= mc_burn_in < mc_len:
            raise ValueError(f"mc_burn_in ({mc_burn_in}) must be in [0, mc_len = {mc_len})")
        self.files = {"transition": str(transition), "emission": str(emission), "initial": initial}
        if initial is None:
            self.stationary = self._stationary()
        else:
            pi = _load(initial, "oracle.initial")
            self.stationary = _check_initial(pi, lambda d: d @ A, self.n_states, "oracle.initial", initial)
        self._nll_cache, self._rate = {}, None

    @property
    def config(self) -> dict[str, Any]:
        return {
            **self.files,
            "mc_samples": self.mc_samples,
            "mc_len": self.mc_len,
            "mc_burn_in": self.mc_burn_in,
            "mc_seed": self.mc_seed,
            "seed": self.seed,
        }


ORACLES.register("markov_file", MarkovFileSource)
ORACLES.register("hmm_file", HMMFileSource)
