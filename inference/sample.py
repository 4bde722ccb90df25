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

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--ckpt", help="consolidated model dir (model.safetensors + config.json), a training out dir "
                                    "(uses its export/), or a DeepSpeed checkpoint dir (consolidated first)")
    src.add_argument("--init_from", help="OpenAI GPT-2: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local "
                                         "Hugging Face GPT-2 dir (tokenizer gpt2); needs the weights cached offline")
    src.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda | cuda:1 ...")
    src.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="autocast dtype on GPU (auto: bfloat16 where supported); CPU always runs float32")
    src.add_argument("--attn_impl", default="auto", choices=["auto", "triton", "torch"],
                     help="attention kernel: auto = Triton on GPU, PyTorch elsewhere")
    pr = p.add_argument_group("prompts")
    pr.add_argument("--start", default="\n", help='prompt text, or FILE:path to read it from a UTF-8 file (default "\\n")')
    pr.add_argument("--prompts_file", help="one prompt per line (UTF-8), decoded in batches; overrides --start")
    pr.add_argument("--num_samples", type=int, default=None,
                    help="samples per prompt (default 10 for --start as in nanoGPT, 1 with --prompts_file)")
    pr.add_argument("--max_new_tokens", type=int, default=None,
                    help=f"tokens to generate per sample (default {NANOGPT_MAX_NEW_TOKENS}, capped to the context)")
    pr.add_argument("--batch_size", type=int, default=DEFAULTS.batch_size, help="requests decoded together")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--strategy", choices=STRATEGIES, default=None,
                     help="decoding rule (default: ancestral for diffusion models, ar for AR models)")
    dec.add_argument("--steps", type=int, default=None,
                     help="ancestral: time steps (default L = max_new_tokens); topk: steps to spread the L tokens "
                          "over; threshold: cap on calls; blocks: steps over all blocks (default one token/step)")
    dec.add_argument("--tokens_per_step", type=int, default=None,
                     help="topk / blocks(topk): commit this many tokens per step (default 1 unless --steps)")
    dec.add_argument("--threshold", type=float, default=DEFAULTS.threshold,
                     help=f"threshold rule: confidence tau (default {DEFAULTS.threshold})")
    dec.add_argument("--block_length", type=int, default=None,
                     help="blocks: block length (default: the model's block for block-causal models, else 32)")
    dec.add_argument("--block_rule", choices=BLOCK_RULES, default=DEFAULTS.block_rule,
                     help="blocks: rule inside a block")
    dec.add_argument("--no_kv_cache", action="store_true", help="blocks / ar: recompute the prefix every call")
    dec.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                     help=f"0 = greedy (default {DEFAULTS.temperature}, as nanoGPT)")
    dec.add_argument("--top_k", type=int, default=DEFAULTS.top_k,
                     help=f"sample among the k most likely tokens (0 = all; default {DEFAULTS.top_k})")
    dec.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep the smallest set with mass >= p")
    dec.add_argument("--no_stop_at_eot", action="store_true", help="do not cut the text at the first EOT")
    dec.add_argument("--seed", type=int, default=DEFAULTS.seed)
    out = p.add_argument_group("output")
    out.add_argument("--out", help="also write one JSON line per sample (text, token ids, NFE, tokens/s) here")
    out.add_argument("--show_steps", action="store_true",
                     help="print the text after every decoding step (MASK shown as a placeholder)")
    out.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    return p


def print_step(tokenizer, info: StepInfo) -> None:
    print(f"--- step (nfe {max(info.nfe)})")
    for req, ids in zip(info.request_ids, info.token_ids):
        print(f"[{req}] {tokenizer.decode(ids)!r}")


def autocast_context(device: str, dtype: str):
    if not device.startswith("cuda") or dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def run(args) -> list:
    if (args.ckpt is None) == (args.init_from is None):
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
    options = DecodeOptions(
        strategy=args.strategy, steps=args.steps, tokens_per_step=args.tokens_per_step, threshold=args.threshold,
        block_length=args.block_length, block_rule=args.block_rule, kv_cache=not args.no_kv_cache,
        temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
        stop_at_eot=not args.no_stop_at_eot, batch_size=args.batch_size, seed=args.seed)
    loaded = load_model(args.ckpt, args.init_from, args.device, args.attn_impl,
                        log=lambda m: print(m, file=sys.stderr))
    model, tokenizer = loaded.model, loaded.tokenizer
    max_new = args.max_new_tokens
    if max_new is None:
        longest = max(len(tokenizer.encode(p)) for p in prompts)
        max_new = min(NANOGPT_MAX_NEW_TOKENS, model.config.block_size - max(longest, 1))
        if max_new < NANOGPT_MAX_NEW_TOKENS:
            print(f"note: max_new_tokens = {max_new} (the context is {model.config.block_size} tokens)",
                  file=sys.stderr)
    requests = [p for p in prompts for _ in range(num_samples)]
    device = str(next(model.parameters()).device)
    with autocast_context(device, args.dtype):
        done = generate_with_stats(
            model, tokenizer, requests, max_new, options=replace(options, schedule=loaded.schedule),
            progress=not (args.no_progress or args.show_steps),
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
