"""Method kinds, one file each, and the planner that turns validated specs into a stage graph.

    base.py      MethodKind, `register_kind`, METHOD_KINDS, the Planner, `plan_study`
    load.py      the checks of a spec against the kinds (`validate_methods`) and the loaders that run them
    common.py    what every kind's stages share: corpus, DiT artefacts, the training-stage skeleton, SAMPLERS
    dfm.py fsdfm.py ar.py flm.py fmlm.py exact.py released.py    one method kind each: settings, planning,
                 stage functions and sampler, registered on the kind
    evaluate.py  the stages after a model exists: sample, evaluate, evaluate_data, pos_divergence

No list names the kinds: importing this package (or the first lookup in METHOD_KINDS) imports every module in it
(fsdfm.registry.discover, with the `fsdfm.plugins` entry points), and each kind file registers itself. A new
baseline is one new file here that calls `register_kind` (and `stage_kind`, `SAMPLERS.register` for its own
stages), or one module of a plugin distribution named in the `fsdfm.plugins` entry-point group.
"""

from fsdfm.methods.base import EXACT_TEACHER, METHOD_KINDS, MethodKind, Planner, plan_study, register_kind
from fsdfm.methods.common import SAMPLERS

# every kind and stage kind registered once this package is imported (a job process, the versions check, ...)
METHOD_KINDS.discover()

from fsdfm.methods.fsdfm import FSDFMSettings  # noqa: E402  (re-exported; imported by the discovery above)

__all__ = [
    "EXACT_TEACHER",
    "METHOD_KINDS",
    "SAMPLERS",
    "FSDFMSettings",
    "MethodKind",
    "Planner",
    "plan_study",
    "register_kind",
]
