"""Published numbers, transcribed for labelled reference rows beside (never mixed with) our own.

Source: /work/shared/notes/published-numbers.md. Every entry says where the numbers come from and how they
were computed (perplexity convention, entropy unit), because conventions differ between papers: FLM/FMLM
report token-pooled generative perplexity under GPT-2 Large with entropy in nats; the FS-DFM code base
reports the mean of per-sample perplexities on raw GPT-2 ids with entropy in bits. A value goes into the
column of the matching convention (`gen_ppl` for token-pooled, `gen_ppl_seq_mean` for the per-sample mean).
They are reference points at paper scale (GPT-2 tokenizer, OWT/LM1B/FineWeb-Edu), not comparable in
absolute terms with a small-scale run of this suite.
"""

from __future__ import annotations

from dataclasses import dataclass

from fsdfm.registry import Registry


@dataclass(frozen=True)
class PublishedRow:
    """One published number set: `method` at `steps` sampling steps, metric name -> value."""

    method: str
    steps: int | None
    values: dict


@dataclass(frozen=True)
class PublishedTable:
    """Rows of one source, with the source, the dataset and the evaluation convention."""

    source: str
    dataset: str
    convention: str
    rows: tuple

    def label(self, row: PublishedRow) -> str:
        return f"published: {self.source} — {row.method}, {self.dataset}"


PUBLISHED: Registry[PublishedTable] = Registry("published table")

_FLM_CONV = "token-pooled gen. PPL under GPT-2 Large; entropy in nats; unconditional samples"
_FLM_README = "FLM/FMLM README (arXiv 2602.16813)"
_FLM_PAGE = "FLM project page (arXiv 2602.16813)"


def _sweep(method: str, steps: tuple, pairs: tuple) -> tuple:
    """Rows from (gen_ppl, entropy_nats) pairs, one per step budget."""
    if len(steps) != len(pairs):
        raise ValueError(f"published {method}: {len(steps)} step budgets for {len(pairs)} value pairs")
    return tuple(PublishedRow(method, s, {"gen_ppl": p, "entropy_nats": e}) for s, (p, e) in zip(steps, pairs))


_FLM_STEPS = (8, 16, 32, 64, 128, 256, 512, 1024)
_FMLM_STEPS = (1, 2, 4, 8, 16, 32)

PUBLISHED.register(
    "flm_owt",
    PublishedTable(
        _FLM_README,
        "OWT",
        _FLM_CONV,
        _sweep(
            "FLM (Euler)",
            _FLM_STEPS,
            (
                (449.15, 5.21),
                (380.99, 5.66),
                (240.11, 5.72),
                (147.28, 5.68),
                (103.30, 5.58),
                (82.05, 5.48),
                (70.22, 5.40),
                (62.23, 5.33),
            ),
        ),
    ),
)
PUBLISHED.register(
    "flm_lm1b",
    PublishedTable(
        _FLM_README,
        "LM1B",
        _FLM_CONV,
        _sweep(
            "FLM (Euler)",
            _FLM_STEPS,
            (
                (243.36, 2.41),
                (198.53, 4.22),
                (152.01, 4.40),
                (126.51, 4.36),
                (112.54, 4.34),
                (104.59, 4.32),
                (99.75, 4.30),
                (96.91, 4.29),
            ),
        ),
    ),
)
PUBLISHED.register(
    "fmlm_owt",
    PublishedTable(
        _FLM_README,
        "OWT",
        _FLM_CONV,
        _sweep(
            "FMLM",
            _FMLM_STEPS,
            ((168.30, 5.17), (133.29, 5.25), (111.31, 5.26), (86.50, 5.36), (63.63, 5.29), (45.09, 5.25)),
        ),
    ),
)
PUBLISHED.register(
    "fmlm_lm1b",
    PublishedTable(
        _FLM_README,
        "LM1B",
        _FLM_CONV,
        _sweep(
            "FMLM",
            _FMLM_STEPS,
            ((119.34, 4.16), (110.19, 4.21), (98.76, 4.21), (86.32, 4.21), (78.35, 4.21), (69.21, 4.21)),
        ),
    ),
)
PUBLISHED.register(
    "many_step_lm1b",
    PublishedTable(
        _FLM_PAGE,
        "LM1B",
        _FLM_CONV,
        (
            PublishedRow("MDLM", 1024, {"gen_ppl": 109.21, "entropy_nats": 4.32}),
            PublishedRow("Duo", 1024, {"gen_ppl": 98.14, "entropy_nats": 4.31}),
            PublishedRow("FLM", 1024, {"gen_ppl": 96.91, "entropy_nats": 4.29}),
            PublishedRow("data", None, {"entropy_nats": 4.31}),
        ),
    ),
)
PUBLISHED.register(
    "many_step_owt",
    PublishedTable(
        _FLM_PAGE,
        "OWT",
        _FLM_CONV,
        (
            PublishedRow("MDLM", 1024, {"gen_ppl": 121.09, "entropy_nats": 5.65}),
            PublishedRow("Duo", 1024, {"gen_ppl": 77.69, "entropy_nats": 5.55}),
            PublishedRow("FLM", 1024, {"gen_ppl": 62.23, "entropy_nats": 5.33}),
            PublishedRow("data", None, {"entropy_nats": 5.44}),
        ),
    ),
)
PUBLISHED.register(
    "few_step_owt",
    PublishedTable(
        _FLM_PAGE,
        "OWT",
        _FLM_CONV,
        _sweep("Duo+DCD", (1, 2, 4), ((5743.29, 6.02), (891.16, 5.41), (250.86, 5.37)))
        + _sweep("MDLM+SDTT", (1, 2, 4), ((1260.86, 5.26), (877.22, 5.34), (339.73, 5.38)))
        + _sweep("FMLM", (1, 2, 4), ((168.30, 5.17), (133.29, 5.25), (111.31, 5.26))),
    ),
)
PUBLISHED.register(
    "dfm_reference",
    PublishedTable(
        "facebookresearch/flow_matching text example",
        "FineWeb-Edu (170M model)",
        "gen. PPL convention not stated in our notes; float32 sampling (lowers perplexity relative to float64); "
        "no entropy reported",
        tuple(
            PublishedRow(m, 1024, {"gen_ppl": v})
            for m, v in (
                ("DFM mask+CE", 128.9),
                ("DFM mask+GKL", 132.2),
                ("DFM uniform+CE", 90.9),
                ("DFM uniform+GKL", 82.1),
            )
        ),
    ),
)


def published_tables(keys) -> list[tuple[str, PublishedTable]]:
    """The tables named by `keys` (unknown names: `UnknownNameError` with close matches), in the given order."""
    return [(k, PUBLISHED.get(k)) for k in dict.fromkeys(keys or ())]
