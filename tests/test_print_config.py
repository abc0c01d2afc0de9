"""`--print-config` prints every default resolved (each method kind's own settings included), and what it prints
plans the very stages of the spec it came from, for every shipped spec whose method kinds differ."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fsdfm.cli import main
from fsdfm.methods import plan_study
from fsdfm.methods.dump import WRITTEN_SETTINGS_KINDS, dump_yaml, resolved_config
from fsdfm.study.grid import resolve_bases
from fsdfm.methods.load import load, load_spec_dict
from fsdfm.methods.base import METHOD_KINDS

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("name", ["methods", "oracle_decomposition", "ablations", "demo"])
def test_every_default_is_resolved_and_the_config_plans_the_same_stages(name):
    r = load(EXPERIMENTS / f"{name}.yaml", check_files=False)
    config = yaml.safe_load(yaml.safe_dump(resolved_config(r.spec, r.raw), sort_keys=False))
    raw_methods = resolve_bases(r.raw["methods"], name)  # as written, base: merged
    for mname, method in r.spec.methods.items():
        kind = METHOD_KINDS.get(method.kind)
        printed = config["methods"][mname]
        assert "base" not in printed and printed["kind"] == method.kind
        # every training setting (OptimConfig), whether the YAML wrote it or not, with the value the run uses
        train = {f.name: _plain(getattr(method.train, f.name)) for f in dataclasses.fields(method.train)}
        if "seed" not in printed["train"]:  # the study's seed (each grid cell's): not frozen into the method
            assert method.train.seed == r.spec.seed
            train.pop("seed")
        assert printed["train"] == train
        assert printed["rules"] == list(method.rules or kind.rules[:1]) and printed["rules"]
        if kind.settings_cls is not None and method.kind in WRITTEN_SETTINGS_KINDS:
            # the mapping as written (the stage id hashes it); the settings in effect are a comment (dump_yaml)
            assert printed.get(kind.settings_key, {}) == dict(method.distill)
        elif kind.settings_cls is not None:
            written = (raw_methods.get(mname) or {}).get(kind.settings_key) or {}
            fields = {f.name: f for f in dataclasses.fields(kind.settings_cls)}
            assert set(printed[kind.settings_key]) == set(fields), (mname, kind.settings_key)
            for key, f in fields.items():  # a setting the YAML left out: the dataclass default
                if key not in written and f.default is not dataclasses.MISSING:
                    assert printed[kind.settings_key][key] == _plain(f.default), (mname, key)
    assert config["sampling"] == {f.name: getattr(r.spec.sampling, f.name) for f in dataclasses.fields(r.spec.sampling)}
    again, cells = load_spec_dict(config, f"printed {name}", check_files=False, spec_dir=EXPERIMENTS)
    assert set(plan_study(name, cells).stages) == set(plan_study(name, r.cells).stages)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def test_cli_print_config_shows_defaults_the_yaml_left_out(tmp_path, capsys):
    assert main(["--results", str(tmp_path), "run", str(EXPERIMENTS / "demo.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    config = yaml.safe_load(out.rsplit("\n", 2)[0])
    assert "every default filled in" in out.splitlines()[0]
    assert config["sampling"]["eps"] == 1e-3  # demo.yaml does not write it
    assert (
        config["methods"]["fsdfm"]["distill"]["shortcut"] == "rk4"
        and "h_embedding" in config["methods"]["fsdfm"]["distill"]
    )
    assert config["methods"]["dfm_1024"]["kind"] == "dfm"  # base: merged


def test_flm_settings_in_effect_are_a_comment_beside_the_mapping_as_written():
    r = load(EXPERIMENTS / "methods.yaml", check_files=False)
    lines = dump_yaml(r.spec, r.raw).splitlines()
    flm = lines[lines.index("  flm:") :]
    distill = next(ln for ln in flm if ln.startswith("    distill:"))
    assert distill.startswith("    distill: {}  # in effect: {tau_max: 1.0, tau_min: 0.0}") or distill.startswith(
        "    distill: {}  # in effect: {tau_min: 0.0, tau_max: 1.0}"
    )
