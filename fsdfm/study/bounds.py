"""Plausibility bounds on the sizes that decide a study's memory and time, checked when the spec loads.

A typo such as `train.steps: 10**23` or `batch_size: 10000000` is accepted by every type check and only fails
later, after the plan was written: an allocation error in the first stage, a tokenizer library that aborts the
process (BPE `vocab_size: 100000000`), or a run that never ends. Each bound below is far above any setting of
the paper's scale (1.3B DiT, GPT-2 vocabulary, 1,024 tokens, 10^6 steps), and each error names the key, the
value, the bound, an estimate of the memory or time it implies, and how to allow it on purpose:

    FSDFM_ALLOW_LARGE=methods.dfm.train.steps,sampling.batch_size fsdfm run SPEC     (or FSDFM_ALLOW_LARGE=all)

Estimates (lower bounds, on purpose simple):
    logits of one batch       B * L * V * 4 bytes (float32), what every forward pass of a DiT materialises
    training state            16 bytes * params (weights, gradients, two AdamW moments; float32),
                              params ~ n_blocks * 12 * hidden^2 + 2 * V * hidden
    samples kept              n_samples * L * 8 bytes (int64 token ids)
    batches                   at most 10^6 sequences, whatever the memory
    training time             steps * 1 ms (a step of the tiny preset on one CPU core takes longer)
"""

from __future__ import annotations

import os

from fsdfm.study.yaml_io import SpecError

ALLOW_ENV = "FSDFM_ALLOW_LARGE"
MAX_TRAIN_STEPS = 10**7
MAX_N_SAMPLES = 10**7
MAX_BATCH_SIZE = 10**6  # sequences per batch (the paper's largest is a few hundred)
MAX_BPE_VOCAB = 10**6  # the `tokenizers` trainer aborts the process (no Python exception) far above this
MAX_MEMORY_BYTES = 2**40  # 1 TiB: more than any one machine this suite runs on has
GPT2_VOCAB = 50257
DEFAULT_BPE_VOCAB = 2048


def _allowed(key: str) -> bool:
    allowed = {k.strip() for k in os.environ.get(ALLOW_ENV, "").split(",") if k.strip()}
    return "all" in allowed or key in allowed


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} EiB"


def _human_time(seconds: float) -> str:
    for unit, s in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600)):
        if seconds >= s:
            return f"{seconds / s:.3g} {unit}"
    return f"{seconds:.3g} s"


def _refuse(file: str, key: str, value, bound: str, estimate: str) -> None:
    if _allowed(key):
        return
    raise SpecError(
        f"{file}: {key}: {_show(value)} is beyond the plausibility bound ({bound}; {estimate}); if you mean it, "
        f"allow it deliberately: {ALLOW_ENV}={key} (comma-separated keys, or all)"
    )


def _show(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def vocab_estimate(data) -> int:
    """The vocabulary size V the models of a study will have, as far as the spec says it (no tokenizer is read)."""
    oracle = getattr(data, "oracle", None)
    if isinstance(oracle, dict) and isinstance(oracle.get("vocab_size"), int):
        return oracle["vocab_size"]
    if isinstance(data.vocab_size, int):
        return data.vocab_size
    return GPT2_VOCAB if data.tokenizer == "gpt2" else DEFAULT_BPE_VOCAB


def _params(model: dict, V: int) -> int:
    """~ parameters of a DiT of these sizes: n_blocks * 12 * hidden^2 (attention and MLP) + 2 * V * hidden."""
    from fsdfm.model import PRESETS  # heavy: torch

    sizes = {**PRESETS.get(model.get("preset", "tiny")), **{k: v for k, v in model.items() if v is not None}}
    h, n = int(sizes.get("hidden", 0)), int(sizes.get("n_blocks", 0))
    return n * 12 * h * h + 2 * V * h


def check_bounds(spec, file: str) -> None:
    """Refuse sizes beyond the module's bounds (a `SpecError` naming the key, the bound and an estimate);
    `FSDFM_ALLOW_LARGE` lists the keys allowed beyond them."""
    data = spec.data
    V, L = vocab_estimate(data), int(data.seq_len)
    if data.tokenizer in (None, "bpe") and isinstance(data.vocab_size, int) and data.vocab_size > MAX_BPE_VOCAB:
        _refuse(
            file,
            "data.vocab_size",
            data.vocab_size,
            f"a BPE vocabulary of at most {MAX_BPE_VOCAB:,}; GPT-2 has {GPT2_VOCAB:,}",
            f"one batch of 32 x {L} logits alone would take {_human_bytes(32 * L * data.vocab_size * 4)}",
        )
    s = spec.sampling
    _refuse_if(
        s.n_samples > MAX_N_SAMPLES,
        file,
        "sampling.n_samples",
        s.n_samples,
        f"at most {MAX_N_SAMPLES:,}",
        f"the samples alone take {_human_bytes(s.n_samples * L * 8)}",
    )
    _batch(
        file, "sampling.batch_size", s.batch_size, s.batch_size * L * V * 4, f"logits of {s.batch_size} x {L} x V={V}"
    )
    base = {"preset": spec.model.preset, **spec.model.overrides()}
    trained = {f"methods.{name}": (m.train, {**base, **m.model}) for name, m in spec.methods.items()}
    if spec.evaluator.kind == "reference":
        trained["evaluator"] = (spec.evaluator.train, {**base, **spec.evaluator.model})
    for where, (optim, model) in trained.items():
        _refuse_if(
            optim.steps > MAX_TRAIN_STEPS,
            file,
            f"{where}.train.steps",
            optim.steps,
            f"at most {MAX_TRAIN_STEPS:,} steps",
            f"at 1 ms per step at least {_human_time(optim.steps * 1e-3)}",
        )
        b = optim.batch_size
        _batch(file, f"{where}.train.batch_size", b, b * L * V * 4, f"logits of {b} x {L} x V={V}")
        p = _params(model, V)
        key = next((k for k in ("hidden", "n_blocks") if k in model), "preset")
        _memory(file, f"{where}.model.{key}", model.get(key), 16 * p, f"training state of ~{p:,} parameters")


def _refuse_if(cond: bool, file: str, key: str, value, bound: str, estimate: str) -> None:
    if cond:
        _refuse(file, key, value, bound, estimate)


def _memory(file: str, key: str, value, need: float, what: str) -> None:
    if need > MAX_MEMORY_BYTES:
        _refuse(
            file, key, value, f"at most {_human_bytes(MAX_MEMORY_BYTES)} of memory", f"{what}: {_human_bytes(need)}"
        )


def _batch(file: str, key: str, value: int, need: float, what: str) -> None:
    if value > MAX_BATCH_SIZE or need > MAX_MEMORY_BYTES:
        _refuse(
            file,
            key,
            value,
            f"at most {MAX_BATCH_SIZE:,} sequences and {_human_bytes(MAX_MEMORY_BYTES)} of memory per batch",
            f"{what}: {_human_bytes(need)}",
        )
