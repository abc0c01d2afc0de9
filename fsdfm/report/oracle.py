"""The few-step error decomposition of oracle studies, in cross-entropies: "CE excess", split at the exact denoiser.

For a trained method M sampled with rule r at budget N, and the exact denoiser (`kind: exact`) on the same path
(source and scheduler) with the same rule and budget:

    oracle_nll(M, N) - H_L  =  [oracle_nll(M, N) - oracle_nll(exact, N)]  +  [oracle_nll(exact, N) - H_L]
    CE excess                   model CE excess at N                          exact sampler's CE excess at N

with H_L the source's expected NLL per token of length-L sequences. These are differences of cross-entropies, not
divergences: for a sampler with output law q, E_q[-log p] / L - H_L = KL(q || p) / L - (H(p) - H(q)) / L, so a
more diffuse sampler scores worse at equal KL, and the model CE excess can be negative (the exact posterior is the
best p_{1|t}, not the best few-step denoiser, under the uniform source). The true divergences of the output law
(KL(q || p), KL(p || q), H(q)) on sources small enough to enumerate, and the per-step split into factorization
(the total correlation of the exact step law) and a per-position term, are `fsdfm.oracle_law`; under the mask
source with the cumulative-scalar rule the exact sampler's per-position term is zero, so its CE excess is
factorization, set by the grid. Each oracle_nll has a Monte-Carlo standard error (per run: the std of the
per-sample values / sqrt(n), from the per-sample table), shown beside it. Next to them: posterior_kl (the model's
p_{1|t} error, recorded by its training stage) and the n-gram TV with its finite-sample floor.

Matching runs to their path reads the plan (evaluate -> sample -> model stage -> ... -> the stage that fixed the
path), and posterior_kl the model stage's record: analysis reads records and the plan only.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from fsdfm.report.mc import mc_standard_errors, pooled_se
from fsdfm.report.summary import Study
from fsdfm.report.table import DASH, Table, fmt_mean_std, fmt_number
from fsdfm.records import read_record, stage_dir
from fsdfm.samplers import UPDATE_ALIASES
from fsdfm.report.significance import compare
from fsdfm.report.significance import ALPHA
from fsdfm.report.significance import holm

EXACT_KIND = "exact"
EXACT_STAGE = "exact_posterior"
JOINT_KIND = "exact_joint"  # the exact joint sampler (fsdfm.oracle_joint): its CE excess is its own oracle_nll - H_L
VERDICT_STEPS = 8


def model_stage(plan: dict, sid: str) -> str | None:
    """The model stage behind an evaluate stage (evaluate -> samples -> model), or None."""
    st = plan["stages"].get(sid) or {}
    samples = (st.get("inputs") or {}).get("samples")
    if samples is None:
        return None
    return (plan["stages"].get(samples, {}).get("inputs") or {}).get("model")


def path_key(plan: dict, sid: str | None) -> str | None:
    """The path (source, scheduler) a model stage samples on: its own config, or its teacher's (distil stages)."""
    seen = 0
    while sid is not None and seen < 16:
        st = plan["stages"].get(sid) or {}
        cfg = st.get("config") or {}
        if "source" in cfg and "scheduler" in cfg:
            return f"{cfg['source']} · {json.dumps(cfg['scheduler'], sort_keys=True)}"
        sid = (st.get("inputs") or {}).get("teacher")
        seen += 1
    return None


def path_source(key: str | None) -> str:
    return key.split(" · ")[0] if isinstance(key, str) and key else "?"  # NaN: a run with no mixture path


def _training_metric(study: Study, sid: str | None, name: str) -> float:

    if sid is None:
        return math.nan
    rec = read_record(stage_dir(study.path, sid), warn=False) or {}
    v = ((rec.get("payload") or {}).get("metrics") or {}).get(name)
    return float(v) if isinstance(v, (int, float)) else math.nan


def annotated_runs(study: Study) -> pd.DataFrame:
    """The model runs with `model_stage`, `path` (key) and `posterior_kl` (from the model's training record)."""
    runs = study.runs
    if "kind" not in runs or "oracle_nll" not in runs:
        return runs.iloc[:0]
    runs = study.models.copy()
    runs["model_stage"] = [model_stage(study.plan, s) for s in runs["stage_id"]]
    runs["path"] = [path_key(study.plan, s) for s in runs["model_stage"]]
    # every method sampling the exact posterior (kind exact, or a kind with its own sampler on the same stage, such
    # as exact_duo) is an exact row of the decomposition; the joint sampler keeps its own kind
    posterior = pd.Series(
        [(study.plan["stages"].get(s) or {}).get("kind") == EXACT_STAGE for s in runs["model_stage"]], index=runs.index
    )
    runs.loc[posterior & (runs["kind"] != JOINT_KIND), "kind"] = EXACT_KIND
    cache: dict = {}
    runs["posterior_kl"] = [
        cache.setdefault(s, _training_metric(study, s, "posterior_kl")) for s in runs["model_stage"]
    ]
    return runs


def _mean(x) -> float:
    v = pd.to_numeric(pd.Series(x), errors="coerce").dropna()
    return float(v.mean()) if len(v) else math.nan


def _std(x) -> float:
    v = pd.to_numeric(pd.Series(x), errors="coerce").dropna()
    return float(v.std(ddof=1)) if len(v) > 1 else math.nan


def decomposition_frame(study: Study) -> pd.DataFrame:
    """One row per (path, label, rule, steps): oracle_nll mean/std/n over seeds and its Monte-Carlo standard error
    (`mc_se`), the matched exact run's oracle_nll, model_ce_excess, exact_ce_excess, posterior_kl, ngram_tv and its
    floor, the expected NLL and the entropy rate."""
    runs = annotated_runs(study)
    if runs.empty or not (runs["kind"] == EXACT_KIND).any():
        return pd.DataFrame()

    # a run is matched with the exact run of the same sampler: rule (an alias is its rule: mdlm = cumulative_scalar)
    # and sampler knobs (fsdfm.sampling; "" when none)
    runs = runs.assign(
        _rule=runs["rule"].map(lambda r: UPDATE_ALIASES.get(r, r)),
        _knobs=runs["knobs"].fillna("").astype(str) if "knobs" in runs else "",
    )
    exact = {
        (p, r, k, int(s)): _mean(g["oracle_nll"])
        for (p, r, k, s), g in runs[runs["kind"] == EXACT_KIND].groupby(
            ["path", "_rule", "_knobs", "steps"], dropna=False
        )
    }
    # A kind whose path is fixed in its code (duo, dcd) records no source/scheduler in its stage config: its runs
    # have no path key and are matched with the exact runs of the same sampler when exactly one path has them
    # (the exact_duo kind's ancestral / greedy_tail runs).
    paths_by_sampler: dict = {}
    for p, r, k, s in exact:
        paths_by_sampler.setdefault((r, k, s), set()).add(p)
    fixed = runs["path"].isna()
    runs.loc[fixed, "path"] = [
        next(iter(ps)) if len(ps := paths_by_sampler.get((r, k, int(s)), set())) == 1 else None
        for r, k, s in zip(runs.loc[fixed, "_rule"], runs.loc[fixed, "_knobs"], runs.loc[fixed, "steps"])
    ]
    se = mc_standard_errors(study)
    rows = []
    for (p, label, rule, steps), g in runs.groupby(["path", "label", "rule", "steps"], dropna=False, sort=False):
        kind = str(g["kind"].iloc[0])
        nll = _mean(g["oracle_nll"])
        ex = (
            nll if kind == JOINT_KIND else exact.get((p, g["_rule"].iloc[0], g["_knobs"].iloc[0], int(steps)), math.nan)
        )
        expected = _mean(g["oracle_expected_nll"])
        rows.append(
            {
                "source": path_source(p),
                "path": p,
                "label": label,
                "kind": kind,
                "rule": rule,
                "steps": int(steps),
                "n": int(pd.to_numeric(g["oracle_nll"], errors="coerce").notna().sum()),
                "oracle_nll_mean": nll,
                "oracle_nll_std": _std(g["oracle_nll"]),
                "oracle_nll_mc_se": pooled_se(se, g["run_id"], "oracle_nll"),
                "entropy_nats_mc_se": pooled_se(se, g["run_id"], "entropy_nats"),
                "exact_oracle_nll": ex,
                "model_ce_excess": nll - ex if kind not in (EXACT_KIND, JOINT_KIND) else 0.0,
                "model_ce_excess_std": _std(g["oracle_nll"]) if kind not in (EXACT_KIND, JOINT_KIND) else math.nan,
                "exact_ce_excess": ex - expected,
                "posterior_kl_mean": _mean(g["posterior_kl"]),
                "posterior_kl_std": _std(g["posterior_kl"]),
                "ngram_tv_mean": _mean(g.get("ngram_tv", math.nan)),
                "ngram_tv_std": _std(g.get("ngram_tv", math.nan)),
                "ngram_tv_floor": _mean(g.get("ngram_tv_floor", math.nan)),
                "expected_nll": expected,
                "entropy_rate": _mean(g.get("oracle_entropy_rate", math.nan)),
            }
        )
    df = pd.DataFrame(rows)
    order = {k: i for i, k in enumerate(dict.fromkeys(df["label"]))}
    df["_exact_first"] = (df["kind"] != EXACT_KIND).astype(int)
    df["_label"] = df["label"].map(order)
    df = df.sort_values(["source", "_exact_first", "_label", "rule", "steps"]).drop(columns=["_exact_first", "_label"])
    return df.reset_index(drop=True)


def _teacher_label(study: Study, runs: pd.DataFrame, student_stage: str) -> str | None:
    """The label of the trained method whose model stage is the student's teacher."""
    teacher = (study.plan["stages"].get(student_stage, {}).get("inputs") or {}).get("teacher")
    hit = runs[runs["model_stage"] == teacher]
    return None if hit.empty else str(hit["label"].iloc[0])


def _canonical_rule(rule) -> str:

    return UPDATE_ALIASES.get(rule, rule)


def _setting(study: Study, runs: pd.DataFrame, label: str, rule: str, steps: int) -> tuple[dict, pd.DataFrame | None]:
    """One setting's {seed tuple: run-level oracle_nll} (seeds: the study's re-seeding grid keys) and its
    per-sample rows (for the Welch fallback when fewer than 2 seeds are shared)."""
    keys = [k for k in study.seed_keys if k in runs]
    # an alias is its rule (a teacher sampled with "mdlm" is the student's "cumulative_scalar")
    same_rule = runs["rule"].map(_canonical_rule) == _canonical_rule(rule)
    sel = runs[(runs["label"] == label) & same_rule & (pd.to_numeric(runs["steps"]) == steps)]
    vals = pd.to_numeric(sel["oracle_nll"], errors="coerce")
    seeds = {tuple(r): v for r, v in zip(sel[keys].astype(str).itertuples(index=False), vals) if v == v}
    samples = study.samples
    if samples is None or not len(samples) or "run_id" not in samples:
        return seeds, None
    return seeds, samples[samples["run_id"].isin(sel["run_id"])]


def _compare_teacher(study: Study, runs: pd.DataFrame, st: pd.Series, tlabel: str, steps: int, teacher_steps: int):
    """The `fsdfm.report.significance.compare` of oracle_nll: student at `steps` vs teacher at `teacher_steps`."""

    a, sa = _setting(study, runs, st["label"], st["rule"], steps)
    b, sb = _setting(study, runs, tlabel, st["rule"], teacher_steps)
    return compare("oracle_nll", a, b, sa, sb)


def _verdict_line(st: pd.Series, tlabel: str, steps: int, teacher_steps: int, c, p_holm: float | None, m: int = 1):

    p = c.p if p_holm is None else p_holm
    verdict = ("beats" if c.diff < 0 else "is worse than") if p < ALPHA else "is not distinguishable from"
    at = f"at {steps} steps" if teacher_steps == steps else f"at {steps} steps vs its teacher at {teacher_steps}"
    holm = (
        "" if p_holm is None else f", Holm-adjusted p = {p_holm:.2g} over the {m} student–teacher tests of this table"
    )
    return (
        f"{st['label']} {verdict} its teacher {tlabel} {at} ({st['rule']}): oracle_nll "
        f"{c.mean_a:.3f} vs {c.mean_b:.3f} nats/token, difference {c.diff:+.3f} (95% CI [{c.ci[0]:+.3f}, "
        f"{c.ci[1]:+.3f}], {c.test}, n = {c.n}, p = {c.p:.2g}{holm})."
    )


def _versus_teacher(
    study: Study, runs: pd.DataFrame, st: pd.Series, tlabel: str, steps: int, teacher_steps: int | None = None
) -> str | None:
    """ "S beats / is worse than / is not distinguishable from its teacher T at N steps", decided by the paired t-test
    across the training seeds the two share (a student is distilled from the teacher of its own seed), else (one seed)
    by Welch's test across per-sample values; at 0.05 (one test alone; `verdicts` corrects a table's family)."""
    teacher_steps = steps if teacher_steps is None else teacher_steps
    c = _compare_teacher(study, runs, st, tlabel, steps, teacher_steps)
    return None if c is None else _verdict_line(st, tlabel, steps, teacher_steps, c, None)


def verdicts(study: Study, frame: pd.DataFrame, steps: int = VERDICT_STEPS) -> list[str]:
    """Plain sentences: does each FS-DFM student beat its teacher at `steps` (same rule) and at the teacher's largest
    budget, and which CE excess term is the larger part. The family of student–teacher tests of the table is
    Holm-corrected (`fsdfm.report.significance.holm`): a verdict is stated where the adjusted p < 0.05."""

    runs = annotated_runs(study)
    heads, tests = [], []  # per student: its line; tests: (student index, st, tlabel, teacher steps, comparison)
    for _, st in frame[(frame["kind"] == "fsdfm") & (frame["steps"] == steps)].iterrows():
        sid = runs[(runs["label"] == st["label"])]["model_stage"].dropna()
        if sid.empty:
            continue
        tlabel = _teacher_label(study, runs, sid.iloc[0])
        excess = st["oracle_nll_mean"] - st["expected_nll"]
        term = (
            "the exact sampler's CE excess (what the exact denoiser itself loses at this budget and rule)"
            if st["exact_ce_excess"] >= st["model_ce_excess"]
            else "the model CE excess"
        )
        heads.append(
            f"{st['label']} ({st['rule']}, {steps} steps): oracle_nll {st['oracle_nll_mean']:.3f}; CE excess over "
            f"H_L {excess:.3f} = model CE excess {st['model_ce_excess']:.3f} + exact sampler's CE excess "
            f"{st['exact_ce_excess']:.3f}: {term} is the larger part (cross-entropies, not divergences)"
        )
        if tlabel is None:
            continue
        # the claim itself: N student steps against the same budget and the teacher's largest budget, same rule
        same_rule = runs["rule"].map(_canonical_rule) == _canonical_rule(st["rule"])
        tsteps = pd.to_numeric(runs[(runs["label"] == tlabel) & same_rule]["steps"], errors="coerce").dropna().max()
        for ts in [steps] + ([int(tsteps)] if pd.notna(tsteps) and int(tsteps) > steps else []):
            c = _compare_teacher(study, runs, st, tlabel, steps, ts)
            if c is not None:
                tests.append((len(heads) - 1, st, tlabel, ts, c))
    adjusted = holm([c.p for *_, c in tests])
    out = list(heads)
    for (i, st, tlabel, ts, c), q in zip(tests, adjusted):
        out[i] += ". " + _verdict_line(st, tlabel, steps, ts, c, q, len(tests))
    return out


def decomposition_table(study: Study) -> Table:
    """The decomposition as a Table (markdown, LaTeX, CSV): one block per path source, exact rows first."""
    frame = decomposition_frame(study)
    columns = (
        "source",
        "method",
        "rule",
        "steps",
        "n",
        "oracle_nll ↓",
        "MC SE",
        "exact oracle_nll",
        "model CE excess",
        "exact sampler CE excess",
        "posterior_kl ↓",
        "ngram_tv ↓",
        "ngram_tv floor",
    )
    if frame.empty:
        return Table(
            name="table_decomposition",
            title=f"{study.name}: few-step error decomposition",
            columns=columns,
            cells=(),
            bold=(),
            sections=(),
            notes=(),
            numbers=pd.DataFrame(),
            n_label_columns=4,
        )
    cells, sections = _decomposition_cells(frame)
    notes = _decomposition_notes(study, frame)
    return Table(
        name="table_decomposition",
        title=f"{study.name}: few-step error decomposition",
        columns=columns,
        cells=tuple(cells),
        bold=tuple((False,) * len(columns) for _ in cells),
        sections=tuple(sections),
        notes=tuple(notes),
        numbers=frame.drop(columns=["path"]).convert_dtypes(),
        n_label_columns=4,
    )


def _decomposition_cells(frame: pd.DataFrame) -> tuple[list[tuple], list[int]]:
    """(one row of cells per frame row, the row indices where a new path source's block starts)."""
    cells, sections = [], []
    prev = None
    for _, r in frame.iterrows():
        if prev is not None and r["source"] != prev:
            sections.append(len(cells))
        prev = r["source"]
        exact = r["kind"] in (EXACT_KIND, JOINT_KIND)
        cells.append(
            (
                r["source"],
                r["label"],
                str(r["rule"]),
                str(r["steps"]),
                str(r["n"]),
                fmt_mean_std(r["oracle_nll_mean"], r["oracle_nll_std"], r["n"], "nats/token"),
                fmt_number(r["oracle_nll_mc_se"], "nats/token"),
                fmt_number(r["exact_oracle_nll"], "nats/token"),
                DASH if exact else fmt_mean_std(r["model_ce_excess"], r["model_ce_excess_std"], r["n"], "nats/token"),
                fmt_number(r["exact_ce_excess"], "nats/token"),
                DASH if exact else fmt_mean_std(r["posterior_kl_mean"], r["posterior_kl_std"], r["n"], "nats"),
                fmt_mean_std(r["ngram_tv_mean"], r["ngram_tv_std"], r["n"], "TV"),
                fmt_number(r["ngram_tv_floor"], "TV"),
            )
        )
    return cells, sections


def _decomposition_notes(study: Study, frame: pd.DataFrame) -> list[str]:
    """What the columns mean, the reference values (H_L, entropy rate, the data row) and the verdicts."""
    data = study.data
    ref = [
        f"expected NLL of true length-L sequences (H_L): {_mean(frame['expected_nll']):.3f} nats/token; "
        f"entropy rate {_mean(frame['entropy_rate']):.3f}"
    ]
    if not data.empty and "oracle_nll" in data:
        ref.append(
            f"data row (held-out true sequences): oracle_nll {_mean(data['oracle_nll']):.3f}"
            + (f", ngram_tv {_mean(data['ngram_tv']):.3f}" if "ngram_tv" in data else "")
        )
    return (
        [
            "CE excess oracle_nll(M, N) − H_L = model CE excess [oracle_nll(M, N) − oracle_nll(exact, N)] + exact "
            "sampler CE excess [oracle_nll(exact, N) − H_L]; the exact run has the same path, rule and budget; cells "
            "mean ± std over seeds (the exact sampler: one sampling seed)",
            "these are cross-entropy differences, not divergences: E_q[−log p]/L − H_L = KL(q‖p)/L − (H(p) − H(q))/L "
            "for output law q, so a more diffuse sampler scores worse at equal KL and a model CE excess can be "
            "negative; true KL(q‖p), KL(p‖q), H(q) on enumerable sources and the per-step split into factorization "
            "(total correlation) and a per-position term: fsdfm.oracle_law. Under the mask source with the "
            "cumulative-scalar rule the exact sampler's per-position term is zero: its CE excess is factorization, "
            "set by the grid",
            "MC SE: the Monte-Carlo standard error of the oracle_nll cell's mean from the per-sample values "
            "(sqrt(Σ SE_run²) / runs); sampling noise only, not the spread over training seeds",
            "posterior_kl: KL(exact posterior ‖ model p_{1|t}) per movable position, over t = 0.05..0.95 and "
            "held-out path states (student: at its smallest step h = 2^-K)",
            "ngram_tv: total variation of the samples' (order + 1)-gram distribution (HMM: bigrams) from the "
            "source's exact one; floor: the same for as many true sequences",
        ]
        + ref
        + verdicts(study, frame)
    )
