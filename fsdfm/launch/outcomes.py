"""What executors share: `ExecutionSummary` (stage ids by outcome), the tally kept while executing, progress lines,
reading a failed job's own exception out of its traceback, and the stage files an executor writes around a job
(`runnable` sorts a wave, `clear_error` before a submission, `write_submitted` after it).

Knows stage outcomes and the stage files that decide them (`fsdfm.records`); knows nothing of how a job is run
(a job is anything with `job_id` and `paths.stdout`/`paths.stderr`, as submitit's are).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fsdfm.io import atomic_write_json
from fsdfm.launch.runner import error_summary
from fsdfm.records import ERROR, SUBMITTED, check_stage, is_done, now_iso, stage_dir
from fsdfm.study.graph import Stage


@dataclass(frozen=True)
class ExecutionSummary:
    """What `execute`/`wait_for` saw: stage ids by outcome.

    done: finished in this call. skipped: already done, not submitted. failed: id -> "Type: message".
    blocked: not run because an input failed. pending: submitted or queued but not finished when the call
    returned (wait=False, or a timeout). submitted: id -> job id of every stage handed to an executor."""

    study_dir: str
    done: tuple = ()
    skipped: tuple = ()
    failed: dict = field(default_factory=dict)
    blocked: tuple = ()
    pending: tuple = ()
    submitted: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked and not self.pending

    def format(self) -> str:
        out = [
            f"{self.study_dir}: {len(self.done)} done, {len(self.skipped)} skipped (already done), "
            f"{len(self.failed)} failed, {len(self.blocked)} blocked, {len(self.pending)} pending"
        ]
        out += [f"  failed  {sid}: {msg}" for sid, msg in self.failed.items()]
        out += [f"  blocked {sid} (an input failed)" for sid in self.blocked]
        return "\n".join(out)


class Tally:
    """Mutable outcome lists while executing; frozen into an ExecutionSummary at the end."""

    def __init__(self, study_dir: Path):
        self.study_dir = study_dir
        self.done: list[str] = []
        self.skipped: list[str] = []
        self.failed: dict[str, str] = {}
        self.blocked: list[str] = []
        self.pending: list[str] = []
        self.submitted: dict[str, str] = {}

    def bad(self, stage: Stage) -> bool:
        """Whether an input of `stage` failed or was blocked (so `stage` cannot run)."""
        return any(d in self.failed or d in self.blocked for d in stage.inputs.values())

    def summary(self) -> ExecutionSummary:
        return ExecutionSummary(
            str(self.study_dir),
            tuple(self.done),
            tuple(self.skipped),
            dict(self.failed),
            tuple(self.blocked),
            tuple(self.pending),
            dict(self.submitted),
        )


def already_done(tally: Tally, sdir: Path, stage: Stage) -> bool:
    """Whether an executor may skip `stage`: done by `check_stage`, and no input of it is (re)run in this call
    (a dependent of a redone stage read the old result; on SLURM the input has not even run yet). A damaged
    or stale stage is announced with the files that make it so."""
    if any(d in tally.submitted or d in tally.done for d in stage.inputs.values()):
        return False
    check = check_stage(stage_dir(sdir, stage.id))
    if check.problems:
        print(f"{stage.id}: {check.state}, redoing it: {'; '.join(check.problems)}", file=sys.stderr, flush=True)
    return check.done


def say(line: str) -> None:
    """A progress line of an executor (stderr, flushed: it shows in logs and on the terminal as it happens)."""
    print(line, file=sys.stderr, flush=True)


def say_end(tally: Tally, stage_id: str, wall_s: float | None) -> None:
    if stage_id in tally.failed:
        say(f"  {stage_id} FAILED: {tally.failed[stage_id]}")
    elif stage_id in tally.done:
        say(f"  {stage_id} done" + (f" in {wall_s:.1f} s" if wall_s is not None else ""))


def job_exception(text: str) -> str | None:
    """The last exception of a Python traceback in `text` (submitit's FailedJobError text, a job's log) as
    "Type: message", the type without its module path; None when `text` holds no traceback.

    A traceback ends with its exception: the unindented line(s) after the last frame of the last
    "Traceback (most recent call last):" (a chained exception prints the cause first)."""
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    exc: list[str] = []
    for ln in lines[starts[-1] + 1 :]:
        if not ln.strip() or ln.startswith((" ", "\t")) or ln.startswith("-----"):
            if exc:
                break
            continue
        exc.append(ln.strip())
    if not exc:
        return None
    kind, sep, message = " ".join(exc).partition(":")
    kind = kind.rsplit(".", 1)[-1] if " " not in kind else kind
    return f"{kind}{sep}{message}"[:2000]


def settle(tally: Tally, sdir: Path, stage: Stage, why: Callable[[], str]) -> None:
    """File a finished job's stage under done or failed, from the stage's own files."""
    out = stage_dir(sdir, stage.id)
    if is_done(out):
        tally.done.append(stage.id)
    else:
        tally.failed[stage.id] = error_summary(out) or why()


def runnable(tally: Tally, sdir: Path, wave: list[Stage]) -> list[Stage]:
    """The stages of `wave` to run: the done ones are filed as skipped, those behind a failed input as blocked."""
    out = []
    for stage in wave:
        if already_done(tally, sdir, stage):
            tally.skipped.append(stage.id)
        elif tally.bad(stage):
            tally.blocked.append(stage.id)
        else:
            out.append(stage)
    return out


def clear_error(sdir: Path, stage_id: str) -> None:
    """Remove a stage's error.json before it is handed to a job: an earlier failure is not this attempt's."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stage_dir(sdir, stage_id) / ERROR)


def write_submitted(sdir: Path, stage_id: str, executor: str, job: Any, **extra) -> None:
    """submitted.json: which job (and log files) a stage was handed to, read by `status` while the stage runs
    (run_stage removes it when the stage is done); `extra`: more fields (local_gpus: the job's device)."""
    atomic_write_json(
        stage_dir(sdir, stage_id) / SUBMITTED,
        {
            "executor": executor,
            "job_id": str(job.job_id),
            **extra,
            "time": now_iso(),
            "time_unix": time.time(),
            "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr),
        },
    )
