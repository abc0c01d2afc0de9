"""Benchmark: all sample metrics together on a small-scale evaluation, CPU.

Setup (not timed): a byte-level BPE tokenizer (vocab 2048) trained with `tokenizers` on the bundled
TinyStories train split; a GPT-2 evaluator shaped like the suite's small reference model (n_layer=4,
n_embd=128, n_head=4, vocab 2048, n_positions=128; randomly initialised: cost does not depend on the
weights); 256 samples of 128 tokens (uniformly random ids by default, or real held-out windows with
--samples data) decoded to text; 256 real held-out 128-token windows as MAUVE references.

Timed (wall-clock, and the process CPU time as a load-independent check on a shared machine): one
`compute_metrics` call with gen_ppl, entropy, distinct-1..4, self_bleu, rep_n and mauve (MiniLM
features; the MiniLM load and the `mauve` import are included, they are paid once per process), then each
metric on its own for the breakdown. Prints a table and ends with one JSON line.

    python benchmarks/bench_eval.py [--n 256] [--length 128] [--samples random|data] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_key, "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

EOS = "<|endoftext|>"
NAMES = [
    "gen_ppl",
    "entropy_nats",
    "entropy_bits",
    "distinct_1",
    "distinct_2",
    "distinct_3",
    "distinct_4",
    "self_bleu",
    "rep_n",
    "mauve",
]


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(ROOT / "data" / "tinystories" / "train.txt")], trainer)
    return tok


def windows(tok, split: str, n: int, length: int, rng: random.Random) -> torch.Tensor:
    """n random length-token windows of the split, documents joined by EOS as in packed training blocks."""
    text = (ROOT / "data" / "tinystories" / f"{split}.txt").read_text()
    docs = [d.strip() for d in text.split(EOS) if d.strip()]
    ids = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids + [tok.token_to_id(EOS)])
    starts = [rng.randrange(0, len(ids) - length) for _ in range(n)]
    return torch.tensor([ids[s : s + length] for s in starts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--samples", choices=["random", "data"], default="random")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-breakdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from fsdfm.metrics import Evaluator, compute_metrics

    t0 = time.perf_counter()
    tok = train_tokenizer(args.vocab)
    t_tok = time.perf_counter() - t0
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    eos_id = tok.token_to_id(EOS)
    cfg = GPT2Config(
        n_layer=4,
        n_embd=128,
        n_head=4,
        vocab_size=tok.get_vocab_size(),
        n_positions=args.length,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    evaluator = Evaluator(GPT2LMHeadModel(cfg), hf_tok, name="bench-gpt2-4x128")
    if args.samples == "random":
        ids = torch.randint(1, tok.get_vocab_size(), (args.n, args.length))  # id 0 is EOS
    else:
        ids = windows(tok, "valid", args.n, args.length, rng)
    texts = tok.decode_batch(ids.tolist(), skip_special_tokens=False)
    references = tok.decode_batch(windows(tok, "valid", args.n, args.length, rng).tolist(), skip_special_tokens=False)
    retok = [len(e) for e in hf_tok(texts, add_special_tokens=False)["input_ids"]]
    n_over = sum(r > args.length for r in retok)
    setup_s = time.perf_counter() - t0

    kwargs = dict(
        evaluator=evaluator,
        references=references,
        mauve_featurizer="minilm",
        seed=args.seed,
        batch_size=32,
        max_length=args.length,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation of re-tokenized random text is expected; counted below
        t0, c0 = time.perf_counter(), time.process_time()
        values = compute_metrics(ids, texts, NAMES, **kwargs)
        total_s, total_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        breakdown = {}
        if not args.no_breakdown:  # warm now: MiniLM loaded and mauve imported
            for name in NAMES:
                t0 = time.perf_counter()
                compute_metrics(ids, texts, [name], **kwargs)
                breakdown[name] = time.perf_counter() - t0

    print(
        f"samples: {args.n} x {args.length} tokens ({args.samples}); evaluator GPT-2 4x128, vocab "
        f"{tok.get_vocab_size()}; {torch.get_num_threads()} threads; tokenizer trained in {t_tok:.1f} s; "
        f"setup {setup_s:.1f} s; {n_over} texts re-tokenize to > {args.length} tokens (truncated for gen_ppl)"
    )
    print(f"{'metric':<14}{'value':>12}{'alone (warm) s':>16}")
    for name in NAMES:
        print(f"{name:<14}{values[name]:>12.4f}{breakdown.get(name, float('nan')):>16.2f}")
    print(
        f"{'all together':<14}{'':>12}{total_s:>16.2f}  (cold: includes the MiniLM load and the mauve import; "
        f"process CPU time {total_cpu_s:.1f} s, load average {os.getloadavg()[0]:.1f})"
    )
    print(
        json.dumps(
            {
                "bench": "eval",
                "n": args.n,
                "length": args.length,
                "samples": args.samples,
                "threads": torch.get_num_threads(),
                "total_s": round(total_s, 3),
                "total_cpu_s": round(total_cpu_s, 3),
                "loadavg_1min": round(os.getloadavg()[0], 2),
                "breakdown_s": {k: round(v, 3) for k, v in breakdown.items()},
                "values": {k: round(v, 6) for k, v in values.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
