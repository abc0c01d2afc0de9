"""Run a study's stages: in-process, as local processes, or as SLURM job arrays.

    runner.py     run_stage(study_dir, stage_id), the plain function every job executes; StageJob (what submitit
                  pickles: only the study folder and the stage id)
    executors.py  the executor registry, execute(), the in-process "debug" and "inline" executors
    local.py      the "local" executor (one submitit process per stage) and the cancelling of its jobs
    gpus.py       the "local_gpus" executor (one machine, several GPUs: one stage per GPU, CUDA_VISIBLE_DEVICES)
    slurm.py      the "slurm" executor (job arrays chained by afterok)
    scheduler.py  asking SLURM about job states
    profiles.py   cluster profiles (slurm/*.yaml) and their resources
    signals.py    SIGTERM/SIGHUP handled like Ctrl-C while a study executes
    watch.py      status() and wait_for(): watching a study (not named status.py: that would hide the function)
    outcomes.py   ExecutionSummary and progress lines

The work of a stage is `run_stage`; executors only decide where it runs. Importing this package registers every
executor. What a stage reads and writes on disk is `fsdfm.records`'s.
"""

from fsdfm.launch.executors import EXECUTORS, execute, write_plan
from fsdfm.launch import gpus as _gpus, local as _local, slurm as _slurm  # noqa: F401 - they register their executors
from fsdfm.launch.outcomes import ExecutionSummary, job_exception
from fsdfm.launch.profiles import load_profile, resources_for, slurm_parameters
from fsdfm.launch.runner import (
    PACKAGE,
    STAGE_MODULES_ENV,
    CheckpointableStageJob,
    StageInputError,
    StageJob,
    resolve_kind,
    run_stage,
    stage_modules_env,
)
from fsdfm.launch.scheduler import expand_job_ids, slurm_states
from fsdfm.launch.signals import DriverInterrupted, signals_interrupt
from fsdfm.launch.watch import StageStatus, StatusReport, status, wait_for
