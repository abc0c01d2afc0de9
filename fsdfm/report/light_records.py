"""A study's light records, copied beside its report so that every number can be recomputed and every pairing
checked from a clone: `fsdfm report SPEC --records` (or `copy_light_records`).

    <report>/records/plan.json                  the plan (stage configs, inputs, runs with their grid values)
    <report>/records/<stage_id>/record.json     every finished stage's record (config, ids, seeds, metrics, timings)
    <report>/records/<stage_id>/<light file>    LIGHT_FILES where the stage wrote them (per-sample tables, curves)

No checkpoints, samples or other artefacts: only these names are copied, and none over MAX_BYTES. The report folder
is the part of results/<study>/ that .gitignore lets be committed, so the records travel with the report. The copy
has the layout of a study directory (plan.json + stages/<id>/), so `fsdfm.records.load(<report>/records)`,
`fsdfm.report.load_study` and `fsdfm report <report>/records --out DIR` read it like the study itself.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from fsdfm.io import atomic_write, read_json
from fsdfm.records import PLAN, stage_dir

__all__ = ["LIGHT_FILES", "MAX_BYTES", "LightRecords", "copy_light_records"]

LIGHT_FILES = ("record.json", "per_sample.csv", "curves.json")
MAX_BYTES = 4 << 20  # a per-sample table of 10^4 samples is ~1 MiB; anything far larger is not "light"


@dataclass(frozen=True)
class LightRecords:
    """What `copy_light_records` wrote: the folder, the files, and (path, reason) of what it left out."""

    folder: Path
    files: tuple
    skipped: tuple


def copy_light_records(study_dir: str | Path, out_dir: str | Path) -> LightRecords:
    """Copy plan.json and, for every stage of the plan with a record, its LIGHT_FILES into
    `out_dir`/records/ (as plan.json and stages/<id>/...: a study directory `fsdfm.records.load` reads).
    Files are written to a temporary name and renamed (nothing half-written); a stale copy is replaced whole."""

    sdir = Path(study_dir)
    plan = read_json(sdir / PLAN)
    dest = Path(out_dir) / "records"
    tmp = Path(out_dir) / ".records.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    files, skipped = [], []
    atomic_write(tmp / PLAN, (sdir / PLAN).read_bytes())
    for sid in plan.get("stages", {}):
        src = stage_dir(sdir, sid)
        if not (src / "record.json").is_file():
            continue
        for name in LIGHT_FILES:
            f = src / name
            if not f.is_file():
                continue
            if f.stat().st_size > MAX_BYTES:
                skipped.append((str(f), f"{f.stat().st_size} bytes > {MAX_BYTES}"))
                continue
            target = tmp / "stages" / sid / name
            atomic_write(target, f.read_bytes())
            files.append(dest / "stages" / sid / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return LightRecords(folder=dest, files=tuple(files), skipped=tuple(skipped))
