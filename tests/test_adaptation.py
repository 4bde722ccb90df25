"""AR -> diffusion adaptation (training/init_from.py, GPTConfig.shift, attention annealing), as specified:

  - before any step, under the causal mask annealing starts from, an adapted shifted model's logits are the
    AR model's (our AR export through the real pretrain.py, and a Hugging Face GPT-2 directory)
  - the shifted MDLM and BD3-LM losses equal a naive per-position loop written from the decoding-time rule
  - the annealing mask goes from causal (0) to the model's own mask (1)
  - the GPT-2 recipe runs end to end on a tiny local GPT2LMHeadModel; resume and export keep the shift
  - bad input: a missing path, another vocabulary, GPT-2 with rope, a shape that disagrees; diffusion -> AR
    is allowed (only weights are taken) and says so
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import AttentionMask, dense_mask
from models.diffusion import NoiseSchedule, block_diffusion_loss, forward_process, masked_diffusion_loss
from models.gpt import GPT, GPTConfig
from models.weights import load_consolidated
from training import prepare
from training.init_from import InitSource, adopt_source_shape, check_same_tokens, load_weights, read_source
from training.metrics import read_records

from in_process import pretrain_cli
from test_training import python_run

FAST = ["--wandb_mode=disabled", "--no_tensorboard", "--no_progress_bar", "--log_interval=1", "--eval_iters=1"]
# fp32 logits of the same weights through two attention paths (SDPA's causal kernel vs a materialised mask):
# they differ by summation order only, ~1e-6 here
LOGIT_TOL = 1e-5


def tiny(attention="bidirectional", shift=True, block_length=0, vocab=40) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, bias=False,
                         attention=attention, block_length=block_length, shift=shift, pos_emb="rope")).eval()


def causal_logits_of(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """The model's logits under the causal mask annealing starts from (future_attention=0)."""
    mask = AttentionMask(model.config.attention, block_length=model.config.block_length, future_attention=0.0)
    return model.lm_head(model.hidden_states(x, mask=mask)[0])


# ----------------------------------------------------------------------------- loading equivalence
@pytest.fixture(scope="module")
def ar_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ar") / "run"
    proc = python_run("--config", "training/configs/tiny_test.json", f"--data_dir={tiny_data}", f"--out_dir={out}",
                      "--objective=ar", "--model.attention=causal", "--max_iters=6", "--eval_interval=6", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("objective,attention", [("mdlm", "bidirectional"), ("bd3lm", "block_causal")])
def test_adapted_shifted_model_equals_the_ar_model_before_any_step(ar_run, tiny_data, tmp_path, objective, attention):
    out = tmp_path / "adapted"
    # one update at learning rate 0 (AdamW's decay is lr * wd: also 0): the export holds the initial weights
    proc = python_run("--config", "training/configs/tiny_test.json", f"--data_dir={tiny_data}", f"--out_dir={out}",
                      f"--init_from={ar_run}/export", f"--objective={objective}", f"--model.attention={attention}",
                      "--model.block_length=8", "--model.shift", "--learning_rate=0", "--min_lr=0", "--max_iters=1",
                      "--eval_interval=1", "--anneal_attention_iters=4", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised from {ar_run}/export" in proc.stdout + proc.stderr
    config = read_records(out, "config")[0]
    assert config["init_from"]["path"] == f"{ar_run}/export" and config["init_from"]["objective"] == "ar"
    assert config["train_config"]["init_from"] == f"{ar_run}/export"

    ar, _ = load_consolidated(ar_run / "export")
    adapted, info = load_consolidated(out / "export")
    assert adapted.config.shift and adapted.config.attention == attention and info["objective"]["name"] == objective
    x = torch.randint(0, info["mask_id"], (3, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(causal_logits_of(adapted, x), ar(x), atol=LOGIT_TOL, rtol=0)


def test_gpt2_weights_load_into_a_shifted_diffusion_model_with_the_same_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    source = read_source(str(tmp_path / "hf"))
    cfg = GPTConfig(block_size=32, vocab_size=50304, attention="bidirectional", shift=True)
    notes = adopt_source_shape(cfg, {"model.block_size"}, source, "hf")
    assert (cfg.n_layer, cfg.n_embd, cfg.pos_emb, cfg.bias) == (2, 32, "learned", True)
    assert any("position embeddings are kept" in n for n in notes)  # 64 -> 32 positions: cropped, said
    model = GPT(cfg).eval()
    load_weights(model, source)
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = causal_logits_of(model, x)[..., :50257]  # GPT-2's rows; ours adds MASK and padding after them
        torch.testing.assert_close(ours, hf(x).logits, atol=LOGIT_TOL, rtol=0)


# ----------------------------------------------------------------------------- shift-aware losses
def naive_shifted_nelbo(model, x0, xt, weight, mask_id, block_length=None) -> torch.Tensor:
    """Position by position, from the decoding-time rule: token j (masked, j >= 1) is predicted from the state
    of position j - 1. MDLM: one bidirectional pass over x_t. BD3-LM, as the decoder feeds it: the first token of
    block k from the clean blocks before it alone; any other token from [clean blocks < k ; all of noised block
    k] (block-causal, so the state of j - 1 sees the whole noised block)."""
    B, L = x0.shape
    total = torch.zeros(())
    for b in range(B):
        h_mdlm = None if block_length else model.hidden_states(xt[b:b + 1])[0][0]
        for j in range(1, L):
            if xt[b, j] != mask_id:
                continue
            if block_length is None:
                state = h_mdlm[j - 1]
            else:
                lo = j // block_length * block_length
                if j == lo:
                    state = model.hidden_states(x0[b:b + 1, :lo])[0][0, -1]  # the clean token before the block
                else:
                    seq = torch.cat([x0[b:b + 1, :lo], xt[b:b + 1, lo:lo + block_length]], dim=1)
                    state = model.hidden_states(seq)[0][0, j - 1]
            logits = model.lm_head(state).clone()
            logits[mask_id:] = float("-inf")  # SUBS: never MASK (nor padding ids)
            total = total + weight[b, j] * -F.log_softmax(logits, dim=-1)[x0[b, j]]
    return total / (B * (L - 1))


@pytest.mark.parametrize("objective,block_length", [("mdlm", None), ("bd3lm", 4), ("bd3lm", 1), ("bd3lm", 16)])
def test_shifted_loss_equals_a_naive_per_position_loop(objective, block_length):
    mask_id = 37
    model = tiny("block_causal" if block_length else "bidirectional", block_length=block_length or 0)
    x0 = torch.randint(0, mask_id, (2, 16), generator=torch.Generator().manual_seed(1))
    sched, seed = NoiseSchedule("loglinear"), 5
    n_t = 2 if block_length is None else 2 * 16 // block_length
    t = torch.full((n_t,), 0.6)  # about 60% masked: every kind of position occurs
    with torch.no_grad():
        if block_length is None:
            loss = masked_diffusion_loss(model, x0, sched, mask_id, seed, t=t, masking_impl="torch")
            xt, w = forward_process(x0, sched, mask_id, seed, t=t, masking_impl="torch")
        else:
            loss = block_diffusion_loss(model, x0, sched, mask_id, seed, block_length, t=t, masking_impl="torch")
            xt, w = forward_process(x0.reshape(-1, block_length), sched, mask_id, seed, t=t, masking_impl="torch")
            xt, w = xt.view_as(x0), w.view_as(x0)
        xt[:, 0], w[:, 0] = x0[:, 0], 0.0  # a shifted model never masks (nor scores) token 0
        assert bool((xt[:, 1:] == mask_id).any())
        expected = naive_shifted_nelbo(model, x0, xt, w, mask_id, block_length)
    # fp32: the same products summed in another order
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_clean_prefix_scores_the_same_tokens_for_unshifted_models():
    model = tiny(shift=False)
    x0 = torch.randint(0, 37, (2, 16), generator=torch.Generator().manual_seed(2))
    t = torch.full((2,), 0.9)
    with torch.no_grad():
        full = masked_diffusion_loss(model, x0, NoiseSchedule(), 37, 3, t=t, masking_impl="torch")
        given = masked_diffusion_loss(model, x0, NoiseSchedule(), 37, 3, t=t, masking_impl="torch", clean_prefix=1)
    assert full != given and math.isfinite(float(given))


# ----------------------------------------------------------------------------- annealing mask
@pytest.mark.parametrize("kind", ["bidirectional", "block_causal", "block_diffusion"])
def test_annealing_mask_moves_from_causal_to_the_models_own(kind):
    T = 32 if kind == "block_diffusion" else 16
    own = dense_mask(AttentionMask(kind, block_length=4), 1, T, T, "cpu")[0, 0]
    start = dense_mask(AttentionMask(kind, block_length=4, future_attention=0.0), 1, T, T, "cpu")[0, 0]
    half = dense_mask(AttentionMask(kind, block_length=4, future_attention=0.5, future_seed=3), 1, T, T, "cpu")[0, 0]
    pos = torch.arange(T) % (T // 2) if kind == "block_diffusion" else torch.arange(T)
    later = pos[None, :] > pos[:, None]
    assert torch.equal(start, own & ~later)  # 0: nothing after the query (causal in position)
    assert torch.equal(dense_mask(AttentionMask(kind, block_length=4, future_attention=1.0), 1, T, T, "cpu")[0, 0], own)
    assert bool((half <= own).all()) and bool((half >= start).all())
    share = (half & later).sum() / (own & later).sum()
    assert 0.35 < float(share) < 0.65  # about half of the later keys (>= 24 pairs: 0.15 is > 3 SE)


# ----------------------------------------------------------------------------- the GPT-2 recipe, resume, export
def test_gpt2_recipe_end_to_end_on_a_tiny_local_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "hf")
    (tmp_path / "text.txt").write_text("It was the best of times, it was the worst of times.\n" * 400)
    prepare.main(["--source", str(tmp_path / "text.txt"), "--tokenizer", "gpt2", "--out", str(tmp_path / "data")])
    out = tmp_path / "run"
    small = [f"--init_from={tmp_path / 'hf'}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}",
             "--model.block_size=32", "--batch_size=2", "--gradient_accumulation_steps=1", "--warmup_iters=1",
             "--lr_decay_iters=6", "--eval_interval=4", "--checkpoint_interval=2", "--no_compile", *FAST]
    proc = python_run("--config", "training/configs/gpt2_to_mdlm.json", *small, "--max_iters=4",
                      "--anneal_attention_iters=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    anneal = {r["step"]: r["future_attention"] for r in read_records(out, "train")}
    assert anneal == {1: 0.0, 2: 0.5, 3: 1.0, 4: 1.0}  # the step just trained: 0/2, 1/2, then the full mask
    proc = python_run("--config", "training/configs/gpt2_to_mdlm.json", *small, "--max_iters=6", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised from" not in proc.stdout + proc.stderr  # a resumed run keeps its own weights
    _, info = load_consolidated(out / "export")
    assert info["model"]["shift"] is True and info["model"]["attention"] == "bidirectional"
    assert info["step"] == 6 and info["model"]["pos_emb"] == "learned" and info["model"]["n_embd"] == 32


# ----------------------------------------------------------------------------- bad input
def source(objective="ar", tokenizer=None, **model) -> InitSource:
    cfg = GPTConfig(**{"block_size": 64, "vocab_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128, "bias": False,
                       "pos_emb": "rope", "attention": "causal" if objective == "ar" else "bidirectional", **model})
    return InitSource("SRC", "export", cfg, objective, tokenizer or {"tokenizer": "char", "vocab_size": 81})


def test_init_from_a_missing_path_is_a_clear_error_from_pretrain(tiny_data, tmp_path):
    proc = pretrain_cli("--config", "training/configs/tiny_test.json", f"--out_dir={tmp_path / 'o'}",
                        f"--data_dir={tiny_data}", f"--init_from={tmp_path / 'nope'}", *FAST)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"--init_from {tmp_path / 'nope'}: no such directory" in proc.stderr
    assert not (tmp_path / "o" / "ckpt").exists()


def test_a_shape_stated_against_the_source_names_both_sides():
    cfg = GPTConfig(n_embd=64, n_head=4, attention="bidirectional")
    with pytest.raises(ValueError, match=r"source has n_embd=128 but this run states model.n_embd=64; drop --model.n_embd"):
        adopt_source_shape(cfg, {"model.n_embd"}, source(), "SRC")
    cfg = GPTConfig(n_embd=64, n_head=4, attention="bidirectional")
    adopt_source_shape(cfg, set(), source(), "SRC")  # not stated: the source's shape is taken
    assert (cfg.n_embd, cfg.n_layer, cfg.pos_emb, cfg.block_size) == (128, 4, "rope", 64)


def test_gpt2_with_rope_is_refused():
    gpt2 = InitSource("gpt2", "gpt2", GPTConfig(bias=True, pos_emb="learned"), "ar", None)
    with pytest.raises(ValueError, match=r"pos_emb='learned' \(GPT-2 has learned position embeddings\).*drop --model.pos_emb"):
        adopt_source_shape(GPTConfig(pos_emb="rope", attention="bidirectional"), {"model.pos_emb"}, gpt2, "gpt2")


def test_another_vocabulary_is_refused():
    with pytest.raises(ValueError, match=r"trained on 'char' ids \(81\).*'char' ids \(90\)"):
        check_same_tokens(source(), {"tokenizer": "char", "vocab_size": 90}, 128, "SRC", "data/other")
    gpt2 = InitSource("gpt2", "gpt2", GPTConfig(), "ar", None)
    with pytest.raises(ValueError, match=r"GPT-2 reads GPT-2 BPE ids.*prepared with the 'char' tokenizer"):
        check_same_tokens(gpt2, {"tokenizer": "char", "vocab_size": 81}, 128, "gpt2", "data/shakespeare_char")


def test_diffusion_into_ar_is_allowed_and_a_shifted_source_stays_shifted():
    ar_run = GPTConfig(attention="causal")
    notes = adopt_source_shape(ar_run, set(), source("mdlm", shift=True), "SRC")
    assert not ar_run.shift and any("only its weights are used" in n for n in notes)
    mdlm_run = GPTConfig(attention="bidirectional")
    adopt_source_shape(mdlm_run, set(), source("mdlm", shift=True), "SRC")
    assert mdlm_run.shift  # the setting travels with the weights unless stated
    unshifted = GPTConfig(attention="bidirectional")
    notes = adopt_source_shape(unshifted, set(), source("ar"), "SRC")
    assert any("--model.shift keeps that meaning" in n for n in notes)


def test_shift_is_refused_for_ar_models():
    with pytest.raises(ValueError, match="shift=True is for diffusion models"):
        GPTConfig(attention="causal", shift=True)


def test_a_longer_context_than_the_sources_learned_positions_is_refused():
    src = source(pos_emb="learned", bias=True)  # 64 learned positions
    with pytest.raises(ValueError, match=r"learned positions for block_size=64 tokens.*block_size=128; use --model.block_size <= 64"):
        adopt_source_shape(GPTConfig(block_size=128, pos_emb="learned", bias=True, attention="bidirectional"),
                           {"model.block_size"}, src, "SRC")
    rope = GPTConfig(block_size=128, attention="bidirectional")
    adopt_source_shape(rope, {"model.block_size"}, source(), "SRC")  # rope has no position table: any context
    assert rope.block_size == 128


def test_a_training_run_is_read_like_its_export(ar_run):
    """--init_from a run dir reads its latest checkpoint (not the export) and gets the same weights and config."""
    from_run, from_export = read_source(str(ar_run)), read_source(str(ar_run / "export"))
    assert from_run.kind == "checkpoint" and from_run.path.endswith("ckpt/step_000006")
    assert (from_run.model, from_run.objective, from_run.step, from_run.tokenizer) == \
        (from_export.model, from_export.objective, from_export.step, from_export.tokenizer)
    for key, value in from_export.state.items():
        if key in from_run.state:  # the export omits nothing but the tied lm_head, the checkpoint may hold it
            assert torch.equal(from_run.state[key], value), key
