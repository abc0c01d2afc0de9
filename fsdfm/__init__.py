"""fsdfm: a benchmarking and ablation suite for few-step discrete flow-matching language models.

The Python API (fsdfm.api) is re-exported lazily, so that `import fsdfm` stays cheap (no torch, no pandas):
`fsdfm.run_study`, `fsdfm.load_model`, `fsdfm.evaluate`, and their `Samples` / `Model` results.
"""

__version__ = "0.1.0"

_API = ("run_study", "load_model", "evaluate", "Model", "Samples", "StudyFailed")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from fsdfm import api

        return getattr(api, name)
    raise AttributeError(f"module 'fsdfm' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
