"""Dotted overrides (fsdfm.study.load.apply_overrides): applied before validation, so an overridden dict is the YAML that
says the same; a bad override is one SpecError naming it."""

from __future__ import annotations

import pytest
import yaml

from fsdfm.methods import plan_study
from fsdfm.study.spec import SpecError
from fsdfm.methods.load import load_spec, load_spec_dict
from fsdfm.study.load import apply_overrides

RAW = {
    "name": "tiny",
    "data": {"kind": "oracle", "seq_len": 8, "oracle": {"source": "markov", "vocab_size": 8, "order": 1, "support": 2}},
    "evaluator": {"kind": "none"},
    "metrics": {"names": ["oracle_nll"]},
    "methods": {
        "dfm": {"kind": "dfm", "budgets": [1]},
        "fs": {"kind": "fsdfm", "teacher": "dfm", "distill": {"K": 3}, "budgets": [1]},
    },
}


def test_overrides_write_dotted_keys_into_a_copy():
    out = apply_overrides(RAW, {"seed": 3, "methods.fs.distill.K": 2, "sampling.seed": 5}, "f")
    assert out["seed"] == 3 and out["methods"]["fs"]["distill"] == {"K": 2} and out["sampling"] == {"seed": 5}
    assert "seed" not in RAW and RAW["methods"]["fs"]["distill"] == {"K": 3}  # the input is not changed
    assert apply_overrides(RAW, None, "f") == RAW
    # under grid the rest of the key is one grid key (grid keys are dotted names themselves)
    assert apply_overrides(RAW, {"grid.sampling.seed": [0, 1]}, "f")["grid"] == {"sampling.seed": [0, 1]}


def test_an_overridden_dict_plans_exactly_as_the_yaml_that_says_it(tmp_path):
    yaml_raw = apply_overrides(RAW, {}, "f")
    yaml_raw["methods"]["fs"]["distill"]["K"] = 2
    yaml_raw["grid"] = {"sampling.seed": [0, 1]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(yaml_raw))
    spec, cells = load_spec(tmp_path / "s.yaml")
    spec2, cells2 = load_spec_dict(RAW, "nb", overrides={"methods.fs.distill.K": 2, "grid.sampling.seed": [0, 1]})
    a, b = plan_study(spec.name, cells), plan_study(spec2.name, cells2)
    assert sorted(a.stages) == sorted(b.stages) and [r.run_id for r in a.runs] == [r.run_id for r in b.runs]
    # and the override changed exactly the ids that depend on it: the teacher's training is shared
    base = plan_study("tiny", load_spec_dict(RAW, "nb", overrides={"grid": {"sampling.seed": [0, 1]}})[1])
    changed = set(b.stages) ^ set(base.stages)
    assert not any(s.startswith("train_dfm-") for s in changed)
    assert any(s.startswith("distil_fsdfm-") for s in changed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"methods.fs.distil.K": 2},
            r"override methods\.fs\.distil\.K=2: unknown key methods\.fs\.distil "
            r"\(did you mean 'distill'\?\)",
        ),
        ({"sampling.seed": 1.5}, r"sampling\.seed: expected int.*\(set by override sampling\.seed=1\.5\)"),
        ({"seed": -1}, r"seed: a seed is an integer.*\(set by override seed=-1\)"),
        ({"name.x": 1}, r"override name\.x=1: name is 'tiny', not a mapping"),
        ({"a..b": 1}, r"override a\.\.b=1: a key is a dotted spec key"),
    ],
)
def test_a_bad_override_is_one_spec_error_naming_the_override(overrides, message):
    with pytest.raises(SpecError, match=message) as e:
        load_spec_dict(RAW, "nb.yaml", overrides=overrides)
    assert str(e.value).startswith("nb.yaml: ")


def test_a_dict_spec_is_validated_like_a_file():
    with pytest.raises(SpecError, match=r"<spec dict>: unknown key 'methods\.dfm\.stpes'"):
        load_spec_dict({**RAW, "methods": {"dfm": {"kind": "dfm", "stpes": [1]}}})
    with pytest.raises(SpecError, match="a spec must be a mapping"):
        load_spec_dict(["not", "a", "mapping"])
