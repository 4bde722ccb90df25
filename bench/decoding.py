"""Decoding benchmark: every rule on one model and one prompt set, side by side, from one run.

    python -m bench.decoding --ckpt out/mdlm --ar out/ar --judge out/ar --gen_length 128 --out bench.json
    python -m bench.decoding --random_init            # CPU smoke run on tiny random models

For each rule it prints tokens/s, model calls (NFE) per generated token, the generative perplexity
of the samples under an AR judge (--judge DIR, or GPT-2 when its weights are cached, or the --ar model)
with its standard error, and the samples' unigram entropy (low entropy = repetition, which an AR judge
rewards with a low perplexity):
  two one-token-per-step baselines (L calls each):
    random order, k=1      exact sampling from the model (an MDLM is an any-order AR model); the
                           reference for the rules that sample like it: ancestral, random k=4
    confidence order, k=1  LLaDA low-confidence remasking with one token per step; the reference for
                           the confidence rules: top-k k=4, threshold, blocks
  ancestral with T in {L/4, L/2, L}, random order k=4, top-k k=4, threshold tau in {0.7, 0.9},
  blocks (threshold 0.9 inside, Fast-dLLM) with and without the KV cache, and AR with and without the
  KV cache (the --ar model, else the judge).
Checked at the end (`targets` in the JSON): >= 4x fewer model calls than one-token-per-step at a generative perplexity
within 10% of the one-token-per-step baseline of the same family; KV-cached blocks >= 2x the tokens/s
of uncached blocks with the same output.
Every rule generates exactly L tokens per prompt (EOT does not stop it, unless --stop_at_eot), with the
same seed and temperature. With --random_init the models are tiny and random: NFE and the speed ratios
are real, the perplexities are meaningless.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.config import knob, parse_cli, run_or_exit
from inference.api import generate_with_stats
from evaluation.generative_perplexity import generative_perplexity, unigram_entropy
from inference.loading import LoadedModel, load_gpt2, load_model, resolve_device
from common.precision import autocast
from inference.sample import read_prompts_file
from models.gpt import GPT, GPTConfig
from models.tokenizer import get_tokenizer

DEFAULT_PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are", "The quick brown fox", "To be, or not to be",
                   "Once upon a time", "KING HENRY:\nWhat", "I will", "And"]
RANDOM_BASELINE = "one-token-per-step, random order"
CONFIDENCE_BASELINE = "one-token-per-step, confidence"
RANDOM_CORPUS = "".join(chr(c) for c in range(32, 127)) + "\n"  # printable ASCII: every default prompt encodes
RANDOM_WARNING = ("RANDOM-INIT MODELS: generative perplexities below are MEANINGLESS for quality (random weights); "
                  "only NFE per token and the speed ratios mean something.")


@dataclass
class Row:
    name: str
    model: str  # "diffusion" | "ar"
    strategy: str
    knobs: dict = field(default_factory=dict)
    nfe_per_token: float = 0.0
    calls_fewer_than_baseline: Optional[float] = None  # baseline NFE per token / this NFE per token
    tokens_per_s: float = 0.0
    gen_ppl: Optional[float] = None
    tokens: int = 0
    wall_s: float = 0.0
    same_output_as: Optional[str] = None
    same_output: Optional[bool] = None
    baseline: Optional[str] = None  # the one-token-per-step row this rule's quality is compared with
    gen_ppl_stderr: Optional[float] = None  # standard error of log gen PPL (relative error of the PPL)
    entropy: Optional[float] = None  # mean unigram entropy of the samples (nats)
    token_ids: list = field(default_factory=list, repr=False)


@dataclass
class BenchConfig:
    ckpt: str = knob("", "the diffusion model to benchmark (consolidated dir or training out dir)")
    ar: str = knob("", "an AR model for the AR rows (default: the judge)")
    judge: str = knob("", "AR judge for generative perplexity: a model dir, or gpt2 | gpt2-medium | ... "
                           "(default: GPT-2 if its weights are cached, else the --ar model)")
    random_init: bool = knob(False, "no checkpoint: tiny random block-causal diffusion + AR models (CPU smoke run)")
    random_attention: str = knob("block_causal", "--random_init: attention of the random diffusion model "
                                                  "(block_causal: its KV cache is exact)",
                                  choices=("block_causal", "bidirectional"))
    prompts_file: str = knob("", "one prompt per line (default: 8 built-in prompts)")
    num_prompts: Optional[int] = knob(None, "use the first N prompts (none = all)")
    samples_per_prompt: int = knob(4, "requests per prompt (different draws); more samples = smaller perplexity "
                                       "error bars")
    gen_length: int = knob(64, "L: tokens generated per prompt")
    block_length: Optional[int] = knob(None, "blocks rows (none: the model's block for block-causal models, "
                                              "else L/4)")
    topk: int = knob(4, "tokens per step of the top-k row")
    batch_size: int = knob(8, "requests decoded together")
    temperature: float = knob(1.0, "sampling temperature of every rule")
    top_p: Optional[float] = knob(None, "nucleus sampling (none = off)")
    stop_at_eot: bool = knob(False, "let EOT stop a request (default: always L tokens)")
    seed: int = knob(1337, "the same seed for every rule")
    repeats: int = knob(1, "run every rule this many times; tokens/s is the fastest run (outputs are identical)")
    device: str = knob("auto", "auto | cpu | cuda | cuda:1 ...")
    threads: Optional[int] = knob(None, "torch CPU threads (none: torch's choice; 1 is faster for tiny models on "
                                         "a busy CPU)")
    dtype: str = knob("auto", "autocast dtype on GPU (auto: bfloat16 where supported); CPU runs float32",
                       choices=("auto", "float32", "bfloat16", "float16"))
    out: str = knob("", "write the rows and the checks as JSON here")


def parse_args(argv=None) -> BenchConfig:
    return parse_cli(BenchConfig, argv, prog="python -m bench.decoding", description=__doc__)


def random_models(args, device):
    """Tiny random diffusion + AR models on a printable-ASCII char tokenizer (seeded)."""
    tok = get_tokenizer("char", corpus_text=RANDOM_CORPUS)
    b = args.block_length or 16
    base = dict(block_size=256, vocab_size=tok.padded_vocab_size, n_layer=4, n_head=4, n_embd=128)
    torch.manual_seed(args.seed)
    diff = GPT(GPTConfig(**base, attention=args.random_attention,
                         block_length=b if args.random_attention == "block_causal" else 0)).to(device).eval()
    ar = GPT(GPTConfig(**base, attention="causal")).to(device).eval()
    return (LoadedModel(diff, tok, "mdlm", source="random-init"),
            LoadedModel(ar, tok, "ar", source="random-init"))


def load_judge(args, device, ar: Optional[LoadedModel], log):
    if args.judge:
        try:  # init_from takes our model dirs, GPT-2 names and Hugging Face GPT-2 dirs
            judge = load_model(init_from=args.judge, device=device, log=log)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--judge {args.judge}: {e}") from e
        if judge.objective != "ar":
            raise ValueError(f"--judge {args.judge} is a diffusion model; the judge must be autoregressive")
        return judge
    if gpt2_is_cached():
        try:
            return load_gpt2("gpt2", device)
        except (OSError, ValueError) as e:
            log(f"note: cached GPT-2 did not load ({e})")
    if ar is not None:
        log("note: GPT-2 weights not in the Hugging Face cache; judging with the --ar model")
        return ar
    log("note: no judge (no --judge, no cached GPT-2, no --ar): generative perplexity is not measured")
    return None


def gpt2_is_cached() -> bool:
    """GPT-2's files are in the local Hugging Face cache (checked without touching the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo, "config.json"), str)
               for repo in ("openai-community/gpt2", "gpt2"))


def run_row(row: Row, loaded: LoadedModel, prompts, args, judge) -> Row:
    walls = []
    for _ in range(max(args.repeats, 1)):  # same seed: every repeat decodes the same tokens
        with autocast(next(loaded.model.parameters()).device, args.dtype):
            done = generate_with_stats(loaded.model, loaded.tokenizer, prompts, args.gen_length, row.strategy,
                                       temperature=args.temperature, top_p=args.top_p,
                                       stop_at_eot=args.stop_at_eot, schedule=loaded.schedule,
                                       batch_size=args.batch_size, seed=args.seed, **row.knobs)
        walls.append(sum({c.batch_index: c.elapsed_s for c in done}.values()))
    row.tokens = sum(len(c.token_ids) for c in done)
    row.wall_s = min(walls)
    row.tokens_per_s = row.tokens / max(row.wall_s, 1e-9)
    row.nfe_per_token = sum(c.nfe for c in done) / max(row.tokens, 1)
    row.token_ids = [c.token_ids for c in done]
    row.entropy = sum(unigram_entropy(c.token_ids) for c in done) / max(len(done), 1)
    if judge is not None:
        score = generative_perplexity(judge.model, judge.tokenizer, done, loaded.tokenizer)
        row.gen_ppl, row.gen_ppl_stderr = score.perplexity, score.stderr_nats()
    return row


def bench_rows(args, L: int, diffusion: LoadedModel) -> list[Row]:
    cfg = diffusion.model.config
    b = args.block_length or (cfg.block_length if cfg.attention == "block_causal" else max(L // 4, 1))
    blocks = dict(block_length=b, block_rule="threshold", threshold=0.9)
    exact, greedy = RANDOM_BASELINE, CONFIDENCE_BASELINE
    return [
        Row(exact, "diffusion", "random", dict(tokens_per_step=1)),
        Row(greedy, "diffusion", "topk", dict(tokens_per_step=1)),
        Row(f"ancestral T=L/4={max(L // 4, 1)}", "diffusion", "ancestral", dict(steps=max(L // 4, 1)), baseline=exact),
        Row(f"ancestral T=L/2={max(L // 2, 1)}", "diffusion", "ancestral", dict(steps=max(L // 2, 1)), baseline=exact),
        Row(f"ancestral T=L={L}", "diffusion", "ancestral", dict(steps=L), baseline=exact),
        Row(f"random order k={args.topk}", "diffusion", "random", dict(tokens_per_step=args.topk), baseline=exact),
        Row(f"top-k k={args.topk}", "diffusion", "topk", dict(tokens_per_step=args.topk), baseline=greedy),
        Row("threshold tau=0.7", "diffusion", "threshold", dict(threshold=0.7), baseline=greedy),
        Row("threshold tau=0.9", "diffusion", "threshold", dict(threshold=0.9), baseline=greedy),
        Row(f"blocks b={b} +KV cache", "diffusion", "blocks", {**blocks, "kv_cache": True}, baseline=greedy),
        Row(f"blocks b={b} no cache", "diffusion", "blocks", {**blocks, "kv_cache": False}, baseline=greedy),
    ]


def check_targets(rows: list[Row]) -> dict:
    by_name = {r.name: r for r in rows}
    fewer = []
    for r in rows:
        if r.model != "diffusion" or r.baseline is None or r.calls_fewer_than_baseline is None:
            continue
        base = by_name[r.baseline]
        if r.calls_fewer_than_baseline >= 4.0:
            ok_ppl = (r.gen_ppl is not None and base.gen_ppl is not None and r.gen_ppl <= 1.10 * base.gen_ppl)
            fewer.append({"rule": r.name, "baseline": base.name, "calls_fewer": round(r.calls_fewer_than_baseline, 2),
                          "gen_ppl_ratio": None if r.gen_ppl is None or base.gen_ppl is None
                          else round(r.gen_ppl / base.gen_ppl, 3), "meets": ok_ppl})
    cached = next(r for r in rows if r.strategy == "blocks" and r.knobs.get("kv_cache"))
    uncached = next(r for r in rows if r.strategy == "blocks" and not r.knobs.get("kv_cache"))
    speedup = cached.tokens_per_s / max(uncached.tokens_per_s, 1e-9)
    out = {
        "fewer_calls_same_quality": {"target": ">= 4x fewer model calls than one-token-per-step, gen PPL within "
                                               "10% of the one-token-per-step baseline of its family",
                                     "candidates": fewer, "met": any(c["meets"] for c in fewer)},
        "kv_cache_blocks": {"target": "KV-cached blocks >= 2x tokens/s of uncached at equal output",
                            "speedup": round(speedup, 2), "same_output": cached.same_output,
                            "met": speedup >= 2.0 and bool(cached.same_output)},
    }
    ar_c = [r for r in rows if r.strategy == "ar" and r.knobs.get("kv_cache")]
    ar_u = [r for r in rows if r.strategy == "ar" and not r.knobs.get("kv_cache")]
    if ar_c and ar_u:
        out["kv_cache_ar"] = {"speedup": round(ar_c[0].tokens_per_s / max(ar_u[0].tokens_per_s, 1e-9), 2),
                              "same_output": ar_c[0].same_output}
    return out


def format_table(rows: list[Row]) -> str:
    head = ["rule", "model", "NFE/token", "calls vs 1/step", "tokens/s", "gen PPL (+-SE)", "vs baseline",
            "entropy", "same output"]
    by_name = {r.name: r for r in rows}
    lines = []
    for r in rows:
        base = by_name.get(r.baseline) if r.baseline else None
        ratio = ("-" if base is None or r.gen_ppl is None or base.gen_ppl is None
                 else f"x{r.gen_ppl / base.gen_ppl:.3f} ({'random' if base.strategy == 'random' else 'conf'})")
        lines.append([r.name, r.model, f"{r.nfe_per_token:.3f}",
                      "-" if r.calls_fewer_than_baseline is None else f"{r.calls_fewer_than_baseline:.2f}x fewer",
                      f"{r.tokens_per_s:.1f}",
                      "n/a" if r.gen_ppl is None else f"{r.gen_ppl:.2f} +-{100 * (r.gen_ppl_stderr or 0):.1f}%",
                      ratio, "n/a" if r.entropy is None else f"{r.entropy:.2f}",
                      "-" if r.same_output is None else (f"yes (= {r.same_output_as})" if r.same_output
                                                          else f"NO (vs {r.same_output_as})")])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    numeric = {2, 3, 4, 5, 6, 7}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(l) for l in lines])


@torch.no_grad()  # not torch.set_grad_enabled(False): tests call run() in their own process
def run(args, log=print) -> dict:
    if args.gen_length < 1:
        raise ValueError(f"--gen_length must be >= 1, got {args.gen_length}")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_init:
        if args.ckpt:
            raise ValueError("give --ckpt or --random_init, not both")
        diffusion, ar = random_models(args, device)
        judge = ar
    else:
        if not args.ckpt:
            raise ValueError("give --ckpt DIR (a diffusion model) or --random_init (tiny random models, CPU smoke run)")
        diffusion = load_model(ckpt=args.ckpt, device=device)
        if diffusion.objective == "ar":
            raise ValueError(f"--ckpt {args.ckpt} is an AR model; the bench needs a diffusion model there "
                             f"(pass the AR model with --ar)")
        ar = load_model(ckpt=args.ar, device=device) if args.ar else None
        if ar is not None and ar.objective != "ar":
            raise ValueError(f"--ar {args.ar} is a diffusion model")
        judge = load_judge(args, device, ar, log)
        if ar is None and judge is not None:
            ar = judge
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else list(DEFAULT_PROMPTS)
    prompts = prompts[:args.num_prompts] if args.num_prompts else prompts
    if args.samples_per_prompt < 1:
        raise ValueError(f"--samples_per_prompt must be >= 1, got {args.samples_per_prompt}")
    prompts = [p for p in prompts for _ in range(args.samples_per_prompt)]
    L = args.gen_length
    if args.random_init:
        log(RANDOM_WARNING)

    rows = bench_rows(args, L, diffusion)
    if ar is not None:
        rows += [Row("AR +KV cache", "ar", "ar", dict(kv_cache=True)),
                 Row("AR no cache", "ar", "ar", dict(kv_cache=False))]
    # warm-up (allocator, kernels) so the first row is not charged for it
    generate_with_stats(diffusion.model, diffusion.tokenizer, prompts[:2], min(L, 8), "topk", batch_size=2)
    for r in rows:
        t0 = time.perf_counter()
        run_row(r, diffusion if r.model == "diffusion" else ar, prompts, args, judge)
        log(f"  {r.name:<28} done in {time.perf_counter() - t0:.1f} s")
    base = rows[0]  # both one-token-per-step baselines make exactly L calls
    for r in rows:
        if r.model == "diffusion":
            r.calls_fewer_than_baseline = base.nfe_per_token / max(r.nfe_per_token, 1e-9)
    for strategy in ("blocks", "ar"):
        pair = [r for r in rows if r.strategy == strategy]
        if len(pair) == 2:
            cached, uncached = pair
            cached.same_output, cached.same_output_as = cached.token_ids == uncached.token_ids, uncached.name

    targets = check_targets(rows)
    header = (f"model {diffusion.source} ({diffusion.model.config.attention}), {len(prompts)} prompts, L={L}, "
              f"batch {args.batch_size}, temperature {args.temperature}, device {device}, judge "
              f"{'none' if judge is None else judge.source}")
    log(header)
    if args.random_init:
        log(RANDOM_WARNING)
    log(format_table(rows))
    t1, t2 = targets["fewer_calls_same_quality"], targets["kv_cache_blocks"]
    best = ", ".join(f"{c['rule']} ({c['calls_fewer']}x fewer, PPL x{c['gen_ppl_ratio']} of {c['baseline']})"
                     for c in t1["candidates"])
    log(f"fewer calls at the same quality ({t1['target']}): {'yes' if t1['met'] else 'no'}; rules: {best or 'none'}")
    log(f"KV-cached blocks ({t2['target']}): {'yes' if t2['met'] else 'no'}; speedup {t2['speedup']}x, "
        f"same output {t2['same_output']}")
    if "kv_cache_ar" in targets:
        log(f"AR KV cache: {targets['kv_cache_ar']['speedup']}x tokens/s, same output "
            f"{targets['kv_cache_ar']['same_output']}")
    if args.random_init:
        log("(random-init models: the perplexity-based check says nothing; run with trained checkpoints)")
    result = {"header": header, "random_init": args.random_init, "meaningless_quality": args.random_init,
              "config": asdict(args), "rows": [{k: v for k, v in asdict(r).items() if k != "token_ids"} for r in rows],
              "targets": targets}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        log(f"wrote {args.out}")
    return result


def main(argv=None):
    args = parse_args(argv)
    return run_or_exit(run, args)


if __name__ == "__main__":
    main()
