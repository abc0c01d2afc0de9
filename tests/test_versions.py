"""Declared versions stay honest: the committed source-digest table matches the code, and `compare` says
"bump the version of X" when X's sources changed without a bump."""

from __future__ import annotations

from fsdfm import versions
from fsdfm.versions import Unit, compare, source_digest


def test_every_versioned_unit_matches_the_committed_table():
    problems = versions.check()
    assert not problems, "\n".join(problems)


def test_every_stage_kind_and_metric_is_a_versioned_unit():
    import fsdfm.methods  # noqa: F401  (registers the method and stage kinds)
    from fsdfm.metrics.registry import METRICS
    from fsdfm.study.graph import STAGE_KINDS

    units, problems = versions.current_units()
    assert not problems
    kinds = {k for k in STAGE_KINDS.names() if STAGE_KINDS.get(k).module.startswith("fsdfm.")}
    assert {f"stage:{k}" for k in kinds} | {f"metric:{m}" for m in METRICS.names()} == set(units)


def test_changed_sources_without_a_bump_ask_for_one():
    table = {"metric:m": {"version": "1", "sources": {"pkg.mod": "aa", "pkg.other:fn": "bb"}}}
    same = {"metric:m": Unit("metric:m", "1", {"pkg.mod": "aa", "pkg.other:fn": "bb"}, "registry.py")}
    assert compare(table, same) == []
    edited = {"metric:m": Unit("metric:m", "1", {"pkg.mod": "aa", "pkg.other:fn": "cc"}, "registry.py")}
    [msg] = compare(table, edited)
    assert "bump the version of metric:m" in msg and "pkg.other:fn" in msg and "pkg.mod" not in msg.split("(")[1]
    bumped = {"metric:m": Unit("metric:m", "2", {"pkg.mod": "aa", "pkg.other:fn": "cc"}, "registry.py")}
    [msg] = compare(table, bumped)
    assert "'1' -> '2'" in msg and "--write" in msg
    [msg] = compare(table, {})
    assert "no longer a versioned unit" in msg
    [msg] = compare({}, same)
    assert "not in" in msg


def test_source_digest_of_a_module_and_of_one_function():
    import hashlib
    import inspect

    import fsdfm.metrics.diversity as diversity

    assert (
        source_digest("fsdfm.metrics.diversity")
        == hashlib.sha256(open(diversity.__file__, "rb").read().replace(b"\r\n", b"\n")).hexdigest()
    )
    assert (
        source_digest("fsdfm.metrics.diversity:rep_n")
        == hashlib.sha256(inspect.getsource(diversity.rep_n).encode()).hexdigest()
    )
