"""Masked diffusion rows, decoded block by block: the base of `AncestralRows` and `ConfidenceRows`.

Each row is a canvas of its own: its prompt, then gen_len MASKs, from column 0. A row is decoded in blocks,
left to right, its rule (ancestral sampling, or a confidence rule) restarting in each block:
  one block     block_length=None: the whole generation (MDLM, and the confidence rules over the canvas)
  blocks of b   semi-autoregressive decoding (the `blocks` strategy), and every rule of a block-causal
                (BD3-LM) model: a block is predicted from the clean blocks before it. The first block starts
                at the row's first generated column, or, on a block-causal model, at the start of the model
                block holding it (b is a multiple of the model's block: decoding blocks are model blocks).
With stop_id (EOT), a finished block that holds it ends its row: the rest is filled with stop_id.

KV cache (kv_cache, with blocks): a row keeps the keys/values of its finished blocks (`RowSlots`' cache).
  block-causal model: exact. A row's first call in a block feeds the block finished before it together
                      with this one and keeps its keys/values; its later calls feed only this block.
  bidirectional:      approximate (Fast-dLLM prefix cache): a row's first call in a block feeds its whole
                      canvas and keeps the prefix's keys/values; its later calls feed the block and the
                      masked suffix, reusing that prefix.
A shifted model (GPTConfig.shift) predicts column c from the state of column c - 1: the cache ends one column
before the block and every call feeds from there (the block-causal cache stays exact: that column lies in a
finished block). Without the cache a block-causal model is fed the canvas up to the block's end (later
blocks cannot influence it), a bidirectional one its whole canvas.

A step's calls (`_model_calls`): the rows fed from column 0 (one call, or split by width) and the rows with a
cached past (one call per alignment, their pasts right-aligned: `RowSlots._past_call`). `_take_states` keeps
what the calls return: the state predicting each fed column (`h`) and the finished blocks' keys/values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from inference.batching import RowsCall, RowSlots
from inference.sampling import Sampler
from models.diffusion import align_predictions

Split = Optional[Callable[[list[int]], list[list[int]]]]


@dataclass(kw_only=True)
class DiffusionRow:
    """What every diffusion row holds; a rule's row (`AncestralRows`, `ConfidenceRows`) adds its own state."""

    generator: Optional[torch.Generator]
    sampler: Sampler
    length: int  # canvas columns: prompt + generation
    gen_start: int  # first generated column
    gen_len: int
    block_length: int = 0  # columns per block; 0: the whole generation is one block
    kv_cache: bool = False  # keep the finished blocks' keys/values (see the module docstring)
    stop_id: Optional[int] = None  # a finished block holding it ends the row
    lo: int = 0  # the current block: columns [lo, hi)
    hi: int = 0
    cached: int = 0  # columns [0, cached) whose keys/values the row holds
    refresh: bool = False  # the block's first call is still to come (the bidirectional prefix is refreshed then)
    block_step: int = 0  # steps taken in the current block
    steps: int = 0  # steps taken (ancestral: time steps, the ones that committed nothing too)
    nfe: int = 0  # model calls the row took part in


def steps_per_block(total_steps: int, blocks: int) -> int:
    """`total_steps` spread over a row's blocks, rounded up (a row never gets fewer steps than asked for)."""
    return -(-total_steps // max(blocks, 1))


class DiffusionRows(RowSlots):
    """Diffusion rows (see the module docstring): `todo` marks the still-masked columns of each row's current
    block, `h` holds the state predicting each column from the row's last call."""

    def __init__(self, model, mask_id: int, vocab_limit: int, capacity: int, width: int):
        super().__init__(model, vocab_limit, capacity, width)
        self.mask_id = mask_id
        self.shift = int(model.config.shift)
        self.block_causal = model.config.attention == "block_causal"
        self.align = model.config.block_alignment  # the model's own blocks (0: none)
        self.todo = torch.zeros(capacity, width, dtype=torch.bool, device=self.device)  # (N, W)
        self.h: Optional[torch.Tensor] = None  # (N, W, C) the state predicting each column, from the last call

    def first_block_start(self, prompt_len: int) -> int:
        """Where a row's first block starts: its first generated column, or its model block's start."""
        return (prompt_len // self.align) * self.align if self.align else prompt_len

    def blocks(self, prompt_len: int, gen_len: int, block_length: Optional[int]) -> int:
        """How many blocks a row of prompt_len + gen_len columns is decoded in."""
        if not block_length:
            return 1
        return max(1, -(-(prompt_len + gen_len - self.first_block_start(prompt_len)) // block_length))

    def _place(self, prompt_ids: list[int], row: DiffusionRow) -> int:
        """Put a new row (every field filled but its block) in a free slot and enter its first block."""
        if self.shift and not prompt_ids:
            raise ValueError("a shifted model predicts each token from the column before it: give the row at "
                             "least one prompt token")
        if row.kv_cache and not row.block_length:
            raise ValueError("kv_cache needs semi-autoregressive blocks (block_length)")
        if row.block_length and self.align and row.block_length % self.align:
            raise ValueError(f"this block-causal model was trained with blocks of {self.align}; decoding blocks "
                             f"must be a multiple of it (got block_length={row.block_length})")
        slot = self._take_slot(list(prompt_ids) + [self.mask_id] * row.gen_len, len(prompt_ids), row.gen_len)
        row.hi = self.first_block_start(row.gen_start) if row.block_length else row.gen_start
        self.rows[slot] = row
        self._enter_block(slot)
        return slot

    def _enter_block(self, slot: int) -> None:
        """The row's next block becomes its current one: its masked columns are todo, its rule restarts."""
        r = self.rows[slot]
        r.lo = r.hi
        r.hi = min(r.lo + r.block_length, r.length) if r.block_length else r.length
        r.block_step, r.refresh = 0, True
        self.todo[slot] = False
        self.todo[slot, max(r.lo, r.gen_start):r.hi] = True
        self._begin_block(slot)

    def _begin_block(self, slot: int) -> None:
        """The rule's start of a block (a subclass's)."""

    def _cache_end(self, r: DiffusionRow) -> int:
        """The first column whose state the block's candidates read: the cache holds the columns before it."""
        return max(r.lo - self.shift, 0)

    def _fed_end(self, r: DiffusionRow) -> int:
        """One past the last column a call must feed: the block's end (block-causal), else the canvas's."""
        return r.hi if self.block_causal else r.length

    def _fed_start(self, r: DiffusionRow) -> int:
        """The first column a call feeds: after the cached past (a bidirectional prefix: once refreshed)."""
        if not r.kv_cache or (r.refresh and not self.block_causal):
            return 0
        return r.cached

    def _model_calls(self, slots: list[int], split: Split) -> list[RowsCall]:
        """The calls of these rows: from column 0 (one call, or split by width), and after cached pasts (one
        call per alignment: a block-causal model's pasts differ by whole model blocks)."""
        whole, past = [], {}
        for s in slots:
            r = self.rows[s]
            start = self._fed_start(r)
            if start == 0:
                whole.append(s)
            else:
                past.setdefault(start % self.align if self.align else 0, []).append(s)
        calls = self._whole_calls(whole, split, [self._fed_end(self.rows[s]) for s in whole]) if whole else []
        for group in past.values():
            calls.append(self._past_call(group, [self.rows[s].cached for s in group],
                                         [self._fed_end(self.rows[s]) for s in group]))
        self.calls += len(calls)
        return calls

    def _take_states(self, calls: list[RowsCall], results: list[tuple]) -> None:
        """Keep what each call returned: the state predicting each fed column in `h`, and the keys/values of
        the finished blocks it fed."""
        dev, W = self.device, self.x.size(1)
        for call, (h, presents) in zip(calls, results):
            starts = call.starts or [0] * len(call.slots)
            keep = []
            for s, p in zip(call.slots, starts):
                r = self.rows[s]
                end = self._cache_end(r)
                keep.append(end - p if r.kv_cache and p < end else 0)
                if r.kv_cache:
                    r.cached = end
                r.refresh = False
                r.nfe += 1
            self._keep_kv(call, presents, keep)
            if self.h is None:
                self.h = h.new_zeros(self.x.size(0), W, h.size(-1))
            index = torch.tensor(call.slots, device=dev)
            first = torch.tensor(starts, device=dev)  # (R,)
            span = torch.arange(h.size(1), device=dev)[None, :]  # (1, w)
            ends = torch.tensor([self._fed_end(self.rows[s]) for s in call.slots], device=dev)
            real = span < (ends - first)[:, None]  # (R, w): the row's own columns, not the call's padding
            flat = index[:, None] * W + first[:, None] + span  # (R, w) row-major columns of h
            self.h.view(-1, h.size(-1))[flat[real]] = align_predictions(h, self.shift)[real]  # row j: column p + j

    def _end_blocks(self, slots: list[int]) -> list[int]:
        """After a commit: rows whose block has nothing masked left go on to their next block, or finish (at
        their last block, or at a finished block holding their stop_id). Returns the finished rows."""
        if not slots:
            return []
        left = self.todo[torch.tensor(slots, device=self.device)].any(1).tolist()
        done = [s for s, more in zip(slots, left) if not more]
        stopping = [s for s in done if self.rows[s].stop_id is not None and self.rows[s].hi < self.rows[s].length]
        so_far = dict(zip(stopping, self.x[torch.tensor(stopping, device=self.device)].tolist())) if stopping else {}
        finished = []
        for s in done:
            r = self.rows[s]
            if s in so_far and r.stop_id in so_far[s][r.gen_start:r.hi]:
                self.x[s, r.hi:r.length] = r.stop_id
                r.hi = r.length
            if r.hi >= r.length:
                finished.append(s)
            else:
                self._enter_block(s)
        return finished
