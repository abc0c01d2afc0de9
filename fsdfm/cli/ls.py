"""`fsdfm ls [methods|rules|metrics|presets|published]`: what exists, from the registries; `fsdfm ls` alone lists
the studies under the results root with their done/total stages and runs.

A stage counts as done here when its record says so (cheap: no artefact is hashed); `fsdfm verify` checks them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fsdfm.records import list_studies
from fsdfm.registry import Registry


@dataclass(frozen=True)
class Entry:
    """One line of `fsdfm ls WHAT`: a registered name and what it is."""

    name: str
    about: str


def _first_line(obj: object) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _methods() -> list[Entry]:
    from fsdfm.methods import METHOD_KINDS  # heavy: torch (each listing imports only what it shows)

    out = []
    for name in METHOD_KINDS:
        k = METHOD_KINDS.get(name)
        teacher = f"; distils a {k.teacher_kind} teacher" if k.teacher_kind else ""
        out.append(
            Entry(
                name,
                f"sampler {k.sampler}, rules {', '.join(k.rules)}{teacher}"
                + ("; oracle data only" if k.oracle_only else ""),
            )
        )
    return out


def _rules() -> list[Entry]:
    """Every update rule of the mixture-path loop (aliases too), with the method kinds that accept it."""
    from fsdfm.methods import METHOD_KINDS  # heavy: torch
    from fsdfm.methods.base import MixtureRules  # heavy: torch
    from fsdfm.samplers import RULE_KINDS, UPDATE_ALIASES, UPDATE_RULES, get_rule  # heavy: torch

    UPDATE_RULES.discover()  # rule modules and plugins registered before RULE_KINDS is read
    # the kinds that sample the mixture path (a kind with a loop of its own may reuse a name, e.g. FLM's euler), and
    # a kind with its own sampler that claims a rule registered for it by name (`register_rule(..., kinds=(kind,))`)
    kinds = {k: METHOD_KINDS.get(k).rules for k in METHOD_KINDS}
    out = []
    for n in RULE_KINDS:
        about = f"alias of {UPDATE_ALIASES[n]}" if n in UPDATE_ALIASES else _first_line(get_rule(n))
        named = RULE_KINDS[n] or ()
        takers = [k for k, rules in kinds.items() if n in rules and (isinstance(rules, MixtureRules) or k in named)]
        out.append(Entry(n, f"{about} [kinds: {', '.join(takers) or 'none'}]"))
    return out


def _metrics() -> list[Entry]:
    from fsdfm.metrics.registry import METRICS  # heavy: torch

    out = []
    for n in METRICS:
        m = METRICS.get(n)
        better = m.better or "no direction"  # the goal the report's tables and figures rank by
        out.append(Entry(n, f"[{m.family}, {m.unit}, {better}] {m.description}"))
    return out


def _presets() -> list[Entry]:
    from fsdfm.model import PRESETS  # heavy: torch

    return [Entry(n, ", ".join(f"{k}={v}" for k, v in PRESETS.get(n).items())) for n in PRESETS]


def _published() -> list[Entry]:
    from fsdfm.report.published import PUBLISHED  # heavy: pandas, torch

    out = []
    for n in PUBLISHED:
        t = PUBLISHED.get(n)
        out.append(Entry(n, f"{t.source}, {t.dataset}: {len(t.rows)} rows ({t.convention})"))
    return out


LISTINGS: Registry[Callable[[], list[Entry]]] = Registry("listing")
LISTINGS.register("methods", _methods)
LISTINGS.register("rules", _rules)
LISTINGS.register("metrics", _metrics)
LISTINGS.register("presets", _presets)
LISTINGS.register("published", _published)


def cmd_ls(args) -> dict:
    if args.what is None:
        root = Path(args.results)
        rows = list_studies(root)
        if not rows:
            print(f"no studies under {root}/ yet (fsdfm run experiments/demo.yaml)")
        for r in rows:
            state = "done" if r.stages_done == r.stages_total else "partial" if r.stages_done else "not run"
            print(
                f"  {r.name:<40} stages {r.stages_done:>4}/{r.stages_total:<4} runs {r.runs_done:>4}/{r.runs_total:<4}"
                f" {state}"
            )
        return {"results": str(root), "studies": [r.__dict__ for r in rows]}
    entries = LISTINGS.get(args.what)()
    width = max((len(e.name) for e in entries), default=0)
    for e in entries:
        print(f"  {e.name:<{width}}  {e.about}".rstrip())
    return {"ls": args.what, "names": [e.name for e in entries]}


def add_ls_parser(sub, common: argparse.ArgumentParser) -> None:
    ls = sub.add_parser("ls", parents=[common], help="list studies (no argument) or " + "|".join(LISTINGS))
    ls.add_argument(
        "what", nargs="?", default=None, help=f"one of {', '.join(LISTINGS)}; none: the studies under the results root"
    )
    ls.set_defaults(fn=cmd_ls)
