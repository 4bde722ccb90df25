"""Decoding a laid-out batch (`Layout`) of masked-diffusion (MDLM / BD3-LM) rows with given rule objects.

Every rule starts from MASK at every generated position and never touches the prompt; each row of the
layout is decoded as a row of its own (`decode_rows`), at steps of its own:

  decode_by_confidence   top-k confidence (LLaDA low-confidence remasking), random order (LLaDA random
                         remasking; one token per step = exact sampling), threshold (Fast-dLLM), over the
                         whole canvas or block by block with a KV cache of the finished prefix
                         (`inference.confidence_rows`, `inference.diffusion_rows`)
  decode_ancestral       MDLM ancestral sampling on a T-step time grid, skipping the model call when the
                         canvas has not changed since the last one; BD3-LM's sampler block by block, with
                         the exact KV cache of the finished blocks (`inference.ancestral_rows`)

`generate` (inference/api.py) adds its requests to the same rows with what their options ask for.
A shifted model (GPTConfig.shift) predicts column c from the state of column c - 1
(`models.diffusion.align_predictions`): the first generated token from the last prompt token, so every
request needs at least one prompt token.
"""
from __future__ import annotations

from typing import Optional

from inference.ancestral_rows import AncestralRows, ancestral_commit_probability  # noqa: F401 - re-exported
from inference.batching import DecodeResult, Layout, StepHook, decode_rows
from inference.confidence_rows import ConfidenceRows
from inference.diffusion_rows import steps_per_block
from inference.sampling import Sampler
from models.diffusion import NoiseSchedule


def check_first_token(model, layout: Layout) -> None:
    """A shifted model has no prediction for a row's first column: a row that generates needs a prompt token."""
    empty = (layout.gen_starts == layout.key_starts) & (layout.key_lengths > layout.gen_starts)  # (B,)
    if model.config.shift and bool(empty.any()):
        rows = empty.nonzero().squeeze(1).tolist()
        raise ValueError(f"this diffusion model is shifted (config.shift): it predicts each token from the position "
                         f"before it, so nothing predicts the first token of rows {rows}, which have an empty "
                         f"prompt; give every request at least one prompt token (start from EOT, as "
                         f"inference.api.encode_requests does)")


def per_row(value, batch_size: int) -> list:
    """One value for every row, or a list (or tensor) of one per row."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value] * batch_size


def decode_by_confidence(model, layout: Layout, rule, sampler: Sampler, generator, mask_id: int,
                         vocab_limit: int, block_length: Optional[int] = None, kv_cache: bool = False,
                         block_steps: Optional[int] = None, stop_id: Optional[int] = None,
                         on_step: Optional[StepHook] = None) -> DecodeResult:
    """Confidence-based decoding (rule = CommitTopK | CommitRandom | CommitThreshold) of every masked position.

    generator: one per row (each row decodes what it decodes alone with its generator, whatever the batch),
    or one the rows draw from in turn. block_length=None: the whole generation is one block. block_length=b:
    semi-autoregressive, blocks of b left to right, the rule restarting in each; block_steps=S spreads S steps
    over a row's blocks (ceil(S / its blocks) per block, replacing the rule's own budget); with stop_id, a
    finished block holding it ends its row; kv_cache keeps the finished prefix (`inference.diffusion_rows`)."""
    check_first_token(model, layout)
    B, T = layout.x.shape
    generators = per_row(generator, B)
    rows = ConfidenceRows(model, mask_id, vocab_limit, capacity=B, width=T)

    def add(b, prompt_ids):
        row_rule = rule
        if block_steps is not None:
            row_rule = rule.with_steps(steps_per_block(block_steps, rows.blocks(len(prompt_ids), layout.gen_lens[b],
                                                                                block_length)))
        return rows.add(prompt_ids, layout.gen_lens[b], row_rule, sampler, generators[b], block_length, kv_cache,
                        stop_id if block_length else None)
    return decode_rows(model, rows, layout, add, on_step)


def decode_ancestral(model, layout: Layout, num_steps, schedule: NoiseSchedule, sampler: Sampler,
                     generator, mask_id: int, vocab_limit: int, block_length: Optional[int] = None,
                     kv_cache: bool = False, on_step: Optional[StepHook] = None) -> DecodeResult:
    """MDLM ancestral sampling from t = 1 to 0 in num_steps equal steps (t_j = j / num_steps; an int, or one
    per row), over the whole canvas or, block_length=b, BD3-LM's sampler: each block by its own chain of
    num_steps steps, conditioned on the finished blocks before it (kv_cache: their exact keys/values, on a
    block-causal model). generator: one per row, or one the rows draw from in turn."""
    if kv_cache and not (block_length and model.config.attention == "block_causal"):
        raise ValueError("the ancestral sampler's KV cache is exact only block by block on a block-causal "
                         "(BD3-LM) model; decode without it (kv_cache=False)")
    check_first_token(model, layout)
    B, T = layout.x.shape
    generators, steps = per_row(generator, B), per_row(num_steps, B)
    rows = AncestralRows(model, mask_id, vocab_limit, capacity=B, width=T)
    return decode_rows(model, rows, layout, lambda b, prompt_ids: rows.add(
        prompt_ids, layout.gen_lens[b], steps[b], schedule, sampler, generators[b], block_length, kv_cache), on_step)
