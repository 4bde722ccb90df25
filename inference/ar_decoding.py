"""Autoregressive sampling with a KV cache (nanoGPT recomputes the whole context for every token).

`ARRows` decodes many rows, each at its own length, every step one token for every row: what the CLI
decodes a batch with and what the server's scheduler runs, rows joining and leaving at any step. Each row
is a canvas of its own (its prompt from column 0, then its tokens) with its own random generator, and
everything a step does is one tensor operation over the rows (the model call, reading and writing the
cache, the output layer, sampling, writing tokens) except each row's one random draw.

The KV cache of all rows is one buffer, (rows x context) columns of every layer's keys and values; row
r holds its first P_r columns. A step feeds each row its newest column. Rows of different lengths share
the call: each row's past is read RIGHT-aligned into a window of the longest past Q (one gather for every
row and layer), so every row's new column sits at key Q, the one q_offset of the call, and the columns
before row r's past are hidden by key_starts = Q - P_r; a causal query at Q then sees exactly the row's
own P_r keys and itself, as alone. A row's first call (the prefill) feeds its whole prompt; rows in
their prefill are called apart from one-column steps (or split further by width, as the caller likes).
A row stops at its own max_new_tokens or at EOT and leaves; finished rows cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from inference.batching import DecodeResult, Layout, RowsCall, RowSlots, StepHook, decode_rows
from inference.sampling import Sampler
from kernels.attention import AttentionMask


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

    def __init__(self, model, vocab_limit: int, capacity: int, width: int):
        super().__init__(model, vocab_limit, capacity, width)
        self.kv: Optional[torch.Tensor] = None  # (N * W, 2 L, H, D): column c of slot s at s * W + c

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
        if stepping:
            self._calls.append(self._step_call(stepping))
        self.calls += len(self._calls)
        return self._calls

    def _step_call(self, slots: list[int]) -> RowsCall:
        """Each row's newest column after its cached past, the pasts right-aligned to the longest (Q)."""
        dev, W = self.device, self.x.size(1)
        past = torch.tensor([self.rows[s].cached for s in slots], device=dev)  # (R,) P_r
        index = torch.tensor(slots, device=dev)
        Q = max(self.rows[s].cached for s in slots)
        lead = Q - past  # (R,) hidden columns before each row's past
        cols = (torch.arange(Q, device=dev)[None, :] - lead[:, None]).clamp(min=0)  # (R, Q)
        window = self.kv[index[:, None] * W + cols]  # (R, Q, 2L, H, D): one gather for every row and layer
        past_kv = [(window[:, :, 2 * i].transpose(1, 2), window[:, :, 2 * i + 1].transpose(1, 2))
                   for i in range(window.size(2) // 2)]  # per layer (R, H, Q, D)
        cfg = self.model.config
        mask = AttentionMask(kind=cfg.attention, block_length=cfg.block_length, q_offset=Q,
                             key_starts=lead if bool((lead > 0).any()) else None)
        return RowsCall(slots, self.x[index, past][:, None], mask, past_kv, past[:, None])

    def commit(self, results: list[tuple]) -> tuple[list[int], list[int]]:
        """results: (h, presents) of each of prepare's calls. Keeps the new keys/values, draws every row's
        next token; returns (the rows that stepped, the rows now finished), slots in order."""
        calls, self._calls = self._calls, []
        dev, W = self.device, self.x.size(1)
        fed_slots, states = [], []
        for call, (h, presents) in zip(calls, results):
            index = torch.tensor(call.slots, device=dev)
            fed = torch.tensor([self.rows[s].cached if call.past_kv is not None else 0 for s in call.slots],
                               device=dev)  # (R,) the column each row's first fed column is
            last = torch.tensor([self.rows[s].length - 1 for s in call.slots], device=dev) - fed  # (R,)
            fed_slots += call.slots
            states.append(h[torch.arange(len(call.slots), device=dev), last])  # (R, C) each row's newest state
            if any(self.rows[s].kv_cache for s in call.slots):
                new = torch.stack([t for kv in presents for t in kv], dim=2)  # (R, H, 2L, w, D)
                new = new.permute(0, 3, 2, 1, 4)  # (R, w, 2L, H, D)
                if self.kv is None:
                    self.kv = new.new_zeros(self.x.size(0) * W, *new.shape[2:])
                cols = fed[:, None] + torch.arange(new.size(1), device=dev)[None, :]  # (R, w)
                keep = cols < W  # right padding of a wide call may run past the canvas: never read anyway
                self.kv[(index[:, None] * W + cols)[keep]] = new[keep]
            for s in call.slots:
                r = self.rows[s]
                r.nfe += 1
                r.cached = r.length  # every fed column is in the cache now (padding past it is overwritten later)
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


def decode_autoregressive(model, layout: Layout, sampler: Sampler, generator, vocab_limit: int,
                          kv_cache: bool = True, stop_id: Optional[int] = None,
                          on_step: Optional[StepHook] = None) -> DecodeResult:
    """Sample each row's generation token by token, every row of the layout a row of `ARRows` (its own
    real columns; its own generator when `generator` is a list of one per row). The first call (prefill)
    runs the prompts and gives the first token; with kv_cache every later call feeds only the newest
    column. Without it, every call feeds the whole canvas so far (the reference the cache must reproduce)."""
    if layout.anchor < 1:
        raise ValueError("autoregressive decoding needs at least one prompt token per request")
    B, T = layout.x.shape
    generators = generator if isinstance(generator, (list, tuple)) else [generator] * B
    rows = ARRows(model, vocab_limit, capacity=B, width=T)
    res = decode_rows(model, rows, layout, lambda b, prompt_ids: rows.add(
        prompt_ids, layout.gen_lens[b], sampler, generators[b], stop_id, kv_cache), on_step)
    # columns a row never reached (it stopped at EOT) hold the layout's filler; mark where it stopped
    gen = layout.gen & (torch.arange(T, device=res.x.device)[None, :]
                        < (layout.gen_starts + res.steps.to(res.x.device))[:, None])
    return DecodeResult(res.x, res.nfe, res.steps, res.calls, Layout(**{**layout.__dict__, "gen": gen}))
