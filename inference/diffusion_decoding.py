"""Parallel decoding rules for masked-diffusion (MDLM / block-diffusion) models.

All rules start from MASK at every generated position of a `Layout` canvas and never touch the
prompt. One model call (one NFE) gives the final hidden states of the canvas; a rule then commits
some still-masked positions to tokens drawn by `inference.sampling.predict_tokens`.

  decode_by_confidence   top-k confidence (LLaDA low-confidence remasking), random order (LLaDA random
                         remasking; one token per step = exact sampling), threshold (Fast-dLLM),
                         optionally semi-autoregressive: block by block, left to right, with a KV cache
                         of the finished prefix (exact for block-causal models, refreshed once per
                         block for bidirectional ones)
  decode_ancestral       MDLM ancestral sampling on a T-step time grid, skipping the model call when
                         the canvas has not changed since the last one (`inference.ancestral_rows`:
                         rows at steps of their own, as a server runs them); BD3-LM's sampler block
                         by block, with the exact KV cache of the finished blocks

Only the rows that still have masked positions are run, so a request that finished early (shorter
generation, easy block) costs nothing more; `ModelRunner.nfe` counts the calls of every row.

A shifted model (GPTConfig.shift) predicts column c from the state of column c - 1
(`models.diffusion.align_predictions`): the first generated token from the last prompt token, so every
request needs at least one prompt token, and a call must feed the column before its candidates.
"""
from __future__ import annotations

from typing import Optional

import torch

from inference.ancestral_rows import AncestralRows, ancestral_commit_probability
from inference.batching import DecodeResult, Layout, ModelRunner, RowKVCache, StepHook, decode_rows
from inference.confidence_rows import ConfidenceRows
from inference.sampling import Sampler, predict_tokens
from models.diffusion import NoiseSchedule, align_predictions

def steps_per_block(layout: Layout, total_steps: int, block_length: int) -> torch.Tensor:
    """(B,) steps for each block of a row: `total_steps` spread over the blocks its generation spans
    (rounded up, so a row never gets fewer steps than asked for)."""
    n_blocks = torch.div(layout.key_lengths - layout.anchor + block_length - 1, block_length,
                         rounding_mode="floor").clamp(min=1)
    return torch.div(total_steps + n_blocks - 1, n_blocks, rounding_mode="floor")


def check_first_token(model, layout: Layout) -> None:
    """A shifted model has no prediction for a row's first column: a row that generates needs a prompt token."""
    empty = (layout.gen_starts == layout.key_starts) & (layout.key_lengths > layout.gen_starts)  # (B,)
    if model.config.shift and bool(empty.any()):
        rows = empty.nonzero().squeeze(1).tolist()
        raise ValueError(f"this diffusion model is shifted (config.shift): it predicts each token from the position "
                         f"before it, so nothing predicts the first token of rows {rows}, which have an empty "
                         f"prompt; give every request at least one prompt token (start from EOT, as "
                         f"inference.api.encode_requests does)")


def decode_by_confidence(model, layout: Layout, rule, sampler: Sampler, generator, mask_id: int,
                         vocab_limit: int, block_length: Optional[int] = None, kv_cache: bool = False,
                         block_steps: Optional[int] = None, stop_id: Optional[int] = None,
                         on_step: Optional[StepHook] = None) -> DecodeResult:
    """Confidence-based decoding (rule = CommitTopK | CommitThreshold) of every masked position.

    block_length=None: the whole generation is one region, every call sees the whole canvas: the rows are
                       decoded as `inference.confidence_rows.ConfidenceRows`, each at its own step;
                       `generator` may be a list of one generator per row, and then each row decodes
                       exactly what it decodes alone with its generator (whatever the batch).
    block_length=b:    semi-autoregressive: regions are canvas blocks [anchor + i b, anchor + (i+1) b),
                       decoded left to right; the rule restarts in each block. block_steps=S spreads S
                       steps over a row's blocks: ceil(S / its number of blocks) per block (replacing the
                       rule's own budget). With stop_id, a row whose finished block holds stop_id (EOT)
                       stops there: the rest of its generation is filled with stop_id.
    kv_cache (blocks only):
      block-causal model: exact. Finished blocks are fed once (together with the first step of the next
                          block) and their keys/values are kept; later calls feed only the current block.
      bidirectional:      approximate (Fast-dLLM prefix cache): the block's first call runs the whole
                          canvas and keeps the prefix's keys/values; the block's later calls feed only
                          the block and the masked suffix, reusing that prefix.
      A shifted model reads the state of the column before the block, so the cache ends one column
      earlier and every call feeds from there (the block-causal cache stays exact: that column lies in
      a finished block, whose keys and values do not change).
    Without the cache a block-causal model is fed the canvas up to the current block's end (later
    blocks cannot influence it), a bidirectional one the whole canvas.
    """
    check_first_token(model, layout)
    if block_length is None:
        if kv_cache:
            raise ValueError("kv_cache needs semi-autoregressive blocks (block_length)")
        B = layout.batch_size
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * B
        rows = ConfidenceRows(model, mask_id, vocab_limit, capacity=B, width=layout.x.size(1))
        return decode_rows(model, rows, layout, lambda b, prompt_ids: rows.add(
            prompt_ids, layout.gen_lens[b], rule, sampler, generators[b]), on_step)
    x = layout.x.clone()
    runner = ModelRunner(model, layout, x)
    B, T = x.shape
    dev = x.device
    cols = torch.arange(T, device=dev)
    masked = (x == mask_id) & layout.gen  # (B, T)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    steps = torch.zeros(B, dtype=torch.long)
    block_causal = runner.kind == "block_causal"
    shift = int(model.config.shift)  # 1: column c is predicted from the state of column c - 1
    regions = [(lo, min(lo + block_length, T)) for lo in range(layout.anchor, T, block_length)]
    if block_steps is not None:
        rule = rule.with_steps(steps_per_block(layout, block_steps, block_length))
    cache = RowKVCache(B, T) if kv_cache else None

    for lo, hi in regions:
        # first column whose state the region's candidates read (a shifted region that starts at column
        # 0 holds its rows' prompts, so its candidates all lie after column 0)
        start = max(lo - shift, 0)
        todo = masked & ((cols >= lo) & (cols < hi))[None, :] & ~done[:, None]  # (B, T)
        rule.begin(todo.sum(1))
        region_step = torch.zeros(B, dtype=torch.long, device=dev)
        first_call = True
        while bool(todo.any()):
            rows = todo.any(1).nonzero().squeeze(1)  # (R,)
            if cache is None:
                q_lo = 0
                h, _ = runner.hidden(rows, 0, hi if block_causal else T)
            elif block_causal:
                q_lo = cache.length(rows)  # first call of a block: the previous block's `start`; then this one's
                h, presents = runner.hidden(rows, q_lo, hi, cache.get(rows))
                if q_lo < start:  # the finished blocks just fed are final: keep their keys/values
                    cache.write(rows, presents, q_lo, start - q_lo)
            elif first_call:  # bidirectional: refresh the prefix cache once per block
                q_lo = 0
                h, presents = runner.hidden(rows, 0, T)
                cache.write(rows, presents, 0, start)
            else:
                q_lo = start
                h, _ = runner.hidden(rows, start, T, cache.get(rows))
            first_call = False
            h = align_predictions(h, shift)  # (R, fed, C): row j predicts column q_lo + j

            cand = todo[rows]  # (R, T), all inside [lo, hi) and so inside the fed columns (shifted: after q_lo)
            tokens, conf = predict_tokens(model, h[cand[:, q_lo:q_lo + h.size(1)]], vocab_limit,
                                          sampler, generator)
            conf_full = torch.full(cand.shape, float("-inf"), dtype=conf.dtype, device=dev)
            conf_full[cand] = conf
            commit = rule.choose(conf_full, rows, region_step[rows])  # (R, T)
            proposal = torch.zeros_like(x[rows])
            proposal[cand] = tokens
            x[rows] = torch.where(commit, proposal, x[rows])
            todo[rows] = cand & ~commit
            masked[rows] = masked[rows] & ~commit
            region_step[rows] += 1
            steps[rows.cpu()] += 1
            if on_step is not None:
                on_step(x, DecodeResult(x, runner.nfe, steps, runner.calls, layout))

        done |= layout.key_lengths <= hi  # generation over
        if stop_id is not None:  # a finished block that holds EOT ends its row
            hit = ((x == stop_id) & layout.gen & (cols < hi)[None, :]).any(1) & ~done
            x[hit[:, None] & masked] = stop_id
            masked &= ~hit[:, None]
            done |= hit
    return DecodeResult(x, runner.nfe, steps, runner.calls, layout)


def decode_ancestral(model, layout: Layout, num_steps, schedule: NoiseSchedule, sampler: Sampler,
                     generator, mask_id: int, vocab_limit: int, block_length: Optional[int] = None,
                     kv_cache: bool = False, on_step: Optional[StepHook] = None) -> DecodeResult:
    """MDLM ancestral sampling from t = 1 to 0 in num_steps equal steps (t_j = j / num_steps).

    From t to s each still-masked token is committed with probability (alpha_s - alpha_t)/(1 - alpha_t)
    to a token drawn from p(x0 | x_t) (SUBS). The commit decision does not depend on the model, so it
    is drawn first, and the model runs only for rows that commit something AND whose canvas changed
    since their last call (our GPT has no time input: an unchanged canvas gives the same prediction).
    Hence at most min(num_steps, L) calls per row; with num_steps > L most steps are free.

    block_length=None (the whole canvas): the rows are decoded as `inference.ancestral_rows.AncestralRows`,
    each on its own time grid; `generator` may be a list of one generator per row, and then each row
    decodes exactly what it decodes alone with its generator (whatever the batch).

    block_length=b: BD3-LM's sampler: the blocks [anchor + i b, anchor + (i+1) b) are sampled left to
    right, each by its own ancestral chain of num_steps steps (an int, or a (B,) tensor: one per row),
    conditioned on the finished blocks before it. A block-causal model is then fed the canvas only up
    to the current block's end (later blocks cannot influence it). kv_cache (block-causal models, with
    block_length): exact, as in `decode_by_confidence`: a row's first call in a block feeds the block
    finished before it together with this one and keeps its keys/values, its later calls feed only this
    block. Rows commit at steps of their own, so in a block some rows may already hold the previous block
    while others do not yet: the rows of a step are called in (at most two) groups of equal cache length.
    """
    if kv_cache and not (block_length and model.config.attention == "block_causal"):
        raise ValueError("the ancestral sampler's KV cache is exact only block by block on a block-causal "
                         "(BD3-LM) model; decode without it (kv_cache=False)")
    check_first_token(model, layout)
    if block_length is None:
        return _decode_ancestral_rows(model, layout, num_steps, schedule, sampler, generator, mask_id, vocab_limit,
                                      on_step)
    x = layout.x.clone()
    runner = ModelRunner(model, layout, x)
    B, T = x.shape
    dev = x.device
    cols = torch.arange(T, device=dev)
    masked = (x == mask_id) & layout.gen
    fresh = torch.zeros(B, dtype=torch.bool, device=dev)  # h_cache[row] matches the row's canvas
    h_cache = None  # (B, T, C) the state predicting each column (align_predictions), from each row's last call
    steps = torch.zeros(B, dtype=torch.long)
    block_causal = runner.kind == "block_causal"
    shift = int(model.config.shift)
    cache = RowKVCache(B, T) if kv_cache else None
    regions = [(lo, min(lo + block_length, T)) for lo in range(layout.anchor, T, block_length)]
    row_steps = (num_steps if isinstance(num_steps, torch.Tensor)
                 else torch.full((B,), int(num_steps), dtype=torch.long)).cpu()
    for lo, hi in regions:
        fed = hi if block_causal else T  # columns a model call needs
        start = max(lo - shift, 0)  # the first column whose state predicts a candidate of this block
        region = masked & ((cols >= lo) & (cols < hi))[None, :]  # (B, T)
        for S in sorted(set(row_steps.tolist())):  # rows with the same step budget share one time grid
            group = (row_steps == S).to(dev)
            for j in range(S, 0, -1):
                todo = region & group[:, None]
                if not bool(todo.any()):
                    break
                steps[todo.any(1).cpu()] += 1
                p = ancestral_commit_probability(schedule, j / S, (j - 1) / S)
                u = torch.rand(todo.shape, generator=generator, device=dev)  # (B, T)
                commit = todo & (u < p)
                committing = commit.any(1)  # (B,)
                stale = committing & ~fresh
                if bool(stale.any()):
                    rows = stale.nonzero().squeeze(1)
                    held = (torch.zeros_like(rows) if cache is None else
                            torch.tensor([cache.lengths[r] for r in rows.tolist()], device=dev))  # (R,)
                    for q_lo in sorted(set(held.tolist())):  # one call per cache length (one without a cache)
                        part = rows[held == q_lo]
                        h, presents = runner.hidden(part, q_lo, fed, None if cache is None else cache.get(part))
                        if cache is not None and q_lo < start:  # finished blocks, fed once: keep them
                            cache.write(part, presents, q_lo, start - q_lo)
                        if h_cache is None:
                            h_cache = h.new_zeros(B, T, h.size(-1))
                        h_cache[part, q_lo:fed] = align_predictions(h, shift)  # row j predicts column q_lo + j
                    fresh[rows] = True
                if bool(committing.any()):
                    tokens, _ = predict_tokens(model, h_cache[commit], vocab_limit, sampler, generator)
                    x[commit] = tokens
                    masked &= ~commit
                    region &= ~commit
                    fresh &= ~committing
                    if on_step is not None:
                        on_step(x, DecodeResult(x, runner.nfe, steps, runner.calls, layout))
    return DecodeResult(x, runner.nfe, steps, runner.calls, layout)


def _decode_ancestral_rows(model, layout: Layout, num_steps, schedule: NoiseSchedule, sampler: Sampler, generator,
                           mask_id: int, vocab_limit: int, on_step: Optional[StepHook]) -> DecodeResult:
    """Ancestral sampling over the whole canvas: every row of the layout as a row of `AncestralRows` (its own
    real columns, its own time grid, its own generator when `generator` is a list of one per row)."""
    B, T = layout.x.shape
    generators = generator if isinstance(generator, (list, tuple)) else [generator] * B
    row_steps = num_steps.tolist() if isinstance(num_steps, torch.Tensor) else [int(num_steps)] * B
    rows = AncestralRows(model, mask_id, vocab_limit, capacity=B, width=T)
    return decode_rows(model, rows, layout, lambda b, prompt_ids: rows.add(
        prompt_ids, layout.gen_lens[b], row_steps[b], schedule, sampler, generators[b]), on_step)
