"""The metrics of a sampler's exact output law (recorded by the exact_law stage, `fsdfm.methods.exact_law`).

On a source small enough to enumerate, q (the sampler's output law) is computed exactly and compared with the
source p per token: KL(q || p), KL(p || q), H(q) - H(p) and E_q[-log p] - H(p) (the CE excess oracle_nll - H_L
estimates from samples); and the per-step chain-rule split of the trajectory KL along the true path into
factorization and per-position terms (`fsdfm.oracle_law`); and that split at the study's own scale under the mask
source (the path_split stage, `fsdfm.methods.path_split`: no enumeration). Registered here with `recorded_by`: no function computes
them from samples. Importing the module registers them (the metrics registry discovers this package).
"""

from __future__ import annotations

from fsdfm.metrics.registry import register_metric

RECORDED_BY = "the exact_law stage (fsdfm.methods.exact_law: the sampler's exact output law q on an enumerable source)"
LAW_METRICS = (
    ("law_kl_qp", "min", "KL(q || p) / L: the sampler's exact output law q against the source p"),
    ("law_kl_pq", "min", "KL(p || q) / L: the source against the sampler's exact output law (missing mass: none)"),
    ("law_entropy_gap", None, "(H(q) - H(p)) / L: negative, sharper than the source; positive, more diffuse"),
    (
        "law_ce_excess",
        "min",
        "E_q[-log p] / L - H_L = law_kl_qp + law_entropy_gap: the value oracle_nll - H_L estimates from samples",
    ),  # fmt: skip
    (
        "split_path_kl",
        "min",
        "sum over steps of E_{x_t ~ p_t} KL(J || prod_i Q_i) / L: the trajectory KL of the "
        "sampler against the exact process (>= KL(p || q) of the outputs)",
    ),  # fmt: skip
    (
        "split_factorization",
        None,
        "sum over steps of E TC(J) / L: the exact step's total correlation, which no "
        "product sampler removes on this grid",
    ),  # fmt: skip
    (
        "split_per_position",
        "min",
        "sum over steps of E sum_i KL(J_i || Q_i) / L: the update rule's discretization "
        "and the model's error, per position",
    ),  # fmt: skip
)

for _name, _direction, _description in LAW_METRICS:
    register_metric(
        _name,
        direction=_direction,
        unit="nats/token",
        family="oracle",
        recorded_by=RECORDED_BY,
        sources=("fsdfm.methods.exact_law", "fsdfm.oracle_law"),
        description=_description,
    )

SPLIT_RECORDED_BY = "the path_split stage (fsdfm.methods.path_split: the closed-form mask-path step law, any L)"
PATH_SPLIT_METRICS = (
    (
        "traj_kl",
        "min",
        "sum over steps of E_{x_t ~ p_t} KL(J || prod_i Q_i) / L at the study's sequence length (mask source): the "
        "trajectory KL of the sampler against the exact process (>= KL(p || q) of the outputs)",
    ),  # fmt: skip
    (
        "traj_factorization",
        None,
        "sum over steps of E TC(J) / L at the study's sequence length: the exact step's total correlation, which no "
        "product sampler removes on this grid (a Monte-Carlo estimate with exact integrands)",
    ),  # fmt: skip
    (
        "traj_per_position",
        "min",
        "sum over steps of E sum_i KL(J_i || Q_i) / L at the study's sequence length: the update rule's "
        "discretization and the model's error, per position",
    ),  # fmt: skip
)

for _name, _direction, _description in PATH_SPLIT_METRICS:
    register_metric(
        _name,
        direction=_direction,
        unit="nats/token",
        family="oracle",
        recorded_by=SPLIT_RECORDED_BY,
        sources=("fsdfm.methods.path_split", "fsdfm.oracle_split"),
        description=_description,
    )
