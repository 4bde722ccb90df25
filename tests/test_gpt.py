"""Specification of the GPT backbone: masks, KV cache, GPT-2 weight loading, bookkeeping."""
import pytest
import torch

from kernels.attention import AttentionMask
from models.gpt import GPT, GPTConfig


def tiny_config(**kw) -> GPTConfig:
    base = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    return GPTConfig(**{**base, **kw})


def tiny_model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**kw)).eval()


def test_logits_shape_and_dtype():
    model = tiny_model()
    logits = model(torch.randint(0, 64, (3, 17)))
    assert logits.shape == (3, 17, 64)
    assert logits.dtype == torch.float32


def test_causal_model_does_not_see_the_future():
    model = tiny_model(attention="causal")
    x = torch.randint(0, 64, (2, 20))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 64, (2, 10))  # change only the future
    assert torch.equal(model(x)[:, :10], model(y)[:, :10])


def test_bidirectional_model_sees_the_future():
    model = tiny_model(attention="bidirectional")
    x = torch.randint(0, 64, (2, 20))
    y = x.clone()
    y[:, 15] = (y[:, 15] + 1) % 64
    assert not torch.allclose(model(x)[:, :10], model(y)[:, :10])


def test_block_causal_sees_its_block_but_not_the_next():
    model = tiny_model(attention="block_causal", block_length=4)
    x = torch.randint(0, 64, (1, 16))
    inside = x.clone()
    inside[0, 7] = (inside[0, 7] + 1) % 64  # same block (4..7) as position 5
    later = x.clone()
    later[0, 8] = (later[0, 8] + 1) % 64  # next block
    base = model(x)
    assert not torch.allclose(base[0, 5], model(inside)[0, 5])
    assert torch.equal(base[0, :8], model(later)[0, :8])


@pytest.mark.parametrize("attention,block_length", [("causal", 0), ("block_causal", 4)])
def test_kv_cache_reproduces_full_forward(attention, block_length):
    """Decoding with a KV cache must give the logits of one full forward pass (to float rounding)."""
    model = tiny_model(attention=attention, block_length=block_length)
    x = torch.randint(0, 64, (2, 24))
    full = model(x)
    _, kv = model(x[:, :16], return_kv=True)  # prefix = whole blocks
    cached = model(x[:, 16:], past_kv=kv)
    torch.testing.assert_close(cached, full[:, 16:], rtol=0, atol=1e-5)  # 1e-5: fp32 sum order differs


def test_right_padding_does_not_change_real_tokens():
    """Key padding: a sequence padded with junk gives the logits of the unpadded sequence."""
    model = tiny_model(attention="bidirectional")
    x = torch.randint(0, 64, (1, 10))
    padded = torch.cat([x, torch.randint(0, 64, (1, 6))], dim=1)
    mask = AttentionMask(kind="bidirectional", key_lengths=torch.tensor([10]))
    torch.testing.assert_close(model(padded, mask=mask)[:, :10], model(x), rtol=0, atol=1e-5)


def test_context_overflow_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("bad", [dict(attention="sideways"), dict(attn_impl="cuda"), dict(n_head=5),
                                 dict(attention="block_causal", block_length=0)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        tiny_config(**bad)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({"n_layer": 2, "n_layers": 3})


def test_param_count_and_flops():
    model = tiny_model()
    cfg = model.config
    per_block = 12 * cfg.n_embd ** 2 + 13 * cfg.n_embd  # attn (4C^2 + 4C) + mlp (8C^2 + 5C) + 2 LN (4C)
    expected = cfg.vocab_size * cfg.n_embd + cfg.n_layer * per_block + 2 * cfg.n_embd  # + ln_f
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + cfg.block_size * cfg.n_embd
    assert model.flops_per_token() == 6 * expected + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_weight_decay_only_on_matrices():
    groups = tiny_model().optimizer_param_groups(0.1)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_from_pretrained_matches_transformers(tmp_path):
    """A tiny random GPT2LMHeadModel saved locally loads with identical logits (no network needed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=2, vocab_size=100)).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # the tolerance
