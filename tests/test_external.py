"""`fsdfm eval FILES --spec SPEC` (fsdfm.external): external samples scored with the study's metrics, recorded
as a run whose stage id holds the file's content hash, and shown in the report as an external row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fsdfm.cli import main
from fsdfm.external import EXTERNAL, SAMPLING_METRICS
from fsdfm.records import read_plan
from fsdfm.records import is_done, load, load_records, stage_dir

SPEC = """
name: tiny_ext
data:
  kind: oracle
  seq_len: 8
  oracle: {source: markov, vocab_size: 6, order: 1, support: 2, epsilon: 0.001, seed: 1, n_train: 64, n_valid: 16}
model: {preset: tiny, hidden: 16, cond_dim: 8, n_blocks: 1, n_heads: 2}
sampling: {n_samples: 4, batch_size: 4, seed: 0}
evaluator: {kind: none}
methods:
  dfm: {kind: dfm, train: {steps: 2, batch_size: 4, warmup_steps: 1, ema_decay: null}, rules: [euler], budgets: [2]}
metrics:
  names: [entropy_nats, distinct_2, rep_n]
"""


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ext")
    (tmp / "tiny_ext.yaml").write_text(SPEC)
    assert main(["--results", str(tmp / "results"), "run", str(tmp / "tiny_ext.yaml"), "--executor", "debug"]) == 0
    return tmp / "tiny_ext.yaml", tmp / "results", tmp / "results" / "tiny_ext"


def test_eval_of_the_studys_own_samples_reproduces_its_metrics(finished, capsys):
    spec, root, sdir = finished
    capsys.readouterr()
    ev = next(r for r in load_records(sdir, kind="evaluate"))
    samples = stage_dir(sdir, ev["inputs"]["samples"]) / "samples.npy"
    assert main(["--results", str(root), "eval", str(samples), "--spec", str(spec), "--label", "own"]) == 0
    res = last_json(capsys)
    (run,) = res["runs"]
    assert run["stage_id"].startswith("evaluate_external-")
    want = {k: v for k, v in ev["payload"]["metrics"].items() if k not in SAMPLING_METRICS}
    assert run["metrics"] == want  # every non-sampling metric, exactly (the external file has no sampler)
    assert is_done(stage_dir(sdir, run["stage_id"]))
    # a run of the study: load() has its row, labelled, kind external; the record keeps its own copy
    df = load(sdir)
    row = df[df["run_id"] == run["run_id"]].iloc[0]
    assert row["kind"] == "external" and row["label"] == "own" and row["entropy_nats"] == want["entropy_nats"]
    assert (stage_dir(sdir, run["stage_id"]) / "external.npy").read_bytes() == samples.read_bytes()
    # the same file again is the same stage (content-addressed): nothing new
    assert main(["--results", str(root), "eval", str(samples), "--spec", str(sdir), "--label", "own"]) == 0
    assert last_json(capsys)["runs"][0]["stage_id"] == run["stage_id"]
    assert sum(r.startswith("external-") for r in load(sdir)["run_id"]) == 1
    # a re-run of the spec rewrites plan.json but keeps the external row, and redoes nothing
    assert main(["--results", str(root), "run", str(spec), "--executor", "debug"]) == 0
    assert last_json(capsys)["done"] == 0
    assert run["stage_id"] in read_plan(sdir)["stages"]
    # and the report shows it as its own row
    assert main(["--results", str(root), "report", str(sdir)]) == 0
    index = Path(last_json(capsys)["report"]).read_text()
    assert "own" in index


def test_changed_file_is_a_new_stage(finished, capsys, tmp_path):
    spec, root, sdir = finished
    tokens = np.array([[0, 1, 2, 3, 4, 5, 0, 1]] * 4, dtype=np.int64)
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, tokens)
    np.save(b, tokens[:, ::-1].copy())
    capsys.readouterr()
    assert main(["--results", str(root), "eval", str(a), str(b), "--spec", str(spec)]) == 0
    runs = last_json(capsys)["runs"]
    assert [r["label"] for r in runs] == ["a", "b"] and runs[0]["stage_id"] != runs[1]["stage_id"]
    # distinct_2 by hand: 4 copies of one row with 7 bigrams, 6 distinct ((0,1) twice) -> 6 / 28
    assert runs[0]["metrics"]["distinct_2"] == pytest.approx(6 / 28)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("s.txt", b"hello", "unknown sample file type '.txt'"),
        ("s.npy", None, "the study's vocabulary has 6 ids"),
        ("s.jsonl", b'{"text": "a b"}\n', "needs a study with a tokenizer"),
        ("t.jsonl", b'{"txt": "a"}\n', 't.jsonl:1: each line must be a JSON object with a "text" key'),
    ],
)
def test_bad_files_are_exit_2_naming_the_file_and_write_nothing(finished, capsys, tmp_path, name, content, message):
    spec, root, sdir = finished
    p = tmp_path / name
    if content is None:
        np.save(p, np.full((2, 8), 9, dtype=np.int64))
    else:
        p.write_bytes(content)
    before = (sdir / EXTERNAL).read_bytes() if (sdir / EXTERNAL).exists() else None
    capsys.readouterr()
    assert main(["--results", str(root), "eval", str(p), "--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert ((sdir / EXTERNAL).read_bytes() if (sdir / EXTERNAL).exists() else None) == before


TEXT = "Once upon a time there was a cat.\n\nThe cat sat on a mat and looked at the sun.\n\n" * 20
TEXT_SPEC = """
name: tiny_ext_text
data: {{kind: text, train: {train}, valid: {valid}, tokenizer: bpe, vocab_size: 300, seq_len: 16}}
model: {{preset: tiny, hidden: 16, cond_dim: 8, n_blocks: 1, n_heads: 2}}
sampling: {{n_samples: 4, batch_size: 4, seed: 0}}
evaluator: {{kind: reference, train: {{steps: 2, batch_size: 4}}}}
methods:
  dfm: {{kind: dfm, train: {{steps: 2, batch_size: 4}}, rules: [euler], budgets: [2]}}
metrics:
  names: [gen_ppl, self_bleu, entropy_nats]
"""


@pytest.mark.slow
def test_eval_of_the_studys_own_texts_reproduces_its_text_metrics(tmp_path, capsys):
    """The study's own samples.npy scores every metric of the run, text metrics included (gen_ppl under the
    reference evaluator, self-BLEU: the texts are the ids decoded, as the run's). The .jsonl of the same samples
    need not: its texts are re-encoded, and a lossy decode (a partial UTF-8 byte token becomes U+FFFD, 3 bytes)
    re-encodes longer than seq_len, so that text is cut to seq_len tokens (reported), as any over-long text is."""
    for name in ("train", "valid"):
        (tmp_path / f"{name}.txt").write_text(TEXT + name)
    spec = tmp_path / "t.yaml"
    spec.write_text(TEXT_SPEC.format(train=tmp_path / "train.txt", valid=tmp_path / "valid.txt"))
    root = tmp_path / "results"
    assert main(["--results", str(root), "run", str(spec), "--executor", "debug"]) == 0
    sdir = root / "tiny_ext_text"
    ev = next(r for r in load_records(sdir, kind="evaluate"))
    ids = stage_dir(sdir, ev["inputs"]["samples"]) / "samples.npy"
    capsys.readouterr()
    assert main(["--results", str(root), "eval", str(ids), "--spec", str(spec)]) == 0
    got = last_json(capsys)["runs"][0]["metrics"]
    for k in ("gen_ppl", "gen_ppl_n_tokens", "self_bleu", "entropy_nats"):
        assert got[k] == ev["payload"]["metrics"][k]


def test_external_rows_are_counted_apart_and_are_no_ablation(finished, capsys, tmp_path):
    """9c2f443: after `fsdfm eval` of two files the report said "N+2 finished of N planned" and added an "ablation
    of external" table, as if two scored files were variants of one method."""
    spec, root, sdir = finished
    files = []
    for i, row in enumerate(([0, 1, 2, 3, 4, 5, 0, 1], [5, 4, 3, 2, 1, 0, 5, 4])):
        files.append(tmp_path / f"x{i}.npy")
        np.save(files[-1], np.array([row] * 4, dtype=np.int64))
    assert main(["--results", str(root), "eval", *map(str, files), "--spec", str(spec)]) == 0
    plan_runs = [r for r in read_plan(sdir)["runs"] if r["params"].get("kind") != "external"]
    n_ext = sum(r["run_id"].startswith("external-") for r in load(sdir).to_dict("records"))
    assert n_ext >= 2
    capsys.readouterr()
    assert main(["--results", str(root), "report", str(sdir)]) == 0
    out = Path(last_json(capsys)["report"])
    index = out.read_text()
    assert f"runs: {len(plan_runs)} finished of {len(plan_runs)} planned; {n_ext} external sample file(s)" in index
    assert "ablation of external" not in index and not (out.parent / "table_ablation_external.md").exists()
