"""Executors: where a study's stages run. `execute(plan, root, executor=...)` writes plan.json, then walks
`waves(plan)` with the executor registered under that name:

* "debug": in this process, one stage after another (tests, pdb). No submitit here: its DebugExecutor opens
  pdb on a failing job, which under pytest turns the job's exception into an OSError about stdin.
* "inline": the same with progress lines on the terminal (what `make demo` uses on one machine).
* "local" (`fsdfm.launch.local`): one submitit LocalExecutor job (a process) per stage.
* "slurm" (`fsdfm.launch.slurm`): job arrays chained by afterok dependencies.

Knows the registry and the in-process executors; the work of a stage is `fsdfm.launch.runner.run_stage`.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Callable

from fsdfm.io import atomic_write_json
from fsdfm.launch.outcomes import ExecutionSummary, Tally, runnable
from fsdfm.launch.profiles import load_profile
from fsdfm.launch.runner import run_stage
from fsdfm.launch.signals import signals_interrupt
from fsdfm.records import PLAN, STORE, driver_mark, link_stages, study_dir as _study_dir
from fsdfm.registry import Registry
from fsdfm.study.graph import STAGE_KINDS, PlanError, StudyPlan, waves


def write_plan(plan: StudyPlan, root: str | os.PathLike) -> Path:
    """Write root/<plan.name>/plan.json atomically and link its stages into the shared store
    (root/_stages/<id>, see `fsdfm.records.store`); returns the study directory."""
    if plan.name == STORE:
        raise PlanError(f"study name {STORE!r} is reserved: it is the shared stage store under the results root")
    sdir = _study_dir(root, plan.name)
    sdir.mkdir(parents=True, exist_ok=True)
    link_stages(sdir, list(plan.stages), root)  # before the plan: a job never sees a plan without its links
    atomic_write_json(sdir / PLAN, plan.to_dict())
    return sdir


EXECUTORS: Registry[Callable[..., ExecutionSummary]] = Registry("executor", discover=("fsdfm.launch",))


def execute(
    plan: StudyPlan,
    root: str | os.PathLike,
    executor: str = "local",
    profile: str | os.PathLike | dict | None = None,
    wait: bool = True,
    max_parallel: int | None = None,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
) -> ExecutionSummary:
    """Run every stage of `plan` that is not done yet; returns what happened.

    root/<plan.name>/plan.json is written first (atomically). Stages already done are skipped (not
    submitted). A stage whose input failed is "blocked". executor: "debug" (in-process), "local" (submitit
    local processes; `max_parallel` at once, default 1) or "slurm" (job arrays with afterok dependencies;
    `wait=False` returns once all is submitted; `max_parallel` caps each array). `profile`: a cluster profile
    (see `load_profile`). `timeout_s` bounds the wait (pending stages are reported, not raised).
    """
    run = EXECUTORS.get(executor)
    if max_parallel is not None and (
        isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1
    ):
        raise ValueError(f"max_parallel must be an integer >= 1 (or None), got {max_parallel!r}")
    if not isinstance(plan, StudyPlan):
        raise TypeError(f"execute() needs a StudyPlan, got {type(plan).__name__}")
    plan.validate()
    kinds = {s.kind for s in plan.stages.values()}
    for kind in sorted(kinds):
        k = STAGE_KINDS.get(kind)  # an unknown kind fails here, before anything is written or submitted
        if executor != "debug" and k.module == "__main__":
            raise ValueError(
                f"stage kind {kind!r} is defined in __main__, which a job process cannot import; "
                "define it in an importable module (or use executor='debug')"
            )
    sdir = write_plan(plan, root)
    with signals_interrupt(), driver_mark(sdir, plan.name):  # `fsdfm clean` refuses while it is there
        return run(
            plan,
            sdir,
            profile=load_profile(profile),
            wait=wait,
            max_parallel=max_parallel,
            timeout_s=timeout_s,
            poll_s=poll_s,
        )


@EXECUTORS.register("debug")
def _execute_debug(
    plan: StudyPlan,
    sdir: Path,
    *,
    profile: dict,
    wait: bool,
    max_parallel: int | None,
    timeout_s: float | None,
    poll_s: float,
    verbose: bool = False,
) -> ExecutionSummary:
    """In this process, in wave order; a failure is recorded (error.json) and blocks only its dependents."""
    tally = Tally(sdir)
    total = len(plan.stages)
    say = functools.partial(print, file=sys.stderr, flush=True) if verbose else lambda *_: None
    for wave in waves(plan):
        for stage in runnable(tally, sdir, wave):
            n = len(tally.done) + len(tally.skipped) + len(tally.failed) + len(tally.blocked) + 1
            start = time.time()
            say(f"[{n}/{total}] {stage.id} ...")
            try:
                run_stage(sdir, stage.id)
                tally.done.append(stage.id)
                say(f"[{n}/{total}] {stage.id} done in {time.time() - start:.1f} s")
            except Exception as e:  # noqa: BLE001 - reported in the summary and error.json
                tally.failed[stage.id] = f"{type(e).__name__}: {e}"
                say(f"[{n}/{total}] {stage.id} FAILED: {tally.failed[stage.id]}")
    return tally.summary()


# In this process with progress lines and bars on the terminal: what `make demo` uses on one machine.
EXECUTORS.register("inline", functools.partial(_execute_debug, verbose=True))
