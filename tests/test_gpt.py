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


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("attention,block_length", [("causal", 0), ("block_causal", 4)])
def test_kv_cache_reproduces_full_forward(attention, block_length, pos_emb):
    """Decoding with a KV cache must give the logits of one full forward pass (to float rounding);
    with rope the cache holds keys already rotated by their own positions."""
    model = tiny_model(attention=attention, block_length=block_length, pos_emb=pos_emb)
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
                                 dict(attention="block_causal", block_length=0), dict(pos_emb="alibi"),
                                 dict(pos_emb="rope", n_embd=30)])  # rope needs an even head size (15 here)
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        tiny_config(**bad)


def test_bad_pos_emb_names_the_choices():
    with pytest.raises(ValueError, match=r"pos_emb='Rope'.*'learned', 'rope'"):
        tiny_config(pos_emb="Rope")


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({"n_layer": 2, "n_layers": 3})


def test_param_count_and_flops():
    model = tiny_model()
    cfg = model.config
    per_layer = 12 * cfg.n_embd ** 2 + 13 * cfg.n_embd  # attn (4C^2 + 4C) + mlp (8C^2 + 5C) + 2 LN (4C)
    expected = cfg.vocab_size * cfg.n_embd + cfg.n_layer * per_layer + 2 * cfg.n_embd  # + ln_f
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + cfg.block_size * cfg.n_embd
    assert model.flops_per_token() == 6 * expected + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_rope_has_no_position_parameters_and_checkpoints_no_tables():
    learned, rope = tiny_model(), tiny_model(pos_emb="rope")
    cfg = rope.config
    assert "transformer.wpe.weight" in learned.state_dict()
    assert not any("wpe" in k or "rotary" in k for k in rope.state_dict())  # cos/sin are non-persistent
    assert rope.num_params() == rope.num_params(non_embedding=False) == learned.num_params()
    assert rope.flops_per_token() == learned.flops_per_token()
    assert sum(len(g["params"]) for g in rope.optimizer_param_groups(0.1)) == len(list(rope.parameters()))
    fresh = GPT(cfg)
    fresh.load_state_dict(rope.state_dict())  # strict: the saved keys are exactly the model's
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(fresh.eval()(x), rope(x), rtol=0, atol=0)
    assert rope.rotary.cos.shape == (cfg.block_size, cfg.n_embd // cfg.n_head)


def test_default_is_learned_and_old_config_dicts_load():
    """Configs written before pos_emb existed have no such key: they must mean GPT-2's learned table."""
    old = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True,
               attention="causal", block_length=0, attn_impl="auto")
    cfg = GPTConfig.from_dict(old)
    assert cfg.pos_emb == "learned" and GPTConfig().pos_emb == "learned"
    assert GPT(cfg).rotary is None and "wpe" in GPT(cfg).transformer


def test_rope_scores_depend_only_on_relative_position():
    """Shifting every position by the same constant leaves a rope model's output unchanged (a learned
    table would change it), while changing the spacing of the positions does change it."""
    def sharp(model):  # at init (std 0.02) attention is ~uniform and positions barely matter: sharpen it
        with torch.no_grad():
            for layer in model.transformer.h:
                layer.attn.c_attn.weight.normal_(0, 0.3)
        return model

    model = sharp(tiny_model(attention="bidirectional", pos_emb="rope"))
    x = torch.randint(0, 64, (2, 12))
    pos = torch.arange(12)
    base = model(x, positions=pos)
    # 1e-5: cos/sin of the shifted angles round differently in fp32 (seen: 3e-7), while moving the
    # positions apart changes the logits by ~0.4
    torch.testing.assert_close(model(x, positions=pos + 17), base, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(x, positions=(pos + 5).expand(2, 12)), base, rtol=0, atol=1e-5)
    assert (model(x, positions=2 * pos) - base).abs().max() > 0.1
    learned = sharp(tiny_model(attention="bidirectional"))
    assert not torch.allclose(learned(x, positions=pos + 17), learned(x, positions=pos), atol=1e-3)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_rope_left_padded_batch_matches_each_row_alone(attention):
    """A left-padded batch with per-row (B, T) positions gives each row the logits it gets alone."""
    model = tiny_model(attention=attention, pos_emb="rope")
    short, long = torch.randint(0, 64, (1, 10)), torch.randint(0, 64, (1, 16))
    batch = torch.cat([torch.cat([torch.randint(0, 64, (1, 6)), short], dim=1), long])  # row 0: 6 junk pads
    positions = (torch.arange(16)[None, :] - torch.tensor([[6], [0]])).clamp(min=0)  # (B, T), 0 on padding
    mask = AttentionMask(kind=attention, key_starts=torch.tensor([6, 0]))
    out = model(batch, mask=mask, positions=positions)
    torch.testing.assert_close(out[0, 6:], model(short)[0], rtol=0, atol=1e-5)  # 1e-5: fp32 sum order
    torch.testing.assert_close(out[1], model(long)[0], rtol=0, atol=1e-5)


def test_rope_tables_stay_fp32_when_the_model_is_cast():
    """.bfloat16() would round cos/sin to 8 mantissa bits (angle errors ~1e-2 at position 1000): rebuilt in fp32."""
    model = tiny_model(pos_emb="rope")
    cos = model.rotary.cos.clone()
    model.to(torch.bfloat16)
    assert model.rotary.cos.dtype == torch.float32 and torch.equal(model.rotary.cos, cos)
    assert model.transformer.wte.weight.dtype == torch.bfloat16


def test_weight_decay_only_on_matrices():
    groups = tiny_model().optimizer_param_groups(0.1)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_from_pretrained_refuses_rope():
    with pytest.raises(ValueError, match="learned position embeddings"):
        GPT.from_pretrained("unused", pos_emb="rope")


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
