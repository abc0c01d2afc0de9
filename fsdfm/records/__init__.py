"""Records: the only place that knows how results sit on disk.

    layout.py      file names, study/stage folders, read_record, check_stage (is a stage done?), the plan reader
    locks.py       stage locks, process liveness, stale temp files of killed writers
    provenance.py  git state, library versions, host, device name, SLURM job id (its `provenance()` is not
                   re-exported here: the name would hide the module)
    schema.py      the keys of a written record.json (TypedDicts, one comment per key)
    loading.py     load() -> DataFrame (one row per run, upstream settings as columns), load_records, load_samples
    per_sample.py  per_sample.csv tables, written so that floats read back exactly
    store.py       the stage store shared by every study under a results root (<root>/_stages)
    cache.py       where a stage's data cache lives, found from its folder

It writes through `fsdfm.io` and knows nothing of stage functions or executors (`fsdfm.launch` runs stages and
writes their records through here).
"""

from fsdfm.records.cache import (
    check_cache_dir,
    data_cache_dir,
    default_cache_dir,
    pin_cache_env,
    results_root_of,
    stage_cache_dir,
)
from fsdfm.records.layout import (
    ATTEMPTS,
    CONTROL_FILES,
    ERROR,
    EXTERNAL,
    JOBS,
    LOCK,
    PLAN,
    RECORD,
    RUNNING,
    STAGES,
    STORE,
    SUBMITTED,
    StageCheck,
    artefact_manifest,
    artefact_paths,
    check_stage,
    is_done,
    merge_external,
    now_iso,
    read_plan,
    read_plan_or_warn,
    read_record,
    read_study_plan,
    record_digest,
    content_digest,
    seal,
    stage_dir,
    study_dir,
)
from fsdfm.records.loading import (
    BASE_COLUMNS,
    PROVENANCE_COLUMNS,
    StudyListing,
    find_studies,
    list_studies,
    load,
    load_records,
    load_samples,
    settings_columns,
)
from fsdfm.records.locks import (
    LOCK_WRITE_GRACE_S,
    LockInfo,
    StageLockedError,
    break_stale_lock,
    driver_mark,
    live_drivers,
    lock_holder,
    pid_alive,
    remove_stale_temp_files,
    stage_lock,
)
from fsdfm.records.per_sample import PER_SAMPLE, read_per_sample, write_per_sample
from fsdfm.records.provenance import (
    device_name,
    find_seeds,
    git_state,
    job_id,
    loadavg_1min,
    slurm_job_id,
    torch_threads,
    versions,
)
from fsdfm.records.schema import SCHEMA_VERSION, Provenance, StageRecord
from fsdfm.records.store import (
    LinkReport,
    Unlinked,
    discard_stage,
    link_stages,
    linked_by,
    owned_folder,
    running_holder,
    store_dir,
    store_path,
    store_root,
    unlink_stage,
)
