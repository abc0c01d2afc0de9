"""Quality-matched speed-up (fsdfm.report.speedup): N* recovers a known budget, the no-crossing cases are said,
and a study's student/teacher pairs are found from the plan."""

import math
from pathlib import Path

import numpy as np
import pytest

from fsdfm.io import atomic_write_json
from fsdfm.records import stage_dir
from fsdfm.report import load_study
from fsdfm.report.speedup import ABOVE, BELOW, IN_RANGE, crossing, matched_budget, speedup_frame, speedup_table
from fsdfm.study.graph import RunSpec, Stage, StudyPlan

BUDGETS = (1, 2, 4, 8, 16, 64, 256, 1024)


def curve(a: float, b: float) -> dict:
    """A teacher curve z(N) = a - b log2 N, exactly linear in log2 N (the interpolation is exact on it)."""
    return {n: a - b * math.log2(n) for n in BUDGETS}


def test_n_star_recovers_a_known_budget_on_a_synthetic_curve():
    # the student's score equals the teacher's at N = 100 (between the grid points 64 and 256)
    target = 5.0 - 0.4 * math.log2(100)
    c = crossing(BUDGETS, [curve(5.0, 0.4)[n] for n in BUDGETS], target)
    assert c.status == IN_RANGE and c.n_star == pytest.approx(100.0, rel=1e-9)
    mb = matched_budget([curve(5.0, 0.4)], [target], k=8, n_boot=10)
    assert mb.n_star == pytest.approx(100.0) and mb.speedup_nfe == pytest.approx(100.0 / 8)
    assert math.isnan(mb.ci[0])  # one unit: no interval


def test_no_crossing_in_range_is_said_both_ways():
    z = [curve(5.0, 0.4)[n] for n in BUDGETS]
    below = crossing(BUDGETS, z, target=z[0] + 1.0)  # the student is worse than the teacher's single step
    above = crossing(BUDGETS, z, target=z[-1] - 1.0)  # the student beats the teacher's 1,024 steps
    assert (below.status, below.n_star) == (BELOW, 1.0)
    assert (above.status, above.n_star) == (ABOVE, 1024.0)
    mb = matched_budget([curve(5.0, 0.4)] * 3, [z[-1] - 1.0] * 3, k=8, n_boot=50)
    assert mb.status == ABOVE and math.isnan(mb.speedup_nfe) and mb.ci == (math.inf, math.inf)


def test_first_crossing_of_a_non_monotone_curve_and_a_wall_clock_ratio():
    # z falls to 1 at N = 4, rises again, falls again: the first crossing (the smaller speed-up) is taken
    budgets, z = (1, 4, 16, 64), (3.0, 1.0, 2.0, 0.5)
    c = crossing(budgets, z, 2.0)
    assert c.n_star == pytest.approx(2.0)  # halfway from log2 1 to log2 4
    mb = matched_budget(
        [dict(zip(budgets, z))], [2.0], k=1, teacher_wall={1: 1.0, 4: 4.0, 16: 16.0, 64: 64.0}, student_wall=0.5
    )
    assert mb.speedup_wall == pytest.approx(2.0 / 0.5)  # wall linear in N: wall_T(2) = 2 s


def test_bootstrap_interval_covers_the_budget_of_noisy_units():
    rng = np.random.default_rng(1)
    n_true = 32.0
    teach, stud = [], []
    for _ in range(6):
        a = 5.0 + 0.05 * rng.standard_normal()
        teach.append(curve(a, 0.4))
        stud.append(a - 0.4 * math.log2(n_true) + 0.05 * rng.standard_normal())
    mb = matched_budget(teach, stud, k=8, n_boot=500)
    assert mb.ci[0] < mb.n_star < mb.ci[1] and mb.ci[0] < n_true < mb.ci[1]


# ------------------------------------------------------------------------------- a study from its plan
def _study(root: Path, variant: bool = False, sweep: bool = False) -> Path:
    """Teacher stages T_s and students S_s (distilled from T_s), s = 0, 1, 2; teacher sampled at 1..64, the
    student at 8. gen_ppl of the teacher: exp(4 - 0.25 log2 N); of the student: the teacher's at N = 32.
    variant: the teacher is also sampled with a knob (same rule), 1 nat/token worse at every budget; sweep: the
    teacher is also sampled with a temperature at one budget (8) only."""
    stages, runs, records = [], [], {}

    def add(stage: Stage, params: dict | None = None, metrics: dict | None = None):
        stages.append(stage)
        if params is not None:
            runs.append(RunSpec(f"run#{len(runs)}", params, stage.id))
            records[stage.id] = {
                "status": "done",
                "stage_id": stage.id,
                "kind": stage.kind,
                "payload": {"metrics": metrics, "n_samples": 64},
                "provenance": {
                    "git_commit": "abc",
                    "git_dirty": False,
                    "device": "cpu",
                    "wall_s": 1.0,
                    "end_time": "2026-01-01T00:00:00",
                },
            }

    for seed in range(3):
        t = Stage("train", {"seed": seed, "source": "mask", "scheduler": {"kind": "poly"}})
        s = Stage("distill", {"seed": seed}, inputs={"teacher": t.id})
        add(t), add(s)
        settings = [(t, "DFM", (1, 4, 16, 64), None), (s, "FS-DFM", (8,), None)]
        if variant:
            settings.append((t, "DFM blocks", (1, 4, 16, 64), "block_length=16"))
        if sweep:
            settings.append((t, "DFM T 0.7", (8,), "temperature=0.7"))
        for model, label, budgets, knobs in settings:
            for n in budgets:
                smp = Stage("sample", {"n": n, "m": label}, inputs={"model": model.id})
                add(smp)
                log_ppl = 4.0 - 0.25 * math.log2(32 if label == "FS-DFM" else n) + 0.01 * seed + (1.0 if knobs else 0)
                add(
                    Stage("evaluate", {"n": n, "m": label, "seed": seed}, inputs={"samples": smp.id}),
                    {
                        "kind": "fsdfm" if label == "FS-DFM" else "dfm",
                        "method": label.lower(),
                        "label": label,
                        "rule": "cumulative_scalar",
                        "steps": n,
                        "seed": seed,
                        **({"knobs": knobs} if knobs else {}),
                    },
                    {"gen_ppl": math.exp(log_ppl), "wall_s": 0.1 * n, "nfe": n},
                )
    plan = StudyPlan.from_stages("sp", stages, runs).to_dict()
    sdir = root / "sp"
    atomic_write_json(sdir / "plan.json", plan)
    for sid, rec in records.items():
        atomic_write_json(stage_dir(sdir, sid) / "record.json", rec)
    return sdir


def test_a_study_pairs_each_student_with_its_own_teacher(tmp_path):
    study = load_study(_study(tmp_path))
    df = speedup_frame(study, n_boot=200)
    row = df[df["metric"] == "gen_ppl"].iloc[0]
    assert (row["student"], row["teacher"], row["k"], row["units"]) == ("FS-DFM", "DFM (cumulative_scalar)", 8, 3)
    assert row["n_star"] == pytest.approx(32.0, rel=1e-6) and row["speedup_nfe"] == pytest.approx(4.0, rel=1e-6)
    assert row["speedup_wall"] == pytest.approx(0.1 * 32 / (0.1 * 8), rel=1e-6)
    table = speedup_table(study, n_boot=200)
    assert table.name == "table_speedup" and "32" in table.to_markdown()


def test_knob_variants_of_the_teacher_are_separate_curves_own_setting_first(tmp_path):
    """Two teacher settings with one rule (plain, and a knob 1 nat/token worse) are two rows, not one pooled curve:
    against the plain teacher N* is still 32."""
    study = load_study(_study(tmp_path, variant=True))
    df = speedup_frame(study, n_boot=100)
    df = df[(df["metric"] == "gen_ppl") & (df["k"] == 8)]
    assert list(df["teacher"]) == ["DFM (cumulative_scalar)", "DFM blocks (cumulative_scalar)"]
    assert df["n_star"].iloc[0] == pytest.approx(32.0, rel=0.02)
    assert df["n_star"].iloc[1] > 64 or df["status"].iloc[1] != "in range"


def test_a_teacher_setting_at_one_budget_is_no_curve_and_gets_no_row(tmp_path):
    """A knob sweep of the teacher at one budget (temperature at 8 steps) has no N* to read: the student is compared
    with the teacher's curves only (before, it got a row per metric and budget, all "no N* in range")."""
    df = speedup_frame(load_study(_study(tmp_path, sweep=True)), n_boot=50)
    assert set(df["teacher"]) == {"DFM (cumulative_scalar)"}
    assert df[df["metric"] == "gen_ppl"]["n_star"].iloc[0] == pytest.approx(32.0, rel=0.02)
