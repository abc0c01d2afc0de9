"""`fsdfm report --records`: the light records beside the report, read back like the study itself."""

import sys
from pathlib import Path

import pandas as pd

from fsdfm.records import load, stage_dir
from fsdfm.report.light_records import MAX_BYTES, copy_light_records

sys.path.insert(0, str(Path(__file__).parent))
from test_report import full_study  # noqa: E402  (a synthetic study with known values)


def test_light_records_copy_records_and_tables_and_nothing_heavy(tmp_path):
    sdir = full_study(tmp_path)
    sids = sorted(p.name for p in (sdir / "stages").iterdir())
    sid = sids[0]
    (stage_dir(sdir, sid) / "per_sample.csv").write_text("sample,oracle_nll\n0,1.5\n")
    (stage_dir(sdir, sid) / "samples.npy").write_bytes(b"\0" * 64)  # samples: never copied
    (stage_dir(sdir, sid) / "model.pt").write_bytes(b"\0" * 64)  # checkpoints: never copied
    (stage_dir(sdir, sids[1]) / "per_sample.csv").write_bytes(b"x" * (MAX_BYTES + 1))  # too large: said
    out = copy_light_records(sdir, tmp_path / "report")
    copied = out.folder / "stages" / sid
    assert sorted(p.name for p in copied.iterdir()) == ["per_sample.csv", "record.json"]
    assert (out.folder / "plan.json").read_bytes() == (sdir / "plan.json").read_bytes()
    assert len(out.skipped) == 1 and sids[1] in out.skipped[0][0]
    a, b = load(sdir), load(out.folder)
    cols = [c for c in a.columns if c not in ("stage_dir", "path", "study")]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))
