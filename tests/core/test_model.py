import pytest
import torch

from gpt.config import ModelConfig, preset
from gpt.model import GPT, causal_attention


def test_presets_have_the_documented_sizes():
    assert preset("tiny").n_layers == 2 and preset("tiny").d_model == 64
    assert 10e6 <= preset("small").num_parameters() <= 30e6
    assert GPT(preset("tiny")).num_parameters() == preset("tiny").num_parameters()


def test_config_refuses_what_the_model_cannot_run():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(d_model=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**preset("tiny").to_dict(), "alibi": True})


def test_future_tokens_do_not_change_past_logits(tiny_model):
    x = torch.randint(0, tiny_model.config.vocab_size, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % tiny_model.config.vocab_size
    with torch.no_grad():
        a, b = tiny_model(x), tiny_model(y)
    torch.testing.assert_close(a[0, :10], b[0, :10])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_hook_sees_rotated_gqa_tensors_and_can_replace_attention(tiny_model):
    seen = []

    def hook(layer, q, k, v):
        seen.append((layer, q.shape, k.shape))
        return causal_attention(q, k, v)

    x = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(x, hook=hook), tiny_model(x))
    cfg = tiny_model.config
    assert seen[0] == (0, (2, cfg.n_heads, 9, cfg.head_dim), (2, cfg.n_kv_heads, 9, cfg.head_dim))
    assert [s[0] for s in seen] == list(range(cfg.n_layers))


def test_positions_shift_is_rope_relative(tiny_model):
    """Attention scores depend on relative positions only: the same tokens at an offset
    give the same logits."""
    x = torch.randint(0, tiny_model.config.vocab_size, (1, 12))
    pos = torch.arange(12)[None] + 37
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(x), tiny_model(x, positions=pos), atol=1e-4, rtol=1e-4)


def test_tied_embeddings_share_storage(tiny_tokenizer):
    m = GPT(preset("tiny").replace(vocab_size=tiny_tokenizer.vocab_size))
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()
    m = GPT(preset("tiny").replace(vocab_size=tiny_tokenizer.vocab_size, tie_embeddings=False))
    assert m.lm_head.weight.data_ptr() != m.embed_tokens.weight.data_ptr()
