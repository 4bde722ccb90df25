"""Sample from a trained model (AR or masked diffusion) or from OpenAI GPT-2: nanoGPT's sample.py, batched.

    python -m inference.sample --ckpt out/mdlm/export --start "ROMEO:" --max_new_tokens 128
    python -m inference.sample --ckpt out/mdlm --strategy threshold --threshold 0.9 --temperature 0
    python -m inference.sample --ckpt out/mdlm --strategy blocks --block_length 32 --steps 64 --show_steps
    python -m inference.sample --init_from gpt2 --start=FILE:prompt.txt --num_samples 3 --top_p 0.9
    python -m inference.sample --ckpt out/ar --prompts_file prompts.txt --batch_size 16 --out samples.jsonl

Strategies (default: ancestral for diffusion models, ar for AR models):
  ancestral  MDLM ancestral sampling over --steps time steps (skips the model when nothing changed)
  topk       commit the --tokens_per_step most confident tokens per step (or spread over --steps)
  random     commit --tokens_per_step random masked positions per step (or spread over --steps);
             --tokens_per_step 1 is exact sampling, the one-token-per-step baseline
  threshold  commit every token whose confidence > --threshold (at least one per step)
  blocks     semi-autoregressive blocks of --block_length with a KV cache of the finished prefix
             (--block_rule topk|random|threshold inside a block, --steps in total, --no_kv_cache to disable)
Block-causal (BD3-LM) models decode block by block whatever the strategy (the rule runs inside the
model's blocks, with the exact KV cache of the finished blocks).
  ar         autoregressive sampling with a KV cache (--no_kv_cache to disable)
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.config import knob, parse_cli, run_or_exit
from common.precision import autocast
from inference.api import BLOCK_RULES, STRATEGIES, DecodeOptions, StepInfo, generate_with_stats
from inference.loading import load_model

NANOGPT_MAX_NEW_TOKENS = 500
SEPARATOR = "---------------"
DEFAULTS = DecodeOptions()  # the decoding flags' defaults (one place: the server uses the same)


def read_text_file(path, what: str = "file") -> str:
    """UTF-8 text of a file (a BOM is allowed), with an error that says where the bad byte is."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {p} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                         f"cannot be decoded; re-save it as UTF-8") from None


def read_prompts_file(path) -> list[str]:
    """One prompt per line (UTF-8); blank lines are skipped."""
    prompts = [line for line in read_text_file(path, "prompts file").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (one prompt per line)")
    return prompts


@dataclass
class SampleConfig:
    """The sampling CLI (common/config.py: --key=value, --key value, --flag / --no_flag, --config FILE).
    The decoding knobs take their defaults from DecodeOptions (DEFAULTS): one place, shared with the server."""
    # the model
    ckpt: str = knob("", "consolidated model dir (model.safetensors + config.json), a training out dir (uses its "
                          "export/), or a DeepSpeed checkpoint dir (consolidated first)")
    init_from: str = knob("", "OpenAI GPT-2: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local Hugging Face GPT-2 "
                               "dir (tokenizer gpt2); needs the weights cached offline")
    device: str = knob("auto", "auto (cuda if present) | cpu | cuda | cuda:1 ...")
    dtype: str = knob("auto", "autocast dtype on GPU (auto: bfloat16 where supported); CPU always runs float32",
                       choices=("auto", "float32", "bfloat16", "float16"))
    attn_impl: str = knob("auto", "attention kernel: auto = Triton on GPU, PyTorch elsewhere",
                           choices=("auto", "triton", "torch"))
    # the prompts
    start: str = knob("\n", "prompt text, or FILE:path to read it from a UTF-8 file")
    prompts_file: str = knob("", "one prompt per line (UTF-8), decoded in batches; overrides --start")
    num_samples: Optional[int] = knob(None, "samples per prompt (none: 10 for --start as in nanoGPT, 1 with "
                                             "--prompts_file)")
    max_new_tokens: Optional[int] = knob(None, f"tokens to generate per sample (none: {NANOGPT_MAX_NEW_TOKENS}, "
                                                f"capped to the context)")
    batch_size: int = knob(DEFAULTS.batch_size, "requests decoded together")
    # decoding (inference/api.py DecodeOptions)
    strategy: Optional[str] = knob(DEFAULTS.strategy, "decoding rule (none: ancestral for diffusion models, ar "
                                                       "for AR models)", choices=STRATEGIES)
    steps: Optional[int] = knob(DEFAULTS.steps, "ancestral: time steps (none: L = max_new_tokens, or the steps a "
                                                 "distilled model was distilled for); topk: steps to "
                                                 "spread the L tokens over; threshold: cap on calls; blocks: steps "
                                                 "over all blocks (none: one token per step)")
    tokens_per_step: Optional[int] = knob(DEFAULTS.tokens_per_step, "topk / random / blocks(topk): commit this "
                                                                     "many tokens per step (none: 1 unless --steps)")
    threshold: float = knob(DEFAULTS.threshold, "threshold rule: confidence tau")
    block_length: Optional[int] = knob(DEFAULTS.block_length, "blocks: block length (none: the model's block for "
                                                               "block-causal models, else 32)")
    block_rule: str = knob(DEFAULTS.block_rule, "blocks: rule inside a block", choices=BLOCK_RULES)
    kv_cache: bool = knob(DEFAULTS.kv_cache, "blocks / ar: reuse the finished prefix's keys and values "
                                              "(off: recompute the prefix every call)")
    temperature: float = knob(DEFAULTS.temperature, "0 = greedy (as nanoGPT)")
    top_k: int = knob(DEFAULTS.top_k, "sample among the k most likely tokens (0 = all)")
    top_p: Optional[float] = knob(DEFAULTS.top_p, "nucleus sampling: keep the smallest set with mass >= p")
    stop_at_eot: bool = knob(DEFAULTS.stop_at_eot, "cut each text at its first EOT")
    seed: int = knob(DEFAULTS.seed, "random seed (request i draws from seed + i; block by block decoding: one stream)")
    # the output
    out: str = knob("", "also write one JSON line per sample (text, token ids, NFE, tokens/s) here")
    show_steps: bool = knob(False, "print the text after every decoding step (MASK shown as a placeholder)")
    progress: bool = knob(True, "tqdm progress bar")

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions(
            strategy=self.strategy, steps=self.steps, tokens_per_step=self.tokens_per_step, threshold=self.threshold,
            block_length=self.block_length, block_rule=self.block_rule, kv_cache=self.kv_cache,
            temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p, stop_at_eot=self.stop_at_eot,
            batch_size=self.batch_size, seed=self.seed)


def parse_args(argv=None) -> SampleConfig:
    return parse_cli(SampleConfig, argv, prog="python -m inference.sample", description=__doc__)


def print_step(tokenizer, info: StepInfo) -> None:
    print(f"--- step (nfe {max(info.nfe)})")
    for req, ids in zip(info.request_ids, info.token_ids):
        print(f"[{req}] {tokenizer.decode(ids)!r}")


def run(args: SampleConfig) -> list:
    if bool(args.ckpt) == bool(args.init_from):
        raise ValueError("give --ckpt DIR (our model) or --init_from gpt2|... (OpenAI GPT-2)")
    if args.prompts_file:
        prompts = read_prompts_file(args.prompts_file)
    elif args.start.startswith("FILE:"):
        prompts = [read_text_file(args.start[5:], "--start file")]
    else:
        prompts = [args.start]
    num_samples = args.num_samples if args.num_samples is not None else (1 if args.prompts_file else 10)
    if num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
    options = args.decode_options()
    loaded = load_model(args.ckpt or None, args.init_from or None, args.device, args.attn_impl,
                        log=lambda m: print(m, file=sys.stderr))
    model, tokenizer = loaded.model, loaded.tokenizer
    max_new = args.max_new_tokens
    if max_new is None:
        lengths = [len(tokenizer.encode(p)) for p in prompts]
        longest = max(lengths)
        if longest >= model.config.block_size:  # nothing would be left to generate: name the prompt, not a count
            i = lengths.index(longest)
            where = (f"prompt {i + 1} of {args.prompts_file}" if args.prompts_file
                     else f"the --start prompt ({args.start[5:]})" if args.start.startswith("FILE:") else "the --start prompt")
            raise ValueError(f"{where} is {longest} tokens long, but the model's context is "
                             f"{model.config.block_size} tokens (block_size) and must hold the prompt plus at least "
                             f"one new token: shorten it to at most {model.config.block_size - 1} tokens")
        max_new = min(NANOGPT_MAX_NEW_TOKENS, model.config.block_size - max(longest, 1))
        if max_new < NANOGPT_MAX_NEW_TOKENS:
            print(f"note: max_new_tokens = {max_new} (the context is {model.config.block_size} tokens)",
                  file=sys.stderr)
    requests = [p for p in prompts for _ in range(num_samples)]
    device = str(next(model.parameters()).device)
    with autocast(device, args.dtype):
        done = generate_with_stats(
            model, tokenizer, requests, max_new, options=replace(options, schedule=loaded.schedule),
            progress=args.progress and not args.show_steps,
            on_step=(lambda info: print_step(tokenizer, info)) if args.show_steps else None)
    for c in done:
        print(c.prompt + c.text)
        print(SEPARATOR)
    n_tok = sum(len(c.token_ids) for c in done)
    wall_s = sum({c.batch_index: c.elapsed_s for c in done}.values())  # a batch's requests share its time
    print(f"{len(done)} samples, {n_tok} tokens in {wall_s:.2f} s ({n_tok / max(wall_s, 1e-9):.1f} tokens/s), "
          f"strategy {done[0].strategy}, model calls per request {sum(c.nfe for c in done) / len(done):.1f}",
          file=sys.stderr)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for c in done:
                f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return done


def main(argv=None):
    args = parse_args(argv)
    return run_or_exit(run, args)


if __name__ == "__main__":
    main()
