"""Where a study stands: `status(study_dir)` (each stage done / running / failed / blocked / pending, asking the
scheduler about submitted jobs) and `wait_for` (poll until given stages are done or have failed).

Reads the stage files (`fsdfm.records`) and the scheduler's job states (`fsdfm.launch.scheduler`); runs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from fsdfm.io import read_json
from fsdfm.progress import format_seconds, read_progress
from fsdfm.launch.outcomes import ExecutionSummary, Tally, say, say_end
from fsdfm.launch.runner import error_summary
from fsdfm.launch.scheduler import RECORD_GRACE_S, SLURM_ACTIVE, UNKNOWN_GRACE_S, slurm_failure, slurm_states
from fsdfm.records import (
    ERROR,
    RUNNING,
    SUBMITTED,
    check_stage,
    is_done,
    lock_holder,
    pid_alive,
    read_plan,
    read_record,
    read_study_plan,
    stage_dir,
)
from fsdfm.study.graph import Stage, StudyPlan, waves


def wait_for(
    study_dir: str | os.PathLike,
    stage_ids: list[str] | None = None,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
) -> ExecutionSummary:
    """Wait until the given stages (default: every stage not done) are done or have failed.

    The stage files decide (record.json = done, error.json = failed); the cluster's job state (from the job id
    in submitted.json) only tells whether to keep waiting: a job that ended without a record is a failure,
    never an endless wait. A stage with neither a job nor a live lock counts as failed ("not submitted").
    Stages still unfinished after `timeout_s` are returned as pending."""
    sdir = Path(study_dir)
    plan = read_plan(sdir)
    todo = list(stage_ids) if stage_ids is not None else [s for s in plan["stages"] if not is_done(stage_dir(sdir, s))]
    inputs = {sid: list(plan["stages"][sid].get("inputs", {}).values()) for sid in plan["stages"]}
    deadline = None if timeout_s is None else time.time() + timeout_s
    tally = Tally(sdir)
    first_unknown: dict[str, float] = {}
    ended_at: dict[str, float] = {}
    seen_running: set[str] = set()
    while todo:
        jobs = {}
        for sid in todo:
            with contextlib.suppress(OSError, ValueError, KeyError):
                jobs[sid] = read_json(stage_dir(sdir, sid) / SUBMITTED)["job_id"]
        states = slurm_states(list(jobs.values())) if jobs else {}
        for sid in list(todo):
            out = stage_dir(sdir, sid)
            if is_done(out):
                tally.done.append(sid)
                todo.remove(sid)
                wall = (read_record(out, warn=False) or {}).get("provenance", {}).get("wall_s")
                say_end(tally, sid, wall if isinstance(wall, (int, float)) else None)
                continue
            jid = jobs.get(sid)
            state = states.get(jid, "UNKNOWN") if jid else None
            _, live = lock_holder(out)
            if (live or state == "RUNNING") and sid not in seen_running:
                seen_running.add(sid)
                say(f"  {sid} started" + (f" (slurm job {jid})" if jid else ""))
            if live or state in SLURM_ACTIVE:
                continue
            now = time.time()
            if state == "UNKNOWN" and now - first_unknown.setdefault(sid, now) < UNKNOWN_GRACE_S:
                continue  # sacct/squeue may not list a job yet
            if (
                state == "COMPLETED"
                and not (out / ERROR).exists()
                and now - ended_at.setdefault(sid, now) < RECORD_GRACE_S
            ):
                continue  # the record may show up late on a network filesystem
            todo.remove(sid)
            err = error_summary(out)
            if err:
                tally.failed[sid] = err
                say_end(tally, sid, None)
            elif any(d in tally.failed or d in tally.blocked for d in inputs.get(sid, [])):
                tally.blocked.append(sid)
            elif jid is None:
                tally.failed[sid] = "not submitted (no submitted.json) and not running"
            else:
                tally.failed[sid] = slurm_failure(out, jid, state, sdir)
        if not todo:
            break
        if deadline is not None and time.time() > deadline:
            tally.pending.extend(todo)
            break
        time.sleep(poll_s)
    # a stage that failed because its input failed is blocked, whatever order we noticed them in
    for sid in list(tally.failed):
        if any(d in tally.failed for d in inputs.get(sid, [])) and not (stage_dir(sdir, sid) / ERROR).exists():
            del tally.failed[sid]
            tally.blocked.append(sid)
    return tally.summary()


@dataclass(frozen=True)
class StageStatus:
    stage_id: str
    kind: str
    state: str  # "done" | "running" | "failed" | "blocked" | "pending"
    detail: str = ""
    error_tail: tuple = ()
    wall_s: float | None = None
    runs: tuple = ()  # labels of the runs that need this stage ("FS-DFM/euler@8"), for people reading status


@dataclass(frozen=True)
class StatusReport:
    study: str
    study_dir: str
    stages: tuple  # of StageStatus, in wave order
    runs_total: int = 0
    runs_done: int = 0

    STATES = ("done", "running", "failed", "blocked", "pending")

    def by_state(self, state: str) -> list[StageStatus]:
        return [s for s in self.stages if s.state == state]

    def counts(self) -> dict[str, int]:
        return {st: len(self.by_state(st)) for st in self.STATES}

    def format(self, error_lines: int = 8) -> str:
        c = self.counts()
        lines = [
            f"study {self.study} ({self.study_dir}): "
            + ", ".join(f"{c[s]} {s}" for s in self.STATES)
            + f"; runs {self.runs_done}/{self.runs_total} done"
        ]
        for s in self.stages:
            shown = ", ".join(s.runs[:2]) + (f" +{len(s.runs) - 2} more" if len(s.runs) > 2 else "")
            label = f" [{shown}]" if shown else ""
            lines.append(f"  {s.state:<8} {s.stage_id:<32}{label} {s.detail}".rstrip())
            for ln in s.error_tail[-error_lines:]:
                lines.append(f"           | {ln}")
        return "\n".join(lines)


def _scheduler_states(sdir: Path, stage_ids: list[str]) -> tuple[dict[str, dict], dict[str, str] | None]:
    """(submitted.json of each of `stage_ids` that has a SLURM one, the scheduler's state of those jobs);
    the states are None when neither sacct nor squeue is on PATH (then nobody here can tell)."""
    subs = {}
    for sid in stage_ids:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            sub = read_json(stage_dir(sdir, sid) / SUBMITTED)
            if sub.get("executor") == "slurm" and sub.get("job_id"):
                subs[sid] = sub
    if not subs:
        return subs, {}
    if shutil.which("sacct") is None and shutil.which("squeue") is None:
        return subs, None
    return subs, slurm_states(sorted({str(sub["job_id"]) for sub in subs.values()}))


def _progress_note(d: Path) -> str:
    """ "train step 500/2000, ~37 s left; " of a running stage (its progress.json, fsdfm.progress), or ""."""
    p = read_progress(d)
    if not p or not isinstance(p.get("step"), int):
        return ""
    left = p.get("seconds_left")
    return f"{p.get('what', 'step')} step {p['step']}/{p.get('total')}" + (
        f", ~{format_seconds(left)} left; " if isinstance(left, (int, float)) else "; "
    )


def run_labels(plan: StudyPlan) -> dict[str, tuple]:
    """Stage id -> labels of the runs whose final stage needs it (directly or upstream): "label/rule@steps" (the
    parts a run has), so a stage id in `fsdfm status` says which rows of the report wait for it."""
    out: dict[str, dict] = {}
    for run in plan.runs:
        p = run.params or {}
        text = str(p.get("label") or p.get("method") or run.run_id)
        if p.get("rule"):
            text += f"/{p['rule']}"
        if p.get("steps") is not None:
            text += f"@{p['steps']}"
        todo, seen = [run.stage_id], set()
        while todo:
            sid = todo.pop()
            if sid in seen or sid not in plan.stages:
                continue
            seen.add(sid)
            out.setdefault(sid, {})[text] = None
            todo.extend(plan.stages[sid].inputs.values())
    return {sid: tuple(labels) for sid, labels in out.items()}


def _log_note(d: Path) -> str:
    """ "; log <stderr file>" of the job a stage was handed to (submitted.json), or ""."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        log = read_json(d / SUBMITTED).get("stderr")
        if log:
            return f"; log {log}"
    return ""


def _died(d: Path, holder, state: str | None) -> str | None:
    """Why the stage in `d` counts as failed although it wrote no error.json: its attempt's running.json is
    still there and the process that wrote it is gone (kill -9, an abort in native code, the OOM killer), and no
    scheduler job of it is still queued or running (a requeued SLURM attempt is pending, not failed). None else,
    and None when the scheduler knows how the job ended (CANCELLED, TIMEOUT, ...): `_ended_job` names that state,
    which says more than "died"."""
    if state in SLURM_ACTIVE or (state is not None and state != "UNKNOWN"):
        return None
    try:
        run = read_json(d / RUNNING)
        pid, host = int(run["pid"]), str(run["hostname"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if holder is not None and holder.pid == pid and holder.host == host:
        pass  # its lock is still there: `status` found its holder gone
    elif host != socket.gethostname() or pid_alive(pid):
        return None  # another host's process cannot be seen from here; a live one is not dead
    return (
        f"died without an error report (attempt {run.get('attempt')}, pid {pid} on {host}, started "
        f"{run.get('start_time')}: killed, out of memory, or aborted in native code)"
    )


def _log_tail(d: Path, lines: int = 8) -> tuple:
    """The last lines of the job log named in submitted.json (what a process that died without error.json
    printed last), or ()."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        log = Path(read_json(d / SUBMITTED)["stderr"])
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        return tuple(ln for ln in text.splitlines() if ln.strip())[-lines:]
    return ()


def _stage_status(
    sdir: Path, stage: Stage, sub: dict | None, states: dict[str, str] | None, blocked_by: dict[str, str]
) -> StageStatus:
    """The status of one stage (see `status`); a failed or blocked stage is entered in `blocked_by`, so the
    stages downstream of it (visited later: in wave order) are blocked."""
    d = stage_dir(sdir, stage.id)
    check = check_stage(d)  # a damaged or stale stage is not done: the next run redoes it
    if check.done:
        wall = read_record(d).get("provenance", {}).get("wall_s")
        return StageStatus(
            stage.id, stage.kind, "done", f"{wall:.1f} s" if isinstance(wall, (int, float)) else "", wall_s=wall
        )
    holder, live = lock_holder(d)
    if live:
        who = holder.describe() if holder else "starting"
        return StageStatus(stage.id, stage.kind, "running", _progress_note(d) + who + _log_note(d))
    failed = _error_status(d, stage)
    if failed is not None:
        blocked_by[stage.id] = stage.id
        return failed
    notes = [f"{check.state}: {check.problems[0]}"] if check.problems else []
    state = None
    if sub is not None:
        jid = str(sub["job_id"])
        state = states.get(jid, "UNKNOWN") if states is not None else None
        known = "" if states is not None else "; no sacct/squeue here to ask"
        notes.append(f"submitted as slurm job {jid} at {sub.get('time')}{known}" + (f" ({state})" if state else ""))
    else:
        with contextlib.suppress(OSError, ValueError, KeyError):
            other = read_json(d / SUBMITTED)
            notes.append(f"submitted as {other['executor']} job {other['job_id']} at {other['time']}")
    if _log_note(d):
        notes.append(_log_note(d)[2:])
    if holder is not None:
        notes.append(f"interrupted: {holder.describe()} is gone")
    died = _died(d, holder, state)
    if died is not None:  # killed or aborted in native code: no error.json, but a failure all the same
        blocked_by[stage.id] = stage.id
        return StageStatus(stage.id, stage.kind, "failed", died + _log_note(d), error_tail=_log_tail(d))
    bad = [dep for dep in stage.inputs.values() if dep in blocked_by]
    if bad:
        blocked_by[stage.id] = blocked_by[bad[0]]
        return StageStatus(stage.id, stage.kind, "blocked", "; ".join([f"input {blocked_by[bad[0]]} failed"] + notes))
    ended = _ended_job(d, sdir, sub, state)
    if ended is not None:
        blocked_by[stage.id] = stage.id
        return StageStatus(stage.id, stage.kind, "failed", ended)
    if state == "RUNNING":  # the job started; run_stage has not taken the lock yet
        return StageStatus(stage.id, stage.kind, "running", "; ".join(notes + ["starting"]))
    return StageStatus(stage.id, stage.kind, "pending", "; ".join(notes))


def _error_status(d: Path, stage: Stage) -> StageStatus | None:
    """A failed status from the stage's error.json, or None when it has none (or it cannot be read)."""
    if not (d / ERROR).exists():
        return None
    with contextlib.suppress(OSError, ValueError):
        err = read_json(d / ERROR)
        return StageStatus(
            stage.id,
            stage.kind,
            "failed",
            f"{err.get('type')}: {err.get('message')} (attempt {err.get('attempt')}, {err.get('time')})" + _log_note(d),
            error_tail=tuple(err.get("traceback_tail", ())),
        )
    return None


def _ended_job(d: Path, sdir: Path, sub: dict | None, state: str | None) -> str | None:
    """What a SLURM job that is no longer queued or running and left no record did ("vanished: ...", "slurm job
    J ended FAILED ..."), or None while it may still run (or is unknown for less than UNKNOWN_GRACE_S after
    sbatch: sacct/squeue may not list a fresh job yet)."""
    if state is None or state in SLURM_ACTIVE:
        return None
    if state == "UNKNOWN" and time.time() - float(sub.get("time_unix") or 0) < UNKNOWN_GRACE_S:
        return None
    jid = str(sub["job_id"])
    what = (
        f"vanished: the scheduler knows no job {jid}"
        if state == "UNKNOWN"
        else f"slurm job {jid} ended {state} without a record"
    )
    why = slurm_failure(d, jid, state, sdir)
    return what if why.startswith("slurm job") else f"{what}: {why}"


def status(study_dir: str | os.PathLike, scheduler: bool = True, plan: StudyPlan | None = None) -> StatusReport:
    """Per stage: done (with wall time), running (host, pid, job, since), failed (type, message and the last
    lines of the traceback; or a SLURM job that was cancelled, failed or vanished without a record, with its
    state), blocked (an input failed or is blocked: it cannot run) or pending (not run yet; queued as a job;
    an interrupted attempt whose process is gone).

    Reads the study's files and, with `scheduler` (default) and stages submitted to SLURM, asks the scheduler
    (`slurm_states`: sacct, then squeue) about their job ids once: a job that is no longer queued or running
    and left no record is failed, never "pending" (a job the scheduler does not know yet, in the first
    UNKNOWN_GRACE_S after sbatch, is pending).

    `plan`: the plan to report on instead of plan.json (a study that has not run yet: every stage pending).
    A stage handed to a job names the job's log (stderr) file."""
    sdir = Path(study_dir)
    if plan is None:
        plan = read_study_plan(sdir)
    todo = [
        sid for sid in plan.stages if not is_done(stage_dir(sdir, sid)) and not lock_holder(stage_dir(sdir, sid))[1]
    ]
    subs, states = _scheduler_states(sdir, todo) if scheduler else ({}, None)
    blocked_by: dict[str, str] = {}  # stage id -> the failed stage upstream of it (or itself, if it failed)
    out = [_stage_status(sdir, stage, subs.get(stage.id), states, blocked_by) for wave in waves(plan) for stage in wave]
    done = {s.stage_id for s in out if s.state == "done"}
    labels = run_labels(plan)
    out = [dataclasses.replace(s, runs=labels.get(s.stage_id, ())) for s in out]
    return StatusReport(
        plan.name,
        str(sdir),
        tuple(out),
        runs_total=len(plan.runs),
        runs_done=sum(r.stage_id in done for r in plan.runs),
    )
