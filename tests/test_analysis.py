"""experiments/claims.yaml in miniature, run to the end, and every analysis/ script regenerating its table or
figure from the finished study's records alone (a copy holding only plan.json and the record.json files: no
models, no samples, nothing to train)."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
from fsdfm.launch import execute
from fsdfm.methods import plan_study
from fsdfm.records import load
from fsdfm.methods.load import load_spec

REPO = Path(__file__).resolve().parents[1]
TINY_STEPS = {"train_ar": 3, "dfm": 4, "fsdfm": 2}


def tiny_claims(raw: dict, data_dir: Path) -> dict:
    """The same methods, ablations and metric names as claims.yaml; tiny data (the first stories of its files, so
    the BPE trains in a moment), model, training and samples, each method's smallest step budget, 2 training seeds
    x 1 sampling seed (the full grid is 6 cells of the same kind)."""
    raw = dict(raw, name="claims_tiny", grid={"seed": [0, 1], "sampling.seed": [0]})
    files = {}
    for split, n in (("train", 200), ("valid", 40)):
        stories = (REPO / raw["data"][split]).read_text().split("<|endoftext|>")[:n]
        files[split] = data_dir / f"{split}.txt"
        files[split].write_text("<|endoftext|>".join(stories))
    raw["data"] = {
        **raw["data"],
        "train": str(files["train"]),
        "valid": str(files["valid"]),
        "vocab_size": 300,
        "seq_len": 8,
        "max_train_blocks": 64,
        "max_valid_blocks": 8,
    }
    raw["model"] = {"preset": "tiny", "hidden": 16, "cond_dim": 8, "n_blocks": 1, "n_heads": 2}
    raw["sampling"] = {**raw["sampling"], "n_samples": 4, "batch_size": 4}
    raw["evaluator"]["train"] = {
        **raw["evaluator"]["train"],
        "steps": TINY_STEPS["train_ar"],
        "batch_size": 8,
        "warmup_steps": 1,
    }
    for m in raw["methods"].values():
        if "train" in m:
            kind = "fsdfm" if m.get("kind") == "fsdfm" else "dfm"
            m["train"] = {**m["train"], "steps": TINY_STEPS[kind], "batch_size": 8, "warmup_steps": 1}
        if "steps" in m:
            m["steps"] = [min(m["steps"])]
    raw["metrics"] = {
        **raw["metrics"],
        "mauve_featurizer": "evaluator",
        "self_bleu_subsample": 4,
        "pos_divergence": {
            **raw["metrics"]["pos_divergence"],
            "n_states": 1,
            "n_rollouts": 2,
            "teacher_steps": 8,
            "student_steps": [2],
        },
    }
    return raw


@pytest.fixture(scope="module")
def claims_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("claims")
    raw = yaml.safe_load((REPO / "experiments" / "claims.yaml").read_text())
    spec_path = tmp / "claims_tiny.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_claims(raw, tmp)))
    spec, cells = load_spec(spec_path)
    plan = plan_study(spec.name, cells)
    summary = execute(plan, tmp / "results", executor="debug")
    return tmp / "results" / "claims_tiny", raw, spec, plan, summary


def test_claims_spec_asks_every_question(monkeypatch):
    """The shipped spec: 3 training x 2 sampling seeds, each component ablated alone, both sources, MAUVE at n = 256."""
    monkeypatch.chdir(REPO)
    spec, cells = load_spec("experiments/claims.yaml")
    assert len(cells) == 6 and spec.data.train.endswith("tinystories/train.txt") and spec.sampling.n_samples >= 256
    m = spec.methods
    assert {m["dfm"].source, m["dfm_u"].source} == {"mask", "uniform"}
    assert set(m["fsdfm_seed0"].rules) == {"cumulative_scalar", "euler", "mixture_euler"}
    ablated = {
        (k, v)
        for name, mm in m.items()
        if name.startswith("fsdfm_") and name not in ("fsdfm_seed0", "fsdfm_u")
        for k, v in mm.distill.items()
        if m["fsdfm_seed0"].distill.get(k) != v
    }
    assert ablated == {
        ("h_distribution", "fixed:8"),
        ("shortcut", "heun"),
        ("shortcut", "none"),
        ("shortcut", "frozen_dfm"),
        ("h_distribution", "uniform"),
        ("h_distribution", "annealed"),
        ("anchor_weight", "G/h"),
    }
    assert {"mauve", "rep_n", "distinct_4", "self_bleu", "entropy_nats"} <= set(spec.metrics.names)
    assert spec.metrics.pos_divergence is not None
    plan = plan_study(spec.name, cells)
    kinds = [s.kind for s in plan.stages.values()]
    # one teacher per training seed + the uniform one; the ablations share the seed-0 teacher
    assert kinds.count("train_dfm") == 4 and kinds.count("distil_fsdfm") == 3 + 7 + 1


@pytest.mark.slow
def test_tiny_claims_study_runs_to_the_end(claims_study):
    sdir, raw, spec, plan, summary = claims_study
    assert summary.ok, summary.format()
    df = load(sdir)
    assert set(df.method) == set(raw["methods"]) | {"data"}
    runs = df[df.kind.isin(["dfm", "fsdfm"])]
    assert runs.gen_ppl.notna().all() and runs.mauve.notna().all() and (runs.nfe == runs.steps).all()
    assert set(df[df.method == "fsdfm"].seed) == {0, 1} and set(df["sampling.seed"].dropna()) == {0}
    assert set(df[df.method == "fsdfm_seed0"].rule) == {"cumulative_scalar", "euler", "mixture_euler"}
    assert df[df.kind == "pos_divergence"].pos_divergence.notna().all()


ANALYSIS_SCRIPTS = sorted(p.stem for p in (REPO / "analysis").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", ANALYSIS_SCRIPTS)
def test_analysis_script_regenerates_its_artefact_from_records_alone(
    claims_study, tmp_path, capsys, monkeypatch, script
):
    sdir = claims_study[0]
    records_only = tmp_path / sdir.name
    for f in [sdir / "plan.json", *sdir.glob("stages/*/record.json")]:
        (records_only / f.relative_to(sdir)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, records_only / f.relative_to(sdir))
    assert not list(records_only.glob("stages/*/*.pt")) and not list(records_only.glob("stages/*/samples.*"))
    monkeypatch.setattr(sys, "argv", [script, str(records_only), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "analysis" / f"{script}.py"), run_name="__main__")
    assert e.value.code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["study"] == "claims_tiny" and result["skipped"] is None and result["files"], result
    assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in result["files"])
