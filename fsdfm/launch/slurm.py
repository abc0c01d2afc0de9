"""The SLURM executor: one job array per (wave, resource class, set of input jobs), with partition/GPUs/CPUs/memory/
time from a cluster profile (slurm/*.yaml), and `--dependency=afterok:<input jobs>` (+ `--kill-on-invalid-dep=yes`)
between waves, so `execute(..., wait=False)` submits the whole study and returns. `wait=True` polls the cluster
(`fsdfm.launch.watch.wait_for`: sacct, else squeue, and the stage files), never `job.result()`: a job that dies
without writing its result pickle would make that hang forever.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import submitit

from fsdfm.io import atomic_write_json
from fsdfm.launch.executors import EXECUTORS
from fsdfm.launch.outcomes import ExecutionSummary, Tally, already_done, say
from fsdfm.launch.profiles import resources_for, slurm_parameters, source_setup
from fsdfm.launch.runner import job_for
from fsdfm.launch.watch import wait_for
from fsdfm.records import ERROR, JOBS, SUBMITTED, is_done, now_iso, stage_dir
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
        # one array per (resource class, dependency set): an array's --dependency holds for all its tasks, so
        # stages with different inputs in one array would all be cancelled when any one input fails
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
        for (cls, deps), stages in groups.items():
            res = resources_for(profile, cls)
            params = slurm_parameters(res)
            params["setup"] = source_setup(plan) + list(params.get("setup", []))
            params["job_name"] = f"fsdfm-{plan.name}-w{k}-{cls}"
            if max_parallel:
                params["array_parallelism"] = int(max_parallel)
            extra = dict(params.pop("additional_parameters", {}) or {})
            if deps:
                # afterok on the very array tasks this group reads; kill-on-invalid-dep so that the dependents
                # of a failed stage are cancelled instead of pending forever
                extra.update({"dependency": "afterok:" + ":".join(deps), "kill-on-invalid-dep": "yes"})
            if extra:
                params["additional_parameters"] = extra
            ex = submitit.SlurmExecutor(folder=sdir / JOBS / "%j", max_num_timeout=int(res.get("max_num_timeout", 3)))
            ex.update_parameters(**params)
            for s in stages:  # a failure report from an earlier submission must not be read as this one's
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stage_dir(sdir, s.id) / ERROR)
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
                atomic_write_json(
                    stage_dir(sdir, s.id) / SUBMITTED,
                    {
                        "executor": "slurm",
                        "job_id": str(job.job_id),
                        "time": now_iso(),
                        "time_unix": time.time(),
                        "stdout": str(job.paths.stdout),
                        "stderr": str(job.paths.stderr),
                    },
                )
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
