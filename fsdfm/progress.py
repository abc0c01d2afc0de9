"""Progress bars on a terminal only: a bar is drawn when stderr is a TTY, so job logs, CI and tests stay clean.

FSDFM_PROGRESS=0 turns bars off everywhere; FSDFM_PROGRESS=1 draws them even when stderr is not a terminal.
A bar never enters a result: sampling updates it between steps, outside nothing but the wall-clock it measures
(an update is ~0.1 us against a model call of milliseconds; off a terminal there is no bar at all).
"""

from __future__ import annotations

import os
import sys
from typing import Any
from fsdfm.io import atomic_write_json

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


# ------------------------------------------------------------------------------------------ stage progress
# A running stage's progress, for `fsdfm status` (a file in the stage folder) and for logs that are not a terminal
# (a line every tenth of the work): 9c2f443's `make demo` was silent for 25 minutes off a terminal, and status
# showed a running stage with no step and no time left.
PROGRESS_FILE = "progress.json"
WRITE_EVERY_S = 2.0  # progress.json at most this often (and at the last step)
LINES = 10  # progress lines per loop when stderr is not a terminal


class _Stage:
    def __init__(self, out_dir, label: str):
        from pathlib import Path

        self.path = Path(out_dir) / PROGRESS_FILE
        self.label = label
        self.last_write = 0.0
        self.start: dict[str, tuple[float, int]] = {}  # loop -> (time, step) of its first report here


_STAGES: list[_Stage] = []


class stage_progress:
    """While a stage runs (`fsdfm.launch.runner`): `step()` calls of the loops it runs report to `out_dir`'s
    progress.json and, off a terminal, to stderr. The file is removed when the stage ends."""

    def __init__(self, out_dir, label: str):
        self.stage = _Stage(out_dir, label)

    def __enter__(self):
        _STAGES.append(self.stage)
        return self.stage

    def __exit__(self, *exc):
        _STAGES.remove(self.stage)
        try:
            self.stage.path.unlink()
        except OSError:
            pass
        return False


def step(done: int, total: int, what: str = "train", loss: float | None = None) -> None:
    """Report `done` of `total` steps of loop `what` of the running stage (a no-op outside one). Time left is
    extrapolated from the steps done in this process: (elapsed / steps since the first report) x steps left."""
    if not _STAGES:
        return
    import time

    st = _STAGES[-1]
    now = time.monotonic()
    t0, s0 = st.start.setdefault(what, (now, done - 1))
    rate = (now - t0) / max(1, done - s0)
    left = rate * max(0, total - done) if done > s0 + 1 or total == done else None
    if now - st.last_write >= WRITE_EVERY_S or done >= total:
        import datetime

        st.last_write = now
        atomic_write_json(
            st.path,
            {
                "what": what,
                "step": int(done),
                "total": int(total),
                "loss": loss,
                "seconds_left": left,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        )
    every = max(1, total // LINES)
    if (done % every == 0 or done == total) and os.environ.get(ENV) != "0" and not enabled():
        text = f"  {st.label}: {what} step {done}/{total}"
        if loss is not None:
            text += f", loss {loss:.4g}"
        if left is not None:
            text += f", ~{format_seconds(left)} left"
        print(text, file=sys.stderr, flush=True)


def format_seconds(s: float) -> str:
    """12 s, 4.5 min, 2.1 h."""
    return f"{s:.0f} s" if s < 90 else (f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h")


def read_progress(stage_dir) -> dict | None:
    """A running stage's last progress (progress.json), None when it wrote none."""
    import json
    from pathlib import Path

    try:
        return json.loads((Path(stage_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
