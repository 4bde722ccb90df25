"""Specification of the evaluator (evaluation/evaluate.py), generative quality and the bound-vs-T study."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import read_config_file
from evaluation.evaluate import (EvalConfig, diffusion_window_nelbo, evaluate, load_config,
                                split_windows)
from evaluation.generative_quality import score_samples, unigram_entropy
from models.diffusion import NoiseSchedule, masked_diffusion_loss
from models.gpt import GPT, GPTConfig
from models.weights import save_consolidated

REPO = Path(__file__).resolve().parents[1]
CHARS = "0123abcdefghijklmnopqrstuvwxyz"  # 30 chars + EOT = 31 real ids; MASK = 31; 64 rows
VOCAB, MASK_ID, ROWS = len(CHARS) + 1, len(CHARS) + 1, 64


def char_meta(chars=CHARS) -> dict:
    return {"tokenizer": "char", "vocab_size": len(chars) + 1, "eot_id": len(chars), "mask_id": len(chars) + 1,
            "padded_vocab_size": ROWS, "chars": chars}


def write_dataset(d: Path, val: np.ndarray, train=None, meta=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    train = val if train is None else train
    val.astype(np.uint16).tofile(d / "val.bin")
    train.astype(np.uint16).tofile(d / "train.bin")
    (d / "meta.json").write_text(json.dumps({**(meta or char_meta()), "dtype": "uint16", "train_tokens": len(train),
                                             "val_tokens": len(val)}))
    return d


def arithmetic_stream(n_seq: int, length: int, seed: int) -> np.ndarray:
    """x_i = (a + b i) mod 31, a new (a, b) every `length` tokens: two visible tokens determine the rest."""
    g = np.random.default_rng(seed)
    a = g.integers(0, VOCAB, (n_seq, 1))
    b = g.integers(1, 4, (n_seq, 1))
    return ((a + b * np.arange(length)) % VOCAB).reshape(-1)


def save_model(model: GPT, d: Path, objective: str, meta=None) -> Path:
    save_consolidated(model.state_dict(), {"model": model.config.to_dict(), "objective": {"name": objective,
                      "schedule": "loglinear"}, "tokenizer": meta or char_meta(), "mask_id": MASK_ID,
                      "eot_id": MASK_ID - 1}, d)
    return d


def tiny_gpt(attention: str, block_size=16, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=ROWS, n_layer=2, n_head=2, n_embd=32,
                         attention=attention)).eval()


def cfg(**kw) -> EvalConfig:
    base = dict(wandb_mode="disabled", tensorboard=False, max_windows=8, samples_per_window=4)
    return EvalConfig(**{**base, **kw})


class ConstantSequenceOracle(torch.nn.Module):
    """The exact (Bayes-optimal) denoiser of a handcrafted data set: every sequence repeats one token c
    drawn uniformly from V real ids. One visible token reveals c (loss ~0); a fully masked row leaves c
    uniform (loss log V). The NELBOs are then known in closed form (linear schedule, L tokens):
        L_inf = log V / L,   L_T = log V * sum_j (j/T)^(L-1) / T   (= log V (1 + 1/T)^2 / 4 for L = 4),
    so the T-step bound is strictly above the continuous one and decreases with T -- a real effect,
    not an untrained model's flat line. It has the members masked_diffusion_loss uses (an unshifted,
    bidirectional config; hidden_states and lm_head)."""

    def __init__(self, vocab: int, rows: int):
        super().__init__()
        self.vocab, self.rows = vocab, rows
        self.config = GPTConfig(attention="bidirectional", shift=False)
        self.lm_head = torch.nn.Linear(rows, rows, bias=False)  # identity: hidden states are the logits
        torch.nn.init.eye_(self.lm_head.weight)

    def hidden_states(self, xt, mask=None):  # mask: always the config's own (no annealing here)
        assert mask is None
        visible = xt < self.vocab  # (B, L)
        c = torch.where(visible, xt, -1).max(dim=1).values  # (B,) the constant, -1 when nothing is visible
        logits = torch.zeros(*xt.shape, self.rows)  # (B, L, rows): uniform when nothing is visible
        known = c >= 0
        logits[known] = 50.0 * F.one_hot(c[known], self.rows).float().unsqueeze(1).expand(-1, xt.size(1), -1)
        return logits, None


def oracle_bound(T, L=4, V=VOCAB):
    """Closed-form NELBO (nats/token) of the oracle; T=None is the continuous bound."""
    if T is None:
        return math.log(V) / L
    return math.log(V) * sum((j / T) ** (L - 1) for j in range(1, T + 1)) / T


@pytest.fixture(scope="module")
def oracle_estimates():
    oracle = ConstantSequenceOracle(VOCAB, ROWS).eval()
    windows = torch.arange(VOCAB).repeat_interleave(4).view(VOCAB, 4).repeat(4, 1)  # (124, 4): c repeated
    schedule = NoiseSchedule("linear")
    return {T: diffusion_window_nelbo(oracle, windows, schedule, MASK_ID, T, samples_per_window=64, seed=7)
            for T in (2, 8, 32, 128, None)}


# ----------------------------------------------------------------------------- the bounds
def test_t_step_bound_is_above_continuous_and_non_increasing_in_T(oracle_estimates):
    """Statistical check with common random numbers (same windows, same seeds for every T): for
    consecutive estimators (T=2, 8, 32, 128, inf) the paired difference L_coarse - L_fine must not be
    below -3 standard errors, and the coarse bounds are above L_inf by more than 3 standard errors."""
    per = oracle_estimates
    order = [2, 8, 32, 128, None]
    for coarse, fine in zip(order, order[1:]):
        diff = per[coarse] - per[fine]
        se = diff.std() / math.sqrt(len(diff))
        assert diff.mean() > -3 * se, f"L_{coarse}={per[coarse].mean():.4f} < L_{fine}={per[fine].mean():.4f}"
    for T in (2, 8, 32):
        gap = per[T] - per[None]
        gap_se = gap.std() / math.sqrt(len(gap))
        assert gap.mean() > 3 * gap_se, f"L_{T} - L_inf = {gap.mean():.4f} ± {gap_se:.4f} is not significant"


def test_estimates_match_the_closed_form_within_their_standard_error(oracle_estimates):
    for T, est in oracle_estimates.items():
        se = est.std() / math.sqrt(len(est))
        assert abs(est.mean() - oracle_bound(T)) < 4 * se + 2e-3, (T, est.mean().item(), oracle_bound(T))


def test_common_random_numbers_make_differences_far_more_precise_than_values(oracle_estimates):
    per = oracle_estimates
    level_se = per[None].std() / math.sqrt(len(per[None]))
    gap = per[32] - per[None]
    gap_se = gap.std() / math.sqrt(len(gap))
    assert gap_se < level_se / 2
    assert abs(gap.mean() - (oracle_bound(32) - oracle_bound(None))) < 4 * gap_se + 1e-3


def test_window_estimate_is_the_mean_of_its_samples():
    """Each window's NELBO is masked_diffusion_loss on that window repeated K times, seed = base + 2 w."""
    model = tiny_gpt("bidirectional")
    windows = torch.from_numpy(arithmetic_stream(3, 16, seed=5)).view(3, 16)
    got = diffusion_window_nelbo(model, windows, NoiseSchedule("loglinear"), MASK_ID, 8, 16, seed=100)
    with torch.no_grad():
        want = masked_diffusion_loss(model, windows[2:3].expand(16, -1), NoiseSchedule("loglinear"), MASK_ID,
                                     seed=104, num_steps=8)
    assert got[2].item() == pytest.approx(want.item(), rel=1e-6)


def test_evaluator_ar_ppl_is_exp_of_the_mean_cross_entropy(tmp_path):
    model = tiny_gpt("causal")
    val = np.random.default_rng(0).integers(0, VOCAB, 200)
    data = write_dataset(tmp_path / "data", val)
    res = evaluate(cfg(model=[str(save_model(model, tmp_path / "ar", "ar"))], data_dir=str(data), max_windows=5))
    entry = res["models"][0]["splits"]["val"]
    # by hand: 5 windows of 17 tokens, evenly spaced over the 200 tokens
    starts = np.linspace(0, 200 - 17, 5).round().astype(int)
    w = torch.from_numpy(np.stack([val[s:s + 17] for s in starts]).astype(np.int64))
    with torch.no_grad():  # the softmax over the real ids only: MASK and padding rows are not text
        ce = F.cross_entropy(model(w[:, :-1])[..., :MASK_ID].flatten(0, 1), w[:, 1:].flatten())
    assert entry["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert entry["ppl"] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert entry["tokens"] == 5 * 16


def test_bd3lm_model_is_evaluated_with_the_block_diffusion_nelbo(tmp_path):
    """A saved bd3lm model loads as objective "bd3lm" and reports its continuous and T-step NELBOs, each
    window's value being block_diffusion_loss on it repeated K times with seed = base + 2 w."""
    from inference.loading import load_model
    from models.diffusion import block_diffusion_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=ROWS, n_layer=2, n_head=2, n_embd=32, attention="block_causal",
                          block_length=4)).eval()
    data = write_dataset(tmp_path / "data", arithmetic_stream(20, 16, seed=1))
    saved = save_model(model, tmp_path / "bd3lm", "bd3lm")
    assert load_model(ckpt=str(saved), device="cpu", log=lambda *a: None).objective == "bd3lm"
    res = evaluate(cfg(model=[str(saved)], data_dir=str(data), steps=[4], max_windows=3, seed=50))
    m = res["models"][0]
    assert m["objective"] == "bd3lm"
    bounds = m["splits"]["val"]["bounds"]
    assert [b["steps"] for b in bounds] == ["inf", 4]
    windows = split_windows(np.fromfile(data / "val.bin", dtype=np.uint16), 17, 3)[:, :-1]
    for b in bounds:
        with torch.no_grad():
            want = [block_diffusion_loss(model, w.expand(4, -1), NoiseSchedule("loglinear"), MASK_ID, seed=50 + 2 * i,
                                         block_length=4, num_steps=None if b["steps"] == "inf" else b["steps"],
                                         masking_impl="torch").item() for i, w in enumerate(windows)]
        assert b["nelbo"] == pytest.approx(sum(want) / len(want), rel=1e-6)
    with pytest.raises(ValueError, match="multiple of it"):
        evaluate(cfg(model=[str(saved)], data_dir=str(data), block_size=10, steps=[4]))


def test_evaluation_writes_json_table_plot_and_logs(tmp_path):
    data = write_dataset(tmp_path / "data", arithmetic_stream(20, 16, seed=1))
    ar = save_model(tiny_gpt("causal"), tmp_path / "ar", "ar")
    mdlm = save_model(tiny_gpt("bidirectional"), tmp_path / "mdlm", "mdlm")
    out = tmp_path / "out"
    res = evaluate(EvalConfig(model=[str(mdlm), str(ar)], data_dir=str(data), out_dir=str(out), steps=[4, 16],
                              max_windows=4, samples_per_window=4, wandb_mode="offline"))
    saved = json.loads((out / "results.json").read_text())
    assert [b["steps"] for b in saved["models"][0]["splits"]["val"]["bounds"]] == ["inf", 4, 16]
    assert saved["models"][1]["splits"]["val"]["ppl"] == pytest.approx(res["models"][1]["splits"]["val"]["ppl"])
    table = (out / "results.md").read_text()
    assert "T = 16" in table and "continuous" in table and "exact" in table
    assert (out / "bound_vs_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert list((out / "wandb").glob("offline-run-*"))  # offline: written locally, no network, no hang


# ----------------------------------------------------------------------------- bad input
def test_checkpoint_with_another_tokenizer_is_refused(tmp_path):
    data = write_dataset(tmp_path / "data", np.arange(100) % VOCAB)
    other = char_meta("4567abcdefghijklmnopqrstuvwxyz")  # same size, different characters
    model = save_model(tiny_gpt("causal"), tmp_path / "ar", "ar", meta=other)
    with pytest.raises(ValueError, match="tokenizer mismatch.*character set"):
        evaluate(cfg(model=[str(model)], data_dir=str(data)))
    gpt2_data = write_dataset(tmp_path / "gpt2", np.arange(100), meta={"tokenizer": "gpt2", "vocab_size": 50257,
                                                                      "eot_id": 50256, "mask_id": 50257})
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        evaluate(cfg(model=[str(model)], data_dir=str(gpt2_data)))


@pytest.mark.parametrize("steps", ["0", "8,0", "-4"])
def test_zero_or_negative_timesteps_are_rejected(steps, capsys):
    with pytest.raises(ValueError, match="positive integers"):
        EvalConfig(model=["m"], data_dir="d", steps=steps).validate()
    from evaluation.evaluate import main
    with pytest.raises(SystemExit) as e:
        main(["--model", "m", "--data_dir", "d", "--steps", steps])
    assert e.value.code == 2 and "positive integers" in capsys.readouterr().err


def test_val_split_shorter_than_one_context_is_a_clear_error(tmp_path):
    data = write_dataset(tmp_path / "data", np.arange(10), train=np.arange(500) % VOCAB)
    model = save_model(tiny_gpt("causal", block_size=16), tmp_path / "ar", "ar")
    with pytest.raises(ValueError, match="val split has 10 tokens, fewer than one window of 17"):
        evaluate(cfg(model=[str(model)], data_dir=str(data)))
    with pytest.raises(ValueError, match="fewer than one window"):
        split_windows(np.arange(5), 6, 4)


# ----------------------------------------------------------------------------- GPT-2 baselines
@pytest.mark.parametrize("name", ["gpt2", "gpt2_medium", "gpt2_large", "gpt2_xl"])
def test_gpt2_eval_configs_name_the_openai_checkpoint(name):
    c = read_config_file(REPO / "evaluation" / "configs" / f"eval_{name}.json")
    cfg_ = EvalConfig(**c)
    assert cfg_.init_from == name.replace("_", "-") and cfg_.splits == ["train", "val"]
    assert cfg_.block_size == 1024 and cfg_.data_dir == "data/openwebtext"


def test_train_gpt2_config_is_nanogpts_124m_recipe():
    from training.config import load_config as load_train_config

    c, _ = load_train_config(str(REPO / "training" / "configs" / "train_gpt2.json"))
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size) == (12, 12, 768, 1024)
    assert c.objective.name == "ar" and c.model.attention == "causal"
    assert c.batch_size * c.model.block_size * c.gradient_accumulation_steps * 8 == 491_520  # ~0.5M tokens/step
    assert c.max_iters == 600_000 and c.learning_rate == 6e-4 and c.min_lr == 6e-5 and c.beta2 == 0.95


def test_gpt2_eval_config_runs_on_a_tiny_local_gpt2(tmp_path):
    """The eval_gpt2 path (GPT.from_pretrained -> train/val loss) on a random GPT2LMHeadModel saved with
    save_pretrained: our loss equals the one transformers computes for the same windows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256, "mask_id": 50257, "padded_vocab_size": 50304}
    data = write_dataset(tmp_path / "owt", rng.integers(0, 50257, 400), train=rng.integers(0, 50257, 800), meta=meta)
    config_file = REPO / "evaluation" / "configs" / "eval_gpt2.json"
    c = load_config(["--config", str(config_file), "--init_from", str(tmp_path / "hf"), "--data_dir", str(data),
                     "--block_size", "32", "--max_windows", "6", "--out_dir", "", "--wandb_mode", "disabled"])
    res = evaluate(c)
    m = res["models"][0]
    assert set(m["splits"]) == {"train", "val"} and m["objective"] == "ar"
    w = split_windows(np.fromfile(data / "val.bin", dtype=np.uint16), 33, 6)
    with torch.no_grad():
        hf_loss = hf(w[:, :-1], labels=w[:, :-1]).loss  # HF shifts the labels itself: 31 targets per row
        ours_on_same = F.cross_entropy(hf(w).logits[:, :-1].flatten(0, 1), w[:, 1:].flatten())
    assert m["splits"]["val"]["loss"] == pytest.approx(ours_on_same.item(), rel=1e-4)
    assert abs(m["splits"]["val"]["loss"] - hf_loss.item()) < 0.05  # same model, 31 vs 32 targets


# ----------------------------------------------------------------------------- generative quality
def test_unigram_entropy_catches_repetition():
    assert unigram_entropy([5] * 50) == 0.0
    assert unigram_entropy([0, 1, 2, 3] * 10) == pytest.approx(math.log(4))


def test_generative_ppl_scores_only_the_generated_tokens_given_the_prompt():
    from models.tokenizer import tokenizer_from_meta

    tok = tokenizer_from_meta(char_meta())
    judge = tiny_gpt("causal", block_size=32)
    prompt, sample = [3, 4, 5], [6, 7, 8, 9]
    r = score_samples([sample, [1] * 4], [prompt, prompt], tok, judge)
    seq = torch.tensor([tok.eot_id] + prompt + sample)  # the judge reads EOT + prompt as context
    with torch.no_grad():
        logits = judge(seq[None, :-1])[0][-4:, :VOCAB]  # real ids only (not MASK / padding)
        nll = F.cross_entropy(logits, seq[-4:], reduction="sum")
        seq2 = torch.tensor([tok.eot_id] + prompt + [1] * 4)
        nll2 = F.cross_entropy(judge(seq2[None, :-1])[0][-4:, :VOCAB], seq2[-4:], reduction="sum")
    assert r["judged_tokens"] == 8
    assert r["gen_ppl"] == pytest.approx(math.exp((nll + nll2).item() / 8), rel=1e-5)
    assert r["unigram_entropy"] == pytest.approx(math.log(4) / 2)  # (log 4 + 0) / 2: repetition shows


# ----------------------------------------------------------------------------- the study, end to end
@pytest.mark.slow
def test_quick_study_writes_results_table_and_plot(tmp_path):
    """python -m evaluation.study --quick: prepare, train AR + MDLM with the deepspeed launcher (2 CPU
    ranks), evaluate, generative quality (~70 s on a 2-core CPU)."""
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-m", "evaluation.study", "--out_dir", str(out), "--quick",
                           "--wandb_mode", "offline"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    kinds = {m["name"]: m for m in res["models"]}
    assert kinds["ar"]["objective"] == "ar" and kinds["mdlm"]["objective"] == "mdlm"
    bounds = kinds["mdlm"]["splits"]["val"]["bounds"]
    assert [b["steps"] for b in bounds] == ["inf", 8, 32, 128]
    assert all(b["nelbo_stderr"] > 0 for b in bounds)
    assert res["generative_quality"] and res["study"]["tokens_per_model"] > 0
    assert "T = 128" in (out / "results.md").read_text()
    assert (out / "bound_vs_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert "gen PPL" in (out / "study.md").read_text()
