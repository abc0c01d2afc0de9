"""Progress bars (fsdfm/progress.py): drawn on a terminal only (or when FSDFM_PROGRESS=1), never changing a result."""

from __future__ import annotations

import torch

from fsdfm.metrics import compute_metrics
from fsdfm.paths import MaskSource, MixturePath
from fsdfm.samplers import sample
from fsdfm.schedulers import PolynomialScheduler

V = 6


def model(x_t, t, h):
    """Fixed logits: p_1t is the same over positions and times (a sampler needs nothing more)."""
    return torch.arange(V, dtype=torch.float32).expand(*x_t.shape, V).clone()


def draw(n_steps: int = 5):
    path = MixturePath(PolynomialScheduler(1.0), MaskSource(V))
    return sample(
        model, path, n_samples=3, seq_len=4, n_steps=n_steps, batch_size=2, generator=torch.Generator().manual_seed(0)
    ).tokens


def test_sampling_and_metrics_draw_bars_only_when_asked_and_results_do_not_change(monkeypatch, capsys):
    monkeypatch.delenv("FSDFM_PROGRESS", raising=False)
    quiet = draw()  # stderr is captured here, not a terminal: no bar
    ids = torch.tensor([[0, 1, 2, 3], [1, 1, 2, 2]])
    quiet_metrics = compute_metrics(ids, None, ["entropy_nats", "distinct_1"])
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("FSDFM_PROGRESS", "1")
    loud = draw()
    err = capsys.readouterr().err
    assert "sample cumulative_scalar x 5 steps" in err and "/10 " in err  # 2 batches x 5 steps
    assert torch.equal(loud, quiet)
    assert compute_metrics(ids, None, ["entropy_nats", "distinct_1"]) == quiet_metrics
    assert "metrics of 2 samples" in capsys.readouterr().err
    monkeypatch.setenv("FSDFM_PROGRESS", "0")
    draw()
    assert capsys.readouterr().err == ""
