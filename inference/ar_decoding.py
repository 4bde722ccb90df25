"""Autoregressive sampling with a KV cache (nanoGPT recomputes the whole context for every token).

Batched prompts of different lengths are left-padded so that they all end in the same canvas column
(`inference.batching`): every step then appends one column for all rows, each row has its own position
ids and the left padding is hidden by key_starts. A row stops at its own max_new_tokens or at EOT and
leaves the batch (the cache is read only for the rows still active), so finished rows cost nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from inference.batching import Layout, ModelRunner, RowKVCache
from inference.diffusion_decoding import DecodeResult, StepHook
from inference.sampling import Sampler, predict_tokens


def decode_autoregressive(model, layout: Layout, sampler: Sampler, generator, vocab_limit: int,
                          kv_cache: bool = True, stop_id: Optional[int] = None,
                          on_step: Optional[StepHook] = None) -> DecodeResult:
    """Sample each row's generation token by token. The first call (prefill) runs the prompts and
    gives the first token; with kv_cache every later call feeds only the newest column.
    Without it, every call feeds the whole canvas so far (the reference the cache must reproduce)."""
    if layout.anchor < 1:
        raise ValueError("autoregressive decoding needs at least one prompt token per request")
    x = layout.x.clone()
    runner = ModelRunner(model, layout, x)
    B = x.size(0)
    dev = x.device
    gen_lens = torch.tensor(layout.gen_lens, device=dev)
    produced = torch.zeros(B, dtype=torch.long, device=dev)
    steps = torch.zeros(B, dtype=torch.long)
    active = torch.arange(B, device=dev)  # rows still generating
    cache = RowKVCache(B, x.size(1)) if kv_cache else None  # columns [0, col - 1) of every active row
    col = layout.anchor  # the column the next token goes to
    while active.numel() > 0:
        if cache is None:
            h, _ = runner.hidden(active, 0, col)
        else:  # the prefill feeds the prompts, every later call the newest column
            q_lo = cache.length(active)
            h, new = runner.hidden(active, q_lo, col, cache.get(active))
            cache.write(active, new, q_lo, col - q_lo)
        tokens, _ = predict_tokens(model, h[:, -1], vocab_limit, sampler, generator)  # (R,)
        x[active, col] = tokens
        produced[active] += 1
        steps[active.cpu()] += 1
        finished = produced[active] >= gen_lens[active]
        if stop_id is not None:
            finished |= tokens == stop_id
        if on_step is not None:
            on_step(x, DecodeResult(x, runner.nfe, steps, runner.calls, layout))
        active = active[~finished]
        col += 1
    # columns a row never reached (it stopped at EOT) hold the layout's filler; mark where it stopped
    gen = layout.gen & (torch.arange(x.size(1), device=dev)[None, :] < (layout.gen_starts + produced)[:, None])
    return DecodeResult(x, runner.nfe, steps, runner.calls, Layout(**{**layout.__dict__, "gen": gen}))
