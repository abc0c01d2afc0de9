"""Progress bars on a terminal only: a bar is drawn when stderr is a TTY, so job logs, CI and tests stay clean.

FSDFM_PROGRESS=0 turns bars off everywhere; FSDFM_PROGRESS=1 draws them even when stderr is not a terminal.
A bar never enters a result: sampling updates it between steps, outside nothing but the wall-clock it measures
(an update is ~0.1 us against a model call of milliseconds; off a terminal there is no bar at all).
"""

from __future__ import annotations

import os
import sys
from typing import Any

ENV = "FSDFM_PROGRESS"


def enabled() -> bool:
    """Whether to draw progress bars here (module docstring)."""
    flag = os.environ.get(ENV)
    if flag in ("0", "1"):
        return flag == "1"
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def bar(total: int, desc: str, unit: str = "it") -> Any:
    """A tqdm bar of `total` steps when `enabled()`, else None (callers skip the updates)."""
    if not enabled():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, mininterval=0.5, dynamic_ncols=True, leave=False, file=sys.stderr)
