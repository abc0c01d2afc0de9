"""The MDLM-family released checkpoints (MDLM OWT, SDTT students, Duo / DCD): synthetic state dicts in the exact
public key layouts (HF model.safetensors, Lightning {"state_dict", "ema"}) load into our DiT, which then computes
an independently written forward of *their* architecture (below, from the facts in fsdfm/released_mdlm.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fsdfm.released_checkpoints import CheckpointError, CheckpointNotFoundError
from fsdfm.released_mdlm import DUO_EPS, load_mdlm_family, mdlm_config, their_parameter_order

REPO = Path(__file__).resolve().parents[1]
V, D, C, N_BLOCKS, N_HEADS, L = 40, 32, 16, 2, 4, 12


def their_state_dict(seed: int, rows: int, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """Random weights under their names and shapes (MDLM `models/dit.py` = SDTT `dit_orig.py` = Duo `models/dit.py`)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.12):
        return torch.randn(*shape, generator=g) * scale

    d_head = D // N_HEADS
    sd = {
        "vocab_embed.embedding": r(rows, D, scale=1.0),
        "sigma_map.mlp.0.weight": r(C, 256),
        "sigma_map.mlp.0.bias": r(C),
        "sigma_map.mlp.2.weight": r(C, C),
        "sigma_map.mlp.2.bias": r(C),
        "rotary_emb.inv_freq": 1.0 / 10_000 ** (torch.arange(0, d_head, 2).float() / d_head),
        "output_layer.norm_final.weight": 1 + r(D),
        "output_layer.linear.weight": r(rows, D),
        "output_layer.linear.bias": r(rows),
        "output_layer.adaLN_modulation.weight": r(2 * D, C),
        "output_layer.adaLN_modulation.bias": r(2 * D),
    }
    for i in range(N_BLOCKS):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": 1 + r(D),
            b + "attn_qkv.weight": r(3 * D, D),
            b + "attn_out.weight": r(D, D),
            b + "norm2.weight": 1 + r(D),
            b + "mlp.0.weight": r(4 * D, D),
            b + "mlp.0.bias": r(4 * D),
            b + "mlp.2.weight": r(D, 4 * D),
            b + "mlp.2.bias": r(D),
            b + "adaLN_modulation.weight": r(6 * D, C),
            b + "adaLN_modulation.bias": r(6 * D),
        }
    return {prefix + k: v for k, v in sd.items()}


def their_forward(sd: dict, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Their DIT.forward in plain float64 torch, written from their code's description: (B, L) ids, (B,) sigma ->
    (B, L, V_in) logits (every row, mask / [PAD] included)."""
    w = {k.removeprefix("backbone."): v.double() for k, v in sd.items()}
    B, n = x.shape
    half = 128
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float64) / half)
    emb = torch.cat([torch.cos(sigma.double()[:, None] * freqs), torch.sin(sigma.double()[:, None] * freqs)], -1)
    c = F.silu(F.linear(F.silu(F.linear(emb, w["sigma_map.mlp.0.weight"], w["sigma_map.mlp.0.bias"])),
                        w["sigma_map.mlp.2.weight"], w["sigma_map.mlp.2.bias"]))  # fmt: skip
    ang = torch.arange(n, dtype=torch.float64)[:, None] * w["rotary_emb.inv_freq"][None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(u):  # flash-attn non-interleaved: rotate_half
        u1, u2 = u.chunk(2, -1)
        return u * cos + torch.cat([-u2, u1], -1) * sin

    def norm(u, weight):
        return F.layer_norm(u, (D,), eps=1e-5) * weight

    h = w["vocab_embed.embedding"][x]
    for i in range(N_BLOCKS):
        p = lambda k: w[f"blocks.{i}.{k}"]  # noqa: E731
        mods = F.linear(c, p("adaLN_modulation.weight"), p("adaLN_modulation.bias"))[:, None].chunk(6, -1)
        y = norm(h, p("norm1.weight")) * (1 + mods[1]) + mods[0]
        qkv = (y @ p("attn_qkv.weight").T).view(B, n, 3, N_HEADS, D // N_HEADS)  # 'b s (three h d)'
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax(rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(D // N_HEADS), -1) @ v
        h = h + mods[2] * (att.transpose(1, 2).reshape(B, n, D) @ p("attn_out.weight").T)
        y = norm(h, p("norm2.weight")) * (1 + mods[4]) + mods[3]
        mlp = F.linear(F.gelu(F.linear(y, p("mlp.0.weight"), p("mlp.0.bias")), approximate="tanh"),
                       p("mlp.2.weight"), p("mlp.2.bias"))  # fmt: skip
        h = h + mods[5] * mlp
    shift, scale = F.linear(c, w["output_layer.adaLN_modulation.weight"], w["output_layer.adaLN_modulation.bias"])[
        :, None
    ].chunk(2, -1)
    y = norm(h, w["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return F.linear(y, w["output_layer.linear.weight"], w["output_layer.linear.bias"])


def save_hf(tmp: Path, sd: dict, time_conditioning: bool | None) -> Path:
    path = tmp / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    if time_conditioning is not None:  # the HF layout's config.json (kuleshov-group/mdlm-owt: hidden_dim, ...)
        cfg = {"vocab_size": V + 1, "hidden_dim": D, "cond_dim": C, "n_blocks": N_BLOCKS, "n_heads": N_HEADS}
        (tmp / "config.json").write_text(json.dumps({**cfg, "time_conditioning": time_conditioning}))
    return path


def save_lightning(tmp: Path, sd: dict, ema_sd: dict | None, name: str = "last.ckpt") -> Path:
    """A Lightning-style checkpoint reduced to what torch.load(weights_only=True) reads: state_dict and EMA."""
    box = {"epoch": 3, "global_step": 1000, "state_dict": sd}
    if ema_sd is not None:
        bare = {k.split("backbone.")[-1]: v for k, v in ema_sd.items()}
        cfg = mdlm_config(vocab_size=V, input_vocab_size=bare["vocab_embed.embedding"].shape[0], hidden=D,
                          cond_dim=C, n_blocks=N_BLOCKS, n_heads=N_HEADS, seq_len=L)  # fmt: skip
        box["ema"] = {
            "decay": 0.9999,
            "num_updates": 1000,
            "shadow_params": [bare[k] for k in their_parameter_order(cfg)],
        }
    torch.save(box, tmp / name)
    return tmp / name


def mdlm_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (3, L), generator=g)
    x[torch.rand(3, L, generator=g) < 0.5] = V  # masked positions hold the mask id V (their mask_index)
    return x, torch.tensor([0.1, 0.5, 0.95])


# --------------------------------------------------------------------------------------------- MDLM / SDTT


@pytest.mark.parametrize("layout", ["hf", "lightning_ema", "sdtt_hf_teacher"])
def test_mdlm_family_matches_their_forward(tmp_path, layout):
    """MDLM OWT (HF safetensors), a Lightning file with EMA, an SDTT student state dict distilled from the HF teacher
    (`backbone.backbone.`): our logits equal their SUBS forward at sigma = 0 (time_conditioning False) on the V real
    tokens, at any t."""
    sd = their_state_dict(1, V + 1)
    if layout == "hf":
        path, weights = save_hf(tmp_path, sd, time_conditioning=False), sd
    elif layout == "lightning_ema":
        ema = their_state_dict(2, V + 1)
        path, weights = save_lightning(tmp_path, sd, ema), ema
    else:
        path, weights = save_lightning(tmp_path, {"backbone." + k: v for k, v in sd.items()}, None), sd
    loaded = load_mdlm_family(path, "mdlm")
    assert loaded.source_key == ("ema" if layout == "lightning_ema" else "weights")
    assert (loaded.config.vocab_size, loaded.config.input_vocab_size, loaded.config.n_heads) == (V, V + 1, N_HEADS)
    x, t = mdlm_inputs()
    with torch.no_grad():
        ours = loaded.model(x, t).double()
    theirs = their_forward(weights, x, torch.zeros(3))
    assert ours.shape == (3, L, V)  # the mask column is gone
    torch.testing.assert_close(ours, theirs[..., :V], atol=1e-5, rtol=1e-5)
    # SUBS: their mask logit gets -1e6 before the softmax: the same distribution over the V tokens as ours
    subs = theirs.clone()
    subs[..., V] -= 1e6
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(subs, -1)[..., :V], atol=1e-5, rtol=1e-4)


def test_lightning_which_selects_weights_or_ema(tmp_path):
    sd, ema = their_state_dict(1, V + 1), their_state_dict(2, V + 1)
    path = save_lightning(tmp_path, sd, ema)
    x, t = mdlm_inputs(1)
    for which, ref in (("weights", sd), ("ema", ema), ("auto", ema)):
        with torch.no_grad():
            ours = load_mdlm_family(path, "mdlm", which).model(x, t).double()
        torch.testing.assert_close(ours, their_forward(ref, x, torch.zeros(3))[..., :V], atol=1e-5, rtol=1e-5)
    no_ema = save_lightning(tmp_path, sd, None, "plain.ckpt")
    with pytest.raises(CheckpointError, match="which='ema', but the file holds no 'ema'"):
        load_mdlm_family(no_ema, "mdlm", "ema")


def test_mask_token_is_never_drawn(tmp_path):
    """Their mask row has a huge bias (a model that would love to predict the mask): sampled with the suite's mask
    source, every position of the output is a real token, and positions revealed are never changed again."""
    from fsdfm.paths import make_path
    from fsdfm.samplers import sample, time_grid
    from fsdfm.schedulers import make_scheduler

    sd = their_state_dict(3, V + 1)
    sd["backbone.output_layer.linear.bias"][V] = 1e4
    model = load_mdlm_family(save_hf(tmp_path, sd, None), "mdlm").model
    path = make_path(make_scheduler("polynomial", n=1.0), "mask", V)
    out = sample(model, path, n_samples=6, seq_len=L, grid=time_grid(4), rule="cumulative_scalar",
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.tokens.shape == (6, L) and int(out.tokens.max()) < V and int(out.tokens.min()) >= 0


# ---------------------------------------------------------------------------------------------------- Duo


@pytest.mark.parametrize("rows", [V + 1, V])  # GPT-2 + the [PAD] row its get_tokenizer adds; a tokenizer with a pad
def test_duo_matches_their_forward_at_sigma_of_t(tmp_path, rows):
    """Duo reads sigma = -log alpha_t, alpha_t = 1 - (1 - eps) t_theirs, t_theirs = 1 - t: our logits at our t equal
    their forward at that sigma, on the V real tokens (the [PAD] row dropped)."""
    sd, ema = their_state_dict(4, rows), their_state_dict(5, rows)
    loaded = load_mdlm_family(save_lightning(tmp_path, sd, ema), "usdm", vocab_size=V)
    x = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.0, 0.3, 1.0])
    sigma = -torch.log1p(-(1 - DUO_EPS) * (1 - t.double()))
    with torch.no_grad():
        ours = loaded.model(x, t).double()
    torch.testing.assert_close(ours, their_forward(ema, x, sigma)[..., :V], atol=1e-5, rtol=1e-5)
    hf = load_mdlm_family(save_hf(tmp_path, sd, time_conditioning=True), "usdm", vocab_size=V)
    with torch.no_grad():
        torch.testing.assert_close(hf.model(x, t).double(), their_forward(sd, x, sigma)[..., :V], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- errors


def test_wrong_shape_and_missing_key_one_message(tmp_path):
    sd = their_state_dict(1, V + 1)
    sd["backbone.blocks.1.attn_out.weight"] = torch.zeros(D, D + 1)
    del sd["backbone.output_layer.adaLN_modulation.bias"]
    sd["backbone.blocks.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as err:
        load_mdlm_family(save_hf(tmp_path, sd, None), "mdlm")
    msg = str(err.value)
    assert msg.count("\n") >= 3 and "3 mismatches (1 missing, 1 unexpected, 1 wrong shape)" in msg
    assert f"blocks.1.attn_out.weight: wrong shape, expected ({D}, {D}), got ({D}, {D + 1})" in msg
    assert f"output_layer.adaLN_modulation.bias: missing, expected ({2 * D},), got absent" in msg
    assert "blocks.0.extra.weight: unexpected" in msg
    assert {m.name for m in err.value.mismatches} == {
        "blocks.1.attn_out.weight",
        "output_layer.adaLN_modulation.bias",
        "blocks.0.extra.weight",
    }


def test_layout_errors_name_what_and_where(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint file at .*nowhere.safetensors"):
        load_mdlm_family(tmp_path / "nowhere.safetensors", "mdlm")
    sd = their_state_dict(1, V + 3)
    with pytest.raises(CheckpointError, match=r"vocab_embed.embedding has 43 rows; a mdlm checkpoint for V = 40"):
        load_mdlm_family(save_hf(tmp_path, sd, None), "mdlm", vocab_size=V)
    ok = their_state_dict(1, V + 1)
    with pytest.raises(CheckpointError, match="time_conditioning=True, but family 'mdlm' expects False"):
        load_mdlm_family(save_hf(tmp_path, ok, time_conditioning=True), "mdlm")
    path = save_lightning(tmp_path, ok, ok)
    box = torch.load(path, weights_only=True)
    box["ema"]["shadow_params"] = box["ema"]["shadow_params"][:-1]
    torch.save(box, tmp_path / "short.ckpt")
    with pytest.raises(CheckpointError, match=r"ema.shadow_params: wrong shape, expected \(30,\), got \(29,\)"):
        load_mdlm_family(tmp_path / "short.ckpt", "mdlm")
    with pytest.raises(ValueError, match="family must be one of mdlm, usdm"):
        load_mdlm_family(path, "sedd")


def test_pickled_lightning_config_is_refused_with_the_way_out(tmp_path):
    """Their real .ckpt pickles its config: weights_only refuses it, and the message says how to extract the weights."""
    torch.save(
        {"state_dict": their_state_dict(1, V + 1), "hyper_parameters": {"config": Path("x")}}, tmp_path / "a.ckpt"
    )
    with pytest.raises(CheckpointError, match=r"torch.save\(\{'state_dict': c\['state_dict'\], 'ema': c\['ema'\]\}"):
        load_mdlm_family(tmp_path / "a.ckpt", "mdlm")


def test_released_mdlm_config_is_the_small_model():
    cfg = mdlm_config()
    assert (cfg.vocab_size, cfg.input_vocab_size, cfg.hidden, cfg.cond_dim, cfg.n_blocks, cfg.n_heads) == (
        50257,
        50258,
        768,
        128,
        12,
        12,
    )
    assert cfg.seq_len == 1024 and cfg.norm_weight and cfg.norm_eps == 1e-5


# --------------------------------------------------------------------------------- the specs, end to end


def _fake_hub_cache(root: Path, repo: str) -> Path:
    """A local HF hub cache holding only `repo`'s config.json (what a spec load checks offline)."""
    snap = root / f"models--{repo}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (root / f"models--{repo}" / "refs").mkdir()
    (root / f"models--{repo}" / "refs" / "main").write_text("0" * 40)
    return root


@pytest.mark.parametrize("name", ["released_mdlm", "protocol_mdlm"])
def test_specs_validate_and_dry_run_offline(monkeypatch, capsys, tmp_path, name):
    import huggingface_hub.constants

    from fsdfm.cli import main
    from fsdfm.methods import plan_study
    from fsdfm.methods.load import load_spec

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_fake_hub_cache(tmp_path / "hub", "gpt2-large")))
    monkeypatch.chdir(REPO)
    spec, cells = load_spec(f"experiments/{name}.yaml")
    plan = plan_study(spec.name, cells)
    kinds = sorted(s.kind for s in plan.stages.values())
    assert spec.evaluator.name == "gpt2-large" and spec.data.hf_name == "openwebtext"
    if name == "released_mdlm":
        assert {m.kind for m in spec.methods.values()} == {"released", "released_duo"}
        assert all(list(m.budgets) == [2**k for k in range(3, 11)] for m in spec.methods.values())
        assert spec.methods["mdlm_owt"].settings.family == "mdlm" and spec.methods["mdlm_owt"].source == "mask"
        assert set(spec.methods["duo_dcd"].rules) == {"ancestral", "greedy_tail"}
        assert {"gen_ppl", "gen_ppl_seq_mean", "gen_ppl_raw", "entropy_nats", "mauve", "collapse_ngram"} <= set(
            spec.metrics.names
        )
        assert kinds.count("load_released") == 2 and kinds.count("load_released_duo") == 2
        assert kinds.count("evaluate") == 8 * (4 + 1 + 2 + 2) and kinds.count("evaluate_data") == 1
    else:
        assert kinds.count("load_released") == 1 and kinds.count("evaluate") == 4 * 2
    assert main(["run", f"experiments/{name}.yaml", "--dry-run"]) == 0
    assert '"dry_run": true' in capsys.readouterr().out.strip().splitlines()[-1]


def test_spec_rejects_bad_family_settings(tmp_path):
    from fsdfm.methods.load import load_spec
    from fsdfm.study.spec import SpecError

    base = (REPO / "experiments" / "released_mdlm.yaml").read_text()
    line = "family: mdlm, which: weights}"
    for new, message in (
        ("family: mdlmm, which: weights}", "family must be one of fsdfm, mdlm .*did you mean 'mdlm'"),
        ("family: mdlm, which: student_ema}", r"which must be one of auto, ema, weights \(family mdlm\)"),
    ):
        (tmp_path / "bad.yaml").write_text(base.replace(line, new, 1))
        with pytest.raises(SpecError, match=message):
            load_spec(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(
        base.replace("duo-distilled/model.safetensors, which: weights", "x, which: w", 1)
    )
    with pytest.raises(SpecError, match="which must be one of auto, ema, weights, got 'w'"):
        load_spec(tmp_path / "bad.yaml")


@pytest.fixture(scope="module")
def mdlm_study(tmp_path_factory):
    """A tiny copy of experiments/released_mdlm.yaml: the same methods, rules and metric names; synthetic checkpoints
    in the HF layouts at d = 32 over the GPT-2 vocabulary, TinyStories blocks of 16 tokens, a tiny local GPT-2 as the
    evaluator, budgets 1 and 4."""
    import yaml

    from fsdfm.launch import execute
    from fsdfm.methods import plan_study
    from fsdfm.methods.load import load_spec
    from metrics_fixtures import shrink_released_spec

    tmp = tmp_path_factory.mktemp("released_mdlm")
    raw = yaml.safe_load((REPO / "experiments" / "released_mdlm.yaml").read_text())
    for i, (name, tc) in enumerate((("mdlm_owt", False), ("sdtt_kld_r7", False), ("duo", True), ("duo_dcd", True))):
        (tmp / name).mkdir()
        path = save_hf(tmp / name, their_state_dict(20 + i, 50258), time_conditioning=tc)
        raw["methods"][name]["checkpoint"]["path"] = str(path)
        raw["methods"][name]["budgets"] = [1, 4]
    shrink_released_spec(raw, tmp, "released_mdlm_tiny")
    (tmp / "spec.yaml").write_text(yaml.safe_dump(raw))
    spec, cells = load_spec(tmp / "spec.yaml")
    summary = execute(plan_study(spec.name, cells), tmp / "results", executor="debug")
    return tmp, spec, summary


@pytest.mark.slow
def test_mdlm_study_runs_every_rule_and_metric_on_the_checkpoint_weights(mdlm_study):
    from fsdfm.methods.common import load_dit
    from fsdfm.records import load, load_records

    tmp, spec, summary = mdlm_study
    assert summary.ok, summary.format()
    df = load(tmp / "results" / "released_mdlm_tiny")
    runs = df[df.kind.isin(["released", "released_duo"])]
    assert len(runs) == 2 * (4 + 1 + 2 + 2)
    for name in list(spec.metrics.names) + ["nfe"]:
        assert runs[name].notna().all(), name
    assert (runs.gen_ppl > 1).all() and runs.mauve.between(0, 1).all()
    root = tmp / "results" / "released_mdlm_tiny"
    found = load_records(root, kind="load_released") + load_records(root, kind="load_released_duo")
    recs = {Path(r["payload"]["checkpoint"]["checkpoint"]).parent.name: r for r in found}
    assert set(recs) == {"mdlm_owt", "sdtt_kld_r7", "duo", "duo_dcd"}
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.7])
    for name, i in (("mdlm_owt", 0), ("duo_dcd", 3)):
        m = load_dit(Path(recs[name]["stage_dir"]), torch.device("cpu"))
        assert m.path.source.name == ("mask" if name == "mdlm_owt" else "uniform")
        sigma = torch.zeros(2) if name == "mdlm_owt" else -torch.log1p(-(1 - DUO_EPS) * (1 - t.double()))
        with torch.no_grad():
            ours = m.model(x, t).double()
        torch.testing.assert_close(ours, their_forward(their_state_dict(20 + i, 50258), x, sigma)[..., :50257],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def test_missing_checkpoint_file_fails_at_load_naming_it(tmp_path):
    from fsdfm.methods.released import load_released_stage
    from fsdfm.methods.released_duo import load_released_duo

    data = {
        "kind": "text",
        "train": str(REPO / "data/tinystories/train.txt"),
        "valid": str(REPO / "data/tinystories/valid.txt"),
        "tokenizer": "gpt2",
        "seq_len": 16,
        "max_train_blocks": 4,
        "max_valid_blocks": 4,
    }
    path = {"scheduler": {"name": "polynomial", "n": 1.0}}
    missing = tmp_path / "nowhere" / "model.safetensors"
    ckpt = {"path": str(missing), "which": "weights"}
    with pytest.raises(CheckpointNotFoundError, match=f"no checkpoint file at {missing}"):
        load_released_stage({"data": data, "checkpoint": {**ckpt, "family": "mdlm"}, "source": "mask", **path}, {},
                            tmp_path / "a")  # fmt: skip
    with pytest.raises(CheckpointNotFoundError, match=f"no checkpoint file at {missing}"):
        load_released_duo({"data": data, "checkpoint": ckpt, "source": "uniform", **path}, {}, tmp_path / "b")
    with pytest.raises(CheckpointError, match="a family mdlm checkpoint is a mask-source model; set source: mask"):
        load_released_stage({"data": data, "checkpoint": {**ckpt, "family": "mdlm"}, "source": "uniform", **path}, {},
                            tmp_path / "c")  # fmt: skip
    assert not any((tmp_path / d / "released.json").exists() for d in "abc")  # nothing half-written
