"""Smoke runs of the cost benchmarks (--quick, one thread): each prints its tables and ends with one JSON line whose
counted values are checked against what the run must have done (NFE = step budget, passes per training step, the
FLM state never above its budget, ...). Timings are only checked to be positive: no timing asserts.

Also a known-answer check of the sampler's CPU fast path (`update_from_logits`, which the sampling benchmark
exercises) on a vocabulary spanning several inverse-CDF blocks: jump probabilities and destinations follow p.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsdfm.paths import MaskSource, MixturePath, UniformSource
from fsdfm.samplers import get_rule, update_from_logits
from fsdfm.schedulers import PolynomialScheduler

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *extra: str, timeout: int = 300) -> tuple[str, dict]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--quick", "--threads", "1", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    record = json.loads(lines[-1])  # the closing line is JSON ...
    assert not any(line.startswith("{") for line in lines[:-1])  # ... and the only JSON line
    return proc.stdout, record


def _positive(*values):
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


def test_bench_sampling_quick():
    out, rec = run_bench("bench_sampling.py")
    assert rec["bench"] == "sampling" and rec["quick"] and rec["threads"] == 1 and rec["extrapolated"] is False
    runs = rec["sweep"]["runs"]
    budgets = [1, 2, 4, 8, 32]
    assert sorted({r["rule"] for r in runs}) == ["cumulative_scalar", "euler", "mixture_euler"]
    for rule in ("cumulative_scalar", "euler", "mixture_euler"):
        assert [r["budget"] for r in runs if r["rule"] == rule] == budgets
    for r in runs:
        assert r["nfe"] == r["budget"], r  # counted forward calls = the step budget
        assert _positive(r["wall_s"], r["forward_s"], r["tokens_per_s"], r["peak_mem_mib"])
        assert r["forward_s"] <= r["wall_s"] and 0.0 <= r["outside_share"] < 1.0
        assert r["per_step_ms"] == pytest.approx(1e3 * r["wall_s"] / r["budget"], rel=1e-3)
    for rule in ("cumulative_scalar", "euler", "mixture_euler"):
        s = rec["speedup"][rule]
        assert (s["few_steps"], s["many_steps"], s["nfe_ratio"]) == (8, 32, 4.0)
        assert s["speedup"] == pytest.approx(s["wall_many_s"] / s["wall_few_s"], rel=1e-2)
        few = next(r for r in runs if r["rule"] == rule and r["budget"] == 8)  # the same keys on CPU as on a GPU
        assert s["outside_share_few"] == pytest.approx(few["outside_share"], rel=1e-3, abs=1e-6)
        assert s["meets_targets"] == (s["fraction_of_nfe_ratio"] >= 0.95 and s["outside_share_few"] <= 0.05)
    assert all("mfu" in r for r in runs) and rec["numerics"]["precision"] == "float64"
    assert rec["numerics"]["logits_dtype"] == "float32" and rec["numerics"]["certified_float32_exp"]
    assert [(s["source"], s["budget"]) for s in rec["share"]] == [
        ("mask", 1),
        ("mask", 8),
        ("uniform", 1),
        ("uniform", 8),
    ]
    for s in rec["share"]:
        assert s["nfe"] == s["budget"] and 0.0 <= s["share_timed_forwards"] < 1 and 0.0 < s["share_standin"] < 1
        assert s["forward_s"] <= s["wall_s"] and _positive(s["own_work_s"], s["peak_mem_mib"])
    assert [(c["batch"], c["seq_len"]) for c in rec["scaling"]["vs_len"]] == [(2, 32), (2, 64)]
    assert [(c["batch"], c["seq_len"]) for c in rec["scaling"]["vs_batch"]] == [(1, 32), (4, 32)]
    assert all(
        c["nfe"] == c["steps"] == 2 and _positive(c["per_step_ms"], c["peak_mem_mib"])
        for c in rec["scaling"]["vs_len"] + rec["scaling"]["vs_batch"]
    )
    assert "[1] wall-clock vs step budget" in out and "[3] sampler time outside the model forward" in out


def test_bench_training_quick():
    _, rec = run_bench("bench_training.py")
    assert rec["bench"] == "training" and _positive(rec["teacher_forward_ms"])
    steps = 3
    teacher, rk4, heun = (rec["objectives"][k] for k in ("teacher_dfm", "student_rk4", "student_heun"))
    for r in (teacher, rk4, heun):  # one forward with gradient and one backward per optimiser step
        assert r["steps"] == steps and r["grad_forward_calls"] == steps and r["backward_calls"] == steps
        assert r["counts_student"]["grad_rows"] == r["counts_student"]["backward_rows"] == steps * rec["batch"]
        assert _positive(r["tokens_per_s"], r["step_ms"], r["peak_mem_mib"], r["teacher_forward_units_per_step"])
        assert r["tokens_per_s"] == pytest.approx(rec["batch"] * rec["seq_len"] * steps / r["wall_s"], rel=1e-2)
    assert teacher["teacher_forward_calls"] == 0 and teacher["forward_row_equiv_per_step"] == 1.0
    # the shortcut teacher runs on the EMA copy, without gradient: 4 calls (rk4) or 2 (heun) per step with shortcut
    # rows, on those rows only; at least one of the 3 steps has shortcut rows under P(h) ~ 1/h (fixed seed)
    for r, calls in ((rk4, 4), (heun, 2)):
        ema = r["counts_ema"]
        assert ema["grad_calls"] == ema["backward_calls"] == 0 and r["counts_student"]["nograd_calls"] == 0
        assert ema["nograd_calls"] == r["teacher_forward_calls"] and ema["nograd_calls"] % calls == 0
        assert 0 < ema["nograd_calls"] <= calls * steps
        assert ema["nograd_rows"] <= (ema["nograd_calls"] // calls) * calls * rec["batch"]
        assert r["forward_row_equiv_per_step"] == pytest.approx(
            1 + ema["nograd_rows"] / (rec["batch"] * steps), abs=1e-3
        )


def test_bench_memory_quick():
    _, rec = run_bench("bench_memory.py")
    assert rec["bench"] == "memory" and rec["all_within_budget"] and rec["tokens_independent_of_chunking"]
    per_sample = rec["state_bytes_per_sample"]
    assert per_sample == rec["seq_len"] * rec["vocab"] * 4
    assert [r["chunk_size"] for r in rec["runs"]] == [1, 4, 16]
    for r in rec["runs"]:
        assert r["chunk_size"] == r["expected_chunk_size"] == r["max_state_bytes"] // per_sample
        assert r["max_state_seen_bytes"] == r["chunk_size"] * per_sample <= r["max_state_bytes"]
        assert r["nfe"] == rec["steps"] and r["calls_per_run"] == rec["steps"] * math.ceil(
            rec["n_samples"] / r["chunk_size"]
        )
        assert _positive(r["wall_s"], r["peak_mem_mib"])


def test_bench_ar_quick():
    _, rec = run_bench("bench_ar.py")
    assert rec["autocast"] is False
    assert rec["bench"] == "ar" and rec["ar_available"]
    L = rec["seq_len"]
    nfe = {r["method"]: r["nfe"] for r in rec["runs"]}
    assert nfe == {
        "AR, KV cache=True": L,
        "AR, KV cache=False": L,
        f"DFM teacher, {L} steps (equal NFE), euler": L,
        "FS-DFM student, 8 steps, cumulative scalar": 8,
        "FS-DFM student, 1 steps, cumulative scalar": 1,
    }
    for r in rec["runs"]:
        assert _positive(r["wall_s"], r["ms_per_sample"], r["tokens_per_s"], r["peak_mem_mib"])
        assert r["ms_per_sample"] == pytest.approx(1e3 * r["wall_s"] / rec["batch"], rel=1e-2)
    assert rec["runs"][0]["relative_to_ar_cache"] == 1.0


@pytest.mark.slow
def test_bench_sampling_compile_and_autocast_paths():
    """The GPU options run (and give the counted NFE) on CPU: torch.compile of the model, bf16 autocast."""
    _, rec = run_bench(
        "bench_sampling.py",
        "--compile",
        "--autocast",
        "--sections",
        "sweep",
        "--rules",
        "euler",
        "--budgets",
        "1,8",
        timeout=900,
    )
    assert rec["compile"] and rec["autocast"]
    assert [(r["budget"], r["nfe"]) for r in rec["sweep"]["runs"]] == [(1, 1), (8, 8)]


# ------------------------------------------------------------------------- the sampler's CPU path, known answers

V = 130  # three inverse-CDF blocks of 64, the last one padded
N_ROWS, N_COLS = 40, 2500  # 100k positions


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    row = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2
    row[7] = -float("inf")  # a token without mass is never drawn
    return row.expand(N_ROWS, N_COLS, V).contiguous(), torch.softmax(row.double(), -1)


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    n = float(counts.sum())
    keep = p > 0
    return float(((counts[keep] - n * p[keep]) ** 2 / (n * p[keep])).sum()), int(keep.sum()) - 1


def _chi2_ok(chi2: float, df: int) -> bool:
    return chi2 <= df + 5 * math.sqrt(2 * df)  # 5 standard deviations of the chi-square distribution


@pytest.mark.parametrize("rule", ["cumulative_scalar", "euler", "mixture_euler"])
def test_logits_path_jump_probability_and_destinations(rule):
    logits, p = _logits()
    path = MixturePath(PolynomialScheduler(1), UniformSource(V))
    z = int(p.argmax())
    x = torch.full((N_ROWS, N_COLS), z)
    t, h = torch.full((N_ROWS,), 0.3, dtype=torch.float64), torch.full((N_ROWS,), 0.4, dtype=torch.float64)
    y = update_from_logits(x, logits, t, h, get_rule(rule), path, torch.Generator().manual_seed(1))
    expected = {
        "cumulative_scalar": 1 - (0.3 / 0.7) ** (1 - float(p[z])),  # r = (1 - 0.7) / (1 - 0.3)
        "euler": (1 - float(p[z])) * (1 - math.exp(-0.4 / 0.7)),  # g(0.3) = 1 / 0.7
        "mixture_euler": 1 - math.exp(-(1 - float(p[z]))),
    }[rule]
    frac = float((y != x).double().mean())
    assert abs(frac - expected) <= 5 * math.sqrt(expected * (1 - expected) / x.numel()), (frac, expected)
    moved = y[y != x]
    q = p.clone()
    q[z] = 0.0  # a move changes the token: destinations ~ p over x != z
    counts = torch.bincount(moved, minlength=V).double()
    assert counts[7] == 0 and counts[z] == 0
    assert _chi2_ok(*_chi2(counts, q / q.sum()))


def test_logits_path_final_step_and_mask_source():
    logits, p = _logits()
    t, h = torch.full((N_ROWS,), 0.5, dtype=torch.float64), torch.full((N_ROWS,), 0.25, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    uniform = MixturePath(PolynomialScheduler(1), UniformSource(V))
    y = update_from_logits(
        torch.full((N_ROWS, N_COLS), 3), logits, t, h, get_rule("cumulative_scalar"), uniform, gen, final=True
    )  # the final step draws x_1 ~ p everywhere, the current token included
    counts = torch.bincount(y.flatten(), minlength=V).double()
    assert counts[7] == 0 and _chi2_ok(*_chi2(counts, p))
    masked = MixturePath(PolynomialScheduler(1), MaskSource(V))
    x = torch.full((N_ROWS, N_COLS), V)
    x[:, ::4] = 5  # already unmasked: never moves
    y = update_from_logits(x, logits, t, h, get_rule("cumulative_scalar"), masked, gen)
    assert bool((y[:, ::4] == 5).all())
    was_masked = x == V
    frac = float((y[was_masked] != V).double().mean())
    assert abs(frac - 0.5) <= 5 * math.sqrt(0.25 / int(was_masked.sum()))  # (kappa(0.75) - kappa(0.5)) / (1 - 0.5)
    counts = torch.bincount(y[was_masked & (y != V)], minlength=V + 1)[:V].double()
    assert _chi2_ok(*_chi2(counts, p))


def test_logits_path_leaves_the_logits_untouched_and_is_deterministic():
    logits, _ = _logits()
    logits = logits[:4, :50].double().contiguous()  # float64 logits: no conversion copy to hide a write
    before = logits.clone()
    path = MixturePath(PolynomialScheduler(1), UniformSource(V))
    x = torch.randint(V, (4, 50), generator=torch.Generator().manual_seed(3))
    t, h = torch.zeros(4, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    a = update_from_logits(x, logits, t, h, get_rule("cumulative_scalar"), path, torch.Generator().manual_seed(4))
    b = update_from_logits(x, logits, t, h, get_rule("cumulative_scalar"), path, torch.Generator().manual_seed(4))
    assert torch.equal(logits, before) and torch.equal(a, b) and bool((a != 7).all())


def test_logits_path_is_shift_invariant_across_its_overflow_guard():
    """Logits far from 0 (|max| > 600, where exp(l) would overflow or underflow) are shifted by their row max first;
    near 0 they are not. Both give the same draws: softmax is shift-invariant."""
    logits, _ = _logits()
    logits = logits[:4, :200].double().contiguous()
    path = MixturePath(PolynomialScheduler(1), UniformSource(V))
    x = torch.randint(V, (4, 200), generator=torch.Generator().manual_seed(5))
    t, h = torch.full((4,), 0.25, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    draws = [
        update_from_logits(
            x, logits + shift, t, h, get_rule("cumulative_scalar"), path, torch.Generator().manual_seed(6)
        )
        for shift in (0.0, 1000.0, -1000.0)
    ]
    assert bool((draws[0] != x).any())
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


GPU_RUN_STEPS = {  # the default steps of benchmarks/gpu_run.sh, in order, and the "bench" of each closing JSON line
    "sampling_small": "sampling",
    "gpu_tests": None,
    "sampling_1p3b": "sampling",
    "training_small": "training",
    "ar_small": "ar",
    "sampling_small_mask": "sampling",
    "scaling_1p3b": "sampling",
}


def _gpu_run(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT_DIR": str(tmp_path), **env},
    )


@pytest.mark.slow
def test_gpu_run_script_dry_run_runs_every_step_on_cpu(tmp_path):
    """benchmarks/gpu_run.sh --dry-run runs every default step at tiny shapes on the CPU (the same commands and flags
    as on a GPU, --device cpu): each output file holds the header, the benchmark's tables, its closing JSON line
    and "=== exit 0"; summary.txt has one line per step; the compile steps run only when named in ONLY."""
    proc = _gpu_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary[:-1]] == list(GPU_RUN_STEPS)
    assert all(": exit 0 in " in line for line in summary[:-1]) and summary[-1].endswith("failed or timed out: none")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{n}.txt" for n in GPU_RUN_STEPS] + ["summary.txt"])
    for name, bench in GPU_RUN_STEPS.items():
        lines = (tmp_path / f"{name}.txt").read_text().splitlines()
        assert lines[0].startswith("=== ") and "--device cpu" in lines[0] or "-m gpu" in lines[0], lines[0]
        assert lines[-1].startswith("=== exit 0 "), lines[-3:]
        if bench is None:
            assert "skipped" in lines[-2]  # the GPU tests are collected (the file imports) and skip without CUDA
            continue
        record = json.loads(lines[-2])
        assert record["bench"] == bench and record["device"] == "cpu"
        assert bench == "training" or record["autocast"] is True  # the bf16 path a GPU study samples with
    ar = json.loads((tmp_path / "ar_small.txt").read_text().splitlines()[-2])
    assert [r["method"] for r in ar["runs"]][0] == "AR, KV cache=True"  # the uncached AR row is left out
    assert not any("KV cache=False" in r["method"] for r in ar["runs"])


def test_gpu_run_script_stops_within_its_time_budget(tmp_path):
    """With no time left in TOTAL_S, every step is skipped (not started), listed as such, and the script exits 1."""
    proc = _gpu_run(tmp_path, TOTAL_S="10")
    assert proc.returncode == 1
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[:-1] == [f"{n}: skipped (the run's 10 s are spent)" for n in GPU_RUN_STEPS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.txt"]


@pytest.mark.parametrize(
    "name, folder, peak",
    [
        ("NVIDIA H100 80GB HBM3", "h100", 989.4e12),
        ("NVIDIA H100 PCIe", "h100-pcie", 756.5e12),
        ("NVIDIA H100 NVL", "h100-nvl", 835.5e12),
        ("NVIDIA H200", "h200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", "a100", 312e12),
        ("NVIDIA A100-PCIE-40GB", "a100-pcie", 312e12),
        ("Tesla V100-SXM2-16GB", "v100", None),
        ("NVIDIA GeForce RTX 4090", "rtx4090", None),
    ],
)
def test_gpu_folder_names_the_model_and_form_factor(name, folder, peak):
    """The results folder from nvidia-smi's name (the model, not the memory type: issue 28 found "hbm3"), and the
    data-sheet dense bf16 peak it selects (PCIe/NVL parts below the SXM figure)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from benchlib import PEAK_BF16_FLOPS, gpu_folder

    assert gpu_folder(name) == folder
    assert PEAK_BF16_FLOPS.get(folder) == peak
    with pytest.raises(ValueError, match="no model number"):
        gpu_folder("cpu")


def test_bench_own_work_quick():
    """The default step and the float64 chunk timed interleaved on the same seeds: the tokens agree (the script checks) and the
    derived ratios are computed from the timings it reports."""
    _, rec = run_bench("bench_own_work.py", "--rules", "cumulative_scalar,mixture_euler")
    assert rec["bench"] == "own_work" and rec["derived"] and (rec["few_steps"], rec["many_steps"]) == (8, 32)
    assert [(r["source"], r["rule"]) for r in rec["results"]] == [
        ("mask", "cumulative_scalar"),
        ("mask", "mixture_euler"),
        ("uniform", "cumulative_scalar"),
        ("uniform", "mixture_euler"),
    ]
    for r in rec["results"]:
        assert r["same_tokens"] and _positive(r["forward_ms"])
        real = r["real_model"]  # measured with the real model between the steps (the default step)
        assert real["runs"] >= 1 and _positive(real["own_ms_per_step_8"]) and 0.0 < real["outside_share_8"] < 1.0
        for chunk in ("default", "float64"):
            c = r[chunk]
            F, o8, o32 = r["forward_ms"], c["own_ms_per_step_8"], c["own_ms_per_step_32"]
            assert _positive(o8, o32)
            assert c["fraction_of_nfe_ratio"] == pytest.approx((F + o32) / (F + o8), rel=2e-3)
            assert c["outside_share_few"] == pytest.approx(o8 / (F + o8), rel=2e-3)
