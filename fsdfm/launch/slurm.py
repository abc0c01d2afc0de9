"""The SLURM executor: one job array per (wave, resource class, set of input jobs), with partition/GPUs/CPUs/memory/
time from a cluster profile (slurm/*.yaml), and `--dependency=afterok:<input jobs>` (+ `--kill-on-invalid-dep=yes`)
between waves, so `execute(..., wait=False)` submits the whole study and returns. `wait=True` polls the cluster
(`fsdfm.launch.watch.wait_for`: sacct, else squeue, and the stage files), never `job.result()`: a job that dies
without writing its result pickle would make that hang forever.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import submitit

from fsdfm.launch.executors import EXECUTORS
from fsdfm.launch.outcomes import ExecutionSummary, Tally, already_done, clear_error, say, write_submitted
from fsdfm.launch.profiles import resources_for, slurm_parameters, source_setup
from fsdfm.launch.runner import job_for
from fsdfm.launch.watch import wait_for
from fsdfm.records import JOBS, is_done, stage_dir
from fsdfm.study.graph import STAGE_KINDS, Stage, StudyPlan, waves


@EXECUTORS.register("slurm")
def _execute_slurm(
    plan: StudyPlan,
    sdir: Path,
    *,
    profile: dict,
    wait: bool,
    max_parallel: int | None,
    timeout_s: float | None,
    poll_s: float,
) -> ExecutionSummary:
    """Submit one job array per (wave, resource class, input jobs), chained by afterok; then maybe wait."""
    if shutil.which("sbatch") is None:
        raise RuntimeError("executor='slurm' needs sbatch on PATH (and SLURM_CONF for a non-default cluster)")
    tally = Tally(sdir)
    for k, wave in enumerate(waves(plan)):
        for (cls, deps), stages in _arrays(tally, sdir, wave).items():
            res = resources_for(profile, cls)
            ex = submitit.SlurmExecutor(folder=sdir / JOBS / "%j", max_num_timeout=int(res.get("max_num_timeout", 3)))
            ex.update_parameters(**_array_parameters(plan, res, f"fsdfm-{plan.name}-w{k}-{cls}", deps, max_parallel))
            for s in stages:
                clear_error(sdir, s.id)
            try:
                with ex.batch():
                    jobs = [ex.submit(job_for(sdir, s)) for s in stages]
            except (
                submitit.core.utils.FailedSubmissionError,
                submitit.core.utils.FailedJobError,
                subprocess.CalledProcessError,
            ) as e:
                # e.g. sbatch refuses afterok on an input job that already failed ("Job dependency problem")
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                for s in stages:
                    tally.failed[s.id] = f"sbatch failed: {msg}"
                continue
            for s, job in zip(stages, jobs):
                tally.submitted[s.id] = str(job.job_id)
                say(f"wave {k}: {s.id} submitted as slurm job {job.job_id} (log {job.paths.stderr})")
                write_submitted(sdir, s.id, "slurm", job)
    if not wait:
        tally.pending.extend(tally.submitted)
        return tally.summary()
    waited = wait_for(sdir, list(tally.submitted), timeout_s=timeout_s, poll_s=poll_s)
    return ExecutionSummary(
        str(sdir),
        waited.done,
        tuple(tally.skipped),
        waited.failed,
        waited.blocked,
        waited.pending,
        dict(tally.submitted),
    )


def _arrays(tally: Tally, sdir: Path, wave: list[Stage]) -> dict[tuple[str, tuple[str, ...]], list[Stage]]:
    """The stages of `wave` to submit, grouped by (resource class, the job ids of their inputs submitted now).

    One array per group: an array's --dependency holds for all its tasks, so stages with different inputs in
    one array would all be cancelled when any one input fails. A stage with an input neither done nor submitted
    (it failed to submit) is blocked."""
    groups: dict[tuple[str, tuple[str, ...]], list[Stage]] = {}
    for stage in wave:
        if already_done(tally, sdir, stage):
            tally.skipped.append(stage.id)
        elif tally.bad(stage) or any(
            d not in tally.submitted and not is_done(stage_dir(sdir, d)) for d in stage.inputs.values()
        ):
            tally.blocked.append(stage.id)
        else:
            deps = tuple(sorted({tally.submitted[d] for d in stage.inputs.values() if d in tally.submitted}))
            groups.setdefault((STAGE_KINDS.get(stage.kind).resources, deps), []).append(stage)
    return groups


def _array_parameters(plan: StudyPlan, res: dict, name: str, deps: tuple[str, ...], max_parallel: int | None) -> dict:
    """submitit SlurmExecutor parameters of one array: the profile's resources, the study's setup lines, and
    afterok on the very array tasks it reads (kill-on-invalid-dep, so that the dependents of a failed stage are
    cancelled instead of pending forever)."""
    params = slurm_parameters(res)
    params["setup"] = source_setup(plan) + list(params.get("setup", []))
    params["job_name"] = name
    if max_parallel:
        params["array_parallelism"] = int(max_parallel)
    extra = dict(params.pop("additional_parameters", {}) or {})
    if deps:
        extra.update({"dependency": "afterok:" + ":".join(deps), "kill-on-invalid-dep": "yes"})
    if extra:
        params["additional_parameters"] = extra
    return params
