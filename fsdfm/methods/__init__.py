"""Method kinds, one file each, and the planner that turns validated specs into a stage graph.

    base.py      MethodKind, `register_kind`, the Planner, `validate_methods`, `plan_study`
    common.py    what every kind's stages share: corpus, DiT artefacts, the training-stage skeleton, SAMPLERS
    dfm.py fsdfm.py ar.py flm.py fmlm.py exact.py released.py    one method kind each: settings, planning,
                 stage functions and sampler, registered on the kind
    evaluate.py  the stages after a model exists: sample, evaluate, evaluate_data, pos_divergence

Importing this package registers every kind and every stage kind. A new baseline is one new file that calls
`register_kind` (and `stage_kind`, `SAMPLERS.register` for its own stages), imported here or by its user.
"""

from fsdfm.methods.base import EXACT_TEACHER, METHOD_KINDS, MethodKind, Planner, plan_study, register_kind
from fsdfm.methods import dfm, exact, fsdfm, ar, flm, fmlm, released, evaluate  # noqa: F401  (registration)
from fsdfm.methods.common import SAMPLERS
from fsdfm.methods.fsdfm import FSDFMSettings
from fsdfm.methods.released import ReleasedCheckpoint

__all__ = [
    "EXACT_TEACHER",
    "METHOD_KINDS",
    "SAMPLERS",
    "FSDFMSettings",
    "MethodKind",
    "Planner",
    "ReleasedCheckpoint",
    "plan_study",
    "register_kind",
]
