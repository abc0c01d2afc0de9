"""The facts and conventions at the top and bottom of a report's index.md: what was run (runs, seeds, grid keys,
code, devices) and how each number is defined (gen-PPL convention, entropy unit, MAUVE settings, collapse flags),
read from the plan and the records. Knows nothing about tables or figures."""

from __future__ import annotations

from fsdfm.report.summary import DEFAULT_BY, DIAGNOSTIC_KINDS, EXTERNAL_RUN_KIND, Study
from fsdfm.records import load_records
from fsdfm.metrics import ENTROPY_COLLAPSE_NATS, REP_COLLAPSE_FACTOR, REP_COLLAPSE_MARGIN

__all__ = ["conventions", "facts"]


def _plan_settings(plan: dict) -> dict:
    """Conventions recorded in the plan's stage configs: MAUVE featurizer, evaluator, sampling precision."""
    found: dict[str, set] = {"featurizer": set(), "evaluator": set(), "precision": set(), "metrics": set()}
    for st in plan.get("stages", {}).values():
        cfg = st.get("config") or {}
        metrics = cfg.get("metrics") if isinstance(cfg.get("metrics"), dict) else {}
        if "mauve" in (metrics.get("names") or []):
            found["featurizer"].add(str(metrics.get("mauve_featurizer")))
        found["metrics"].update(metrics.get("names") or [])
        ev = cfg.get("evaluator")
        if isinstance(ev, dict) and ev.get("kind"):
            found["evaluator"].add(ev["kind"] + (f" ({ev['name']})" if ev.get("name") else ""))
        if st.get("kind") == "sample" and cfg.get("precision"):
            found["precision"].add(str(cfg["precision"]))
    return {k: sorted(v) for k, v in found.items()}


def facts(study: Study) -> list[str]:
    """The study's facts: runs finished of planned, settings and seeds, grid keys, samples, code, devices."""
    import pandas as pd

    runs = study.runs
    # external rows (`fsdfm eval`) are scored files, not planned runs: counted apart (9c2f443: "11 of 9 planned")
    is_ext = runs["kind"].eq(EXTERNAL_RUN_KIND) if "kind" in runs else pd.Series(False, index=runs.index)
    n_ext = int(is_ext.sum())
    lines = [
        f"results: `{study.path}`",
        f"runs: {len(runs) - n_ext} finished of {study.n_planned} planned"
        + (f"; {n_ext} external sample file(s) scored by `fsdfm eval`" if n_ext else ""),
    ]
    if len(runs):
        # a diagnostic's runs (exact_law, pos_divergence) share a setting's label, rule and steps: not more seeds
        sampled = runs[~runs["kind"].isin(DIAGNOSTIC_KINDS)] if "kind" in runs else runs
        settings = sampled.groupby(list(DEFAULT_BY), dropna=False).size()
        seeds = sorted(set(settings))
        lines.append(
            f"settings (method × rule × steps, incl. data): {len(settings)}; seeds per setting: "
            + (str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}")
        )
        if study.seed_keys:
            lines.append(f"seed grid keys: {', '.join(f'`{k}`' for k in study.seed_keys)}")
        if study.ablation_keys:
            lines.append(
                f"ablated grid keys (shown in the method label): {', '.join(f'`{k}`' for k in study.ablation_keys)}"
            )
        ns = sorted({int(v) for v in runs.get("n_samples", []) if v == v})
        if ns:
            lines.append(f"samples per run: {', '.join(map(str, ns))}")
        commits = sorted({str(c)[:12] for c in runs.get("commit", []) if isinstance(c, str)})
        dirty = any(bool(d) for d in runs.get("dirty", []) if d is not None and d == d)
        if commits:
            lines.append(
                f"code: commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}"
                + (" (uncommitted changes in some runs)" if dirty else "")
            )
        devices = sorted({str(d) for d in runs.get("device", []) if isinstance(d, str)})
        if devices:
            lines.append(f"devices: {', '.join(devices)}")
    return lines


def _mauve_facts(study: Study) -> str:
    """n per side, buckets, k-means seeds and featurizer weights hash, as recorded by the evaluate stages."""

    facts: dict[str, set] = {"n": set(), "buckets": set(), "seeds": set(), "sha": set()}
    for kind in ("evaluate", "evaluate_data"):
        for rec in load_records(study.path, kind=kind):
            d = ((rec.get("payload") or {}).get("metric_details") or {}).get("mauve")
            if d:
                facts["n"].add(d["n_per_side"])
                facts["buckets"].add(d["num_buckets"])
                facts["seeds"].add(len(d["seeds"]))
                facts["sha"].add(str(d.get("featurizer_sha256"))[:12])
    if not facts["n"]:
        return ""

    def j(k):
        return ", ".join(map(str, sorted(facts[k])))

    return (
        f"; n = {j('n')} per side, {j('buckets')} k-means buckets, mean ± std over {j('seeds')} k-means seeds "
        f"(std in the records), featurizer weights sha256 {j('sha')}…; below "
        f"{study.report_settings['mauve_min_n']} per side MAUVE is footnoted unreliable"
    )


def conventions(study: Study) -> list[str]:
    """How each reported number is defined, with the settings the plan and the records hold."""

    s = _plan_settings(study.plan)
    out = [
        "`gen_ppl`: token-pooled generative perplexity, exp(Σ NLL / Σ tokens) over all samples, under the evaluator "
        f"LM ({', '.join(s['evaluator']) or 'not recorded'}); first token unscored. Not the FS-DFM/SEDD convention "
        "(mean of per-sample perplexities: `gen_ppl_seq_mean`).",
        "entropy: per-sample unigram entropy of the model's own token ids, averaged over samples, in **nats** "
        "(`entropy_bits` = nats / ln 2).",
        f"MAUVE featurizer: {', '.join(s['featurizer']) or 'MAUVE not computed'}; samples vs as many held-out texts"
        + _mauve_facts(study)
        + ".",
        "text metrics (MAUVE, self-BLEU): end-of-text markers removed from samples and references "
        "(`fsdfm.metrics.texts`: each marker and its surrounding whitespace replaced by one space).",
        f"sampling precision: {', '.join(s['precision']) or 'not recorded'} (float32 categorical sampling lowers "
        "perplexity artificially).",
        f"collapse flags: `collapsed` when entropy_nats is more than {ENTROPY_COLLAPSE_NATS} nats below the data row's "
        f"(`low entropy`) or rep_n above max({REP_COLLAPSE_FACTOR:g} × data, data + {REP_COLLAPSE_MARGIN:g}) "
        f"(`high rep_n`); `noisy` when entropy_nats is more than {ENTROPY_COLLAPSE_NATS} nats above the data row's "
        "(near-uniform tokens: noise, not collapse). A flagged row is never marked best.",
        "sampling wall-clock: warm-up excluded, evaluator time excluded"
        + (
            ""
            if study.wall_s_source != "wall_s" or "stage_wall_s" in study.runs
            else "; **this study's records carry no separate sampler time, so the stage's run time is shown**"
        )
        + ".",
        "spread: tables ±1 sample std over seeds (ddof 1); figures: 95% confidence intervals of the mean "
        "(Student t); the 95% CI half-widths are also in the CSV files, results.json and table_seeds.",
    ]
    return out
