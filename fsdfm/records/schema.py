"""The written record: the keys of a stage's record.json, one comment per key (what `run_stage` writes).

Types only: nothing here reads or writes a file. `fsdfm.launch.runner.run_stage` builds a `StageRecord`;
`fsdfm.records.layout.check_stage` reads its "status", "artefacts", "inputs" and "input_records";
`fsdfm.records.loading` reads "payload" and "provenance". tests/test_records_load.py checks that a record written
by a real run has exactly these keys, so a key added to the writer without a line here fails.
"""

from __future__ import annotations

from typing import Any, Optional, TypedDict

SCHEMA_VERSION = 2  # 2: records list their artefacts, input records and fingerprint (code versions, data)


class Artefact(TypedDict):
    size: int  # bytes of the file when the record was written
    sha256: str  # hex digest of its bytes (`fsdfm.io.sha256_file`)


class LoadAvg(TypedDict):
    start: Optional[float]  # the 1-minute load average when the stage started (None where the OS has none)
    end: Optional[float]  # ... and when it ended: how busy the machine was around the stage's timings


class Versions(TypedDict):
    python: str  # platform.python_version()
    fsdfm: Optional[str]  # installed distribution versions (None when not installed)
    torch: Optional[str]
    transformers: Optional[str]
    numpy: Optional[str]
    submitit: Optional[str]


class Provenance(TypedDict):
    git_commit: str  # HEAD of the git work tree holding the fsdfm sources ("unknown" outside git)
    git_dirty: Optional[bool]  # modified tracked or untracked, not-ignored files (None outside git)
    versions: Versions  # library versions, from the installed metadata
    hostname: str  # socket.gethostname() of the process that ran the stage
    cpu_count: Optional[int]  # os.cpu_count() there
    pid: int  # the process that ran the stage
    slurm_job_id: Optional[str]  # "<job>" or "<array>_<task>"; None outside SLURM
    job_id: Optional[str]  # the SLURM job id, else submitit's local job id, else None (in-process)
    cuda_visible_devices: Optional[str]  # the GPU(s) the job was given (local_gpus sets one per job; SLURM too)
    argv: list  # sys.argv of that process
    threads_source: Optional[str]  # how the torch thread count was chosen (--threads, OMP_NUM_THREADS, auto: ...)
    device: str  # "cuda:<GPU name>" or "cpu" (`fsdfm.records.provenance.device_name`)
    torch_threads: Optional[int]  # torch's intra-op threads (None: the stage never imported torch)
    malloc_tuned: Optional[bool]  # whether glibc malloc was tuned (`fsdfm.launch.runtime.tune_malloc`)
    loadavg_1min: LoadAvg  # load average at start and end
    start_time: str  # ISO 8601 UTC, milliseconds
    end_time: str  # ISO 8601 UTC, milliseconds
    wall_s: float  # seconds from the stage function's call to its return (hashing artefacts included)
    cpu_s: float  # process CPU seconds over the same span (under load wall_s grows, cpu_s does not)
    attempt: int  # 1 for the first attempt of this stage folder, +1 per retry/requeue (.attempts)


class StageRecord(TypedDict):
    schema: int  # SCHEMA_VERSION of the writer
    status: str  # always "done": only finished stages write a record (failures write error.json)
    study: str  # the name of the study whose run wrote it (a shared stage keeps the first study's name)
    stage_id: str  # "<kind>-<12 hex>", content-addressed (`fsdfm.study.graph.stage_id`)
    kind: str  # the registered stage kind
    config: dict  # the stage's resolved JSON config, exactly as hashed into the id
    inputs: dict  # input name -> stage id of each stage whose folder it read
    seeds: dict  # every `seed` / `*_seed` key of config, by dotted path
    fingerprint: dict  # code versions (kind, metrics) and data file hashes that entered the id
    artefacts: dict[str, Artefact]  # relative path -> size and sha256 of every file the stage left
    input_records: dict[str, Optional[str]]  # input name -> sha256 of the input's record.json when read
    payload: dict[str, Any]  # what the stage function returned: {"metrics": {...}, ...}
    provenance: Provenance  # where and with what it ran
    data_read: dict  # data field -> sha256 of the file as re-checked when the stage started (= fingerprint's)
    digest: str  # "sha256:<hex>" of the record's own content without this key (fsdfm.records.layout.seal)
