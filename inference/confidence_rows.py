"""Confidence-based decoding (topk, random, threshold) of many independent rows, each at its own step.

`generate` and the server's scheduler decode every confidence rule through `ConfidenceRows`: over the
whole canvas, or block by block (the `blocks` strategy; every rule of a block-causal model; see
`inference.diffusion_rows`, with the KV cache of the finished blocks). Each row is a canvas of its own (its
prompt, then L MASKs, from column 0) with its own commit rule (`inference.commit_rules`, restarting in each
block), sampler and random generator. A step runs every row (one call, or a few: split by width, or rows
with a cached past), proposes a token for each masked position of its block (one output layer and sampling
per sampler for all rows), and lets each rule choose which to commit (one `choose` per rule for all its
rows, each at its own step of its own budget). Only the random numbers are drawn per row, from the row's
generator, in the order it draws them alone: first the proposals, then (random remasking) one score per
column. So a row decodes exactly what it decodes alone, whatever else is in the batch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from inference.batching import RowsCall
from inference.commit_rules import CommitRandom
from inference.diffusion_rows import DiffusionRow, DiffusionRows, Split
from inference.sampling import Sampler


@dataclass(kw_only=True)
class _Row(DiffusionRow):
    rule: tuple  # the key of its commit rule in ConfidenceRows.rules


def rule_key(rule) -> tuple:
    """Rules that choose alike for the same row state share one object (their per-row state by slot)."""
    return (type(rule).__name__, getattr(rule, "k", None), getattr(rule, "steps", None), getattr(rule, "tau", None))


class ConfidenceRows(DiffusionRows):
    """Confidence rows (see the module docstring). add() a row at any time; remove() it between a commit
    and the next prepare."""

    def __init__(self, model, mask_id: int, vocab_limit: int, capacity: int, width: int):
        super().__init__(model, mask_id, vocab_limit, capacity, width)
        self.rules: dict[tuple, object] = {}  # rule_key -> a rule whose per-row state is indexed by slot

    def add(self, prompt_ids: list[int], gen_len: int, rule, sampler: Sampler, generator: Optional[torch.Generator],
            block_length: Optional[int] = None, kv_cache: bool = False, stop_id: Optional[int] = None) -> int:
        """A new row: prompt_ids then gen_len MASKs, committed by `rule` (CommitTopK / CommitRandom /
        CommitThreshold with an int or no step budget, per block; a random rule's own generator is not used:
        the row's is), its tokens drawn by `sampler` from `generator`; in blocks of block_length (None: the
        whole generation) with the KV cache of the finished blocks (kv_cache) and a block holding stop_id
        ending the row. Returns its slot."""
        if isinstance(getattr(rule, "steps", None), torch.Tensor):
            raise ValueError("a row's commit rule needs one step budget (an int), not one per batch row")
        key = rule_key(rule)
        if key not in self.rules:
            shared = copy.copy(rule)
            shared.begin(torch.zeros(self.x.size(0), dtype=torch.long, device=self.device))  # totals by slot
            self.rules[key] = shared
        return self._place(prompt_ids, _Row(generator=generator, sampler=sampler, length=len(prompt_ids) + gen_len,
                                            gen_start=len(prompt_ids), gen_len=gen_len,
                                            block_length=block_length or 0, kv_cache=kv_cache, stop_id=stop_id,
                                            rule=key))

    def _begin_block(self, slot: int) -> None:
        r = self.rows[slot]
        total = getattr(self.rules[r.rule], "total", None)
        if total is not None:
            total[slot] = r.hi - max(r.lo, r.gen_start)  # the block's masked tokens

    def prepare(self, split: Split = None) -> list[RowsCall]:
        """Every row: one call, or as many as split(row widths) returns groups, and the rows with a cached past."""
        self._calls = self._model_calls(sorted(self.rows), split)
        return self._calls

    def commit(self, results: list[tuple]) -> tuple[list[int], list[int]]:
        """results: what each of prepare's calls returned. Proposes, chooses and commits every row's
        tokens; returns (the rows that stepped, the rows now finished), slots in order."""
        calls, self._calls = self._calls, []
        if not calls:
            return [], []
        self._take_states(calls, results)
        dev, W = self.device, self.x.size(1)
        slots = sorted(s for call in calls for s in call.slots)
        index = torch.tensor(slots, device=dev)
        cand = self.todo[index]  # (R, W)
        rows, cols = cand.nonzero(as_tuple=True)  # row-major: each row's candidates together, rows in order
        tokens, conf = self._sample(slots, cand.sum(1).tolist(), self.h[index[rows], cols])
        conf_full = torch.full(cand.shape, float("-inf"), dtype=conf.dtype, device=dev)
        conf_full[cand] = conf
        proposal = torch.zeros(cand.shape, dtype=torch.long, device=dev)
        proposal[cand] = tokens
        step = torch.tensor([self.rows[s].block_step for s in slots], device=dev)
        commit = torch.zeros_like(cand)
        by_rule: dict[tuple, list[int]] = {}
        for i, s in enumerate(slots):
            by_rule.setdefault(self.rows[s].rule, []).append(i)
        for key, members in by_rule.items():  # each rule chooses for all of its rows at once
            rule, m = self.rules[key], torch.tensor(members, device=dev)
            if isinstance(rule, CommitRandom):  # one score per column up to the block's end, from each row's generator
                scores = torch.ones(len(members), W, dtype=torch.float32, device=dev)
                for j, i in enumerate(members):
                    r = self.rows[slots[i]]
                    torch.rand(r.hi, generator=r.generator, out=scores[j, :r.hi])
                commit[m] = rule.choose_by(scores, conf_full[m], index[m], step[m])
            else:
                commit[m] = rule.choose(conf_full[m], index[m], step[m])
        self.x[index] = torch.where(commit, proposal, self.x[index])
        self.todo[index] = cand & ~commit
        for s in slots:
            self.rows[s].steps += 1
            self.rows[s].block_step += 1
        return self._succeeded(slots, self._end_blocks(slots))
