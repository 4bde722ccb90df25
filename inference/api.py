"""The Python API behind `python -m inference.sample`: prompts in, text and per-request stats out.

    from inference import generate, generate_with_stats, load_model
    loaded = load_model(ckpt="out/export")
    texts = generate(loaded.model, loaded.tokenizer, ["Once upon", "The"], max_new_tokens=64,
                     strategy="threshold", threshold=0.9, temperature=0)
    done = generate_with_stats(...)  # Completion: text, token_ids, nfe, steps, tokens_per_s, ...

Strategies (see inference/diffusion_decoding.py and inference/ar_decoding.py for the maths):
  ancestral  MDLM ancestral sampling, `steps` time steps (default: the generation length L)
  topk       commit the k most confident per step: `tokens_per_step`=k, or `steps` (default k = 1)
  random     commit k randomly chosen masked positions per step (LLaDA random remasking); k = 1 is
             exact sampling from the model, the one-token-per-step baseline
  threshold  commit every token with confidence > `threshold` (at least one per step; `steps` caps calls)
  blocks     semi-autoregressive blocks of `block_length`, inner rule `block_rule` (topk | threshold |
             random), `steps` in total over all blocks, KV cache of the finished prefix (`kv_cache`)
Block-causal (BD3-LM) models are always decoded block by block, left to right (that is the model
they are: a block is predicted from the clean blocks before it): every diffusion strategy runs inside
the model's blocks (or `block_length`, a multiple of them), `steps` spread over the blocks, and the
confidence / random rules keep the exact KV cache of the finished blocks.
  ar         autoregressive sampling, KV cache (`kv_cache`)
temperature 0 is greedy; top_k / top_p filter the sampling distribution.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from inference.ar_decoding import decode_autoregressive
from inference.batching import Request, build_layout, plan_batches
from inference.diffusion_decoding import (CommitRandom, CommitThreshold, CommitTopK, DecodeResult,
                                          decode_ancestral, decode_by_confidence, steps_per_block)
from inference.sampling import Sampler
from models.diffusion import NoiseSchedule

DIFFUSION_STRATEGIES = ("ancestral", "topk", "random", "threshold", "blocks")
STRATEGIES = DIFFUSION_STRATEGIES + ("ar",)
BLOCK_RULES = ("topk", "random", "threshold")
DEFAULT_BLOCK_LENGTH = 32  # semi-AR block for bidirectional models (LLaDA's default)


@dataclass
class Completion:
    """One request's result. token_ids are the generated ids (after EOT trimming); text decodes them."""

    prompt: str
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    strategy: str
    nfe: int  # model calls this request took part in
    steps: int  # decoding steps (ancestral: time steps, including the ones served from the cache)
    elapsed_s: float  # wall time of the batch it was decoded in
    tokens_per_s: float  # len(token_ids) / elapsed_s
    stopped_at_eot: bool
    batch_index: int = 0  # which batch decoded it (requests of one batch share elapsed_s)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepInfo:
    """What an `on_step` callback sees after every decoding step of a batch."""

    request_ids: list[int]  # indices into the prompts list
    token_ids: list[list[int]]  # each request's generated region so far (MASK = tokenizer.mask_id)
    nfe: list[int]


def model_kind(model) -> str:
    """'ar' for causal-attention models, 'diffusion' for bidirectional / block-causal ones."""
    return "ar" if model.config.attention == "causal" else "diffusion"


def check_model_and_tokenizer(model, tokenizer) -> None:
    """The model's embedding rows must be this tokenizer's vocabulary (exactly, or padded with MASK)."""
    rows = model.config.vocab_size
    if rows not in (tokenizer.vocab_size, tokenizer.padded_vocab_size):
        raise ValueError(
            f"the checkpoint's vocabulary ({rows} embedding rows) does not match the tokenizer "
            f"{tokenizer.name!r} ({tokenizer.vocab_size} ids, {tokenizer.padded_vocab_size} padded): the model "
            f"was trained with another tokenizer")
    if model_kind(model) == "diffusion" and tokenizer.mask_id >= rows:
        raise ValueError(f"diffusion model without a MASK row: mask id {tokenizer.mask_id} >= {rows} rows")


def check_strategy(model, strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    kind, attention = model_kind(model), model.config.attention
    if kind == "ar" and strategy != "ar":
        raise ValueError(f"strategy {strategy!r} is a diffusion-only rule, but this model is autoregressive "
                         f"(attention={attention}); use strategy 'ar'")
    if kind == "diffusion" and strategy == "ar":
        raise ValueError(f"strategy 'ar' needs an autoregressive model, but this one is a diffusion model "
                         f"(attention={attention}); use one of {', '.join(DIFFUSION_STRATEGIES)}")


def _check_positive(name, value):
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def generate_with_stats(model, tokenizer, prompts: Sequence[str], max_new_tokens: Union[int, Sequence[int]],
                        strategy: Optional[str] = None, *, steps: Optional[int] = None,
                        tokens_per_step: Optional[int] = None, threshold: float = 0.9,
                        block_length: Optional[int] = None, block_rule: str = "topk", kv_cache: bool = True,
                        temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                        stop_at_eot: bool = True, schedule: str = "loglinear", batch_size: int = 8,
                        seed: int = 1337, progress: bool = False,
                        on_step: Optional[Callable[[StepInfo], None]] = None) -> list[Completion]:
    """Decode every prompt; returns one Completion per prompt, in order. See the module docstring."""
    # ---- validate everything before any model call
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of strings")
    if len(prompts) == 0:
        raise ValueError("the prompt list is empty: give at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(lengths) != len(prompts):
        raise ValueError(f"{len(lengths)} max_new_tokens values for {len(prompts)} prompts")
    for n in lengths:
        _check_positive("max_new_tokens", n)
    _check_positive("steps", steps)
    _check_positive("tokens_per_step", tokens_per_step)
    _check_positive("batch_size", batch_size)
    _check_positive("block_length", block_length)
    if steps is not None and tokens_per_step is not None:
        raise ValueError("give steps or tokens_per_step, not both")
    if block_rule not in BLOCK_RULES:
        raise ValueError(f"unknown block_rule {block_rule!r}; expected one of {', '.join(BLOCK_RULES)}")
    sampler = Sampler(temperature, top_k, top_p)
    kind = model_kind(model)
    strategy = strategy or ("ar" if kind == "ar" else "ancestral")
    check_strategy(model, strategy)
    check_model_and_tokenizer(model, tokenizer)
    noise = NoiseSchedule(schedule)
    if strategy == "threshold" or (strategy == "blocks" and block_rule == "threshold"):
        CommitThreshold(threshold)  # validates tau

    cfg = model.config
    align = cfg.block_length if cfg.attention == "block_causal" else 0
    if strategy == "blocks" or (align and strategy != "ar"):  # block-causal models: always in blocks
        if block_length is None:
            block_length = cfg.block_length if align else DEFAULT_BLOCK_LENGTH
        if align and block_length % align:
            raise ValueError(f"this block-causal model was trained with blocks of {align}; decoding blocks "
                             f"must be a multiple of it (got block_length={block_length})")

    requests = []
    for i, (text, n) in enumerate(zip(prompts, lengths)):
        ids = tokenizer.encode(text)
        if kind == "ar" and not ids:
            ids = [tokenizer.eot_id]  # an AR model needs a first token: start from EOT like GPT-2 does
        if len(ids) >= cfg.block_size:
            raise ValueError(f"prompt {i} is {len(ids)} tokens long, longer than the model's context "
                             f"(block_size={cfg.block_size}); shorten it")
        if len(ids) + n > cfg.block_size:
            raise ValueError(f"prompt {i} ({len(ids)} tokens) + {n} new tokens = {len(ids) + n} exceeds the "
                             f"model's context (block_size={cfg.block_size}); lower max_new_tokens to "
                             f"{cfg.block_size - len(ids)} or shorten the prompt")
        requests.append(Request(ids, n))

    # ---- decode batch by batch
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    fill_id = tokenizer.mask_id if kind == "diffusion" else tokenizer.eot_id
    vocab_limit = tokenizer.vocab_size  # SUBS: never MASK, never padding ids
    stop_id = tokenizer.eot_id if stop_at_eot else None
    default_steps = max(lengths)  # ancestral: T = L; independent of batching
    batches = plan_batches(requests, batch_size, cfg.block_size, 0 if kind == "ar" else align)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(lengths), unit="tok", desc=strategy, dynamic_ncols=True)

    out: list[Optional[Completion]] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch_index, batch in enumerate(batches):
                layout = build_layout([requests[i] for i in batch], fill_id, tokenizer.eot_id,
                                      0 if kind == "ar" else align, device)
                hook = _make_hook(batch, layout, strategy, tokenizer.mask_id, bar, on_step)
                t0 = time.perf_counter()
                if strategy == "ar":
                    res = decode_autoregressive(model, layout, sampler, generator, vocab_limit, kv_cache,
                                                stop_id, hook)
                elif strategy == "ancestral" and align:  # BD3-LM: one ancestral chain per block
                    res = decode_ancestral(model, layout, steps_per_block(layout, steps or default_steps,
                                                                          block_length),
                                           noise, sampler, generator, tokenizer.mask_id, vocab_limit,
                                           block_length=block_length, on_step=hook)
                elif strategy == "ancestral":
                    res = decode_ancestral(model, layout, steps or default_steps, noise, sampler, generator,
                                           tokenizer.mask_id, vocab_limit, on_step=hook)
                elif strategy in ("topk", "random", "threshold") and not align:
                    rule = commit_rule(strategy, steps, tokens_per_step, threshold, generator)
                    res = decode_by_confidence(model, layout, rule, sampler, generator, tokenizer.mask_id,
                                               vocab_limit, on_step=hook)
                else:  # blocks, or any confidence / random rule on a block-causal model
                    rule = commit_rule(block_rule if strategy == "blocks" else strategy, None,
                                       tokens_per_step, threshold, generator)
                    res = decode_by_confidence(model, layout, rule, sampler, generator, tokenizer.mask_id,
                                               vocab_limit, block_length=block_length, kv_cache=kv_cache,
                                               block_steps=steps, stop_id=stop_id, on_step=hook)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - t0
                for row, i in enumerate(batch):
                    out[i] = _completion(prompts[i], requests[i], res, row, elapsed, strategy, tokenizer,
                                         stop_id, batch_index)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out


def commit_rule(name: str, steps, tokens_per_step, threshold, generator):
    """The commit rule of a confidence / random strategy with its step budget."""
    if name == "threshold":
        return CommitThreshold(threshold, steps)
    budget = dict(steps=steps) if steps else dict(tokens_per_step=tokens_per_step or 1)
    return CommitRandom(generator, **budget) if name == "random" else CommitTopK(**budget)


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: Union[int, Sequence[int]],
             strategy: Optional[str] = None, **knobs) -> list[str]:
    """Generated continuation of each prompt (text only; see generate_with_stats for the knobs)."""
    return [c.text for c in generate_with_stats(model, tokenizer, prompts, max_new_tokens, strategy, **knobs)]


def generated_ids(res: DecodeResult, row: int) -> list[int]:
    """The ids of a row's generated region, left to right."""
    return res.x[row][res.layout.gen[row]].tolist()


def _completion(prompt, request, res: DecodeResult, row, elapsed, strategy, tokenizer, stop_id,
                batch_index) -> Completion:
    ids = generated_ids(res, row)
    stopped = stop_id is not None and stop_id in ids
    if stopped:
        ids = ids[:ids.index(stop_id)]
    return Completion(prompt=prompt, text=tokenizer.decode(ids), token_ids=ids, prompt_ids=request.prompt_ids,
                      strategy=strategy, nfe=int(res.nfe[row]), steps=int(res.steps[row]),
                      elapsed_s=elapsed, tokens_per_s=len(ids) / max(elapsed, 1e-9), stopped_at_eot=stopped,
                      batch_index=batch_index)


def _make_hook(batch, layout, strategy, mask_id, bar, on_step):
    """Per-step callback of one batch: advances the progress bar and calls the user's on_step."""
    if bar is None and on_step is None:
        return None
    state = {"done": 0}
    ar = strategy == "ar"

    def hook(x, res: DecodeResult):
        if bar is not None:
            done = int(res.steps.sum()) if ar else int(((x != mask_id) & layout.gen).sum())
            bar.update(done - state["done"])
            bar.set_postfix(nfe=res.calls, refresh=False)
            state["done"] = done
        if on_step is not None:
            rows = []
            for r in range(len(batch)):
                start = int(layout.gen_starts[r])
                if ar:
                    rows.append(x[r, start:start + int(res.steps[r])].tolist())
                else:
                    rows.append(x[r][layout.gen[r]].tolist())
            on_step(StepInfo(list(batch), rows, res.nfe.tolist()))
    return hook
