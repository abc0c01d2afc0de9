"""Records come back whole: `load()` on a finished ablation has a column for every setting that differs between its
runs (namespaced: train.lr, settings.shortcut, sample.steps, evaluator.name, ...), and a written record has exactly
the keys of `fsdfm.records.schema.StageRecord`."""

from __future__ import annotations

import itertools
import typing
from pathlib import Path

import pytest

import fsdfm
from fsdfm.records import read_plan, read_record, settings_columns, stage_dir
from fsdfm.records.schema import Provenance, StageRecord

TEXT = (
    "Once upon a time there was a cat.\n\nThe cat sat on a mat and looked at the sun.\n\n"
    "A little dog ran to the park. It saw a big red ball and it was happy.\n\n"
) * 12
TRAIN = {"steps": 2, "batch_size": 4, "warmup_steps": 1}


def ablation_spec(tmp: Path) -> dict:
    """A teacher and three students that differ from `fs` in one setting each: the shortcut, the learning rate, the
    step-size distribution."""
    return {
        "name": "tiny_ablation",
        "data": {
            "kind": "text",
            "train": str(tmp / "train.txt"),
            "valid": str(tmp / "valid.txt"),
            "tokenizer": "bpe",
            "vocab_size": 300,
            "seq_len": 16,
        },
        "model": {"preset": "tiny", "hidden": 16, "cond_dim": 8, "n_blocks": 1, "n_heads": 2},
        "sampling": {"n_samples": 4, "batch_size": 4, "seed": 0},
        "evaluator": {"kind": "none"},
        "data_reference": False,
        "methods": {
            "dfm": {"kind": "dfm", "train": {**TRAIN, "steps": 3}, "rules": ["euler"], "budgets": [2]},
            "fs": {
                "kind": "fsdfm",
                "teacher": "dfm",
                "train": TRAIN,
                "rules": ["euler"],
                "budgets": [2],
                "distill": {"K": 3, "shortcut": "rk4", "h_distribution": "inv_h"},
            },
            "fs_heun": {"base": "fs", "distill": {"shortcut": "heun"}},
            "fs_lr": {"base": "fs", "train": {"lr": 0.0001}},
            "fs_uniform": {"base": "fs", "distill": {"h_distribution": "uniform"}},
        },
        "metrics": {"names": ["entropy_nats", "distinct_2"]},
    }


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablation")
    (tmp / "train.txt").write_text(TEXT)
    (tmp / "valid.txt").write_text(TEXT[::-1].replace("\n\n", " . \n\n"))
    df = fsdfm.run_study(ablation_spec(tmp), executor="debug", results=tmp / "results")
    return tmp / "results" / "tiny_ablation", df


def _leaves(x, path=()):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, tuple(x) if isinstance(x, list) else x


def _upstream_leaves(plan: dict, sid: str, via=()) -> dict:
    """{(input path from the final stage, stage kind, config key path): value} of a stage and all its inputs: every
    setting that decides a run's result, computed from plan.json without `settings_columns`."""
    st = plan["stages"][sid]
    out = {(via, st["kind"], p): v for p, v in _leaves(st["config"])}
    for name, dep in st.get("inputs", {}).items():
        out.update(_upstream_leaves(plan, dep, (*via, name)))
    return out


@pytest.mark.slow  # runs a tiny study: a teacher and four students of 2-3 steps (~30 s on 2 busy cores)
def test_load_has_a_column_for_each_ablated_setting(ablation):
    sdir, df = ablation
    by = df.set_index("method")
    assert sorted(by.index) == ["dfm", "fs", "fs_heun", "fs_lr", "fs_uniform"]
    # the known answers: each student differs from fs in the one setting its spec changed
    assert by.loc["fs", "settings.shortcut"] == "rk4" and by.loc["fs_heun", "settings.shortcut"] == "heun"
    assert by.loc["fs", "settings.h_distribution"] == "inv_h"
    assert by.loc["fs_uniform", "settings.h_distribution"] == "uniform"
    assert by.loc["fs_lr", "train.lr"] == 0.0001 and by.loc["fs", "train.lr"] != 0.0001
    students = df[df.method.str.startswith("fs")]
    assert sorted(students.groupby("settings.shortcut").size().items()) == [("heun", 1), ("rk4", 3)]
    # settings upstream of the model: the teacher's, prefixed by the input that reaches it
    assert set(students["teacher.train.steps"]) == {3} and set(students["train.steps"]) == {2}
    assert set(df["sample.steps"]) == {2} and set(df["sample.rule"]) == {"euler"}
    assert set(df["evaluator.kind"]) == {"none"} and set(df["evaluate.n_samples"]) == {4}
    assert df[df.method == "dfm"]["settings.shortcut"].isna().all()  # a DFM teacher has no shortcut


@pytest.mark.slow
def test_every_setting_that_differs_between_two_runs_has_a_column(ablation):
    sdir, df = ablation
    plan = read_plan(sdir)
    leaves = {r["run_id"]: _upstream_leaves(plan, r["stage_id"]) for r in plan["runs"]}
    rows = df.set_index("run_id")
    cols = [
        c
        for c in df.columns
        if c
        not in (
            "study",
            "run_id",
            "stage_id",
            "commit",
            "dirty",
            "device",
            "host",
            "threads",
            "stage_wall_s",
            "end_time",
        )
    ]
    compared = 0
    for a, b in itertools.combinations(leaves, 2):
        if leaves[a].keys() != leaves[b].keys():
            continue  # runs of different stage graphs (a teacher and a student): no setting of one is the other's
        differ = {k for k in leaves[a] if leaves[a][k] != leaves[b][k]}
        compared += bool(differ)
        for key in differ:
            # the differing leaf has a column whose two values are the two runs' values
            hits = [
                c
                for c in cols
                if c.split(".")[-1] == key[2][-1]
                and _same(rows.loc[a, c], leaves[a].get(key))
                and _same(rows.loc[b, c], leaves[b].get(key))
            ]
            assert hits, f"{a} vs {b}: setting {key} = {leaves[a].get(key)!r} / {leaves[b].get(key)!r} has no column"
    assert compared == 6  # the four students, pairwise


def _same(cell, value) -> bool:
    if value is None:
        return cell is None or cell != cell  # missing: None or NaN
    return cell == value


def test_settings_columns_namespaces_each_upstream_stage():
    plan = {
        "stages": {
            "e": {
                "kind": "evaluate",
                "config": {"evaluator": {"name": "gpt2"}, "n_samples": 8},
                "inputs": {"samples": "s"},
            },
            "s": {"kind": "sample", "config": {"steps": 4, "precision": "float64"}, "inputs": {"model": "m"}},
            "m": {
                "kind": "distil_fsdfm",
                "config": {
                    "optim": {"lr": 0.1, "betas": [0.9, 0.98]},
                    "source": "mask",
                    "distill": {"shortcut": "rk4"},
                },
                "inputs": {"teacher": "t"},
            },
            "t": {"kind": "train_dfm", "config": {"optim": {"lr": 0.5}, "model": {"hidden": 4}}, "inputs": {}},
        }
    }
    assert settings_columns(plan, "e") == {
        "evaluator.name": "gpt2",
        "evaluate.n_samples": 8,
        "sample.steps": 4,
        "sample.precision": "float64",
        "train.lr": 0.1,
        "train.betas": (0.9, 0.98),
        "settings.source": "mask",
        "settings.shortcut": "rk4",
        "teacher.train.lr": 0.5,
        "teacher.model.hidden": 4,
    }


def _typed_keys(td) -> set:
    return set(typing.get_type_hints(td))


@pytest.mark.slow
def test_a_written_record_has_exactly_the_schema_keys(ablation):
    sdir, df = ablation
    plan = read_plan(sdir)
    for sid in plan["stages"]:
        rec = read_record(stage_dir(sdir, sid))
        assert set(rec) == _typed_keys(StageRecord), sid
        assert set(rec["provenance"]) == _typed_keys(Provenance), sid
        assert set(rec["provenance"]["loadavg_1min"]) == {"start", "end"}
        assert all(set(a) == {"size", "sha256"} for a in rec["artefacts"].values())
