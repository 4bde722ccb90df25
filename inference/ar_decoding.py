"""Autoregressive sampling with a KV cache (nanoGPT recomputes the whole context for every token).

`ARRows` decodes many rows, each at its own length, every step one token for every row: what the CLI
decodes a batch with and what the server's scheduler runs, rows joining and leaving at any step. Each row
is a canvas of its own (its prompt from column 0, then its tokens) with its own random generator, and
everything a step does is one tensor operation over the rows (the model call, reading and writing the
cache, the output layer, sampling, writing tokens) except each row's one random draw.

Each row keeps the keys/values of its first P_r columns (`RowSlots`' KV cache). A step feeds each row its
newest column. Rows of different lengths share the call (`RowSlots._past_call`): each row's past is read
RIGHT-aligned into a window of the longest past Q, so every row's new column sits at key Q, the one
q_offset of the call, and the columns before row r's past are hidden by key_starts = Q - P_r; a causal
query at Q then sees exactly the row's own P_r keys and itself, as alone. A row's first call (the
prefill) feeds its whole prompt; rows in their prefill are called apart from one-column steps (or split
further by width, as the caller likes).
A row stops at its own max_new_tokens or at EOT and leaves; finished rows cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from inference.batching import RowsCall, RowSlots
from inference.sampling import Sampler


@dataclass
class _Row:
    generator: Optional[torch.Generator]
    sampler: Sampler
    length: int  # tokens on the canvas: prompt + generated so far
    gen_start: int  # the prompt's length
    gen_len: int  # tokens to generate at most
    stop_id: Optional[int]  # EOT: the row stops once it draws it
    kv_cache: bool  # False: fed its whole canvas at every step
    cached: int = 0  # columns whose keys/values are in the cache (with the cache: length - 1 after the prefill)
    nfe: int = 0
    steps: int = 0


class ARRows(RowSlots):
    """AR rows (see the module docstring). A row added with kv_cache=False is fed its whole canvas at every
    step (the reference the cache must reproduce)."""

    def add(self, prompt_ids: list[int], gen_len: int, sampler: Sampler, generator: Optional[torch.Generator],
            stop_id: Optional[int] = None, kv_cache: bool = True) -> int:
        """A new row: its prompt (at least one token: it predicts the first one), gen_len tokens at most."""
        if not prompt_ids:
            raise ValueError("autoregressive decoding needs at least one prompt token per request")
        slot = self._take_slot(list(prompt_ids), len(prompt_ids), gen_len)
        self.rows[slot] = _Row(generator, sampler, len(prompt_ids), len(prompt_ids), gen_len, stop_id, kv_cache)
        return slot

    def prepare(self, split: Optional[Callable[[list[int]], list[list[int]]]] = None) -> list[RowsCall]:
        """This step's calls: the rows with their cache feed their newest column (one call), the others
        (first step, or no cache) their whole canvas (one call, or as split(widths) groups them)."""
        slots = sorted(self.rows)
        stepping = [s for s in slots if self.rows[s].kv_cache and self.rows[s].cached]
        whole = [s for s in slots if not (self.rows[s].kv_cache and self.rows[s].cached)]
        self._calls = []
        if whole:
            self._calls += self._whole_calls(whole, split)
        if stepping:  # each row's newest column after its cached past
            self._calls.append(self._past_call(stepping, [self.rows[s].cached for s in stepping],
                                               [self.rows[s].length for s in stepping]))
        self.calls += len(self._calls)
        return self._calls

    def commit(self, results: list[tuple]) -> tuple[list[int], list[int]]:
        """results: (h, presents) of each of prepare's calls. Keeps the new keys/values, draws every row's
        next token; returns (the rows that stepped, the rows now finished), slots in order."""
        calls, self._calls = self._calls, []
        dev = self.device
        fed_slots, states = [], []
        for call, (h, presents) in zip(calls, results):
            starts = call.starts or [0] * len(call.slots)  # the column each row's first fed column is
            last = torch.tensor([self.rows[s].length - 1 - p for s, p in zip(call.slots, starts)], device=dev)  # (R,)
            fed_slots += call.slots
            states.append(h[torch.arange(len(call.slots), device=dev), last])  # (R, C) each row's newest state
            self._keep_kv(call, presents, [self.rows[s].length - p if self.rows[s].kv_cache else 0
                                           for s, p in zip(call.slots, starts)])
            for s in call.slots:
                r = self.rows[s]
                r.nfe += 1
                r.cached = r.length  # every fed column is in the cache now
        slots = sorted(self.rows)
        if not slots:
            return [], []
        order = sorted(range(len(fed_slots)), key=fed_slots.__getitem__)  # the calls' rows in slot order
        states = torch.cat(states)[torch.tensor(order, device=dev)]  # (R, C)
        tokens, _ = self._sample(slots, [1] * len(slots), states)  # (R,)
        index = torch.tensor(slots, device=dev)
        ends = torch.tensor([self.rows[s].length for s in slots], device=dev)
        self.x[index, ends] = tokens
        finished = []
        for s, token in zip(slots, tokens.tolist()):
            r = self.rows[s]
            r.length += 1
            r.steps += 1
            if r.length - r.gen_start >= r.gen_len or token == r.stop_id:
                finished.append(s)
        return self._succeeded(slots, finished)

