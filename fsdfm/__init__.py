"""fsdfm: a benchmarking and ablation suite for few-step discrete flow-matching language models."""

__version__ = "0.1.0"
