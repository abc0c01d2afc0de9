"""Loading apple/ml-fs-dfm checkpoints: a tiny state dict in their layout, saved as their training code saves it,
must load into our DiT and give the logits of an independent forward pass written here from their architecture
description (fsdfm/released_checkpoints.py docstring); bad files fail with one clear error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fsdfm.released_checkpoints import (
    CheckpointError,
    CheckpointNotFoundError,
    convert_state_dict,
    infer_config,
    load_released,
)
from fsdfm.model import DiT, released_config, student_from_teacher
from fsdfm.registry import UnknownNameError

REPO = Path(__file__).resolve().parents[1]

V, D, C, N_BLOCKS, N_HEADS, L, B = 50, 32, 16, 2, 4, 12, 3


def their_shapes(V: int, d: int, c: int, n_blocks: int, n_heads: int, dt_conditioned: bool) -> dict[str, tuple]:
    """Names and shapes of their Transformer (uniform source: no mask row), as listed in their model definition."""
    freq = 256  # sinusoidal features of t (and dt)
    shapes = {
        "vocab_embed.weight": (V, d),
        "time_embedding.mlp.0.weight": (c, freq),
        "time_embedding.mlp.0.bias": (c,),
        "time_embedding.mlp.2.weight": (c, c),
        "time_embedding.mlp.2.bias": (c,),
        "rotary_emb.inv_freq": (d // n_heads // 2,),
        "output_layer.norm_final.weight": (d,),
        "output_layer.linear.weight": (V, d),
        "output_layer.linear.bias": (V,),
        "output_layer.adaLN_modulation.weight": (2 * d, c),
        "output_layer.adaLN_modulation.bias": (2 * d,),
    }
    if dt_conditioned:
        shapes.update(
            {
                "dt_embedding.mlp.0.weight": (c, freq),
                "dt_embedding.mlp.0.bias": (c,),
                "dt_embedding.mlp.2.weight": (c, c),
                "dt_embedding.mlp.2.bias": (c,),
                "time_condition_fuser.weight": (2 * c, 2 * c),
                "time_condition_fuser.bias": (2 * c,),
                "output_layer.condition_fuser.weight": (c, 2 * c),
                "output_layer.condition_fuser.bias": (c,),
            }
        )
    for i in range(n_blocks):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (d,),
                p + "norm2.weight": (d,),
                p + "qw.weight": (d, d),
                p + "kw.weight": (d, d),
                p + "vw.weight": (d, d),
                p + "attn_out.weight": (d, d),
                p + "mlp.0.weight": (4 * d, d),
                p + "mlp.0.bias": (4 * d,),
                p + "mlp.2.weight": (d, 4 * d),
                p + "mlp.2.bias": (d,),
                p + "adaLN_modulation.weight": (6 * d, c),
                p + "adaLN_modulation.bias": (6 * d,),
            }
        )
        if dt_conditioned:
            shapes.update({p + "condition_fuser.weight": (c, 2 * c), p + "condition_fuser.bias": (c,)})
    return shapes


def random_their_state_dict(seed: int, dt_conditioned: bool, vocab_size: int = V) -> dict[str, torch.Tensor]:
    """Random weights (adaLN included, so every gate and shift is exercised) in their layout."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in their_shapes(vocab_size, D, C, N_BLOCKS, N_HEADS, dt_conditioned).items():
        if name == "rotary_emb.inv_freq":
            dh = D // N_HEADS
            sd[name] = 1.0 / 10_000.0 ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
        elif "norm" in name:
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            sd[name] = 0.1 * torch.randn(shape, generator=g)
        elif name == "vocab_embed.weight":
            sd[name] = torch.randn(shape, generator=g)
        else:
            sd[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
    return sd


def fake_optimizer_state(sd: dict) -> dict:
    """An AdamW-like state dict: nested containers of tensors and numbers, as torch.optim saves."""
    names = list(sd)[:2]
    return {
        "state": {
            i: {"step": torch.tensor(7.0), "exp_avg": torch.zeros_like(sd[n]), "exp_avg_sq": torch.zeros_like(sd[n])}
            for i, n in enumerate(names)
        },
        "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.95), "weight_decay": 0.03, "params": list(range(len(names)))}],
    }


def reference_logits(
    sd: dict, x_t: torch.Tensor, t: torch.Tensor, dt: torch.Tensor | None, n_heads: int
) -> torch.Tensor:
    """Their forward pass in float64, from the description: sinusoidal(t) -> Linear-SiLU-Linear; DFM c = silu(e_t),
    student c = silu(fuser([e_t; e_dt])) re-projected by silu(Linear) per block and head; pre-norm blocks
    (weight-only LayerNorm, eps 1e-5) with adaLN shift/scale/gate; rotary as a complex rotation of the pairs
    (i, i + d_head/2); softmax attention; tanh-GELU MLP; modulated final norm -> linear."""
    w = {k: v.double() for k, v in sd.items()}
    n_blocks = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))

    def linear(name, y):
        return y @ w[name + ".weight"].T + (w[name + ".bias"] if name + ".bias" in w else 0.0)

    def silu(y):
        return y * torch.sigmoid(y)

    def norm(name, y):
        mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
        return (y - mu) / torch.sqrt(var + 1e-5) * w[name + ".weight"]

    def gelu_tanh(y):
        return 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y**3)))

    def scalar_embedding(name, s):
        k = torch.arange(128, dtype=torch.float64)
        ang = s.double()[:, None] * torch.exp(-math.log(10_000.0) * k / 128)[None]
        return linear(name + ".mlp.2", silu(linear(name + ".mlp.0", torch.cat([ang.cos(), ang.sin()], -1))))

    x = w["vocab_embed.weight"][x_t]
    Bx, Lx, d = x.shape
    dh = d // n_heads
    e_t = scalar_embedding("time_embedding", t)
    if dt is None:
        c = silu(e_t)
    else:
        c = silu(linear("time_condition_fuser", torch.cat([e_t, scalar_embedding("dt_embedding", dt)], -1)))

    def cond(prefix):
        return c if dt is None else silu(linear(prefix + ".condition_fuser", c))

    theta = 10_000.0 ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    phase = torch.polar(
        torch.ones(Lx, dh // 2, dtype=torch.float64), torch.arange(Lx, dtype=torch.float64)[:, None] * theta
    )

    def rotate(y):  # (B, L, H, dh)
        z = torch.complex(y[..., : dh // 2], y[..., dh // 2 :]) * phase[None, :, None]
        return torch.cat([z.real, z.imag], -1)

    for i in range(n_blocks):
        p = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(p + ".adaLN_modulation", cond(p))[:, None].split(d, -1)
        y = norm(p + ".norm1", x) * (1 + scale1) + shift1
        q, k, v = (linear(f"{p}.{n}", y).view(Bx, Lx, n_heads, dh) for n in ("qw", "kw", "vw"))
        att = torch.einsum("bqhd,bkhd->bhqk", rotate(q), rotate(k)) / math.sqrt(dh)
        o = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(Bx, Lx, d)
        x = x + gate1 * linear(p + ".attn_out", o)
        y = norm(p + ".norm2", x) * (1 + scale2) + shift2
        x = x + gate2 * linear(p + ".mlp.2", gelu_tanh(linear(p + ".mlp.0", y)))
    shift, scale = linear("output_layer.adaLN_modulation", cond("output_layer"))[:, None].split(d, -1)
    return linear("output_layer.linear", norm("output_layer.norm_final", x) * (1 + scale) + shift)


@pytest.fixture(scope="module")
def weights():
    return {
        "teacher": random_their_state_dict(1, dt_conditioned=False),
        "student": random_their_state_dict(2, dt_conditioned=True),
        "ema": random_their_state_dict(3, dt_conditioned=True),
    }


@pytest.fixture
def fsdfm_file(tmp_path, weights):
    """Their distillation checkpoint (fs_dfm/logic/state.py layout); the frozen teacher was compiled without DDP,
    so its names carry `_orig_mod.`."""
    path = tmp_path / "checkpoint_step_190000.pth"
    torch.save(
        {
            "step": 190000,
            "train_sampler": {"epoch": 3, "counter": 1234},
            "test_sampler": {"epoch": 0, "counter": 5},
            "teacher_model": {"_orig_mod." + k: v for k, v in weights["teacher"].items()},
            "teacher_optimizer": fake_optimizer_state(weights["teacher"]),
            "student_model": weights["student"],
            "student_optimizer": fake_optimizer_state(weights["student"]),
            "student_ema_model": weights["ema"],
        },
        path,
    )
    return path


@pytest.fixture
def dfm_file(tmp_path, weights):
    """Their pre-training checkpoint (pre_training/logic/state.py layout), names with a DDP `module.` prefix."""
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "model": {"module." + k: v for k, v in weights["teacher"].items()},
            "optimizer": fake_optimizer_state(weights["teacher"]),
            "step": 10,
            "train_sampler": {"epoch": 0},
            "test_sampler": {"epoch": 0},
        },
        path,
    )
    return path


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randint(0, V, (B, L), generator=g)
    t = torch.tensor([0.0, 0.375, 0.875])
    h = torch.tensor([0.125, 0.5, 2.0**-10])
    return x_t, t, h


def assert_matches_reference(model, sd, with_h: bool):
    x_t, t, h = inputs()
    with torch.no_grad():
        ours = model(x_t, t, h if with_h else None)
    ref = reference_logits(sd, x_t, t, h if with_h else None, N_HEADS)
    assert ours.shape == (B, L, V)
    assert ref.abs().max() > 0.5  # non-trivial logits
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


def test_auto_picks_ema_student_and_matches_independent_forward(fsdfm_file, weights):
    loaded = load_released(fsdfm_file)  # which="auto"
    assert loaded.source_key == "student_ema_model" and loaded.h_conditioned
    cfg = loaded.config
    assert (
        cfg.vocab_size,
        cfg.input_vocab_size,
        cfg.hidden,
        cfg.cond_dim,
        cfg.n_blocks,
        cfg.n_heads,
        cfg.mlp_ratio,
    ) == (V, V, D, C, N_BLOCKS, N_HEADS, 4)
    assert (cfg.h_embedding, cfg.h_fusion, cfg.t_scale, cfg.norm_weight, cfg.norm_eps) == (
        "raw",
        "concat",
        1.0,
        True,
        1e-5,
    )
    assert not loaded.model.training
    assert_matches_reference(loaded.model, weights["ema"], with_h=True)


def test_student_and_teacher_entries(fsdfm_file, weights):
    student = load_released(fsdfm_file, which="student")
    assert student.source_key == "student_model" and student.h_conditioned
    assert_matches_reference(student.model, weights["student"], with_h=True)
    teacher = load_released(fsdfm_file, which="teacher")  # `_orig_mod.` names
    assert teacher.source_key == "teacher_model" and not teacher.h_conditioned
    assert teacher.config.h_embedding == "none"
    assert_matches_reference(teacher.model, weights["teacher"], with_h=False)


def test_dfm_checkpoint(dfm_file, weights):
    for which in ("auto", "teacher"):
        loaded = load_released(dfm_file, which=which)  # `module.` names
        assert loaded.source_key == "model" and not loaded.h_conditioned
        assert_matches_reference(loaded.model, weights["teacher"], with_h=False)
    with pytest.raises(CheckpointError, match=r"student_ema_model.*top-level keys: \['model', 'optimizer'"):
        load_released(dfm_file, which="student_ema")
    with pytest.raises(UnknownNameError, match="student_ema"):
        load_released(dfm_file, which="student-ema")


def test_convert_state_dict_fuses_qkv(weights):
    sd = weights["student"]
    ours = convert_state_dict(sd, infer_config(sd))
    assert torch.equal(ours["blocks.1.qkv.weight"], torch.cat([sd[f"blocks.1.{n}.weight"] for n in ("qw", "kw", "vw")]))
    assert torch.equal(ours["cond_fuser_out.weight"], sd["output_layer.condition_fuser.weight"])
    assert set(ours) == set(DiT(infer_config(sd)).state_dict())


def test_released_layout_converts_at_full_size():
    """Every name and shape of the 1.3B layouts maps onto released_config's DiT (meta tensors: no memory)."""
    for kind, dt in (("fsdfm", True), ("dfm", False)):
        cfg = released_config(kind)
        assert (cfg.vocab_size, cfg.seq_len, cfg.hidden, cfg.cond_dim, cfg.n_blocks, cfg.n_heads) == (
            50257,
            1024,
            2048,
            256,
            21,
            32,
        )
        shapes = their_shapes(50257, 2048, 256, 21, 32, dt)
        del shapes["rotary_emb.inv_freq"]  # values cannot be checked on meta; optional in the converter
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        ours = convert_state_dict(sd, cfg)
        assert ours["blocks.20.qkv.weight"].shape == (3 * 2048, 2048)
        with torch.device("meta"):
            n = DiT(cfg).num_parameters()
        assert 1.30e9 < n < 1.36e9
        assert sum(v.numel() for v in sd.values()) == n
        assert infer_config(sd) == cfg


def test_wrong_shape_lists_name_expected_and_got(tmp_path, weights):
    sd = dict(weights["student"])
    sd["blocks.1.mlp.0.weight"] = torch.zeros(100, D)
    path = tmp_path / "bad.pth"
    torch.save({"student_ema_model": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_released(path)
    msg = str(err.value)
    assert str(path) in msg and "student_ema_model" in msg
    assert "blocks.1.mlp.0.weight: wrong shape, expected (128, 32), got (100, 32)" in msg
    assert [(m.name, m.kind) for m in err.value.mismatches] == [("blocks.1.mlp.0.weight", "wrong shape")]


def test_missing_and_unexpected_keys_listed(tmp_path, weights):
    sd = dict(weights["teacher"])
    del sd["blocks.0.kw.weight"], sd["output_layer.linear.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3, 4)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd, "step": 1}, path)
    with pytest.raises(CheckpointError) as err:
        load_released(path)
    msg = str(err.value)
    assert "3 mismatches (2 missing, 1 unexpected)" in msg
    assert "blocks.0.kw.weight: missing, expected (32, 32), got absent" in msg
    assert "output_layer.linear.bias: missing, expected (50,), got absent" in msg
    assert "blocks.0.extra.weight: unexpected, expected absent, got (3, 4)" in msg


def test_explicit_config_mismatch_lists_first_few(fsdfm_file):
    with pytest.raises(CheckpointError) as err:
        load_released(fsdfm_file, config=released_config("fsdfm"))
    msg = str(err.value)
    assert "vocab_embed.weight: wrong shape, expected (50257, 2048), got (50, 32)" in msg
    assert "... and" in msg and len(err.value.mismatches) > 8
    assert msg.count("\n  ") == 9  # eight listed + the "... and N more" line


def test_rotary_frequencies_checked(tmp_path, weights):
    sd = dict(weights["teacher"])
    sd["rotary_emb.inv_freq"] = sd["rotary_emb.inv_freq"] * 2
    path = tmp_path / "rot.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"rotary_emb\.inv_freq: wrong value"):
        load_released(path)


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return "ran"


class _Payload:
    """An arbitrary object whose unpickling would run code."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_weights_only_refuses_arbitrary_objects(tmp_path, weights):
    path = tmp_path / "evil.pth"
    torch.save({"model": weights["teacher"], "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True.*refused.*_record_unpickling"):
        load_released(path)
    assert not _UNPICKLED


def test_unreadable_and_unknown_layouts(tmp_path, weights):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint file at"):
        load_released(tmp_path / "absent.pth")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_released(garbage)
    odd = tmp_path / "odd.pth"
    torch.save({"weights": weights["teacher"], "step": 3}, odd)
    with pytest.raises(CheckpointError, match=r"top-level keys: \['weights', 'step'\]"):
        load_released(odd)
    bare = tmp_path / "bare.pth"
    torch.save(torch.zeros(3), bare)
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        load_released(bare)


def test_loaded_teacher_gives_a_student_in_their_layout(dfm_file, weights):
    """student_from_teacher on a loaded DFM adds the concat h path: the student layout of their code."""
    teacher = load_released(dfm_file).model
    student = student_from_teacher(teacher, h_embedding="raw")
    ours_student = convert_state_dict(weights["student"], infer_config(weights["student"]))
    assert {k: v.shape for k, v in student.state_dict().items()} == {k: v.shape for k, v in ours_student.items()}
    x_t, t, h = inputs()
    assert student(x_t, t, h).shape == (B, L, V)
    with pytest.raises(ValueError, match="pass h"):
        student(x_t, t)


# ------------------------------------------------------------------- experiments/released.yaml, end to end


def _fake_hub_cache(root: Path, repo: str) -> Path:
    """A local HF hub cache holding only `repo`'s config.json (what a spec load checks offline)."""
    snap = root / f"models--{repo}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (root / f"models--{repo}" / "refs").mkdir()
    (root / f"models--{repo}" / "refs" / "main").write_text("0" * 40)
    return root


def test_released_spec_validates_and_dry_runs_offline(monkeypatch, capsys, tmp_path):
    """The shipped spec: both checkpoints at every budget 1..1,024, every sample metric, both conventions
    (gpt2-large stands in a fake local hub cache: the spec load checks the evaluator is there offline)."""
    import huggingface_hub.constants

    from fsdfm.cli import main
    from fsdfm.methods import plan_study
    from fsdfm.methods.load import load_spec

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_fake_hub_cache(tmp_path / "hub", "gpt2-large")))
    monkeypatch.chdir(REPO)
    spec, cells = load_spec("experiments/released.yaml")
    plan = plan_study(spec.name, cells)
    budgets = [2**k for k in range(11)]
    for name, rules in (("dfm_released", ["euler", "cumulative_scalar"]), ("fsdfm_released", ["cumulative_scalar"])):
        m = spec.methods[name]
        assert m.kind == "released" and list(m.budgets) == budgets and list(m.rules) == rules and m.source == "uniform"
    assert {
        "gen_ppl",
        "gen_ppl_seq_mean",
        "entropy_nats",
        "entropy_bits",
        "mauve",
        "self_bleu",
        "rep_n",
        "distinct_1",
        "distinct_4",
    } <= set(spec.metrics.names)
    assert spec.evaluator.name == "gpt2-large" and spec.data.hf_name == "wikitext-103"
    kinds = sorted(s.kind for s in plan.stages.values())
    assert "train_dfm" not in kinds and "distil_fsdfm" not in kinds and kinds.count("load_released") == 2
    assert kinds.count("evaluate") == 3 * 11
    assert main(["run", "experiments/released.yaml", "--dry-run"]) == 0
    assert '"dry_run": true' in capsys.readouterr().out.strip().splitlines()[-1]


def test_released_spec_rejects_bad_checkpoint_settings(tmp_path):
    from fsdfm.study.spec import SpecError
    from fsdfm.methods.load import load_spec

    base = (REPO / "experiments" / "released.yaml").read_text()
    cases = {
        "which: teacher}": ("which: techer}", "did you mean 'teacher'"),
        "checkpoint: {path: ../checkpoints/released/dfm_1p3b.pth, which: teacher}": (
            "checkpoint: {pth: x.pth}",
            "unknown key 'methods.dfm_released.checkpoint.pth'",
        ),
    }
    for old, (new, message) in cases.items():
        p = tmp_path / "bad.yaml"
        p.write_text(base.replace(old, new, 1))
        with pytest.raises(SpecError, match=message):
            load_spec(p)
    p.write_text(base.replace("    checkpoint: {path: ../checkpoints/released/dfm_1p3b.pth, which: teacher}\n", "", 1))
    with pytest.raises(SpecError, match="dfm_released.checkpoint: a released method needs"):
        load_spec(p)
    p.write_text(base.replace("kind: released", "kind: dfm", 1))
    with pytest.raises(SpecError, match="dfm_released.checkpoint: only a method of kind released reads a checkpoint"):
        load_spec(p)


TINY_V_BUDGETS = [1, 4]


@pytest.fixture(scope="module")
def released_study(tmp_path_factory):
    """A tiny copy of experiments/released.yaml: the same methods, rules and metric names; synthetic checkpoints
    in the official layouts at d = 32 over the GPT-2 vocabulary, TinyStories blocks of 16 tokens, a tiny local
    GPT-2 as the Hugging Face evaluator, budgets 1 and 4."""
    import yaml

    from fsdfm.launch import execute
    from fsdfm.methods import plan_study
    from fsdfm.methods.load import load_spec
    from metrics_fixtures import shrink_released_spec

    tmp = tmp_path_factory.mktemp("released")
    vocab = 50257
    teacher = random_their_state_dict(11, dt_conditioned=False, vocab_size=vocab)
    torch.save({"model": {"module." + k: v for k, v in teacher.items()}, "step": 1}, tmp / "dfm.pth")
    torch.save(
        {
            "step": 1,
            "teacher_model": teacher,
            "student_model": random_their_state_dict(12, True, vocab),
            "student_ema_model": random_their_state_dict(13, True, vocab),
        },
        tmp / "fs_dfm.pth",
    )
    raw = yaml.safe_load((REPO / "experiments" / "released.yaml").read_text())
    shrink_released_spec(raw, tmp, "released_tiny")
    raw["methods"]["dfm_released"]["checkpoint"]["path"] = str(tmp / "dfm.pth")
    raw["methods"]["fsdfm_released"]["checkpoint"]["path"] = str(tmp / "fs_dfm.pth")
    for m in raw["methods"].values():
        m["budgets"] = TINY_V_BUDGETS
    raw["metrics"]["pos_divergence"] = {
        "n_states": 2,
        "n_rollouts": 2,
        "t_start": 0.5,
        "teacher_steps": 8,
        "student_steps": [2],
    }
    spec_path = tmp / "released_tiny.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec, cells = load_spec(spec_path)
    summary = execute(plan_study(spec.name, cells), tmp / "results", executor="debug")
    return tmp, spec, summary, raw


@pytest.mark.slow
def test_released_study_records_every_metric_for_every_budget(released_study):
    from fsdfm.records import load

    tmp, spec, summary, raw = released_study
    assert summary.ok, summary.format()
    df = load(tmp / "results" / "released_tiny")
    runs = df[df.kind == "released"]
    expected = {("dfm_released", r, s) for r in ("euler", "cumulative_scalar") for s in TINY_V_BUDGETS} | {
        ("fsdfm_released", "cumulative_scalar", s) for s in TINY_V_BUDGETS
    }
    assert set(zip(runs.method, runs.rule, runs.steps)) == expected and len(runs) == len(expected)
    for name in list(spec.metrics.names) + ["nfe", "wall_s", "tokens_per_s"]:
        assert runs[name].notna().all(), name
    assert (runs.nfe == runs.steps).all() and (runs.n_samples == 4).all()
    assert (runs.gen_ppl > 1).all() and (runs.gen_ppl_seq_mean > 1).all()
    assert runs.mauve.between(0, 1).all()
    assert df[df.kind == "data"].gen_ppl.notna().all()
    assert df[df.kind == "pos_divergence"].pos_divergence.notna().all()


@pytest.mark.slow
def test_released_study_samples_the_checkpoint_weights(released_study):
    """The pointer stage loads the file itself: its model gives the independent reference forward's logits."""
    from fsdfm.methods.common import load_dit
    from fsdfm.records import load_records

    tmp, spec, summary, raw = released_study
    recs = {
        r["payload"]["checkpoint"]["which"]: r
        for r in load_records(tmp / "results" / "released_tiny", kind="load_released")
    }
    assert set(recs) == {"teacher", "student_ema"}
    ema = torch.load(tmp / "fs_dfm.pth", weights_only=True)["student_ema_model"]
    m = load_dit(Path(recs["student_ema"]["stage_dir"]), torch.device("cpu"))
    assert m.h_conditioned and m.path.source.name == "uniform"
    x_t = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    t, h = torch.tensor([0.25, 0.5]), torch.tensor([0.5, 0.125])
    with torch.no_grad():
        torch.testing.assert_close(
            m.model(x_t, t, h).double(), reference_logits(ema, x_t, t, h, N_HEADS), atol=1e-4, rtol=1e-4
        )
    teacher = load_dit(Path(recs["teacher"]["stage_dir"]), torch.device("cpu"))
    assert not teacher.h_conditioned
