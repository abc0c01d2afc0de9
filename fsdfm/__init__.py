"""fsdfm: a benchmarking and ablation suite for few-step discrete flow-matching language models.

The public API is re-exported lazily, so that `import fsdfm` stays cheap (no torch, no pandas): each name is
imported from its module the first time it is read.

* running and using studies (`fsdfm.api`): `run_study`, `study_path` (the folder `run_study` and `fsdfm run` use), `load_model`, `evaluate`, and their `Samples` / `Model`
  results, `StudyFailed`;
* metrics (`fsdfm.metrics`): `compute_metrics`, `register_metric` (adding a metric is one registered function),
  `METRICS` (one entry per metric);
* reports (`fsdfm.report`): `write_report`, `load_study`, `compare` (one table across studies).
"""

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "run_study": "fsdfm.api",
    "study_path": "fsdfm.api",
    "load_model": "fsdfm.api",
    "evaluate": "fsdfm.api",
    "Model": "fsdfm.api",
    "Samples": "fsdfm.api",
    "StudyFailed": "fsdfm.api",
    "compute_metrics": "fsdfm.metrics",
    "register_metric": "fsdfm.metrics",
    "METRICS": "fsdfm.metrics",
    "write_report": "fsdfm.report",
    "load_study": "fsdfm.report",
    "compare": "fsdfm.report.compare",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import sys

        from fsdfm.registry import discover  # here: `import fsdfm` stays free of every submodule

        discover(_LAZY[name], submodules=False)  # imports the module (fsdfm imports by name only there)
        return getattr(sys.modules[_LAZY[name]], name)
    raise AttributeError(f"module 'fsdfm' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
