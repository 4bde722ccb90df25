"""Specification of decoding and scoring a SHIFTED diffusion model (GPTConfig.shift, DiffuGPT): token i is
predicted from the final state of position i - 1, so the first generated token comes from the last prompt
position and nothing predicts a row's first column.

Tiny random models (2 layers, 32 wide, context 64, fixed seeds) in float64, as in tests/test_inference.py,
so that the equalities below are about the algorithms and never about float rounding ties.
"""
import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from inference.api import DecodeOptions, decode_layout, generate_with_stats
from inference.batching import Request, build_layout
from models.diffusion import align_predictions, subs_logits
from models.gpt import GPT, GPTConfig
from models.tokenizer import get_tokenizer

CORPUS = "abcdefghijklmnopqrstuvwxyz .,!?\n"
TOK = get_tokenizer("char", corpus_text=CORPUS)
PROMPTS = ["the cat", "a", "hello world, how", "xyz", "ab"]  # a shifted model needs >= 1 prompt token
LENGTHS = [12, 20, 7, 16, 9]
BLOCK = 4  # the block-causal model's diffusion block


def tiny_model(attention="bidirectional", block_length=0, shift=True, seed=0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=64, vocab_size=TOK.padded_vocab_size, n_layer=2, n_head=2, n_embd=32,
                    attention=attention, block_length=block_length, shift=shift)
    return GPT(cfg).double().eval()


MODELS = {"bidirectional": lambda: tiny_model("bidirectional"),
          "block_causal": lambda: tiny_model("block_causal", block_length=BLOCK)}

# (strategy, knobs) of every decoding rule; "blocks" with and without the prefix / block KV cache
RULES = {
    "ancestral": ("ancestral", dict(steps=6)),
    "topk_k1": ("topk", dict(tokens_per_step=1)),
    "topk_k3": ("topk", dict(tokens_per_step=3)),
    "random": ("random", dict(tokens_per_step=2)),
    "threshold": ("threshold", dict(threshold=0.05)),
    "blocks_cached": ("blocks", dict(block_length=8, kv_cache=True)),
    "blocks_uncached": ("blocks", dict(block_length=8, kv_cache=False)),
    "blocks_threshold_cached": ("blocks", dict(block_length=8, block_rule="threshold", threshold=0.05)),
}


def decode_canvas(model, layout, strategy, kv_cache, seed=0):
    """A laid-out batch decoded as generate decodes it, sampled (temperature 1): ancestral in 6 steps, the
    confidence rules 2 tokens per step, blocks of 8."""
    options = DecodeOptions(strategy=strategy, temperature=1.0, top_k=None, stop_at_eot=False, kv_cache=kv_cache,
                            **(dict(steps=6) if strategy == "ancestral" else dict(tokens_per_step=2)),
                            **(dict(block_length=8) if strategy == "blocks" else {})).for_model(model)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(layout.batch_size)]
    return decode_layout(model, TOK, layout, options, generators)


# ----------------------------------------------------------------------------- (a) prompt kept, canvas filled
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_shifted_decoding_keeps_the_prompt_and_fills_every_position(model_name, rule):
    model = MODELS[model_name]()
    strategy, knobs = RULES[rule]
    done = generate_with_stats(model, TOK, PROMPTS, LENGTHS, strategy, temperature=1.0, stop_at_eot=False, **knobs)
    for c, p, n in zip(done, PROMPTS, LENGTHS):
        assert c.prompt_ids == TOK.encode(p)
        assert len(c.token_ids) == n
        assert all(0 <= t < TOK.vocab_size for t in c.token_ids)  # no MASK, no padding id
    # the canvas itself (left-padded rows): prompt and padding columns unchanged, no MASK left
    align = BLOCK if model_name == "block_causal" else 0
    layout = build_layout([Request(TOK.encode(p), n) for p, n in zip(PROMPTS, LENGTHS)], TOK.mask_id, TOK.eot_id,
                          align, "cpu")
    res = decode_canvas(model, layout, strategy, kv_cache=knobs.get("kv_cache", strategy == "blocks"))
    assert torch.equal(res.x[~layout.gen], layout.x[~layout.gen])
    assert not (res.x == TOK.mask_id).any()


# ----------------------------------------------------------------------------- (b) the first token's prediction
def first_token_by_hand(model, prompt_ids, shift):
    """argmax over the real ids of lm_head(h[last prompt column]) (shift) or of h[the MASK column] (no shift),
    for the canvas prompt + one MASK, computed without the decoders."""
    x = torch.tensor([prompt_ids + [TOK.mask_id]])  # (1, P + 1)
    with torch.no_grad():
        h, _ = model.hidden_states(x)  # (1, P + 1, C); the model's own mask (block-causal: its blocks)
        logits = model.lm_head(h[0, len(prompt_ids) - 1 if shift else len(prompt_ids)])  # (V,)
    return int(logits[:TOK.vocab_size].argmax())


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_first_generated_token_is_predicted_from_the_last_prompt_position(model_name, rule):
    model = MODELS[model_name]()
    strategy, knobs = RULES[rule]
    prompts = PROMPTS + ["hello", "zz top", "q"]
    done = generate_with_stats(model, TOK, prompts, 1, strategy, temperature=0, stop_at_eot=False, **knobs)
    want = [first_token_by_hand(model, TOK.encode(p), shift=True) for p in prompts]
    assert [c.token_ids for c in done] == [[t] for t in want]
    # the test can tell the two readings apart: some prompt's MASK column would predict another token
    assert want != [first_token_by_hand(model, TOK.encode(p), shift=False) for p in prompts]


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("rule", ["topk_k3", "threshold", "blocks_cached", "blocks_uncached"])
def test_shifted_batched_decoding_equals_one_by_one(model_name, rule):
    """Left padding: a row's first generated column reads its own last prompt column, never padding.
    (Deterministic rules only: ancestral draws its commit times over the whole canvas.)"""
    model = MODELS[model_name]()
    strategy, knobs = RULES[rule]
    kw = dict(temperature=0, stop_at_eot=False, **knobs)
    batched = generate_with_stats(model, TOK, PROMPTS, LENGTHS, strategy, batch_size=len(PROMPTS), **kw)
    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
        alone = generate_with_stats(model, TOK, [p], n, strategy, batch_size=1, **kw)[0]
        assert batched[i].token_ids == alone.token_ids, f"request {i} differs when batched"


# ----------------------------------------------------------------------------- (c) KV caches
@pytest.mark.parametrize("block_length", [BLOCK, 8])
@pytest.mark.parametrize("prompts", [PROMPTS, ["ab", "c"]], ids=["prompts", "prompts_inside_block_0"])
@pytest.mark.parametrize("strategy", ["blocks", "ancestral"])
def test_kv_cached_decoding_of_a_shifted_block_causal_model_equals_uncached_exactly(block_length, prompts, strategy):
    """The cache ends one column before the block (the state predicting its first token) and each call
    feeds from there. ["ab", "c"]: every prompt lies in block 0, which also holds generated tokens."""
    model = tiny_model("block_causal", block_length=BLOCK)
    with torch.no_grad():  # sharpened (as tests/test_serve.py's models): a wrong cached key changes the tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    lengths = LENGTHS[:len(prompts)]
    rule_knobs = (dict(block_rule="threshold", threshold=0.05, temperature=0) if strategy == "blocks"
                  else dict(steps=6, temperature=1.0))
    for knobs in (dict(temperature=0), dict(temperature=1.0, top_k=5), rule_knobs):
        kw = dict(block_length=block_length, stop_at_eot=False, seed=3, **knobs)
        cached = generate_with_stats(model, TOK, prompts, lengths, strategy, kv_cache=True, **kw)
        plain = generate_with_stats(model, TOK, prompts, lengths, strategy, kv_cache=False, **kw)
        assert [c.token_ids for c in cached] == [c.token_ids for c in plain]
        assert [c.nfe for c in cached] == [c.nfe for c in plain]


def test_bidirectional_prefix_cache_feeds_from_the_column_before_the_block():
    """Fast-dLLM prefix cache of a shifted model: the block's later calls start one column before it."""
    model = tiny_model("bidirectional")
    fed = []
    hidden_states = model.hidden_states

    def watch(idx, mask=None, past_kv=None, positions=None):
        t_past = 0 if past_kv is None else past_kv[0][0].size(2)
        fed.append((t_past, t_past + idx.size(1)))
        return hidden_states(idx, mask=mask, past_kv=past_kv, positions=positions)

    model.hidden_states = watch
    done = generate_with_stats(model, TOK, ["abc"], 16, "blocks", block_length=8, kv_cache=True, temperature=0,
                               stop_at_eot=False)
    assert len(done[0].token_ids) == 16 and done[0].prompt_ids == TOK.encode("abc")
    # blocks [3, 11) and [11, 19): first call the whole canvas, then from column 2 resp. 10 with the cache
    assert fed == [(0, 19)] + [(2, 19)] * 7 + [(0, 19)] + [(10, 19)] * 7


# ----------------------------------------------------------------------------- (e) empty prompts
def test_an_empty_prompt_of_a_shifted_model_starts_from_eot():
    model = tiny_model("bidirectional")
    done = generate_with_stats(model, TOK, ["", "ab"], [6, 4], "topk", temperature=0, stop_at_eot=False)
    assert done[0].prompt_ids == [TOK.eot_id] and len(done[0].token_ids) == 6
    assert done[0].token_ids[0] == first_token_by_hand(model, [TOK.eot_id], shift=True)
    unshifted = tiny_model("bidirectional", shift=False)  # unchanged: an unshifted model decodes column 0
    assert generate_with_stats(unshifted, TOK, [""], 6, "topk", stop_at_eot=False)[0].prompt_ids == []


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("strategy", ["ancestral", "topk", "blocks"])
def test_decoding_column_0_of_a_shifted_model_is_refused(model_name, strategy):
    model = MODELS[model_name]()
    align = BLOCK if model_name == "block_causal" else 0
    layout = build_layout([Request(TOK.encode("ab"), 4), Request([], 4)], TOK.mask_id, TOK.eot_id, align, "cpu")
    with pytest.raises(ValueError, match=r"shifted.*at least one prompt token"):
        decode_canvas(model, layout, strategy, kv_cache=strategy == "blocks")


# ----------------------------------------------------------------------------- the server's path
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_server_rows_of_a_shifted_model_decode_like_the_api(model_name):
    """The server decodes each row in the RowSlots of its kind, added as generate_with_stats adds it (the
    real model's config, shift included); its shared calls must give what the API gives alone, an empty
    prompt included."""
    from inference.serving.scheduler import RowSpec, server_options
    from tests.test_serve import decode_together

    model = MODELS[model_name]()
    specs = []
    for k, (strategy, knobs) in enumerate([("ancestral", {}), ("topk", dict(tokens_per_step=2)),
                                           ("blocks", dict(block_length=8))]):
        for prompt, n in [("the cat", 12), ("", 9), ("xyz", 7)]:
            options = DecodeOptions(strategy=strategy, temperature=0.9, seed=7 + k, **knobs)
            specs.append(RowSpec(prompt, n, server_options(options.for_model(model))))
    alone = [generate_with_stats(model, TOK, [s.prompt], s.max_new_tokens, options=s.options)[0] for s in specs]
    got, _ = decode_together(model, specs, max_rows=4, tokenizer=TOK)
    for i, want in enumerate(alone):
        assert getattr(got[i], "token_ids", got[i]) == want.token_ids, f"row {i} ({specs[i].options.strategy})"
        assert got[i].prompt_ids == (want.prompt_ids or [TOK.eot_id])


# ----------------------------------------------------------------------------- (g) harness and HF export
def saved_shifted_model(d, objective, attention, block_length=0, seed=1):
    from models.weights import save_consolidated

    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=TOK.padded_vocab_size, n_layer=2, n_head=2, n_embd=32,
                          attention=attention, block_length=block_length, shift=True))
    save_consolidated(model.state_dict(), {"model": model.config.to_dict(), "tokenizer": TOK.to_meta(),
                                           "objective": {"name": objective, "schedule": "loglinear"},
                                           "mask_id": TOK.mask_id, "eot_id": TOK.eot_id}, d)
    return d


def exact_nelbo_by_hand(model, ids, c0, width, block_length=0):
    """The continuous-time NELBO of ids[c0:] given the clean ids[:c0], by its definition: for each scoring
    unit (MDLM: the continuation; BD3-LM: its part in each block, the other parts clean) the sum over the
    subsets S it masks of B(l, n - l + 1) = 1 / (l C(n, l)) (the integral over r of r^(l-1) (1-r)^(n-l))
    times sum_{i in S} -log p(x_i), where x_i is predicted from position i - 1 of the same canvas. One canvas
    per subset: for BD3-LM the states before a block start are clean there, as in the [x_t ; x_0] pass."""
    L = len(ids)
    edges = [c0, L] if not block_length else sorted(
        {c0, L} | set(range((c0 // block_length + 1) * block_length, L, block_length)))
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = hi - lo
        for l in range(1, n + 1):
            for S in combinations(range(lo, hi), l):
                x = torch.full((1, width), TOK.mask_id, dtype=torch.long)
                x[0, :L] = torch.tensor(ids)
                x[0, list(S)] = TOK.mask_id
                with torch.no_grad():
                    h = align_predictions(model.hidden_states(x)[0], True)  # (1, W, C): row i holds h[i - 1]
                    logp = F.log_softmax(subs_logits(model.lm_head(h[0]).double(), TOK.mask_id), dim=-1)
                total += float(sum(-logp[i, ids[i]] for i in S)) / (l * math.comb(n, l))
    return total


@pytest.mark.parametrize("objective", ["mdlm", "bd3lm"])
def test_harness_scores_a_shifted_model_by_its_exact_bound(tmp_path, objective):
    from evaluation.harness import DiffusionGPTLM, HarnessInputError

    attention, b = ("block_causal", 8) if objective == "bd3lm" else ("bidirectional", 0)
    ckpt = saved_shifted_model(tmp_path / objective, objective, attention, b)
    lm = DiffusionGPTLM(ckpt=str(ckpt), device="cpu", mc_samples=63)  # 2^6 - 1 masks: exact
    context, continuation = TOK.encode("romeo, but so"), TOK.encode("ft, wh")  # 13 + 6: BD3 units 13..16, 16..19
    (ll, greedy), = lm._score_pairs([(context, continuation)], True)
    assert ll.how == "exact bound"
    expected = exact_nelbo_by_hand(lm.model, context + continuation, len(context), 64, b)
    # float32 model (the harness loads it as saved): ~1e-6 relative on a sum of ~20 log-probs
    assert -float(ll) == pytest.approx(expected, rel=1e-5)
    assert isinstance(greedy, bool)
    with pytest.raises(HarnessInputError, match="shifted"):  # nothing predicts a first token without context
        lm._score_pairs([([], continuation)], True)
    with pytest.raises(HarnessInputError, match="shifted"):  # a full-context continuation leaves no context
        lm._score_pairs([(context, TOK.encode("a" * 64))], True)


def test_hf_export_refuses_a_shifted_model_naming_the_shift(tmp_path):
    from training.hf_export import export_to_hf

    ckpt = saved_shifted_model(tmp_path / "mdlm", "mdlm", "bidirectional")
    with pytest.raises(ValueError, match=r"only AR.*shifted \(config\.shift"):
        export_to_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
