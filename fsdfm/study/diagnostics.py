"""The settings of a study's diagnostics, the stages beside its samples (`metrics.pos_divergence`,
`metrics.exact_law`, `metrics.path_split`): frozen, validated once when the spec is built. Knows no stage or method kind."""

from __future__ import annotations

from dataclasses import dataclass

from fsdfm.study.yaml_io import short


@dataclass(frozen=True)
class PosDivergenceSpec:
    """Per-position divergence of few-step students from the many-step teacher, from states on teacher paths."""

    n_states: int = 4
    n_rollouts: int = 8
    t_start: float = 0.5
    teacher_steps: int = 256
    student_steps: tuple = (1, 8)

    def __post_init__(self):
        for name in ("n_states", "n_rollouts", "teacher_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.t_start < 1.0:
            raise ValueError(f"t_start must lie in (0, 1), got {self.t_start!r}")
        for k in self.student_steps:
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 4096:
                raise ValueError(f"student_steps are integers in 1..4096, got {short(k)}")


@dataclass(frozen=True)
class ExactLawSpec:
    """The exact output law of each few-step sampler on an enumerable oracle source (fsdfm.methods.exact_law).

    max_steps: budgets above it get no exact_law run (the dense pass costs steps x |support| x A^L);
    split_max_steps: budgets up to it also get the per-step chain-rule split, averaged over `split_states`
    states x_t of the true path per step (a Monte-Carlo mean: its standard error is recorded beside it);
    max_states: the largest state space A^L (A = V + 1 under the mask source) a study may ask for."""

    max_steps: int = 64
    split_max_steps: int = 16
    split_states: int = 32
    max_states: int = 20_000

    def __post_init__(self):
        for name in ("max_steps", "split_max_steps", "split_states", "max_states"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {short(v)}")
        if self.split_states < 2:  # the split's Monte-Carlo standard error needs two states per step
            raise ValueError(f"split_states must be >= 2 (its standard error needs two), got {self.split_states}")
        if self.max_states > 1_000_000:
            raise ValueError(
                f"max_states must be <= 1,000,000 (the dense pass is quadratic in it), got {self.max_states}"
            )


@dataclass(frozen=True)
class PathSplitSpec:
    """The per-step chain-rule split of each few-step sampler along the true path, at the study's own sequence length
    (mask source, closed-form step law: fsdfm.methods.path_split).

    max_steps: budgets above it get no path_split run (the split costs steps x draws forward-backward passes);
    states: states x_t of the true path per step (rows of a Monte-Carlo mean; its standard error is recorded);
    draws: draws of the next state y ~ J per state for the total correlation (>= 2);
    budgets: only these budgets (each <= max_steps), e.g. [8] for the headline budget alone; empty: every one."""

    max_steps: int = 16
    states: int = 64
    draws: int = 8
    budgets: tuple = ()

    def __post_init__(self):
        for name in ("max_steps", "states", "draws"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {short(v)}")
        for k in self.budgets:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.max_steps:
                raise ValueError(f"budgets are integers in 1..max_steps ({self.max_steps}), got {short(k)}")
        object.__setattr__(self, "budgets", tuple(self.budgets))
        for name in ("states", "draws"):  # a standard error needs two of each
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (its standard error needs two), got {getattr(self, name)}")
