"""`fsdfm eval` scores exactly the text given (issue 24 item 1) within bounded inputs (issue 23 item 4).

On 9c2f443 each text was padded with EOS to seq_len and every id metric scored the padding: eight ordinary
sentences got entropy 1.63 instead of 2.85 and rep_n 0.65 instead of 0.09. Here each metric is checked against an
independent computation on each text's own ids (collections.Counter, a model run on one unpadded sample at a time).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fsdfm.cli import main
from fsdfm.external import EXTERNAL
from fsdfm.metrics import compute_metric_set
from fsdfm.metrics.diversity import distinct_n, entropy, rep_n_per_sample
from fsdfm.metrics.perplexity import gen_ppl_seq_mean
from fsdfm.records import read_per_sample, stage_dir


def by_hand_entropy(ids: list[int]) -> float:
    counts = Counter(ids)
    return -sum(c / len(ids) * math.log(c / len(ids)) for c in counts.values())


def by_hand_rep(ids: list[int], n: int = 4) -> float:
    grams = [tuple(ids[j : j + n]) for j in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams)


def padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, np.array([len(r) for r in rows])


ROWS = [[3, 4, 5, 3, 4, 5, 6], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [7, 7, 7, 7, 8], [2, 9, 2, 9]]


def test_id_metrics_see_only_each_samples_own_ids():
    tokens, lengths = padded(ROWS, pad=0)
    got = entropy(tokens, lengths)
    assert np.allclose(got.per_sample, [by_hand_entropy(r) for r in ROWS], rtol=0, atol=1e-12)
    assert got.nats == pytest.approx(np.mean([by_hand_entropy(r) for r in ROWS]), abs=1e-12)
    assert np.allclose(rep_n_per_sample(tokens, 4, lengths), [by_hand_rep(r) for r in ROWS], atol=1e-12)
    grams = [tuple(r[j : j + 2]) for r in ROWS for j in range(len(r) - 1)]
    assert distinct_n(tokens, 2, lengths) == pytest.approx(len(set(grams)) / len(grams))
    # a sample shorter than n has no n-gram: NaN, left out of the mean and of the count that saw rep_n
    short, lens = padded([[1, 2, 3], [1, 1, 1, 1, 1]], pad=0)
    assert np.isnan(rep_n_per_sample(short, 4, lens)[0])
    ms = compute_metric_set(short, None, ["rep_n"], lengths=lens)
    assert ms.values["rep_n"] == pytest.approx(by_hand_rep([1, 1, 1, 1, 1])) and ms.n_samples["rep_n"] == 1


def test_full_length_samples_score_bit_identically_with_or_without_lengths():
    """A model's samples fill their rows: passing their lengths changes nothing (no metric version bump)."""
    gen = np.random.default_rng(0)
    tokens = gen.integers(0, 20, size=(6, 12))
    full = np.full(6, 12)
    names = ["entropy_nats", "distinct_2", "distinct_4", "rep_n"]
    assert (
        compute_metric_set(tokens, None, names).values == compute_metric_set(tokens, None, names, lengths=full).values
    )


class _Causal(torch.nn.Module):
    """A tiny causal LM (embedding + cumulative mean of the past): logits at j depend on ids[:j+1] only."""

    def __init__(self, vocab: int = 12):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, 8, generator=g))
        self.out = torch.nn.Parameter(torch.randn(8, vocab, generator=g))

    def forward(self, ids):
        h = self.emb[ids].cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return h @ self.out


def test_gen_ppl_seq_mean_scores_each_sample_alone():
    model = _Causal()
    tokens, lengths = padded(ROWS, pad=11)
    got = gen_ppl_seq_mean(torch.as_tensor(tokens), model, batch_size=3, lengths=lengths)
    alone = [gen_ppl_seq_mean(torch.tensor([r]), model) for r in ROWS]  # no padding at all
    assert got.value == pytest.approx(np.mean([a.value for a in alone]), rel=1e-12)
    assert got.n_tokens == sum(len(r) - 1 for r in ROWS)
    assert np.allclose(got.sample_nll, [a.nll_sum for a in alone], rtol=1e-12)


SENTENCES = [
    "The cat sat on the mat.",
    "Once upon a time there was a little dog.",
    "She looked at the sun and smiled.",
    "The sun was warm and the sky was blue.",
    "A bird sang in the tall green tree.",
    "Tom ran to the park with his red ball.",
    "They ate cake and drank milk.",
    "The end.",
]
CORPUS = "Once upon a time there was a cat.\n\nThe cat sat on a mat and looked at the sun.\n\n" * 40
TEXT_SPEC = """
name: tiny_len
data: {{kind: text, train: {train}, valid: {valid}, tokenizer: bpe, vocab_size: 300, seq_len: 64}}
model: {{preset: tiny, hidden: 16, cond_dim: 8, n_blocks: 1, n_heads: 2}}
sampling: {{n_samples: 4, batch_size: 4, seed: 0}}
evaluator: {{kind: none}}
methods:
  dfm: {{kind: dfm, train: {{steps: 2, batch_size: 4, warmup_steps: 1, ema_decay: null}}, rules: [euler], budgets: [2]}}
metrics:
  names: [entropy_nats, rep_n, distinct_2, self_bleu]
"""


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def text_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("len")
    for name in ("train", "valid"):
        (tmp / f"{name}.txt").write_text(CORPUS + name)
    spec = tmp / "t.yaml"
    spec.write_text(TEXT_SPEC.format(train=tmp / "train.txt", valid=tmp / "valid.txt"))
    root = tmp / "results"
    assert main(["--results", str(root), "run", str(spec), "--executor", "debug"]) == 0
    return spec, root, root / "tiny_len"


def _tokenizer(sdir: Path):
    from fsdfm.methods.common import corpus_for
    from fsdfm.records import read_plan

    ev = next(st for st in read_plan(sdir)["stages"].values() if st["kind"] == "evaluate")
    return corpus_for(ev["config"], sdir)


def test_hand_written_texts_score_as_computed_by_hand(text_study, tmp_path, capsys):
    spec, root, sdir = text_study
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    capsys.readouterr()
    assert main(["--results", str(root), "eval", str(f), "--spec", str(spec)]) == 0
    (run,) = last_json(capsys)["runs"]
    corpus = _tokenizer(sdir)
    ids = [corpus.tokenizer.encode(t) for t in SENTENCES]
    assert all(4 <= len(i) < corpus.seq_len for i in ids)  # short texts: none cut, all padded on 9c2f443
    m = run["metrics"]
    assert m["entropy_nats"] == pytest.approx(np.mean([by_hand_entropy(i) for i in ids]), abs=1e-12)
    assert m["rep_n"] == pytest.approx(np.mean([by_hand_rep(i) for i in ids]), abs=1e-12)
    grams = [tuple(i[j : j + 2]) for i in ids for j in range(len(i) - 1)]
    assert m["distinct_2"] == pytest.approx(len(set(grams)) / len(grams))
    table = read_per_sample(stage_dir(sdir, run["stage_id"]) / "per_sample.csv")
    assert table["length"].tolist() == [len(i) for i in ids]
    assert np.allclose(table["entropy_nats"], [by_hand_entropy(i) for i in ids], atol=1e-12)


def test_a_long_text_is_cut_to_seq_len_and_reported(text_study, tmp_path, capsys):
    spec, root, sdir = text_study
    corpus = _tokenizer(sdir)
    long_text = " ".join(SENTENCES * 4)
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": SENTENCES[0]}) + "\n")
    capsys.readouterr()
    assert main(["--results", str(root), "eval", str(f), "--spec", str(spec)]) == 0
    out = capsys.readouterr()
    assert "1 of 2 texts longer than the study's seq_len 64 tokens were cut to 64 (lines 1)" in out.err
    run = json.loads(out.out.strip().splitlines()[-1])["runs"][0]
    kept = corpus.tokenizer.encode(long_text)[: corpus.seq_len]
    short = corpus.tokenizer.encode(SENTENCES[0])
    assert run["metrics"]["entropy_nats"] == pytest.approx((by_hand_entropy(kept) + by_hand_entropy(short)) / 2)


@pytest.mark.parametrize(
    "name, content, flags, message",
    [
        ("n.jsonl", b'{"text": null}\n', [], 'n.jsonl:1: "text" must be a string, got NoneType'),
        ("i.jsonl", b'{"text": "ok"}\n{"text": 5}\n', [], 'i.jsonl:2: "text" must be a string, got int'),
        ("e.jsonl", b'{"text": "  "}\n', [], 'e.jsonl:1: "text" is empty'),
        ("u.jsonl", b'{"text": "caf\xe9"}\n', [], "u.jsonl:1: not UTF-8"),
        ("s.jsonl", b'{"text": "\\ud800"}\n', [], "not valid Unicode"),
        ("big.jsonl", b'{"text": "' + b"a" * 3000 + b'"}\n', ["--max-line-bytes", "1000"], "--max-line-bytes N"),
        ("f.jsonl", b'{"text": "a b"}\n' * 50, ["--max-file-bytes", "100"], "--max-file-bytes N raises it"),
        ("m.jsonl", b'{"text": "a b"}\n' * 5, ["--max-samples", "3"], "--max-samples N raises it"),
        ("z.npy", np.zeros((0, 8), dtype=np.int64), [], "an (0, 8) array has no samples"),
        ("c.npy", np.zeros((4, 0), dtype=np.int64), [], "an (4, 0) array has no samples"),
    ],
)
def test_bad_or_too_big_input_is_one_message_and_writes_nothing(
    text_study, tmp_path, capsys, name, content, flags, message
):
    spec, root, sdir = text_study
    p = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(p, content)
    else:
        p.write_bytes(content)
    before = sorted(q.name for q in (root / "_stages").iterdir())
    ext_before = (sdir / EXTERNAL).read_bytes() if (sdir / EXTERNAL).exists() else None
    capsys.readouterr()
    assert main(["--results", str(root), "eval", str(p), "--spec", str(spec), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(q.name for q in (root / "_stages").iterdir()) == before
    assert ((sdir / EXTERNAL).read_bytes() if (sdir / EXTERNAL).exists() else None) == ext_before


def test_a_huge_one_line_file_is_refused_without_reading_it_whole(text_study, tmp_path, capsys):
    """100 MB on one line (9c2f443 grew to 21.7 GB on it): refused at the line limit, having read 1 MiB + 1."""
    import resource

    spec, root, _ = text_study
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "')
        chunk = b"word " * 200_000
        for _ in range(100):
            f.write(chunk)
        f.write(b'"}\n')
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    capsys.readouterr()
    assert main(["--results", str(root), "eval", str(p), "--spec", str(spec)]) == 2
    assert "huge.jsonl:1: line longer than 1,048,576 bytes" in capsys.readouterr().err
    # the process's peak resident size grew by far less than the file (kilobytes on Linux)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 50 * 1024


def test_npy_rows_longer_than_seq_len_are_cut_like_texts(text_study, tmp_path, capsys):
    spec, root, sdir = text_study
    corpus = _tokenizer(sdir)
    gen = np.random.default_rng(1)
    tokens = gen.integers(0, corpus.vocab_size - 1, size=(3, corpus.seq_len + 8))
    p = tmp_path / "wide.npy"
    np.save(p, tokens)
    capsys.readouterr()
    assert main(["--results", str(root), "eval", str(p), "--spec", str(spec)]) == 0
    out = capsys.readouterr()
    assert "all 3 rows have 72 ids, cut to the study's seq_len 64" in out.err
    run = json.loads(out.out.strip().splitlines()[-1])["runs"][0]
    kept = tokens[:, : corpus.seq_len]
    assert run["metrics"]["entropy_nats"] == pytest.approx(np.mean([by_hand_entropy(list(r)) for r in kept]))


def test_the_limits_help_states_the_defaults():
    from fsdfm.cli import build_parser
    from fsdfm.external import EvalLimits

    assert EvalLimits() == EvalLimits(max_file_bytes=1 << 30, max_line_bytes=1 << 20, max_samples=100_000)
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["eval"].format_help().split())
    assert "default 1 GiB" in help_text and "default 1 MiB" in help_text and "default 100,000" in help_text
