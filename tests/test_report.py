"""Report layer: summarize statistics, table rules (best by direction, data row first, collapse flags,
published rows), figure files, write_report end to end on synthetic study directories, analysis scripts."""

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fsdfm.registry import UnknownNameError
from fsdfm.report import ReportOutput, load_study, sampling_wall_s, summarize, write_report
from fsdfm.report.figures import divergence_curves
from fsdfm.report.metric_table import metric_table
from fsdfm.report.tables import seeds_table
from fsdfm.io import atomic_write_json
from fsdfm.records import stage_dir
from fsdfm.study.graph import RunSpec, Stage, StudyPlan

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T_975_2 = 4.302652729911275  # Student t quantile t_{0.975, 2} (tables), independent of scipy


# ------------------------------------------------------------------------------------ synthetic studies
def write_study(root: Path, name: str, runs: list[dict], description: str | None = None) -> Path:
    """A study directory as the pipeline leaves it: plan.json plus one done record per run's final stage.

    Each run dict: params (kind, method, label, rule, steps, grid keys...), metrics (payload metrics), and
    optionally curves (pos_divergence payload) and n_samples. Stage configs carry the study conventions."""
    stages, specs, records = [], [], {}
    for i, r in enumerate(runs):
        kind = (
            "pos_divergence"
            if r["params"]["kind"] == "pos_divergence"
            else ("evaluate_data" if r["params"]["kind"] == "data" else "evaluate")
        )
        cfg = {
            "i": i,
            "metrics": {"names": ["gen_ppl", "mauve"], "mauve_featurizer": "minilm"},
            "evaluator": {"kind": "reference", "name": None},
        }
        st = Stage(kind, cfg)
        stages.append(st)
        specs.append(RunSpec(f"run#{i}", r["params"], st.id))
        payload = {"metrics": r["metrics"], "n_samples": r.get("n_samples", 64)}
        if "curves" in r:
            payload["curves"] = r["curves"]
        records[st.id] = {
            "status": "done",
            "stage_id": st.id,
            "kind": kind,
            "payload": payload,
            "provenance": {
                "git_commit": "abc123def4567890",
                "git_dirty": False,
                "device": "cpu",
                "hostname": "test",
                "wall_s": 99.0,
                "end_time": "2026-01-01T00:00:00",
            },
        }
    plan = StudyPlan.from_stages(name, stages, specs).to_dict()
    if description:
        plan["description"] = description
    sdir = root / name
    atomic_write_json(sdir / "plan.json", plan)
    for sid, rec in records.items():
        atomic_write_json(stage_dir(sdir, sid) / "record.json", rec)
    return sdir


def _params(kind, label, rule, steps, **grid):
    return {"kind": kind, "method": kind, "label": label, "rule": rule, "steps": steps, **grid}


DATA = {"gen_ppl": 20.0, "entropy_nats": 4.0, "mauve": 1.0, "rep_n": 0.05, "distinct_4": 0.9, "self_bleu": 10.0}


def full_study(root: Path) -> Path:
    """Data row; DFM teacher (2 rules x 3 budgets) and FS-DFM (3 budgets) with 3 seeds; an FS-DFM ablation
    variant (grid key methods.fsdfm.distill.shortcut); per-position divergence curves."""
    runs = [
        {
            "params": _params(
                "data", "data (held-out)", None, None, seed=None, **{"methods.fsdfm.distill.shortcut": None}
            ),
            "metrics": dict(DATA),
        }
    ]
    rng = np.random.default_rng(0)
    for seed in (0, 1, 2):
        for rule in ("euler", "cumulative_scalar"):
            for steps in (8, 64, 1024):
                ppl = 30 + 600 / steps + 3 * rng.standard_normal()
                runs.append(
                    {
                        "params": _params(
                            "dfm", "DFM teacher", rule, steps, seed=seed, **{"methods.fsdfm.distill.shortcut": None}
                        ),
                        "metrics": {
                            "gen_ppl": ppl,
                            "entropy_nats": 3.9 + 0.02 * rng.standard_normal(),
                            "mauve": 0.9 - 1 / steps,
                            "rep_n": 0.06,
                            "distinct_4": 0.88,
                            "self_bleu": 11.0,
                            "nfe": steps,
                            "wall_s": 0.01 * steps + 0.02,
                            "tokens_per_s": 6400 / (0.01 * steps + 0.02),
                            "peak_mem": 2**30,
                        },
                    }
                )
        for shortcut, base in (("rk4", 40.0), ("heun", 55.0)):
            for steps in (1, 2, 8):
                runs.append(
                    {
                        "params": _params(
                            "fsdfm",
                            "FS-DFM",
                            "cumulative_scalar",
                            steps,
                            seed=seed,
                            **{"methods.fsdfm.distill.shortcut": shortcut},
                        ),
                        "metrics": {
                            "gen_ppl": base + 40 / steps + 2 * rng.standard_normal(),
                            "entropy_nats": 3.5 if steps == 1 else 3.85,
                            "mauve": 0.7,
                            "rep_n": 0.3 if steps == 1 else 0.07,
                            "distinct_4": 0.85,
                            "self_bleu": 12.0,
                            "nfe": steps,
                            "wall_s": 0.01 * steps + 0.02,
                        },
                    }
                )
            for steps in (1, 8):
                L = 128
                tv = np.clip(
                    0.2 + 0.3 / steps + 0.2 * np.linspace(0, 1, L) / steps + 0.03 * rng.standard_normal(L), 0, 1
                )
                runs.append(
                    {
                        "params": _params(
                            "pos_divergence",
                            "FS-DFM vs dfm",
                            "cumulative_scalar",
                            steps,
                            seed=seed,
                            **{"methods.fsdfm.distill.shortcut": shortcut},
                        ),
                        "metrics": {
                            "pos_divergence": float(tv.mean()),
                            "pos_agreement": float(1 - tv.mean()),
                            "nfe": steps,
                        },
                        "curves": {"tv": tv.tolist(), "js": (tv / 2).tolist(), "agreement": (1 - tv).tolist()},
                    }
                )
    return write_study(root, "synth", runs, description="A synthetic study with known values.")


def bare_study(root: Path, name: str = "bare") -> Path:
    """One seed, a data row and one method at two budgets, with entropy and MAUVE only: no gen_ppl, no
    timing, no divergence, no ablation."""
    runs = [{"params": _params("data", "data (held-out)", None, None), "metrics": {"entropy_nats": 4.0}}]
    runs += [
        {"params": _params("dfm", "DFM", "euler", s), "metrics": {"entropy_nats": 3.9, "mauve": 0.5}} for s in (1, 4)
    ]
    return write_study(root, name, runs)


# ---------------------------------------------------------------------------------------------- summarize
def _frame(values, metric="gen_ppl", **extra):
    rows = [{"label": "m", "rule": "euler", "steps": 8, "kind": "dfm", metric: v, **extra} for v in values]
    return pd.DataFrame(rows)


def test_summarize_mean_std_t_interval_n():
    s = summarize(_frame([1.0, 2.0, 3.0], n_samples=64), metrics=["gen_ppl"])
    assert len(s) == 1
    r = s.iloc[0]
    assert (r["label"], r["rule"], r["steps"], r["metric"]) == ("m", "euler", 8, "gen_ppl")
    assert r["mean"] == pytest.approx(2.0) and r["std"] == pytest.approx(1.0) and r["n"] == 3
    assert r["ci95"] == pytest.approx(T_975_2 / math.sqrt(3)) and r["ci95"] == pytest.approx(2.484, abs=1e-3)
    assert (r["min"], r["max"], r["n_samples"]) == (1.0, 3.0, 64)


def test_summarize_groups_keep_order_and_missing_keys_and_single_seed_has_no_spread():
    df = pd.concat(
        [
            pd.DataFrame([{"label": "data (held-out)", "rule": None, "steps": None, "kind": "data", "gen_ppl": 5.0}]),
            _frame([1.0, 3.0]).assign(steps=1),
            _frame([4.0, np.nan, 6.0]),
        ],
        ignore_index=True,
    )
    s = summarize(df, metrics=["gen_ppl", "mauve"])  # mauve: not recorded -> no rows, no error
    assert list(s["metric"]) == ["gen_ppl"] * 3
    assert s.iloc[0]["label"] == "data (held-out)" and pd.isna(s.iloc[0]["steps"]) and s.iloc[0]["n"] == 1
    assert math.isnan(s.iloc[0]["std"]) and math.isnan(s.iloc[0]["ci95"])
    assert list(s["steps"].iloc[1:]) == [1, 8]
    assert s.iloc[2]["n"] == 2 and s.iloc[2]["mean"] == pytest.approx(5.0)  # NaN is not a seed
    with pytest.raises(KeyError, match="grouping column"):
        summarize(df, by=("label", "nope"))


def test_sampling_wall_s_prefers_the_sampler_column():
    df = pd.DataFrame({"wall_s": [10.0, 20.0], "metrics.wall_s": [0.1, 0.2]})
    assert list(sampling_wall_s(df)) == [0.1, 0.2]
    assert list(sampling_wall_s(df.drop(columns="metrics.wall_s"))) == [10.0, 20.0]
    assert sampling_wall_s(pd.DataFrame({"x": [1]})).isna().all()


# -------------------------------------------------------------------------------------------------- tables
def _table_runs():
    rows = [
        {
            "label": "data (held-out)",
            "rule": None,
            "steps": None,
            "kind": "data",
            "gen_ppl": 1.0,
            "mauve": 1.0,
            "entropy_nats": 4.0,
            "rep_n": 0.05,
        }
    ]
    for seed, (a, b) in enumerate([(10.0, 20.0), (12.0, 22.0)]):
        rows.append(
            {
                "label": "A",
                "rule": "euler",
                "steps": 8,
                "kind": "dfm",
                "seed": seed,
                "gen_ppl": a,
                "mauve": 0.5,
                "entropy_nats": 3.9,
                "rep_n": 0.06,
            }
        )
        rows.append(
            {
                "label": "B",
                "rule": "euler",
                "steps": 8,
                "kind": "fsdfm",
                "seed": seed,
                "gen_ppl": b,
                "mauve": 0.8,
                "entropy_nats": 3.6,
                "rep_n": 0.30,
            }
        )
    return pd.DataFrame(rows[1:] + rows[:1])  # data row last in the input: the table must still put it first


def test_table_best_by_direction_data_row_first_and_unmarked_and_collapse():
    runs = _table_runs()
    # B within the flags' thresholds (0.25 nats below the data, rep_n under max(2 x 0.05, 0.05 + 0.1)): it competes
    runs.loc[runs.label == "B", ["entropy_nats", "rep_n"]] = [3.75, 0.09]
    t = metric_table(runs, ["gen_ppl", "entropy_nats", "mauve", "rep_n", "distinct_4"], name="t", title="t")
    cols = list(t.columns)
    assert cols[:4] == ["method", "rule", "steps", "n"] and cols[-1] == "collapse"
    rows = {r[0]: (r, b) for r, b in zip(t.cells, t.bold)}
    assert t.cells[0][0] == "data (held-out)" and not any(t.bold[0])
    a, a_bold = rows["A"]
    b, b_bold = rows["B"]
    g, e, m, rep = (cols.index(c) for c in ("gen_ppl ↓", "entropy_nats → data", "mauve ↑", "rep_n → data"))
    assert a[g] == "11.00 ± 1.41" and a[3] == "2"  # mean ± std over 2 seeds, n shown
    assert a_bold[g] and not b_bold[g]  # min: A, although the data row is lower
    assert b_bold[m] and not a_bold[m]  # max: B, although the data row is higher
    assert a_bold[e] and not b_bold[e]  # entropy: A is closer to the data's 4.0
    assert a_bold[rep] and not b_bold[rep]  # rep_n: A (0.06) is closer to the data's 0.05
    assert any("tested across seeds: gen_ppl" in n for n in t.notes)
    assert a[-1] == "no" and b[-1] == "no"
    assert "distinct_4" in " ".join(t.notes)  # the missing metric is named, not a column
    md = t.to_markdown()
    assert "**11.00 ± 1.41**" in md and md.index("data (held-out)") < md.index("| A ")
    tex = t.to_latex()
    assert r"\toprule" in tex and r"\textbf{11.00 $\pm$ 1.41}" in tex and r"gen\_ppl $\downarrow$" in tex
    assert r"entropy\_nats $\rightarrow$ data" in tex
    csv = pd.read_csv(__import__("io").StringIO(t.to_csv()))
    assert csv.loc[csv.label == "A", "gen_ppl_mean"].item() == pytest.approx(11.0)
    # n = 2: t_{0.975, 1} * std / sqrt(2) with std = sqrt(2)
    assert csv.loc[csv.label == "A", "gen_ppl_ci95"].item() == pytest.approx(12.706204736)


def test_a_flagged_row_is_never_bold_and_noise_is_not_collapse():
    """Issue 24: a collapsed row was bold (claims report: DFM teacher (uniform), low entropy, bold distinct-n and
    self-BLEU), and entropy above the data's was read as collapse. B here collapses (0.4 nats below the data's 4.0,
    rep_n 6x) yet has the best MAUVE; C is noisy (0.5 nats above) with the best gen_ppl."""
    runs = _table_runs()
    c = runs[runs.label == "A"].assign(label="C", gen_ppl=[1.5, 1.6], entropy_nats=4.5, mauve=0.6)
    runs = pd.concat([runs, c], ignore_index=True)
    t = metric_table(runs, ["gen_ppl", "entropy_nats", "mauve", "rep_n"], name="t", title="t")
    rows = {r[0]: (r, b) for r, b in zip(t.cells, t.bold)}
    assert rows["B"][0][-1] == "collapsed: low entropy, high rep_n" and not any(rows["B"][1])
    assert rows["C"][0][-1] == "noisy: high entropy" and not any(rows["C"][1])
    cols = list(t.columns)
    # among the unflagged rows only A is left: nothing to beat, so nothing is bold (neither B's MAUVE nor C's gen_ppl)
    assert not any(rows["A"][1])
    assert any("flagged rows excluded" in n for n in t.notes)
    runs2 = pd.concat([runs, runs[runs.label == "A"].assign(label="D", mauve=0.55, gen_ppl=[40.0, 40.5])])
    t = metric_table(runs2, ["gen_ppl", "mauve"], name="t", title="t", flags=False)  # no flag column, same rule
    rows = {r[0]: b for r, b in zip(t.cells, t.bold)}
    cols = list(t.columns)
    g, m = cols.index("gen_ppl ↓"), cols.index("mauve ↑")
    assert rows["A"][g] and rows["D"][m] and not rows["B"][m] and not rows["C"][g]


def test_one_notion_of_best_per_metric():
    """Tables, figure axes and `fsdfm ls metrics` say the same: data-target metrics are "closest to the data"."""
    from fsdfm.cli.ls import _metrics
    from fsdfm.metrics.registry import METRICS
    from fsdfm.report.plotting import axis_label
    from fsdfm.report.table import header

    listed = {e.name: e.about for e in _metrics()}
    for name in ("entropy_nats", "rep_n", "distinct_2", "self_bleu"):
        info = METRICS.get(name)
        assert info.goal == "data" and header(name).endswith("→ data")
        assert "closest to the data is better" in axis_label(name) and "closest to the data is better" in listed[name]
        assert info.best([0.1, 0.5, 0.9], data=0.45) == 0.5
    assert "lower is better" in axis_label("gen_ppl") and "lower is better" in listed["gen_ppl"]
    assert METRICS.get("mauve").best([0.2, 0.7]) == 0.7 and header("mauve").endswith("↑")


def test_collapse_flag_thresholds_follow_collapse_flags():
    runs = _table_runs()
    runs.loc[runs.label == "B", "entropy_nats"] = 3.69  # 0.31 nats below the data's 4.0
    runs.loc[runs.label == "B", "rep_n"] = 0.06
    t = metric_table(runs, ["entropy_nats", "rep_n"], name="t", title="t")
    flags = {r[0]: r[-1] for r in t.cells}
    assert flags == {"data (held-out)": "—", "A": "no", "B": "collapsed: low entropy"}
    t = metric_table(runs[runs.kind != "data"], ["entropy_nats"], name="t", title="t")
    assert {r[-1] for r in t.cells} == {"n/a"} and any("no data reference row" in n for n in t.notes)


def test_ties_are_all_marked_but_an_all_tie_marks_nothing():
    runs = _table_runs()
    runs["mauve"] = 0.5
    runs.loc[runs.kind == "data", "mauve"] = 1.0
    t = metric_table(runs, ["mauve"], name="t", title="t")
    assert not any(any(b) for b in t.bold)


def test_published_rows_are_labelled_last_and_never_marked():
    t = metric_table(_table_runs(), ["gen_ppl", "entropy_nats"], name="t", title="t", published=["flm_owt"])
    pub = [i for i, r in enumerate(t.cells) if r[0].startswith("published: ")]
    assert len(pub) == 8 and pub == list(range(len(t.cells) - 8, len(t.cells)))
    assert all("FLM" in t.cells[i][0] and "2602.16813" in t.cells[i][0] for i in pub)
    assert not any(any(t.bold[i]) for i in pub) and pub[0] in t.sections
    first = t.cells[pub[0]]
    assert first[2] == "8" and "449.15" in first and "5.21" in first
    assert any("token-pooled" in n for n in t.notes)
    with pytest.raises(UnknownNameError, match="flm_owt"):
        metric_table(_table_runs(), ["gen_ppl"], name="t", title="t", published=["flm_ow"])


# ------------------------------------------------------------------------------------- studies, reports
def test_load_study_variant_labels_and_seed_pooling(tmp_path):
    study = load_study(full_study(tmp_path))
    assert study.seed_keys == ("seed",) and study.ablation_keys == ("methods.fsdfm.distill.shortcut",)
    labels = list(dict.fromkeys(study.models["label"]))
    assert labels == ["DFM teacher", "FS-DFM (shortcut=rk4)", "FS-DFM (shortcut=heun)"]
    s = summarize(study.runs, metrics=["gen_ppl"])
    assert set(s.loc[s.label != "data (held-out)", "n"]) == {3}
    assert study.runs["n_samples"].eq(64).all()
    # the sampler's own time (payload metric wall_s), never the stage's run time (99 s in provenance)
    timed = study.runs[study.runs["sampling_wall_s"].notna()]
    assert len(timed) == 3 * (6 + 6) and np.allclose(timed["sampling_wall_s"], 0.01 * timed["steps"] + 0.02)
    curves = divergence_curves(study)
    assert len(curves) == 3 * 2 * 2 * 128 and set(curves.columns) >= {"position", "tv", "agreement"}


def test_write_report_writes_every_file(tmp_path):
    sdir = full_study(tmp_path)
    out = write_report(sdir, published=["many_step_owt"])
    assert isinstance(out, ReportOutput) and out.index == sdir / "report" / "index.md"
    names = {p.name for p in out.figures}
    for stem in ("fig_step_sweep", "fig_frontier", "fig_pos_divergence", "fig_ablation_fsdfm"):
        assert {stem + ".png", stem + ".pdf"} <= names
    for p in out.figures:
        data = p.read_bytes()
        assert len(data) > 5000 and data.startswith(PNG_MAGIC if p.suffix == ".png" else b"%PDF")
    tables = {p.name for p in out.tables}
    for stem in ("table_main", "table_cost", "table_pos_divergence", "table_seeds", "table_ablation_fsdfm"):
        assert {f"{stem}.md", f"{stem}.tex", f"{stem}.csv"} <= tables
    assert all(p.stat().st_size > 0 for p in out.tables) and out.skipped == []
    index = out.index.read_text()
    assert "# Report: synth" in index and "A synthetic study with known values." in index
    assert "| data (held-out)" in index and "published: FLM project page" in index
    assert "![Quality vs step budget](fig_step_sweep.png)" in index and "(table_main.tex)" in index
    assert "token-pooled" in index and "nats" in index and "MAUVE featurizer: minilm" in index
    assert "collapsed: low entropy, high rep_n" in index  # FS-DFM at 1 step collapses (entropy 3.5, rep_n 0.3)
    assert not list(out.index.parent.glob(".*.tmp"))  # atomic writes leave no temp files


def test_missing_metrics_and_figures_are_skipped_and_said(tmp_path):
    out = write_report(bare_study(tmp_path), tmp_path / "rep")
    assert {p.name for p in out.figures} == {"fig_step_sweep.png", "fig_step_sweep.pdf"}
    skipped = dict(out.skipped)
    assert set(skipped) == {"frontier", "quality_vs_nfe", "pos_divergence", "ablation"}
    assert "gen_ppl was not recorded" in skipped["frontier"]
    index = out.index.read_text()
    for name, why in skipped.items():
        assert f"figure `{name}` skipped: {why}" in index
    assert "table `table_pos_divergence`: no data" in index
    assert not (tmp_path / "rep" / "fig_frontier.png").exists()
    main = (tmp_path / "rep" / "table_main.md").read_text()
    assert "gen_ppl" in main and "not recorded in this study: gen_ppl" in main


def test_not_recorded_names_only_the_metrics_the_spec_asked_for(tmp_path):
    # bare_study's stages ask for gen_ppl and mauve and record entropy and mauve: gen_ppl is the one asked for
    # and missing; the main table's other metrics (rep_n, distinct_4, the oracle ones, ...) were never asked for
    sdir = bare_study(tmp_path)
    assert load_study(sdir).asked_metrics == {"gen_ppl", "mauve"}
    write_report(sdir, tmp_path / "rep")
    main = (tmp_path / "rep" / "table_main.md").read_text().splitlines()
    assert [ln for ln in main if "not recorded" in ln] == ["* not recorded in this study: gen_ppl"]


def test_a_planned_but_unfinished_pos_divergence_run_is_not_called_unplanned(tmp_path):
    # the study plans one pos_divergence run whose record is missing (a partial study): the figure is skipped
    # for that reason, not with "not set in the spec"
    curves = {"tv": [0.1, 0.2], "js": [0.01, 0.02], "agreement": [0.9, 0.8]}
    runs = [
        {"params": _params("dfm", "DFM", "euler", 4), "metrics": {"entropy_nats": 3.9}},
        {"params": _params("pos_divergence", "FS-DFM", "cumulative_scalar", 8), "metrics": {}, "curves": curves},
    ]
    sdir = write_study(tmp_path, "partial", runs)
    plan = json.loads((sdir / "plan.json").read_text())
    pos_id = next(r["stage_id"] for r in plan["runs"] if r["params"]["kind"] == "pos_divergence")
    (stage_dir(sdir, pos_id) / "record.json").unlink()
    skipped = dict(write_report(sdir, tmp_path / "rep").skipped)
    assert skipped["pos_divergence"] == "none of the study's 1 pos_divergence runs has finished"


def test_write_report_of_a_study_without_finished_runs(tmp_path):
    sdir = write_study(tmp_path, "empty", [{"params": _params("dfm", "DFM", "euler", 1), "metrics": {}}])
    next(sdir.glob("stages/*/record.json")).unlink()
    out = write_report(sdir)
    assert out.tables == [] and out.figures == [] and "0 finished of 1 planned" in out.index.read_text()


def test_seeds_table_reports_interval(tmp_path):
    study = load_study(
        write_study(
            tmp_path,
            "s",
            [
                {"params": _params("dfm", "DFM", "euler", 8, seed=k), "metrics": {"gen_ppl": v}}
                for k, v in enumerate((1.0, 2.0, 3.0))
            ],
        )
    )
    t = seeds_table(study, metrics=["gen_ppl"])
    (row,) = t.cells
    assert row[:5] == ("DFM", "euler", "8", "gen_ppl", "3") and row[5:8] == ("2.00", "1.00", "2.48")


# ------------------------------------------------------------------------------------------------ analysis
@pytest.mark.parametrize(
    "script,drawn",
    [
        ("table_main", True),
        ("table_seeds", True),
        ("table_ablations", False),
        ("fig_step_sweep", True),
        ("fig_frontier", False),
        ("fig_pos_divergence", False),
    ],
)
def test_analysis_scripts_end_with_one_json_line(tmp_path, capsys, monkeypatch, script, drawn):
    # the bare study keeps this cheap: figures are drawn once, in the write_report tests; here, the script
    # path and its "skipped" answer
    sdir = bare_study(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, str(sdir), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "analysis" / f"{script}.py"), run_name="__main__")
    assert e.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["study"] == "bare" and len(lines) > 1
    assert bool(result["files"]) == drawn and (result["skipped"] is None) == drawn
    assert all(Path(p).is_file() and Path(p).parent == tmp_path / "out" for p in result["files"])


# ------------------------------------------------------------------------------------- significance marks
def _two_rows(a_values, b_values, metric="gen_ppl", data=None, **extra):
    rows = (
        [{"label": "data (held-out)", "rule": None, "steps": None, "kind": "data", metric: data}]
        if data is not None
        else []
    )
    for seed, (a, b) in enumerate(zip(a_values, b_values)):
        rows.append({"label": "A", "rule": "euler", "steps": 8, "kind": "dfm", "seed": seed, metric: a, **extra})
        rows.append({"label": "B", "rule": "euler", "steps": 8, "kind": "fsdfm", "seed": seed, metric: b, **extra})
    return pd.DataFrame(rows)


def _marks(t, metric_header):
    j = list(t.columns).index(metric_header)
    return {r[0]: (r[j], b[j]) for r, b in zip(t.cells, t.bold)}


def test_overlapping_seed_values_mark_no_best_and_separated_values_mark_the_better():
    overlap = metric_table(
        _two_rows([10.0, 14.0, 12.0], [11.0, 15.0, 13.0]), ["gen_ppl"], name="t", title="t", flags=False
    )
    marks = _marks(overlap, "gen_ppl ↓")
    assert not marks["A"][1] and not marks["B"][1]  # p = 0.71 (Welch): inside the noise
    apart = metric_table(
        _two_rows([10.0, 10.5, 11.0], [20.0, 20.5, 21.0]), ["gen_ppl"], name="t", title="t", flags=False
    )
    marks = _marks(apart, "gen_ppl ↓")
    assert marks["A"][1] and not marks["B"][1]
    assert any("tested across seeds: gen_ppl" in n for n in apart.notes)


def test_welch_matches_scipy_and_its_interval_covers_the_difference():
    from scipy import stats

    from fsdfm.report.significance import welch

    a, b = [10.0, 14.0, 12.0, 13.0], [11.0, 15.0, 19.0]
    w = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w.p == pytest.approx(ref.pvalue, rel=1e-10) and w.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert w.ci[0] < w.diff < w.ci[1]
    assert welch([1.0, 1.0], [2.0, 2.0]).p == 0.0 and welch([1.0, 1.0], [1.0, 1.0]).p == 1.0


def test_ties_with_the_best_are_marked_as_ties():
    runs = pd.concat(
        [
            _two_rows([10.0, 10.5, 11.0], [10.2, 10.8, 11.1]),
            pd.DataFrame(
                [
                    {"label": "C", "rule": "euler", "steps": 8, "kind": "ar", "seed": s, "gen_ppl": v}
                    for s, v in enumerate([30.0, 31.0, 30.5])
                ]
            ),
        ],
        ignore_index=True,
    )
    marks = _marks(metric_table(runs, ["gen_ppl"], name="t", title="t", flags=False), "gen_ppl ↓")
    assert marks["A"][0].endswith("≈") and marks["B"][0].endswith("≈") and not marks["C"][0].endswith("≈")
    assert not any(b for _, b in marks.values())


def test_data_target_metrics_are_ranked_by_distance_to_the_data_row():
    # distinct_4 of 1.000 is further from the data's 0.929 than 0.92 is: higher is not better
    t = metric_table(
        _two_rows([1.0, 1.0], [0.92, 0.92], metric="distinct_4", data=0.929),
        ["distinct_4"],
        name="t",
        title="t",
        flags=False,
    )
    marks = _marks(t, "distinct_4 → data")
    assert marks["B"][1] and not marks["A"][1]
    # entropy: 3.8 (0.2 below the data's 4.0) beats 4.25 (0.25 above); directions would not rank it at all
    # (both within the flags' 0.3 nats: a flagged row is never marked)
    t = metric_table(
        _two_rows([4.25, 4.26, 4.24], [3.8, 3.81, 3.79], metric="entropy_nats", data=4.0),
        ["entropy_nats"],
        name="t",
        title="t",
        flags=False,
    )
    marks = _marks(t, "entropy_nats → data")
    assert marks["B"][1] and not marks["A"][1]
    assert any("ranked by distance to the data row" in n and "entropy_nats" in n for n in t.notes)


def test_single_seed_rows_are_tested_across_per_sample_values():
    runs = _two_rows([3.75], [3.95], metric="entropy_nats", data=4.0)  # A within the collapse flag's 0.3 nats
    runs["run_id"] = [f"r{i}" for i in range(len(runs))]
    rng = np.random.default_rng(0)
    per = {"r1": 3.75 + 0.3 * rng.standard_normal(64), "r2": 3.95 + 0.3 * rng.standard_normal(64)}  # A, B
    samples = pd.DataFrame(
        [{"run_id": r, "sample": i, "entropy_nats": v} for r, vs in per.items() for i, v in enumerate(vs)]
    )
    t = metric_table(runs, ["entropy_nats"], name="t", title="t", flags=False, samples=samples)
    marks = _marks(t, "entropy_nats → data")
    assert marks["B"][1] and not marks["A"][1]
    assert any("tested across per-sample values" in n and "entropy_nats" in n for n in t.notes)
    # without per-sample values one seed cannot be tested: nothing is marked, and the note says so
    t = metric_table(runs, ["entropy_nats"], name="t", title="t", flags=False)
    assert not any(any(b) for b in t.bold) and any("no test possible" in n for n in t.notes)


def test_mauve_below_the_minimum_n_is_footnoted_and_never_marked():
    runs = _two_rows([0.2, 0.21, 0.19], [0.9, 0.91, 0.89], metric="mauve", mauve_n=32)
    t = metric_table(runs, ["mauve"], name="t", title="t", flags=False)
    marks = _marks(t, "mauve ↑")
    assert marks["B"][0].endswith("†") and not marks["B"][1] and not marks["A"][1]
    assert any("unreliable, n = 32" in n and "256" in n for n in t.notes)
    t = metric_table(runs, ["mauve"], name="t", title="t", flags=False, mauve_min_n=16)  # configurable
    assert _marks(t, "mauve ↑")["B"][1]


# --------------------------------------------------------------------------- headline pairs and warnings
def _paired_study(root: Path) -> Path:
    """One seed per setting, per-sample tables on disk, report.pairs in the plan; the FS-DFM run's self_bleu saw
    only 60 of its 64 samples and its gen_ppl truncated 3."""
    from fsdfm.records import write_per_sample

    rng = np.random.default_rng(1)
    nll = {"fsdfm": 3.0 + 0.2 * rng.standard_normal(64), "dfm": 3.4 + 0.2 * rng.standard_normal(64)}
    runs = [
        {
            "params": _params("fsdfm", "FS-DFM", "cumulative_scalar", 8),
            "metrics": {
                "gen_ppl": 20.0,
                "self_bleu": 10.0,
                "n_samples": 64,
                "gen_ppl_n_truncated": 3,
                "samples_per_metric": {"gen_ppl": 64, "self_bleu": 60},
            },
        },
        {
            "params": _params("dfm", "DFM", "euler", 8),
            "metrics": {
                "gen_ppl": 30.0,
                "self_bleu": 11.0,
                "n_samples": 64,
                "gen_ppl_n_truncated": 0,
                "samples_per_metric": {"gen_ppl": 64, "self_bleu": 64},
            },
        },
    ]
    sdir = write_study(root, "paired", runs)
    plan = json.loads((sdir / "plan.json").read_text())
    plan["report"] = {"mauve_min_n": 256, "pairs": [["fsdfm@8", "dfm/euler@8"], ["fsdfm@8", "dfm@1024"]]}
    atomic_write_json(sdir / "plan.json", plan)
    for run, method in zip(plan["runs"], ("fsdfm", "dfm")):
        write_per_sample(
            stage_dir(sdir, run["stage_id"]) / "per_sample.csv",
            {"sample": np.arange(64), "nll": nll[method] * 10, "n_tokens": np.full(64, 10)},
        )
    return sdir, nll


def test_pairs_table_gives_the_difference_with_a_welch_interval(tmp_path):
    from scipy import stats

    from fsdfm.report.pairs import pairs_table

    sdir, nll = _paired_study(tmp_path)
    t = pairs_table(load_study(sdir))
    (row,) = [r for r in t.numbers.to_dict("records") if r["metric"] == "gen_ppl"]
    a, b = nll["fsdfm"], nll["dfm"]
    va, vb = a.var(ddof=1) / 64, b.var(ddof=1) / 64
    df = (va + vb) ** 2 / (va**2 / 63 + vb**2 / 63)
    half = stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    assert row["diff"] == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert (row["ci_low"], row["ci_high"]) == (
        pytest.approx(a.mean() - b.mean() - half),
        pytest.approx(a.mean() - b.mean() + half),
    )
    assert row["test"] == "Welch across samples" and row["n"] == "64/64" and row["p"] < 1e-6
    assert any("fsdfm@8 vs dfm@1024 not compared" in n and "no finished run" in n for n in t.notes)


def test_report_warns_where_a_metric_saw_fewer_samples_and_where_gen_ppl_truncated(tmp_path):
    sdir, _ = _paired_study(tmp_path)
    index = write_report(sdir).index.read_text()
    warnings = index.split("## Warnings", 1)[1].split("\n## ", 1)[0]
    assert "self_bleu saw fewer samples than the run made" in warnings and "(60 of 64)" in warnings
    assert "gen_ppl truncated" in warnings and "(3 of 64)" in warnings and "gen_ppl saw" not in warnings
    assert "## Headline pairs" in index and (sdir / "report" / "table_pairs.csv").is_file()


def test_an_outside_legend_with_long_labels_fits_in_the_figure():
    """The claims frontier figure's legend was cut at both edges (2 columns of 60-character labels)."""
    from fsdfm.report.plotting import _legend_outside, _new_figure

    for where in ("bottom", "right"):
        fig, (ax,) = _new_figure(1, w=7.0, h=5.0)
        for i in range(14):
            ax.plot([0, 1], [i, i + 1], label=f"no consistency training (teacher, cumulative rule) {i} · cumulative")
        _legend_outside(fig, [ax], where=where)
        fig.canvas.draw()
        box, page = fig.legends[0].get_window_extent(), fig.bbox
        assert page.x0 - 0.5 <= box.x0 and box.x1 <= page.x1 + 0.5, (where, box, page)
        assert page.y0 - 0.5 <= box.y0 and box.y1 <= page.y1 + 0.5, (where, box, page)


def test_timings_taken_under_load_are_marked_and_never_bold():
    """9c2f443: the same network's 8 steps showed 8.33 s and 2.44 s in the cost table, with nothing saying load
    made the difference. A setting timed at load_per_core > 1 gets ‡ on its time columns and a note."""
    from fsdfm.report.tables import cost_metrics, mark_loaded

    rows = []
    for label, wall, load in (("idle", 2.0, 0.4), ("busy", 1.0, 5.0)):
        for seed in range(2):
            rows.append(
                {
                    "label": label,
                    "rule": None,
                    "steps": 8,
                    "kind": "dfm",
                    "seed": seed,
                    "nfe": 8,
                    "sampling_wall_s": wall + 0.01 * seed,
                    "tokens_per_s": 100 / (wall + 0.01 * seed),
                    "load_per_core": load,
                }
            )
    runs = pd.DataFrame(rows)
    t = mark_loaded(metric_table(runs, cost_metrics(), name="c", title="c", flags=False), runs)
    cols = list(t.columns)
    w = next(i for i, c in enumerate(cols) if c.startswith("sampling_wall_s"))
    cells = {r[0]: (r, b) for r, b in zip(t.cells, t.bold)}
    assert cells["busy"][0][w].endswith("‡") and not cells["busy"][1][w]  # faster, but timed under load
    assert not cells["idle"][0][w].endswith("‡")
    assert any("timed under load: load average up to 5.0 per usable core" in n for n in t.notes)


def test_a_timed_call_records_cpu_time_and_load():
    from fsdfm.metrics.timing import timed, usable_cores

    t = timed(lambda: sum(i * i for i in range(20000)), warmup=0)
    assert t.cpu_s is not None and t.cpu_s >= 0 and usable_cores() >= 1
    assert t.load_per_core is not None and t.load_per_core >= 0  # Linux has a load average
