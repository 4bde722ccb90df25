"""Confidence-based decoding (topk, random, threshold) of many independent rows, each at its own step.

`decode_by_confidence` over the whole canvas and the server's scheduler decode through `ConfidenceRows`.
Each row is a canvas of its own (its prompt, then L MASKs, from column 0) with its own commit rule
(`inference.commit_rules`), sampler and random generator. A step runs every row on its whole canvas (one
call, or a few split by width: a row's canvas changed at its last step), proposes a token for each of
its masked positions (one output layer and sampling per sampler for all rows), and lets each rule choose
which to commit (one `choose` per rule for all its rows, each at its own step of its own budget). Only
the random numbers are drawn per row, from the row's generator, in the order it draws them alone: first
the proposals, then (random remasking) one score per column. So a row decodes exactly what it decodes
alone, whatever else is in the batch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from inference.batching import MaskedRowSlots, RowsCall
from inference.commit_rules import CommitRandom
from inference.sampling import Sampler
from models.diffusion import align_predictions


@dataclass
class _Row:
    generator: Optional[torch.Generator]
    sampler: Sampler
    rule: tuple  # the key of its commit rule in ConfidenceRows.rules
    length: int
    gen_start: int
    gen_len: int
    steps: int = 0
    nfe: int = 0


def rule_key(rule) -> tuple:
    """Rules that choose alike for the same row state share one object (their per-row state by slot)."""
    return (type(rule).__name__, getattr(rule, "k", None), getattr(rule, "steps", None), getattr(rule, "tau", None))


class ConfidenceRows(MaskedRowSlots):
    """Confidence rows (see the module docstring). add() a row at any time; remove() it between a commit
    and the next prepare."""

    def __init__(self, model, mask_id: int, vocab_limit: int, capacity: int, width: int):
        super().__init__(model, mask_id, vocab_limit, capacity, width)
        self.rules: dict[tuple, object] = {}  # rule_key -> a rule whose per-row state is indexed by slot

    def add(self, prompt_ids: list[int], gen_len: int, rule, sampler: Sampler,
            generator: Optional[torch.Generator]) -> int:
        """A new row: prompt_ids then gen_len MASKs, committed by `rule` (CommitTopK / CommitRandom /
        CommitThreshold with an int or no step budget; a random rule's own generator is not used: the
        row's is), its tokens drawn by `sampler` from `generator`. Returns its slot."""
        if isinstance(getattr(rule, "steps", None), torch.Tensor):
            raise ValueError("a row's commit rule needs one step budget (an int), not one per batch row")
        slot = self._take_masked_slot(prompt_ids, gen_len)
        key = rule_key(rule)
        if key not in self.rules:
            shared = copy.copy(rule)
            shared.begin(torch.zeros(self.x.size(0), dtype=torch.long, device=self.device))  # totals by slot
            self.rules[key] = shared
        total = getattr(self.rules[key], "total", None)
        if total is not None:
            total[slot] = gen_len  # the region is the whole generation
        self.rows[slot] = _Row(generator, sampler, key, len(prompt_ids) + gen_len, len(prompt_ids), gen_len)
        return slot

    def prepare(self, split: Optional[Callable[[list[int]], list[list[int]]]] = None) -> list[RowsCall]:
        """Every row, on its whole canvas: one call, or as many as split(row lengths) returns groups."""
        self._calls = self._whole_calls(sorted(self.rows), split)
        self.calls += len(self._calls)
        return self._calls

    def commit(self, results: list[tuple]) -> tuple[list[int], list[int]]:
        """results: what each of prepare's calls returned. Proposes, chooses and commits every row's
        tokens; returns (the rows that stepped, the rows now finished), slots in the calls' order."""
        calls, self._calls = self._calls, []
        if not calls:
            return [], []
        dev, W = self.device, self.x.size(1)
        slots, states, cands = [], [], []
        for call, (h, _) in zip(calls, results):
            index = torch.tensor(call.slots, device=dev)
            cand = self.todo[index, :h.size(1)]  # (R, w): every candidate lies in the row's own columns
            states.append(align_predictions(h, self.shift)[cand])  # row-major: each row's candidates together
            cands.append(self.todo[index])
            slots += call.slots
        cand = torch.cat(cands)  # (R, W)
        tokens, conf = self._sample(slots, cand.sum(1).tolist(), torch.cat(states))
        conf_full = torch.full(cand.shape, float("-inf"), dtype=conf.dtype, device=dev)
        conf_full[cand] = conf
        proposal = torch.zeros(cand.shape, dtype=torch.long, device=dev)
        proposal[cand] = tokens
        index = torch.tensor(slots, device=dev)
        step = torch.tensor([self.rows[s].steps for s in slots], device=dev)
        commit = torch.zeros_like(cand)
        by_rule: dict[tuple, list[int]] = {}
        for i, s in enumerate(slots):
            by_rule.setdefault(self.rows[s].rule, []).append(i)
        for key, members in by_rule.items():  # each rule chooses for all of its rows at once
            rule, m = self.rules[key], torch.tensor(members, device=dev)
            if isinstance(rule, CommitRandom):  # one score per column, from each row's generator
                scores = torch.ones(len(members), W, dtype=torch.float32, device=dev)
                for j, i in enumerate(members):
                    r = self.rows[slots[i]]
                    torch.rand(r.length, generator=r.generator, out=scores[j, :r.length])
                commit[m] = rule.choose_by(scores, conf_full[m], index[m], step[m])
            else:
                commit[m] = rule.choose(conf_full[m], index[m], step[m])
        self.x[index] = torch.where(commit, proposal, self.x[index])
        self.todo[index] = cand & ~commit
        for s in slots:
            self.rows[s].steps += 1
            self.rows[s].nfe += 1
        left = self.todo[index].any(1).tolist()
        return self._succeeded(slots, [s for s, more in zip(slots, left) if not more])
