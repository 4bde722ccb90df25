"""Specification of decoding (inference/): batching, prompt safety, call counts, KV caches, EOT.

Tiny random models (2 layers, 32 wide, context 64, fixed seeds) in float64, so that the equalities
below are about the algorithms and never about float rounding ties.
"""
import math

import pytest
import torch

from inference.batching import Request, build_layout, plan_batches
from inference.commit_rules import CommitRandom, CommitThreshold, CommitTopK
from inference.api import DECODERS, STRATEGIES, DecodeOptions, decode_layout, generate, generate_with_stats
from inference import sampling
from inference.ancestral_rows import AncestralRows, ancestral_commit_probability
from inference.ar_decoding import ARRows
from inference.sampling import Sampler, filter_logits, inverse_cdf, predict_tokens, sample_from_logits
from models.diffusion import NoiseSchedule
from models.gpt import GPT, GPTConfig
from models.tokenizer import get_tokenizer

CORPUS = "abcdefghijklmnopqrstuvwxyz .,!?\n"
TOK = get_tokenizer("char", corpus_text=CORPUS)
PROMPTS = ["the cat", "a", "hello world, how", "", "xyz"]
LENGTHS = [12, 20, 7, 16, 9]



def tiny_model(attention="bidirectional", block_length=0, seed=0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=64, vocab_size=TOK.padded_vocab_size, n_layer=2, n_head=2, n_embd=32,
                    attention=attention, block_length=block_length)
    return GPT(cfg).double().eval()


DIFFUSION_MODELS = {"bidirectional": lambda: tiny_model("bidirectional"),
                    "block_causal": lambda: tiny_model("block_causal", block_length=4)}

# deterministic rules (temperature 0): (strategy, knobs)
DETERMINISTIC_RULES = {
    "topk_k1": ("topk", dict(tokens_per_step=1)),
    "topk_k3": ("topk", dict(tokens_per_step=3)),
    "topk_steps5": ("topk", dict(steps=5)),
    "threshold": ("threshold", dict(threshold=0.05)),
    "blocks_cached": ("blocks", dict(block_length=8, kv_cache=True)),
    "blocks_uncached": ("blocks", dict(block_length=8, kv_cache=False)),
    "blocks_threshold_cached": ("blocks", dict(block_length=8, block_rule="threshold", threshold=0.05)),
    "blocks_steps": ("blocks", dict(block_length=8, steps=6)),
}


# ----------------------------------------------------------------------------- batching
@pytest.mark.parametrize("model_name", sorted(DIFFUSION_MODELS))
@pytest.mark.parametrize("rule", sorted(DETERMINISTIC_RULES))
def test_batched_decoding_equals_one_by_one(model_name, rule):
    model = DIFFUSION_MODELS[model_name]()
    strategy, knobs = DETERMINISTIC_RULES[rule]
    kw = dict(temperature=0, stop_at_eot=False, **knobs)
    batched = generate_with_stats(model, TOK, PROMPTS, LENGTHS, strategy, batch_size=len(PROMPTS), **kw)
    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
        alone = generate_with_stats(model, TOK, [p], n, strategy, batch_size=1, **kw)[0]
        assert batched[i].token_ids == alone.token_ids, f"request {i} differs when batched"
        assert batched[i].nfe == alone.nfe, f"request {i} takes other calls when batched"


def test_batches_are_split_when_padding_would_overflow_the_context():
    reqs = [Request([1] * 60, 4), Request([1] * 2, 62), Request([1] * 2, 5)]
    assert plan_batches(reqs, batch_size=8, context=64, align=0) == [[0], [1, 2]]
    assert plan_batches(reqs, batch_size=1, context=64, align=0) == [[0], [1], [2]]
    model = tiny_model()
    out = generate_with_stats(model, TOK, ["a" * 60, "b", "cd"], [4, 62, 5], "topk", tokens_per_step=4,
                              temperature=0, stop_at_eot=False)
    assert [len(c.token_ids) for c in out] == [4, 62, 5]


def test_layout_aligns_block_causal_rows_to_model_blocks():
    lay = build_layout([Request([1] * 5, 3), Request([1] * 10, 2)], fill_id=99, pad_id=0, align=4, device="cpu")
    # prompts of 5 and 10 tokens: first generated positions 5 and 10 lie in row blocks 1 and 2
    assert lay.key_starts.tolist() == [4, 0]  # pads are whole blocks
    assert lay.anchor == 8 and lay.gen_starts.tolist() == [9, 10]
    assert lay.positions[0, 4:12].tolist() == list(range(8))


# ----------------------------------------------------------------------------- invariants
ALL_DIFFUSION_RULES = {**DETERMINISTIC_RULES, "ancestral": ("ancestral", dict(steps=6))}


@pytest.mark.parametrize("model_name", sorted(DIFFUSION_MODELS))
@pytest.mark.parametrize("rule", sorted(ALL_DIFFUSION_RULES))
def test_prompt_tokens_are_never_changed_and_no_mask_survives(model_name, rule):
    model = DIFFUSION_MODELS[model_name]()
    strategy, knobs = ALL_DIFFUSION_RULES[rule]
    seen = []
    done = generate_with_stats(model, TOK, PROMPTS, LENGTHS, strategy, temperature=1.0, top_p=0.9,
                               stop_at_eot=False, on_step=lambda info: seen.append(info), **knobs)
    for c, p, n in zip(done, PROMPTS, LENGTHS):
        assert c.prompt_ids == TOK.encode(p)
        assert len(c.token_ids) == n
        assert all(0 <= t < TOK.vocab_size for t in c.token_ids)  # no MASK, no padding id
        assert "░" not in c.text
    assert any(TOK.mask_id in ids for info in seen for ids in info.token_ids)  # steps showed masks
    # the canvas itself: prompt columns unchanged
    reqs = [Request(TOK.encode(p), n) for p, n in zip(PROMPTS, LENGTHS)]
    align = 4 if model_name == "block_causal" else 0
    lay = build_layout(reqs, TOK.mask_id, TOK.eot_id, align, "cpu")
    options = DecodeOptions(strategy=strategy, temperature=1.0, top_k=None, stop_at_eot=False,
                            **(dict(steps=6) if strategy == "ancestral" else dict(tokens_per_step=2)),
                            **(dict(block_length=8) if strategy == "blocks" else {})).for_model(model)
    generators = [torch.Generator().manual_seed(i) for i in range(len(reqs))]
    res = decode_layout(model, TOK, lay, options, generators)
    assert torch.equal(res.x[~lay.gen], lay.x[~lay.gen])
    assert not (res.x == TOK.mask_id).any()


# ----------------------------------------------------------------------------- rows at steps of their own
@pytest.mark.parametrize("strategy,attention,knobs", [("ancestral", "bidirectional", dict(steps=10)),
                                                      ("topk", "bidirectional", dict(steps=5)),
                                                      ("random", "bidirectional", dict(tokens_per_step=2)),
                                                      ("threshold", "bidirectional", dict(threshold=0.3)),
                                                      ("ar", "causal", dict(kv_cache=True)),
                                                      ("ar", "causal", dict(kv_cache=False))])
def test_sampled_requests_decode_the_same_in_any_batch(strategy, attention, knobs):
    """AR, and every rule over the whole canvas of a diffusion model, decode rows at steps of their own,
    and request i of a call draws from its own generator, seeded seed + i: sampled, it decodes the same in
    a batch of five as alone with seed + i (one generator shared by the batch would hand it other draws)."""
    model = tiny_model(attention)
    kw = dict(temperature=0.9, top_k=20, stop_at_eot=False, **knobs)
    batched = generate_with_stats(model, TOK, PROMPTS, LENGTHS, strategy, batch_size=5, seed=3, **kw)
    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
        alone = generate_with_stats(model, TOK, [p], n, strategy, seed=3 + i, **kw)[0]
        assert (batched[i].token_ids, batched[i].nfe, batched[i].steps) == (alone.token_ids, alone.nfe, alone.steps)


@pytest.mark.parametrize("strategy,attention,knobs", [
    ("blocks", "bidirectional", dict(block_length=8)),  # the approximate prefix cache
    ("blocks", "bidirectional", dict(block_length=8, block_rule="random", kv_cache=False, steps=6)),
    ("ancestral", "block_causal", dict(steps=8)),  # BD3-LM's sampler with the exact cache
    ("threshold", "block_causal", dict(threshold=0.3, kv_cache=False))])
def test_sampled_block_requests_decode_the_same_in_any_batch(strategy, attention, knobs):
    """Block by block too (blocks, every rule of a block-causal model), request i of a call draws from its
    own generator, seeded seed + i: sampled, it decodes the same in a batch of five as alone with seed + i."""
    model = tiny_model(attention, block_length=4 if attention == "block_causal" else 0)
    kw = dict(temperature=0.9, top_k=20, stop_at_eot=False, **knobs)
    batched = generate_with_stats(model, TOK, PROMPTS, LENGTHS, strategy, batch_size=5, seed=3, **kw)
    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
        alone = generate_with_stats(model, TOK, [p], n, strategy, seed=3 + i, **kw)[0]
        assert (batched[i].token_ids, batched[i].nfe, batched[i].steps) == (alone.token_ids, alone.nfe, alone.steps)


def test_ancestral_rows_at_different_steps_each_decode_what_they_decode_alone():
    """AncestralRows as a server drives it: rows join while others are mid-way (and when a slot frees up),
    some steps split their call by width, samplers, schedules and step counts differ between rows, and
    each row decodes exactly what generate() decodes for it alone with the same seed."""
    model = tiny_model()
    cases = [("the cat", 12, 12, dict(temperature=0.9, top_k=10), "loglinear"),
             ("a", 20, 40, dict(temperature=0), "cosine"),
             ("hello world, how", 7, 3, dict(temperature=1.0, top_p=0.8), "linear"),
             ("xyz", 30, 30, dict(temperature=0.9, top_k=10), "loglinear")]
    rows = AncestralRows(model, TOK.mask_id, TOK.vocab_size, capacity=3, width=64)
    waiting, slot_case, got, most_calls, step = list(enumerate(cases)), {}, {}, 0, 0
    while waiting or rows.active:
        while waiting and rows.active < 3 and step >= 3 * waiting[0][0]:  # case k joins at step 3k (or later)
            k, (prompt, n, steps, knobs, schedule) = waiting.pop(0)
            slot = rows.add(TOK.encode(prompt), n, steps, NoiseSchedule(schedule), Sampler(**knobs),
                            torch.Generator().manual_seed(k))
            slot_case[slot] = k
        one_call_each = (lambda lengths: [[i] for i in range(len(lengths))]) if step % 2 else None
        calls = rows.prepare(one_call_each)
        most_calls = max(most_calls, len(calls))
        stepped, finished = rows.commit([c.run(model) for c in calls])
        for slot, ids in zip(finished, rows.generated(finished)):
            got[slot_case.pop(slot)] = (ids, rows.rows[slot].nfe, rows.rows[slot].steps)
            rows.remove(slot)
        step += 1
    assert most_calls > 1  # some steps did split their rows' call
    for k, (prompt, n, steps, knobs, schedule) in enumerate(cases):
        alone = generate_with_stats(model, TOK, [prompt], n, "ancestral", steps=steps, schedule=schedule, seed=k,
                                    stop_at_eot=False, **knobs)[0]
        assert got[k] == (alone.token_ids, alone.nfe, alone.steps), f"case {k}"


def test_ar_rows_of_different_lengths_each_decode_what_they_decode_alone():
    """ARRows as a server drives it: rows join while others are mid-way (and when a slot frees up), their
    cached pasts differ in length in every step call, prefills are split by width on some steps, samplers
    differ between rows, EOT ends a row, and each row decodes what generate() decodes for it alone."""
    model = tiny_model("causal")
    cases = [("the cat", 12, dict(temperature=0.9, top_k=10)), ("a", 20, dict(temperature=0)),
             ("hello world, how", 7, dict(temperature=1.0, top_p=0.8)), ("xyz", 30, dict(temperature=0.9, top_k=10))]
    rows = ARRows(model, TOK.vocab_size, capacity=3, width=64)
    waiting, slot_case, got, step, mixed = list(enumerate(cases)), {}, {}, 0, False
    while waiting or rows.active:
        while waiting and rows.active < 3 and step >= 3 * waiting[0][0]:  # case k joins at step 3k (or later)
            k, (prompt, n, knobs) = waiting.pop(0)
            slot_case[rows.add(TOK.encode(prompt), n, Sampler(**knobs), torch.Generator().manual_seed(k),
                               stop_id=TOK.eot_id)] = k
        calls = rows.prepare((lambda widths: [[i] for i in range(len(widths))]) if step % 2 else None)
        mixed |= any(c.past_kv is not None and c.mask.key_starts is not None for c in calls)
        stepped, finished = rows.commit([c.run(model) for c in calls])
        for slot, ids in zip(finished, rows.generated(finished)):
            got[slot_case.pop(slot)] = (ids, rows.rows[slot].nfe)
            rows.remove(slot)
        step += 1
    assert mixed  # a step call held rows whose cached pasts differ in length
    for k, (prompt, n, knobs) in enumerate(cases):
        alone = generate_with_stats(model, TOK, [prompt], n, "ar", seed=k, stop_at_eot=False, **knobs)[0]
        ids, nfe = got[k]
        cut = ids.index(TOK.eot_id) + 1 if TOK.eot_id in ids else len(ids)  # this row stopped at EOT
        assert ids == alone.token_ids[:cut] and nfe == cut


def test_runs_of_positions_sampled_together_draw_what_each_draws_alone(monkeypatch):
    """predict_tokens with one generator per run of positions (the rows of many decodes in one output
    layer call): each run draws what a call of its own draws, also where runs cross the chunk of
    positions predicted at once (shrunk from 4096 to 4 here), while one shared generator would not."""
    monkeypatch.setattr(sampling, "PREDICT_CHUNK", 4)
    model = tiny_model()
    h = torch.randn(17, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    counts, sampler = [3, 9, 1, 4], Sampler(1.0)
    together, _ = predict_tokens(model, h, TOK.vocab_size, sampler,
                                 [torch.Generator().manual_seed(k) for k in range(4)], counts)
    alone = [predict_tokens(model, part, TOK.vocab_size, sampler, torch.Generator().manual_seed(k))[0]
             for k, part in enumerate(h.split(counts))]
    assert torch.equal(together, torch.cat(alone))
    shared, _ = predict_tokens(model, h, TOK.vocab_size, sampler, torch.Generator().manual_seed(0))
    assert not torch.equal(shared, together)


# ----------------------------------------------------------------------------- call counts
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_k_tokens_per_step_takes_exactly_ceil_L_over_k_calls(k):
    model = tiny_model()
    done = generate_with_stats(model, TOK, PROMPTS, LENGTHS, "topk", tokens_per_step=k, temperature=1.0,
                               stop_at_eot=False)
    assert [c.nfe for c in done] == [math.ceil(n / k) for n in LENGTHS]


def test_topk_with_steps_takes_exactly_that_many_calls():
    model = tiny_model()
    done = generate_with_stats(model, TOK, PROMPTS, LENGTHS, "topk", steps=5, temperature=0, stop_at_eot=False)
    assert [c.nfe for c in done] == [min(5, n) for n in LENGTHS]


@pytest.mark.parametrize("kv_cache", [True, False])
def test_blocks_spread_the_step_budget_over_each_rows_blocks(kv_cache):
    model = tiny_model()
    # L = 16, 20, 7 with blocks of 8: 2, 3, 1 blocks; 6 steps -> 3, 2, 6 per block (a block of 7 needs 6)
    done = generate_with_stats(model, TOK, ["ab", "cde", "f"], [16, 20, 7], "blocks", block_length=8, steps=6,
                               kv_cache=kv_cache, temperature=0, stop_at_eot=False)
    assert [c.nfe for c in done] == [6, 6, 6]
    assert [len(c.token_ids) for c in done] == [16, 20, 7]


def test_threshold_commits_at_least_one_token_per_step():
    model = tiny_model()
    # tau = 1: no confidence exceeds it, so exactly one token per step (and it terminates)
    never = generate_with_stats(model, TOK, PROMPTS, LENGTHS, "threshold", threshold=1.0, temperature=0,
                                stop_at_eot=False)
    assert [c.nfe for c in never] == LENGTHS
    # tau = 0: every token is confident enough, so one call does everything
    always = generate_with_stats(model, TOK, PROMPTS, LENGTHS, "threshold", threshold=0.0, temperature=0,
                                 stop_at_eot=False)
    assert [c.nfe for c in always] == [1] * len(PROMPTS)
    # a step budget caps the calls
    capped = generate_with_stats(model, TOK, PROMPTS, LENGTHS, "threshold", threshold=1.0, steps=3,
                                 temperature=0, stop_at_eot=False)
    assert [c.nfe for c in capped] == [3] * len(PROMPTS)


def test_commit_rules_choose_the_most_confident():
    conf = torch.tensor([[0.1, float("-inf"), 0.9, 0.5, 0.95]])
    picked = CommitTopK(tokens_per_step=2).choose(conf, torch.tensor([0]), torch.tensor([0]))
    assert picked.tolist() == [[False, False, True, False, True]]
    picked = CommitThreshold(0.92).choose(conf, torch.tensor([0]), torch.tensor([0]))
    assert picked.tolist() == [[False, False, False, False, True]]
    picked = CommitThreshold(0.99).choose(conf, torch.tensor([0]), torch.tensor([0]))  # none above: the best
    assert picked.tolist() == [[False, False, False, False, True]]


@pytest.mark.parametrize("k", [1, 3])
def test_random_rule_takes_exactly_ceil_L_over_k_calls(k):
    done = generate_with_stats(tiny_model(), TOK, PROMPTS, LENGTHS, "random", tokens_per_step=k, stop_at_eot=False)
    assert [c.nfe for c in done] == [math.ceil(n / k) for n in LENGTHS]


def test_random_rule_picks_positions_uniformly_whatever_the_confidence():
    # one candidate is far more confident than the others; random order must ignore that. 4000 draws of
    # 1 of 4 candidates: each count ~ Binomial(4000, 1/4), sd ~27, so +-150 (5.5 sd) never fails by chance
    conf = torch.tensor([[0.99, 0.01, float("-inf"), 0.02, 0.03]]).expand(4000, 5)
    rule = CommitRandom(torch.Generator().manual_seed(0), tokens_per_step=1)
    picked = rule.choose(conf, torch.arange(4000), torch.zeros(4000, dtype=torch.long))
    assert picked.sum(1).eq(1).all() and not picked[:, 2].any()  # one per row, never a non-candidate
    counts = picked.sum(0)[[0, 1, 3, 4]]
    assert ((counts - 1000).abs() < 150).all(), counts


@pytest.mark.parametrize("strategy,knobs", [("topk", dict(tokens_per_step=2)), ("random", dict(tokens_per_step=1)),
                                            ("threshold", dict(threshold=0.05)), ("ancestral", dict(steps=16))])
def test_block_causal_models_always_decode_block_by_block(strategy, knobs):
    """A BD3-LM block is predicted from the clean blocks before it, so every rule finishes a model block
    before it commits anything in the next one."""
    model = tiny_model("block_causal", block_length=4)
    first_masked_block = []

    def watch(info):
        ids = info.token_ids[0]
        masked = [i // 4 for i, t in enumerate(ids) if t == TOK.mask_id]
        committed = [i // 4 for i, t in enumerate(ids) if t != TOK.mask_id]
        if masked:  # nothing committed beyond the first block that still has a mask
            assert max(committed, default=-1) <= min(masked), (ids, committed, masked)
        first_masked_block.append(min(masked, default=None))

    done = generate_with_stats(model, TOK, ["abcd"], 16, strategy, temperature=1.0, stop_at_eot=False,
                               on_step=watch, **knobs)
    assert len(done[0].token_ids) == 16 and TOK.mask_id not in done[0].token_ids


def test_block_causal_topk_equals_blocks_with_the_same_rule():
    model = tiny_model("block_causal", block_length=4)
    kw = dict(temperature=0, stop_at_eot=False, tokens_per_step=2)
    a = generate_with_stats(model, TOK, PROMPTS, LENGTHS, "topk", **kw)
    b = generate_with_stats(model, TOK, PROMPTS, LENGTHS, "blocks", block_length=4, block_rule="topk", **kw)
    assert [c.token_ids for c in a] == [c.token_ids for c in b] and [c.nfe for c in a] == [c.nfe for c in b]


def test_block_ancestral_spreads_its_steps_over_the_blocks():
    # 16 tokens in blocks of 4 with 8 steps in total: 2 time steps per block, so at most 2 calls per block
    model = tiny_model("block_causal", block_length=4)
    done = generate_with_stats(model, TOK, ["abcd"], 16, "ancestral", steps=8, stop_at_eot=False)
    assert 4 <= done[0].nfe <= 8 and done[0].steps <= 8 and len(done[0].token_ids) == 16


def test_ancestral_commit_probability_follows_the_schedule():
    sched = NoiseSchedule("linear")
    # linear alpha = 1 - t: from t to s, (t - s) / t
    assert ancestral_commit_probability(sched, 0.5, 0.25) == pytest.approx(0.5)
    assert ancestral_commit_probability(sched, 1.0, 0.75) == pytest.approx(0.25)
    assert ancestral_commit_probability(NoiseSchedule("cosine"), 0.1, 0.0) == 1.0


@pytest.mark.parametrize("model_name", sorted(DIFFUSION_MODELS))
def test_ancestral_cache_makes_fewer_calls_than_steps(model_name):
    model = DIFFUSION_MODELS[model_name]()
    steps = 4 * max(LENGTHS)
    done = generate_with_stats(model, TOK, PROMPTS, LENGTHS, "ancestral", steps=steps, stop_at_eot=False)
    for c, n in zip(done, LENGTHS):
        assert c.steps == steps or c.steps <= steps  # the time grid is walked until all are committed
        assert c.nfe <= n < steps  # a call only when the canvas changed and something commits
        assert len(c.token_ids) == n


def test_ancestral_with_few_steps_commits_many_tokens_per_call():
    model = tiny_model()
    done = generate_with_stats(model, TOK, ["abc"], 32, "ancestral", steps=4, stop_at_eot=False)
    assert done[0].nfe <= 4 and len(done[0].token_ids) == 32


# ----------------------------------------------------------------------------- KV caches
CACHED_RULES = {  # every rule of a block-causal model keeps the exact cache of the finished blocks
    "blocks": (dict(temperature=0), dict(temperature=1.0, top_k=5),
               dict(block_rule="threshold", threshold=0.05, temperature=0)),
    "ancestral": (dict(temperature=0), dict(temperature=1.0, top_k=5), dict(temperature=1.0, steps=6)),
}


@pytest.mark.parametrize("strategy", sorted(CACHED_RULES))
def test_kv_cached_decoding_of_a_block_causal_model_equals_uncached_exactly(strategy):
    from tests.test_serve import tiny  # sharpened weights: a wrong cached key changes the tokens
    model = tiny("block_causal", block_length=4)
    fed_pasts = []  # the cached columns of every call of the cached decodes
    hidden_states = model.hidden_states

    def watch(idx, mask=None, past_kv=None, positions=None):
        fed_pasts.append(0 if past_kv is None else past_kv[0][0].size(2))
        return hidden_states(idx, mask=mask, past_kv=past_kv, positions=positions)
    for knobs in CACHED_RULES[strategy]:
        kw = dict(block_length=8, stop_at_eot=False, seed=3, **knobs)
        model.hidden_states = watch
        cached = generate_with_stats(model, TOK, PROMPTS, LENGTHS, strategy, kv_cache=True, **kw)
        model.hidden_states = hidden_states
        plain = generate_with_stats(model, TOK, PROMPTS, LENGTHS, strategy, kv_cache=False, **kw)
        assert [c.token_ids for c in cached] == [c.token_ids for c in plain]
        assert [c.nfe for c in cached] == [c.nfe for c in plain]
    assert max(fed_pasts) > 0, "no call used the cache"
    if strategy == "ancestral":  # rows commit at their own steps: in a block, a row that has not run yet
        # holds one block fewer than one that has, and is called with its shorter cache after it
        assert any(b < a for a, b in zip(fed_pasts, fed_pasts[1:]))


def test_the_ancestral_cache_is_refused_where_it_would_not_be_exact():
    rows = AncestralRows(tiny_model(), TOK.mask_id, TOK.vocab_size, capacity=1, width=16)  # bidirectional
    with pytest.raises(ValueError, match="block-causal"):
        rows.add([1, 2], 8, 8, NoiseSchedule("loglinear"), Sampler(0.0), None, block_length=8, kv_cache=True)


def test_blocks_on_a_bidirectional_model_decode_left_to_right():
    model = tiny_model()
    order = []

    def watch(info):
        ids = info.token_ids[0]
        order.append(max((i for i, t in enumerate(ids) if t != TOK.mask_id), default=-1))

    done = generate_with_stats(model, TOK, ["abc"], 24, "blocks", block_length=8, temperature=0, stop_at_eot=False,
                               on_step=watch)
    assert done[0].nfe == 24  # one token per step by default
    assert max(order[:8]) < 8 and min(order[8:]) >= 8  # block 0 is finished before block 1 starts


def test_block_length_must_be_a_multiple_of_a_block_causal_models_blocks():
    with pytest.raises(ValueError, match="multiple"):
        generate(tiny_model("block_causal", block_length=4), TOK, ["a"], 8, "blocks", block_length=6)


def test_ar_kv_cache_equals_no_cache_and_batched_equals_one_by_one():
    model = tiny_model("causal")
    kw = dict(temperature=0, stop_at_eot=False)
    cached = generate_with_stats(model, TOK, PROMPTS, LENGTHS, "ar", kv_cache=True, **kw)
    plain = generate_with_stats(model, TOK, PROMPTS, LENGTHS, "ar", kv_cache=False, **kw)
    assert [c.token_ids for c in cached] == [c.token_ids for c in plain]
    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
        alone = generate_with_stats(model, TOK, [p], n, "ar", kv_cache=False, **kw)[0]
        assert cached[i].token_ids == alone.token_ids
        assert cached[i].nfe == n  # prefill gives the first token, then one call per token


def test_ar_sampling_with_cache_equals_no_cache_for_the_same_seed():
    model = tiny_model("causal")
    kw = dict(temperature=0.8, top_k=10, top_p=0.95, seed=7, stop_at_eot=False)
    a = generate(model, TOK, PROMPTS, LENGTHS, "ar", kv_cache=True, **kw)
    b = generate(model, TOK, PROMPTS, LENGTHS, "ar", kv_cache=False, **kw)
    assert a == b


# ----------------------------------------------------------------------------- EOT
def eot_loving(model):
    """Make EOT by far the most likely token everywhere (its output row points along every state)."""
    with torch.no_grad():
        model.lm_head.weight[TOK.eot_id] = 0
        model.transformer.ln_f.bias[:] = 1.0
        model.transformer.ln_f.weight[:] = 0.0
        model.lm_head.weight[TOK.eot_id] = 10.0
    return model


@pytest.mark.parametrize("strategy,knobs,model_name", [
    ("topk", dict(tokens_per_step=2), "bidirectional"), ("ancestral", dict(steps=8), "bidirectional"),
    ("threshold", dict(), "bidirectional"), ("blocks", dict(block_length=8), "block_causal"),
    ("ar", dict(), "causal")])
def test_generation_stops_at_eot_and_is_trimmed(strategy, knobs, model_name):
    model = eot_loving(tiny_model(model_name, block_length=4 if model_name == "block_causal" else 0))
    done = generate_with_stats(model, TOK, ["abc", "de"], [24, 16], strategy, temperature=0, **knobs)
    for c in done:
        assert c.token_ids == [] and c.text == "" and c.stopped_at_eot
    if strategy == "ar":
        assert [c.nfe for c in done] == [1, 1]  # stopped after the first token
    if strategy == "blocks":
        assert all(c.nfe <= 8 for c in done)  # stopped after the first block
    untrimmed = generate_with_stats(model, TOK, ["abc"], 12, strategy, temperature=0, stop_at_eot=False, **knobs)
    assert untrimmed[0].token_ids == [TOK.eot_id] * 12 and not untrimmed[0].stopped_at_eot


# ----------------------------------------------------------------------------- sampling and API
def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, 33, generator=torch.Generator().manual_seed(0))
    greedy, _ = sample_from_logits(logits, Sampler(0.0), None)
    for s in (Sampler(1.0, top_k=1), Sampler(1.0, top_p=1e-6)):
        tokens, conf = sample_from_logits(logits, s, torch.Generator().manual_seed(1))
        assert torch.equal(tokens, greedy) and torch.allclose(conf, torch.ones(6))
    kept = torch.isfinite(filter_logits(logits, top_k=3, top_p=None)).sum(-1)
    assert kept.tolist() == [3] * 6


def test_inverse_cdf_draws_each_token_with_its_probability_and_never_a_zero_one():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]])
    # the edges: u = 0 and u just below 1 land on the first and the last token of positive probability
    u = torch.tensor([0.0, 0.4999, 0.5, 0.75, 1 - 2 ** -24])
    assert inverse_cdf(probs.expand(5, -1), u).tolist() == [1, 1, 3, 4, 4]
    # frequencies of 200k draws within 0.01 of the probabilities (a binomial's std here is ~0.001)
    draws = inverse_cdf(probs.expand(200_000, -1), torch.rand(200_000, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(torch.bincount(draws, minlength=6) / 200_000, probs[0], atol=0.01)


def test_generate_returns_text_and_stats_and_is_reproducible():
    model = tiny_model()
    a = generate_with_stats(model, TOK, PROMPTS, 8, seed=5)  # default strategy for diffusion: ancestral
    b = generate_with_stats(model, TOK, PROMPTS, 8, seed=5)
    assert [c.text for c in a] == [c.text for c in b]
    assert all(c.strategy == "ancestral" and c.tokens_per_s > 0 and c.elapsed_s > 0 for c in a)
    assert generate(model, TOK, PROMPTS, 8, seed=5) == [c.text for c in a]
    assert generate_with_stats(tiny_model("causal"), TOK, ["ab"], 3)[0].strategy == "ar"


def test_gpt2_tokenizer_prompts_decode():
    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.padded_vocab_size, n_layer=2, n_head=2, n_embd=32,
                          attention="bidirectional")).eval()
    done = generate_with_stats(model, tok, ["Hello world", "The"], [6, 9], "threshold", temperature=0,
                               stop_at_eot=False)
    assert [len(c.token_ids) for c in done] == [6, 9]
    assert all(t < tok.vocab_size for c in done for t in c.token_ids)


def test_every_strategy_has_one_decoder():
    assert sorted(DECODERS) == sorted(STRATEGIES)


@pytest.mark.parametrize("strategy,knobs,model_name", [
    ("random", dict(tokens_per_step=2), "bidirectional"), ("ancestral", dict(steps=6), "block_causal"),
    ("blocks", dict(block_rule="threshold", threshold=0.3), "bidirectional"), ("ar", dict(top_p=0.9), "causal")])
def test_options_object_decodes_like_the_keyword_knobs(strategy, knobs, model_name):
    """generate_with_stats(options=DecodeOptions(...)) and the same knobs as keywords: the same tokens."""
    model = tiny_model(model_name, block_length=4 if model_name == "block_causal" else 0)
    kw = dict(temperature=0.9, top_k=None, seed=3, batch_size=2, **knobs)
    by_keywords = generate_with_stats(model, TOK, PROMPTS, LENGTHS, strategy, **kw)
    by_options = generate_with_stats(model, TOK, PROMPTS, LENGTHS, options=DecodeOptions(strategy=strategy, **kw))
    assert [c.token_ids for c in by_options] == [c.token_ids for c in by_keywords]
    # keywords on top of an options object override it
    other_seed = DecodeOptions(strategy=strategy, **{**kw, "seed": 9})
    over = generate_with_stats(model, TOK, PROMPTS, LENGTHS, options=other_seed, seed=3)
    assert [c.token_ids for c in over] == [c.token_ids for c in by_keywords]
