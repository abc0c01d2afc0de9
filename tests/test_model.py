"""The DiT: teacher -> student equivalence, one-hot float input, conditioning, presets and input checks."""

import pytest
import torch
import torch.nn.functional as F

from fsdfm.model import DiT, ModelConfig, PRESETS, model_config, student_from_teacher

V, L = 11, 9
CFG = ModelConfig(vocab_size=V, input_vocab_size=V + 1, seq_len=L, hidden=32, cond_dim=16, n_blocks=2, n_heads=2)


def _randomised(model: DiT, seed: int = 0) -> DiT:
    """Overwrite every parameter with noise: the zero-initialised heads would otherwise make every test trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _inputs(B=3, seed=1, vocab=V + 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (B, L), generator=gen), torch.rand(B, generator=gen)


def test_fresh_model_predicts_uniform_logits():
    # zero-initialised head: logits exactly 0 at init, so the first DFM loss is log V
    model = DiT(CFG)
    x, t = _inputs()
    out = model(x, t)
    assert out.shape == (3, L, V) and bool((out == 0).all())


@pytest.mark.parametrize("h_embedding", ["raw", "log2"])
def test_student_from_teacher_reproduces_teacher_for_any_h(h_embedding):
    torch.manual_seed(0)
    teacher = _randomised(DiT(CFG)).eval()
    student = student_from_teacher(teacher, h_embedding=h_embedding).eval()
    assert student.cfg.h_embedding == h_embedding and teacher.cfg.h_embedding == "none"
    x, t = _inputs()
    with torch.no_grad():
        ref = teacher(x, t)
        assert ref.abs().max() > 0.1  # non-trivial function
        for h in (1.0, 0.5, 2.0**-3, 2.0**-10):
            out = student(x, t, torch.full((3,), h))
            assert torch.equal(out, ref), h


def test_student_h_path_changes_output_once_trained():
    torch.manual_seed(0)
    student = student_from_teacher(_randomised(DiT(CFG)), "log2")
    _randomised(student.h_emb, seed=3)
    x, t = _inputs()
    with torch.no_grad():
        a = student(x, t, torch.full((3,), 0.5))
        b = student(x, t, torch.full((3,), 0.125))
    assert not torch.allclose(a, b)


def test_student_needs_h_and_an_h_embedding():
    teacher = DiT(CFG)
    with pytest.raises(ValueError, match="needs an h embedding"):
        student_from_teacher(teacher, "none")
    student = student_from_teacher(teacher, "raw")
    x, t = _inputs()
    with pytest.raises(ValueError, match="pass h"):
        student(x, t)


def test_h_features():
    raw = DiT(ModelConfig(vocab_size=V, seq_len=L, hidden=32, cond_dim=16, n_blocks=1, n_heads=2, h_embedding="raw"))
    log2 = DiT(ModelConfig(vocab_size=V, seq_len=L, hidden=32, cond_dim=16, n_blocks=1, n_heads=2, h_embedding="log2"))
    h = torch.tensor([1.0, 0.5, 2.0**-10])
    assert torch.allclose(raw.h_features(h), torch.tensor([1000.0, 500.0, 1000.0 / 1024]))
    assert torch.allclose(log2.h_features(h), torch.tensor([0.0, 100.0, 1000.0]))


def test_one_hot_float_input_equals_id_input():
    torch.manual_seed(0)
    model = _randomised(DiT(CFG)).eval()
    x, t = _inputs(vocab=V)  # data tokens only: a mask id has no one-hot over V
    with torch.no_grad():
        by_id = model(x, t)
        by_float = model(F.one_hot(x, V).float(), t)
        by_double = model(F.one_hot(x, V).double(), t)
    assert torch.equal(by_id, by_float)
    assert torch.equal(by_id, by_double)


def test_float_input_is_linear_in_the_embedding():
    # a soft state reads the embedding x @ W_emb[:V]
    torch.manual_seed(0)
    model = _randomised(DiT(CFG)).eval()
    soft = torch.softmax(torch.randn(2, L, V), dim=-1)
    expected = soft @ model.tok_emb.weight[:V]
    assert torch.allclose(model.embed(soft), expected, atol=1e-6)


def test_model_is_bidirectional_and_position_aware():
    torch.manual_seed(0)
    model = _randomised(DiT(CFG)).eval()
    x, t = _inputs(B=1)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % V
    with torch.no_grad():
        a, b = model(x, t), model(y, t)
        # changing the last token changes the prediction at the first position (no causal mask)
        assert not torch.allclose(a[0, 0], b[0, 0])
        # swapping two tokens leaves the set of keys seen from the last position unchanged: without position
        # information its output would be the same; rotary attention makes it depend on where they sit
        u = torch.full((1, L), 2)
        u[0, 0], u[0, 1] = 5, 7
        w = u.clone()
        w[0, 0], w[0, 1] = 7, 5
        assert not torch.allclose(model(u, t)[0, -1], model(w, t)[0, -1])


def test_t_conditioning_matters():
    torch.manual_seed(0)
    model = _randomised(DiT(CFG)).eval()
    x, _ = _inputs(B=2)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([0.9, 0.9])))


def test_seq_len_check():
    model = DiT(CFG)
    x = torch.zeros(1, L + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=f"sequence length {L + 1} exceeds the model's seq_len {L}"):
        model(x, torch.zeros(1))
    # shorter sequences are fine
    assert model(x[:, : L - 2], torch.zeros(1)).shape == (1, L - 2, V)


def test_config_validation():
    with pytest.raises(ValueError, match="input_vocab_size"):
        ModelConfig(vocab_size=10, input_vocab_size=5, seq_len=4)
    with pytest.raises(ValueError, match="heads of even size"):
        ModelConfig(vocab_size=10, seq_len=4, hidden=30, n_heads=4)
    with pytest.raises(ValueError, match="h_embedding"):
        ModelConfig(vocab_size=10, seq_len=4, h_embedding="log10")
    with pytest.raises(ValueError, match="model.n_blocks"):
        ModelConfig(vocab_size=10, seq_len=4, n_blocks=0)
    assert ModelConfig(vocab_size=10, seq_len=4).input_vocab_size == 10


def test_presets():
    assert set(PRESETS.names()) >= {"tiny", "small", "1.3b"}
    tiny = model_config("tiny", vocab_size=50, seq_len=16, input_vocab_size=51)
    assert (tiny.hidden, tiny.cond_dim, tiny.n_blocks, tiny.n_heads) == (128, 64, 4, 4)
    model = DiT(tiny)
    assert model.tok_emb.weight.shape == (51, 128)
    assert model.head.weight.shape == (50, 128)
    assert len(model.blocks) == 4
    assert model(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2)).shape == (2, 16, 50)

    small = model_config("small", vocab_size=50257, seq_len=1024)
    assert (small.hidden, small.cond_dim, small.n_blocks, small.n_heads) == (768, 128, 12, 12)
    big = model_config("1.3b", vocab_size=50257, seq_len=1024, input_vocab_size=50258, h_embedding="log2")
    assert (big.hidden, big.cond_dim, big.n_blocks, big.n_heads) == (2048, 256, 21, 32)
    assert big.input_vocab_size == 50258 and big.h_embedding == "log2"
    # overrides win over the preset
    assert model_config("tiny", vocab_size=50, seq_len=16, n_blocks=2).n_blocks == 2
    with pytest.raises(KeyError, match="did you mean 'tiny'"):
        model_config("tinny", vocab_size=50, seq_len=16)
