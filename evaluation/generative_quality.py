"""Generative quality: perplexity of samples under an AR judge, and their unigram entropy.

    python -m evaluation.generative_quality --model out/mdlm --judge out/ar --data_dir data/shakespeare_char \
        --strategies ancestral,topk,threshold --steps 16,32,64,128 --out_dir results/genq

For every decoding rule and step count, `num_samples` sequences of `length` tokens are drawn with
inference.api.generate_with_stats (temperature 1, so the numbers describe the model's distribution, not a greedy mode)
and scored:
  gen_ppl          exp(mean NLL of the generated tokens under the judge, given what precedes them).
                   Lower is more fluent to the judge -- but a sampler that repeats one token also scores
                   low, hence:
  unigram_entropy  entropy (nats) of the token frequencies inside each sample, averaged over samples.
                   Real text of the same length sits at a fixed level (reported in the "data" row);
                   much lower means degenerate repetition.
The judge is an AR model with the same tokenizer (the study's AR model), or GPT-2 (`--judge gpt2` or a
HF dir), which re-tokenizes the decoded text with its own BPE.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import knob, parse_cli
from evaluation.evaluate import check_tokenizer_matches, resolve_model_dir, split_windows
from evaluation.generative_perplexity import generative_perplexity, unigram_entropy
from inference.loading import load_model
from models.gpt import GPT2_NAMES
from models.tokenizer import get_tokenizer, tokenizer_from_meta
from training.data import load_meta, read_split

DEFAULT_STRATEGIES = ("ancestral", "topk", "threshold")


@dataclass
class _Text:
    """The fields of inference.api.Completion that generative_perplexity reads (for the data row)."""
    prompt: str
    prompt_ids: list
    text: str
    token_ids: list


def score_samples(samples: list[list[int]], prompt_ids: list[list[int]], tokenizer, judge,
                  judge_tokenizer=None) -> dict:
    """gen PPL under the judge (evaluation.generative_perplexity: prompt as context, generated tokens scored,
    re-tokenised when the judge has another tokenizer) + mean unigram entropy of the samples."""
    entropy = sum(unigram_entropy(s) for s in samples) / max(1, len(samples))
    texts = [_Text(tokenizer.decode(p), list(p), tokenizer.decode(s), list(s)) for s, p in zip(samples, prompt_ids)]
    score = generative_perplexity(judge, judge_tokenizer or tokenizer, texts, tokenizer)
    return {"gen_ppl": score.perplexity, "judge_nll": score.nats_per_token, "judged_tokens": score.num_tokens,
            "unigram_entropy": entropy}


def decoding_runs(kind: str, strategies: Sequence[str], steps: Sequence[int], length: int) -> list[dict]:
    """The (strategy, steps) grid: AR models decode one way; threshold runs once (it picks its own steps)."""
    if kind == "ar":
        return [{"strategy": "ar", "steps": length}]
    runs = []
    for s in strategies:
        if s == "threshold":
            runs.append({"strategy": "threshold", "steps": None, "threshold": 0.9})
        else:
            runs += [{"strategy": s, "steps": T} for T in steps if T <= length or s == "ancestral"]
    return runs


def generative_quality(models: list[tuple[str, object, dict]], tokenizer, judge, judge_name: str,
                       data_windows: Optional[torch.Tensor], length: int, num_samples: int,
                       strategies: Sequence[str] = DEFAULT_STRATEGIES, steps: Sequence[int] = (16, 32, 64, 128),
                       prompt_tokens: int = 0, seed: int = 0, batch_size: int = 8, judge_tokenizer=None,
                       log=print) -> list[dict]:
    """One row per (model, strategy, steps) plus a "data" row (real val text scored the same way)."""
    from inference.api import generate_with_stats

    if prompt_tokens and data_windows is None:
        raise ValueError("prompts come from the val split: pass data windows when prompt_tokens > 0")
    if prompt_tokens:
        prompt_ids = [w[:prompt_tokens].tolist() for w in data_windows[:num_samples]]
    else:
        prompt_ids = [[] for _ in range(num_samples)]
    prompts = [tokenizer.decode(p) for p in prompt_ids]
    rows = []
    if data_windows is not None:
        real = [w[prompt_tokens:prompt_tokens + length].tolist() for w in data_windows[:num_samples]]
        r = score_samples(real, prompt_ids, tokenizer, judge, judge_tokenizer)
        rows.append({"model": "data (val text)", "strategy": "-", "steps": None, "nfe": None, "tokens_per_s": None,
                     **r, "example": tokenizer.decode(real[0])})
        log(f"[genq] data: gen PPL {r['gen_ppl']:.3f}  entropy {r['unigram_entropy']:.3f}")
    for name, model, info in models:
        kind = model.config.kind
        # an AR (or shifted diffusion) model starts from EOT when the prompt is empty: that token takes
        # one slot of its context
        n_new = min(length, model.config.block_size - max(prompt_tokens, int(model.config.needs_first_token)))
        for run in decoding_runs(kind, strategies, steps, n_new):
            knobs = {k: v for k, v in run.items() if k not in ("strategy",) and v is not None}
            if run["strategy"] == "ar":
                knobs.pop("steps", None)
            t0 = time.time()
            done = generate_with_stats(model, tokenizer, prompts, n_new, run["strategy"], temperature=1.0,
                                       stop_at_eot=False, seed=seed, batch_size=batch_size, **knobs)
            samples = [c.token_ids for c in done]
            r = score_samples(samples, prompt_ids, tokenizer, judge, judge_tokenizer)
            row = {"model": name, "strategy": run["strategy"], "steps": run.get("steps"),
                   "threshold": run.get("threshold"),
                   "nfe": sum(c.nfe for c in done) / len(done), "tokens_per_s": sum(len(s) for s in samples) /
                   max(1e-9, time.time() - t0), **r, "example": done[0].text}
            rows.append(row)
            log(f"[genq] {name} {run['strategy']:>9} steps={str(run.get('steps')):>5} NFE {row['nfe']:6.1f}  "
                f"gen PPL {r['gen_ppl']:8.3f}  entropy {r['unigram_entropy']:.3f}  ({time.time() - t0:.1f}s)")
    for r in rows:
        r["judge"] = judge_name
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | decoding | steps | NFE | gen PPL (judge) | unigram entropy (nats) | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        dec = r["strategy"] + (f" τ={r['threshold']}" if r.get("threshold") else "")
        steps = "" if r["steps"] is None else str(r["steps"])
        nfe = "" if r["nfe"] is None else f"{r['nfe']:.1f}"
        tps = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        lines.append(f"| {r['model']} | {dec} | {steps} | {nfe} | {r['gen_ppl']:.3f} ({r['judge']}) | "
                     f"{r['unigram_entropy']:.3f} | {tps} |")
    return "\n".join(lines) + "\n"


@dataclass
class GenerativeQualityConfig:
    model: list[str] = field(metadata={"help": "consolidated model dir (repeat --model for several)"})
    judge: str = field(metadata={"help": "AR model dir with the same tokenizer, or gpt2 / a GPT-2 HF dir"})
    data_dir: str = field(metadata={"help": "prepared dataset: its tokenizer, val text for the data row"})
    strategies: list[str] = knob(list(DEFAULT_STRATEGIES), "decoding rules to score")
    steps: list[int] = knob([16, 32, 64, 128], "step counts of the rules that take steps")
    length: int = knob(128, "generated tokens per sample")
    num_samples: int = knob(16, "samples per rule and step count")
    prompt_tokens: int = knob(0, "condition on this many val tokens (0 = none)")
    seed: int = knob(0, "decoding seed")
    out_dir: str = knob("", "write generative_quality.{json,md} here ('' = print only)")


def main(argv=None) -> list[dict]:
    a = parse_cli(GenerativeQualityConfig, argv, prog="python -m evaluation.generative_quality",
                  description=__doc__.split("\n\n")[0])
    try:
        steps = a.steps
        if any(T < 1 for T in steps) or a.length < 1 or a.num_samples < 1:
            raise ValueError("--steps, --length and --num_samples must be positive")
        meta = load_meta(a.data_dir)
        tokenizer = tokenizer_from_meta(meta)
        models = []
        for m in a.model:
            loaded = load_model(ckpt=m, device="cpu")
            name = Path(resolve_model_dir(m)).resolve().parent.name if Path(resolve_model_dir(m)).name == "export" \
                else Path(m).resolve().name
            check_tokenizer_matches(loaded, meta, name, a.data_dir)
            models.append((name, loaded.model, loaded.info))
        judge_is_hf = a.judge in GPT2_NAMES or \
            (Path(a.judge) / "config.json").is_file() and "GPT2" in (Path(a.judge) / "config.json").read_text()
        judge_loaded = load_model(init_from=a.judge, device="cpu") if judge_is_hf else load_model(ckpt=a.judge, device="cpu")
        judge = judge_loaded.model
        judge_tok = get_tokenizer("gpt2") if judge_is_hf else None  # GPT-2 re-tokenises other vocabularies
        if not judge_is_hf:
            check_tokenizer_matches(judge_loaded, meta, a.judge, a.data_dir)
        windows = split_windows(read_split(a.data_dir, "val", meta), a.prompt_tokens + a.length, a.num_samples)
        rows = generative_quality(models, tokenizer, judge, Path(a.judge).name, windows, a.length, a.num_samples,
                                  a.strategies, steps, a.prompt_tokens, a.seed, judge_tokenizer=judge_tok)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(markdown_table(rows))
    if a.out_dir:
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "generative_quality.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        (out / "generative_quality.md").write_text(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
