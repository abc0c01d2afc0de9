"""The GPT-2 AR baseline / reference evaluator: loss, KV-cache sampling, training and the Hugging Face loading path."""

import inspect
import math
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from fsdfm.ar import ARConfig, ar_loss, ar_nll, build_ar, sample_ar, train_ar, train_reference_evaluator
from fsdfm.model import model_config
from fsdfm.train import OptimConfig

V, L, BOS = 12, 10, 0


def tiny(seed: int = 0, vocab: int = V, seq_len: int = L) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_ar(ARConfig(vocab_size=vocab, seq_len=seq_len, hidden=32, n_blocks=2, n_heads=2), bos_id=BOS)
    with torch.no_grad():  # a wider init than GPT-2's 0.02, so next-token distributions depend on the prefix
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def test_build_ar_follows_the_dit_size():
    dit = model_config("tiny", vocab_size=100, seq_len=32, input_vocab_size=101)
    cfg = ARConfig.from_model_config(dit)
    assert cfg == ARConfig(vocab_size=100, seq_len=32, hidden=dit.hidden, n_blocks=dit.n_blocks, n_heads=dit.n_heads)
    model = build_ar(cfg, bos_id=7)
    c = model.config
    sizes = (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head)
    assert sizes == (100, 33, dit.hidden, dit.n_blocks, dit.n_heads)
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.0
    assert c.bos_token_id == c.eos_token_id == 7
    with pytest.raises(ValueError, match="n_heads"):
        ARConfig(vocab_size=10, seq_len=8, hidden=30, n_heads=4)
    with pytest.raises(ValueError, match="bos_id 100"):
        build_ar(cfg, bos_id=100)


def test_ar_loss_predicts_every_token_after_bos():
    model = tiny()
    x = torch.randint(V, (3, L), generator=torch.Generator().manual_seed(1))
    loss = ar_loss(model, x, BOS)
    # Independent: one forward per prefix, -log softmax of the next token.
    manual = []
    for b in range(3):
        for i in range(L):
            prefix = torch.cat([torch.tensor([BOS]), x[b, :i]])[None]
            manual.append(-torch.log_softmax(model(input_ids=prefix).logits[0, -1], -1)[x[b, i]])
    assert loss.item() == pytest.approx(torch.stack(manual).mean().item(), rel=1e-5)
    # And Hugging Face's own shifted loss on [BOS, x] (its last position predicts nothing).
    full = torch.cat([torch.full((3, 1), BOS), x], dim=1)
    labels = full.clone()
    labels[:, 0] = -100
    assert loss.item() == pytest.approx(model(input_ids=full, labels=labels).loss.item(), rel=1e-5)
    assert ar_nll(model, x, BOS, batch_size=2) == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="token id 12"):
        ar_loss(model, torch.full((1, L), 12), BOS)


def test_cached_and_uncached_sampling_draw_the_same_tokens():
    model = tiny(seed=3)
    a = sample_ar(model, 6, L, BOS, generator=torch.Generator().manual_seed(5), use_cache=True)
    b = sample_ar(model, 6, L, BOS, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert a.tokens.shape == (6, L) and a.tokens.dtype == torch.long
    assert torch.equal(a.tokens, b.tokens)
    assert a.nfe == b.nfe == L
    assert len(set(a.tokens.flatten().tolist())) > 3  # a non-trivial distribution, so the check means something
    torch.testing.assert_close(a.time_grid, torch.linspace(0, 1, L + 1, dtype=torch.float64))
    assert a.wall_s > 0


def test_model_preferring_one_token_emits_it_everywhere():
    model = tiny(seed=1)
    k = 7
    with torch.no_grad():
        # Final LayerNorm outputs the constant vector 100 * e_0; the (tied) output row k alone has a 1 in dim 0,
        # so logits are 100 for token k and 0 for every other token, whatever the prefix.
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 100.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[k, 0] = 1.0
    out = sample_ar(model, 7, L, BOS, generator=torch.Generator().manual_seed(0), batch_size=3)
    assert out.tokens.shape == (7, L)
    assert torch.all(out.tokens == k)


def test_batches_and_remainder():
    model = tiny(seed=2)
    batched = sample_ar(model, 7, L, BOS, generator=torch.Generator().manual_seed(9), batch_size=3)
    first = sample_ar(model, 3, L, BOS, generator=torch.Generator().manual_seed(9))
    assert batched.tokens.shape == (7, L)
    assert torch.equal(batched.tokens[:3], first.tokens)  # the first batch consumes the generator first
    again = sample_ar(model, 7, L, BOS, generator=torch.Generator().manual_seed(9), batch_size=3)
    assert torch.equal(batched.tokens, again.tokens)
    assert int(batched.tokens.max()) < V and int(batched.tokens.min()) >= 0
    with pytest.raises(ValueError, match="n_positions"):
        sample_ar(model, 2, L + 2, BOS)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_token_frequencies_follow_softmax(temperature):
    model = tiny(seed=4)
    n = 4000
    out = sample_ar(model, n, 1, BOS, generator=torch.Generator().manual_seed(0), temperature=temperature)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[BOS]])).logits[0, -1].double()
    p = torch.softmax(logits / temperature, -1)
    freq = torch.bincount(out.tokens[:, 0], minlength=V).double() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert torch.all((freq - p).abs() < 5 * sigma + 1e-9)


def cyclic_blocks(n: int, seq_len: int, vocab: int, first: int, seed: int) -> torch.Tensor:
    """Blocks that walk the ids first..vocab-1 cyclically from a random start: unigram-uniform, next token fixed."""
    g = torch.Generator().manual_seed(seed)
    span = vocab - first
    start = torch.randint(span, (n, 1), generator=g)
    return first + (start + torch.arange(seq_len)) % span


def test_train_ar_learns_saves_and_reloads(tmp_path):
    data = cyclic_blocks(256, L, V, first=1, seed=0)
    valid = cyclic_blocks(64, L, V, first=1, seed=1)
    unigram = math.log(V - 1)  # empirical tokens are uniform over ids 1..V-1
    cfg = ARConfig(vocab_size=V, seq_len=L, hidden=32, n_blocks=2, n_heads=2)
    optim = OptimConfig(steps=80, batch_size=16, lr=3e-3, warmup_steps=5, ema_decay=0.9, seed=0, ckpt_every=40)
    res = train_ar(data, cfg, optim, tmp_path, bos_id=BOS, valid=valid, progress=False)
    assert res.fit.steps == 80 and len(res.fit.losses) == 80
    assert sum(res.fit.losses[-10:]) / 10 < 0.5 * unigram < sum(res.fit.losses[:5]) / 5
    assert res.val_nll < 0.5 * unigram
    assert res.n_params == res.fit.ema.num_parameters()
    loaded = AutoModelForCausalLM.from_pretrained(res.hf_dir).eval()
    assert loaded.config.n_positions == L + 1 and loaded.config.bos_token_id == BOS
    x = torch.cat([torch.full((4, 1), BOS), valid[:4]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, res.fit.ema.eval()(input_ids=x).logits)
    assert ar_nll(loaded, valid, BOS) == pytest.approx(res.val_nll, rel=1e-6)
    # A second call resumes from the finished checkpoint instead of training again.
    again = train_ar(data, cfg, optim, tmp_path, bos_id=BOS, valid=valid, progress=False)
    assert again.fit.resumed_from == 80 and again.val_nll == pytest.approx(res.val_nll, rel=1e-6)


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=words[0], bos_token=words[0], unk_token=words[0])


def test_reference_evaluator_loads_offline_with_its_tokenizer(tmp_path):
    words = ["<eos>", "once", "upon", "a", "time", "there", "was", "cat", "who", "sat", "mat", "end"]
    tokenizer = word_tokenizer(words)
    data = cyclic_blocks(256, L, len(words), first=1, seed=2)
    cfg = ARConfig(vocab_size=len(words), seq_len=L, hidden=32, n_blocks=2, n_heads=2)
    optim = OptimConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, ema_decay=None, seed=1, ckpt_every=0)
    path = train_reference_evaluator(data, tokenizer, cfg, optim, tmp_path / "evaluator", progress=False)
    assert path == tmp_path / "evaluator" / "hf"
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tok.eos_token == "<eos>" and model.config.bos_token_id == tok.eos_token_id == 0
    text = "once upon a time there was"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [1, 2, 3, 4, 5, 6] and tok.decode(ids) == text
    assert ar_nll(model, data[:64], tok.eos_token_id) < 0.5 * math.log(len(words) - 1)
    with pytest.raises(ValueError, match="more than ARConfig.vocab_size"):
        train_reference_evaluator(
            data,
            tokenizer,
            ARConfig(vocab_size=5, seq_len=L, hidden=32, n_blocks=1, n_heads=2),
            optim,
            tmp_path / "bad",
            progress=False,
        )


def test_kv_cache_goes_through_the_supported_cache_api():
    """The cached path hands the model one transformers `Cache` object (never legacy tuples), under the keyword
    the installed transformers supports, and triggers no deprecation warning."""
    from transformers import Cache

    model = tiny(seed=3)
    seen = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            out = sample_ar(model, 2, L, BOS, generator=torch.Generator().manual_seed(1))
    finally:
        handle.remove()
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    caches = [kw[key] for kw in seen]
    assert len(caches) == L and all(isinstance(c, Cache) for c in caches)
    assert all(c is caches[0] for c in caches)  # one cache, grown in place
    assert caches[0].get_seq_length() == L  # BOS + the first L - 1 tokens: every step but the last was cached
    assert [kw["input_ids"].shape[1] for kw in seen] == [1] * L
    assert out.tokens.shape == (2, L)
