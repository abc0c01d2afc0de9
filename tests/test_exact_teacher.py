"""`kind: exact` and `teacher: exact` through specs, stages and the report (oracle data only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
from fsdfm.methods.exact_teacher import ExactTargetObjective
from fsdfm.data.oracle import MarkovSource
from fsdfm.oracle_posterior import ExactPosterior
from fsdfm.paths import make_path
from fsdfm.schedulers import make_scheduler
from fsdfm.study.spec import SpecError
from fsdfm.methods.load import load_spec
from fsdfm.train import StepContext

REPO = Path(__file__).resolve().parents[1]
ORACLE_DATA = """
name: t
data:
  kind: oracle
  seq_len: 8
  oracle: {source: markov, vocab_size: 6, order: 1, support: 2, epsilon: 0.01, seed: 1, n_train: 200, n_valid: 40}
model: {preset: tiny, hidden: 32, cond_dim: 16, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 16, batch_size: 16, seed: 3}
evaluator: {kind: none}
metrics: {names: [oracle_nll, entropy_nats, rep_n]}
"""


class _Fixed(torch.nn.Module):
    """A "network" returning fixed logits f(x_t, t) (one dummy parameter, so an optimiser could hold it)."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.w = fn, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, h=None):
        return self.fn(x_t, t).float() + 0 * self.w


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_exact_targets_loss_is_zero_at_the_exact_posterior(source):
    src = MarkovSource(6, order=1, support=2, seed=1, epsilon=0.01)
    path = make_path(make_scheduler("polynomial", n=1.0), source, 6)
    exact = ExactPosterior(src, path)
    obj = ExactTargetObjective(path, exact, eps=1e-3)
    batch = torch.from_numpy(src.sample(16, 8, seed=0))

    def loss(model):
        return float(obj(StepContext(model, None, batch, torch.Generator().manual_seed(0), 0, 1)))

    assert abs(loss(_Fixed(exact))) < 1e-5
    assert loss(_Fixed(lambda x, t: torch.zeros(*x.shape, 6))) > 0.05


def _spec(tmp_path, methods: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(ORACLE_DATA + "methods:\n" + methods)
    return p


def test_exact_teacher_needs_the_frozen_shortcut_and_the_name_is_reserved(tmp_path):
    with pytest.raises(SpecError, match=r"methods\.s\.distill\.shortcut: .*frozen_dfm"):
        load_spec(_spec(tmp_path, "  s: {kind: fsdfm, teacher: exact, budgets: [2]}\n"))
    with pytest.raises(SpecError, match=r"methods\.exact: the method name 'exact' is reserved"):
        load_spec(_spec(tmp_path, "  exact: {kind: exact, budgets: [2]}\n"))
    with pytest.raises(SpecError, match=r"methods\.s\.teacher: unknown method 'exat' \(did you mean 'exact'"):
        load_spec(_spec(tmp_path, "  s: {kind: fsdfm, teacher: exat, budgets: [2]}\n"))
    with pytest.raises(SpecError, match=r"methods\.a\.teacher: a ar method cannot use teacher 'exact'"):
        load_spec(_spec(tmp_path, "  a: {kind: ar, teacher: exact, budgets: [2]}\n"))


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["16_exact_kind_on_text.yaml", "17_exact_teacher_on_text.yaml"])
def test_exact_on_text_data_exits_2_and_writes_nothing(fixture, tmp_path):
    path = REPO / "tests" / "fixtures" / "bad_specs" / fixture
    key = path.read_text().splitlines()[0].removeprefix("# expect: ").split(":")[0]
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "fsdfm.cli", "--results", str(results), "run", str(path.relative_to(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and "data.kind: oracle" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not results.exists()


STUDY = """
methods:
  ex: {kind: exact, label: exact, rules: [cumulative_scalar], budgets: [1, 8]}
  dfm: {kind: dfm, label: DFM, rules: [cumulative_scalar], train: {steps: 3, batch_size: 8, warmup_steps: 1}, budgets: [1, 8]}
  fs: {kind: fsdfm, label: FS-DFM, teacher: dfm, distill: {K: 3}, train: {steps: 2, batch_size: 8, warmup_steps: 1}, budgets: [8]}
  fs_exact: {kind: fsdfm, label: FS-DFM exact teacher, teacher: exact, distill: {K: 3, shortcut: frozen_dfm},
             train: {steps: 2, batch_size: 8, warmup_steps: 1}, budgets: [8]}
  dfm_exact: {kind: dfm, label: DFM exact targets, teacher: exact, rules: [cumulative_scalar], train: {steps: 2, batch_size: 8, warmup_steps: 1}, budgets: [8]}
"""


@pytest.mark.slow
def test_exact_study_runs_and_the_report_decomposes_the_error(tmp_path):
    from fsdfm.launch import execute
    from fsdfm.methods import plan_study
    from fsdfm.report import write_report
    from fsdfm.report.oracle import decomposition_frame
    from fsdfm.report.summary import load_study
    from fsdfm.records import load

    spec, cells = load_spec(_spec(tmp_path, STUDY.split("methods:\n", 1)[1]))
    plan = plan_study(spec.name, cells)
    kinds = sorted(s.kind for s in plan.stages.values() if s.kind in ("exact_posterior", "train_dfm", "distil_fsdfm"))
    assert kinds == ["distil_fsdfm", "distil_fsdfm", "exact_posterior", "train_dfm", "train_dfm"]  # one exact stage
    summary = execute(plan, tmp_path / "results", executor="debug")
    assert summary.ok, summary.format()
    study_dir = tmp_path / "results" / spec.name
    df = load(study_dir)
    src = MarkovSource(6, order=1, support=2, seed=1, epsilon=0.01)
    expected = src.expected_nll_per_token(8).value
    ex1 = df[(df.method == "ex") & (df.steps == 1)].oracle_nll.item()
    assert ex1 > expected + 0.5  # one step: independent marginals, far above the source's NLL
    # posterior_kl is recorded by every trained model's stage and is positive
    train = [json.loads(p.read_text()) for p in (study_dir / "stages").glob("*/record.json")]
    pkl = [r["payload"]["metrics"]["posterior_kl"] for r in train if r["kind"] in ("train_dfm", "distil_fsdfm")]
    assert len(pkl) == 4 and all(v > 0 for v in pkl)
    frame = decomposition_frame(load_study(study_dir))
    for _, row in frame[frame.kind != "exact"].iterrows():
        model = df[(df.label == row.label) & (df.steps == row.steps)].oracle_nll.mean()
        exact = df[(df.method == "ex") & (df.steps == row.steps)].oracle_nll.item()
        assert row.model_ce_excess == pytest.approx(model - exact, abs=1e-12)
        assert row.exact_ce_excess == pytest.approx(exact - expected, abs=1e-12)
    out = write_report(study_dir)
    index = out.index.read_text()
    assert "Few-step error decomposition" in index and (study_dir / "report" / "fig_decomposition.png").is_file()
    assert "its teacher DFM at 8 steps" in (study_dir / "report" / "table_decomposition.md").read_text()
    assert np.isfinite(frame.ngram_tv_mean).all()
