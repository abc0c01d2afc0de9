"""Bring your own exact source (`markov_file`, `hmm_file`): the same chain as a built-in source when written to
.npy files, and one clear message per defect, at spec load."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from fsdfm.cli import main
from fsdfm.data.oracle import HMMFileSource, HMMSource, MarkovFileSource, MarkovSource
from fsdfm.oracle_posterior import posterior


def _markov_files(tmp: Path, order: int = 2, V: int = 3) -> tuple[MarkovSource, Path, Path]:
    src = MarkovSource(V, order=order, support=2, seed=4, epsilon=0.05)
    T = src.next_token_probs(np.arange(src.n_contexts))  # (V^k, V) dense P(x | c)
    np.save(tmp / "P.npy", T)
    np.save(tmp / "pi.npy", src.stationary)
    return src, tmp / "P.npy", tmp / "pi.npy"


def test_a_chain_written_to_files_is_the_same_source(tmp_path):
    src, P, pi = _markov_files(tmp_path)
    x = src.sample(50, 9, seed=1)
    for mine in (MarkovFileSource(str(P), str(pi)), MarkovFileSource(str(P))):  # initial given / computed
        assert mine.order == 2 and mine.vocab_size == 3
        np.testing.assert_allclose(mine.log_prob(x), src.log_prob(x), rtol=1e-10)
        assert float(mine.expected_nll_per_token(9)) == pytest.approx(float(src.expected_nll_per_token(9)))
    # the (V,) * (k + 1) layout: the same chain
    np.save(tmp_path / "P3.npy", np.load(P).reshape(3, 3, 3))
    np.testing.assert_allclose(MarkovFileSource(str(tmp_path / "P3.npy")).log_prob(x), src.log_prob(x), rtol=1e-10)
    # the exact posterior runs on it unchanged
    import torch

    x_t = torch.tensor([[3, 1, 3, 3, 0]])
    a = posterior(src, x_t, torch.tensor(0.5), "mask").probs
    b = posterior(MarkovFileSource(str(P)), x_t, torch.tensor(0.5), "mask").probs
    assert torch.allclose(a, b, atol=1e-10)


def test_an_hmm_written_to_files_is_the_same_source(tmp_path):
    src = HMMSource(5, n_states=3, seed=2, emission_support=2)
    np.save(tmp_path / "A.npy", src.transition)
    np.save(tmp_path / "B.npy", src.emission)
    mine = HMMFileSource(str(tmp_path / "A.npy"), str(tmp_path / "B.npy"))
    x = src.sample(40, 8, seed=3)
    np.testing.assert_allclose(mine.log_prob(x), src.log_prob(x), rtol=1e-9)


def _defect(tmp: Path, name: str):
    """(oracle section, the words the one message must contain) for each defect."""
    V = 3
    good = np.full((V, V), 1.0 / V)
    cases = {
        "row_sum": (good * np.array([[1.0], [0.9], [1.0]]), "row 1 sums to 0.9"),
        "negative": (np.array([[1.2, -0.2, 0.0], *good[1:]]), "negative entry"),
        "not_power": (np.full((5, 3), 1 / 3), "not a power"),
        "ragged_axes": (np.full((3, 2, 3), 1 / 3), "every axis"),
        "nan": (np.array([[np.nan, 0.5, 0.5], *good[1:]]), "non-finite"),
    }
    if name == "initial_not_stationary":
        P = np.array([[0.9, 0.1, 0.0], [0.0, 0.9, 0.1], [0.1, 0.0, 0.9]])
        np.save(tmp / "P.npy", P)
        np.save(tmp / "pi.npy", np.array([0.5, 0.5, 0.0]))
        return {"source": "markov_file", "transition": "P.npy", "initial": "pi.npy"}, "not the chain's stationary"
    if name == "missing":
        return {"source": "markov_file", "transition": "nowhere.npy"}, "file not found"
    if name == "hmm_shape":
        np.save(tmp / "A.npy", np.full((2, 2), 0.5))
        np.save(tmp / "B.npy", np.full((3, 4), 0.25))
        return {"source": "hmm_file", "transition": "A.npy", "emission": "B.npy"}, "expected (S, V) with S = 2"
    table, words = cases[name]
    np.save(tmp / "P.npy", table)
    return {"source": "markov_file", "transition": "P.npy"}, words


@pytest.mark.parametrize(
    "name",
    ["row_sum", "negative", "not_power", "ragged_axes", "nan", "initial_not_stationary", "missing", "hmm_shape"],
)
def test_each_defect_is_one_message_at_spec_load(name, tmp_path, monkeypatch, capsys):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    oracle, words = _defect(spec_dir, name)
    spec = {
        "name": "byo",
        "data": {"kind": "oracle", "seq_len": 8, "oracle": {**oracle, "n_train": 64, "n_valid": 32}},
        "model": {"preset": "tiny", "hidden": 32, "n_blocks": 1, "n_heads": 2, "cond_dim": 16},
        "evaluator": {"kind": "none"},
        "methods": {"exact_m": {"kind": "exact", "source": "mask", "budgets": [2]}},
        "metrics": {"names": ["oracle_nll"]},
    }
    path = spec_dir / "byo.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)  # paths resolve against the spec's folder, not the working directory
    rc = main(["--results", str(tmp_path / "results"), "run", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(path) in err and words in err, err
    assert not (tmp_path / "results").exists()


def test_a_good_file_source_plans_and_its_files_enter_the_stage_ids(tmp_path, monkeypatch, capsys):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    _markov_files(spec_dir, order=1, V=4)
    spec = {
        "name": "byo",
        "data": {"kind": "oracle", "seq_len": 8, "oracle": {"source": "markov_file", "transition": "P.npy"}},
        "evaluator": {"kind": "none"},
        "methods": {"exact_m": {"kind": "exact", "source": "mask", "budgets": [2]}},
        "metrics": {"names": ["oracle_nll"]},
    }
    path = spec_dir / "byo.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)

    def ids() -> str:
        assert main(["--results", str(tmp_path / "results"), "run", str(path), "--dry-run"]) == 0
        return capsys.readouterr().out

    first = ids()
    P = np.load(spec_dir / "P.npy")
    np.save(spec_dir / "P.npy", P[::-1].copy())  # another chain: rows permuted
    assert ids() != first
