"""The text convention of the text-based metrics (MAUVE, self-BLEU): end-of-text markers removed.

A decoded sample that ends a document carries the literal marker ("<|endoftext|>"), and so may the
held-out references; left in, the marker is a feature of its own (on the demo's samples it moved the
teacher's MAUVE from 0.36 to 0.007). Both sides are cleaned the same way:

    clean(text) = text with every marker and the whitespace around it replaced by one space, ends stripped.

The convention (`TEXT_CONVENTION`) is recorded with the scores.
"""

from __future__ import annotations

import re
from typing import Sequence

# The end-of-text spellings the suite's tokenizers use (fsdfm.data.tokenizer.EOS_CANDIDATES) and GPT-2's.
END_MARKERS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def convention(markers: Sequence[str] = END_MARKERS) -> str:
    """The recorded description of `strip_end_markers` with these markers."""
    return f"end-of-text markers {list(markers)} replaced by one space, ends stripped"


TEXT_CONVENTION = convention()


def strip_end_markers(texts: Sequence[str], markers: Sequence[str] = END_MARKERS) -> list[str]:
    """`texts` with the end-of-text `markers` removed (see the module docstring)."""
    if not markers:
        return list(texts)
    pattern = re.compile(r"\s*(?:" + "|".join(re.escape(m) for m in markers) + r")\s*")
    return [pattern.sub(" ", t).strip() for t in texts]
