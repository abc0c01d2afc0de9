"""sampling.forward_precision (issue 28): the bf16-forward check against the sampling noise (known answers and an
independent computation on a real DiT, on CPU, which supports bf16 autocast), and the setting through a study: a
float32 study keeps its stage ids, a bfloat16 one samples under autocast and records it."""

import math
from pathlib import Path

import pytest
import torch

from fsdfm.metrics.forward_precision import (
    check_forward_precision,
    forward_tv,
    sampling_noise_tv,
    total_variation,
)
from fsdfm.model import DiT, model_config
from fsdfm.paths import make_path
from fsdfm.schedulers import PolynomialScheduler


def test_total_variation_known_answers():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    q = torch.full((4,), 0.25, dtype=torch.float64)
    assert float(total_variation(p, q)) == pytest.approx(0.5)
    assert float(total_variation(p, p)) == 0.0
    assert float(total_variation(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == 1.0


def test_sampling_noise_tv_matches_a_simulation():
    """The normal approximation of E TV(p, empirical of n draws) against a Monte Carlo estimate (20,000 multinomial
    draws of n = 400), for a non-uniform p: within 3%; and its closed form for a uniform p over K."""
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    n = 400
    counts = torch.distributions.Multinomial(n, probs=p).sample((20000,))
    simulated = float(total_variation(counts / n, p).mean())
    assert float(sampling_noise_tv(p, n)) == pytest.approx(simulated, rel=0.03)
    K = 8
    uniform = torch.full((K,), 1 / K, dtype=torch.float64)
    expected = 0.5 * K * math.sqrt((1 / K) * (1 - 1 / K)) * math.sqrt(2 / (math.pi * 64))
    assert float(sampling_noise_tv(uniform, 64)) == pytest.approx(expected, rel=1e-12)


def _dit(V=48, L=12, seed=0):
    torch.manual_seed(seed)
    model = DiT(model_config("tiny", V, L, hidden=64, cond_dim=16, n_blocks=2, n_heads=2, input_vocab_size=V + 1))
    with torch.no_grad():  # the zero-initialised output head and modulations redrawn: non-uniform logits
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    return model.eval()


def test_forward_tv_is_the_softmax_difference_and_within_the_logit_bound():
    """forward_tv against an independent computation of the two forwards, and the bound
    TV(softmax(a), softmax(b)) <= (max(b - a) - min(b - a)) / 4 at every position; bf16 changes something."""
    model, V = _dit(), 48
    x = torch.randint(V + 1, (3, 12), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.5, 0.9])
    tv, p = forward_tv(model, x, t, None, torch.bfloat16)
    with torch.no_grad():
        a = model(x, t, None).double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = model(x, t, None).double()
    assert torch.allclose(p, torch.softmax(a, -1))
    assert torch.allclose(tv, 0.5 * (torch.softmax(a, -1) - torch.softmax(b, -1)).abs().sum(-1))
    d = b - a
    assert bool((tv <= (d.amax(-1) - d.amin(-1)) / 4 + 1e-12).all())
    assert float(tv.max()) > 0
    tv32, _ = forward_tv(model, x, t, None, torch.float32)
    assert float(tv32.max()) == 0.0  # float32 against itself: the same forward


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_check_forward_precision_on_a_dit(source):
    """float32 against itself: TV 0, every token equal, safe. bf16: a positive TV, one state per step, safe exactly
    when its largest TV is below the noise floor, the same figures again from the same seed."""
    model, V, L = _dit(), 48, 12
    path = make_path(PolynomialScheduler(1), source, V)
    kw = dict(n_samples=6, seq_len=L, n_steps=4, seed=3)
    same = check_forward_precision(model, path, dtype=torch.float32, **kw)
    assert (same.max_tv, same.mean_tv, same.same_tokens, same.safe, same.n_states) == (0.0, 0.0, 1.0, True, 4)
    bf16 = check_forward_precision(model, path, **kw)
    assert bf16.dtype == "bfloat16" and bf16.n_states == 4 and 0 < bf16.mean_tv <= bf16.max_tv
    assert 0.0 <= bf16.same_tokens <= 1.0 and bf16.safe == (bf16.max_tv < bf16.noise_tv)
    assert check_forward_precision(model, path, **kw) == bf16  # deterministic for a seed
    with pytest.raises(ValueError, match="float32 or torch.bfloat16"):
        check_forward_precision(model, path, dtype=torch.float16, **kw)


REPO = Path(__file__).resolve().parents[1]
STUDY = f"""
name: fp
data: {{kind: text, train: {REPO}/data/tinystories/train.txt, valid: {REPO}/data/tinystories/valid.txt, seq_len: 32}}
methods:
  dfm: {{kind: dfm, rules: [euler], steps: [1, 8]}}
  fs: {{kind: fsdfm, teacher: dfm, steps: [1, 8]}}
"""


def _plan(tmp_path, text):
    from fsdfm.methods import plan_study
    from fsdfm.methods.load import load_spec

    (tmp_path / "s.yaml").write_text(text)
    spec, cells = load_spec(tmp_path / "s.yaml", check_files=False)
    return plan_study(spec.name, cells)


def test_forward_precision_enters_only_the_sample_stages_and_only_when_not_the_default(tmp_path):
    """float32 (the default, written or not) gives the plan of before: no key in any stage, the same ids;
    bfloat16 changes exactly the sample stages and their evaluations; a bad value is refused by name."""
    from fsdfm.study.spec import SpecError

    default = _plan(tmp_path, STUDY)
    written = _plan(tmp_path, STUDY + "sampling: {forward_precision: float32}\n")
    bf16 = _plan(tmp_path, STUDY + "sampling: {forward_precision: bfloat16}\n")
    assert set(default.stages) == set(written.stages)
    assert not any("forward_precision" in s.config for s in default.stages.values())
    changed = {bf16.stages[i].kind for i in set(bf16.stages) - set(default.stages)}
    assert changed == {"sample", "evaluate"}
    samples = [s for s in bf16.stages.values() if s.kind == "sample"]
    assert samples and all(s.config["forward_precision"] == "bfloat16" for s in samples)
    with pytest.raises((SpecError, ValueError), match="forward_precision must be float32 or bfloat16"):
        _plan(tmp_path, STUDY + "sampling: {forward_precision: fp16}\n")


@pytest.mark.parametrize("forward", ["float32", "bfloat16"])
def test_the_sample_stage_records_its_forward_precision(forward, tmp_path):
    """A sample stage with forward_precision bfloat16 runs the DiT under bf16 autocast (its numerics say so: bf16
    logits) and records the setting; without the key it runs and records float32."""
    from fsdfm.data import DataConfig, load_corpus
    from fsdfm.methods.common import save_dit
    from fsdfm.methods.evaluate import sample_stage

    data = {"kind": "oracle", "seq_len": 8, "oracle": {"source": "markov", "vocab_size": 6, "order": 1}}
    corpus = load_corpus(DataConfig(**data), tmp_path / "cache")
    torch.manual_seed(0)
    model = DiT(
        model_config("tiny", corpus.vocab_size, 8, hidden=32, cond_dim=16, n_blocks=1, n_heads=2, input_vocab_size=7)
    )
    save_dit(tmp_path / "model", model, {"source": "mask", "scheduler": {"name": "polynomial", "n": 1.0}}, False)
    cfg = {
        "data": data,
        "sampler": "dfm",
        "rule": "euler",
        "steps": 2,
        "t_end": 1.0,
        "n_samples": 3,
        "batch_size": 3,
        "seed": 0,
        "precision": "float64",
        **({"forward_precision": forward} if forward != "float32" else {}),
    }
    (tmp_path / "stage").mkdir()
    payload = sample_stage(cfg, {"model": str(tmp_path / "model")}, tmp_path / "stage")
    assert payload["forward_precision"] == forward
    assert payload["numerics"]["autocast"] == (forward == "bfloat16")
    assert payload["numerics"]["logits_dtype"] == forward
