"""MDLM ancestral sampling of many independent rows, each at its own point of its own decode.

`decode_ancestral` (over the whole canvas: the MDLM default) and the server's scheduler both decode
through `AncestralRows`. Each row is a canvas of its own (its prompt, then L MASKs, from column 0) with
its own time grid t_j = j / S and its own random generator. Everything a step does is one tensor
operation over all rows (commit decisions, the model call, the cache of hidden states, the output
layer, sampling, writing tokens), except the random draws: each row takes them from its own generator,
in the order it would alone. So a row decodes exactly what it decodes alone, whatever else is in the
batch, whenever it joined, wherever the others are in their decodes; and its own work per step costs
a few small operations instead of a few dozen (the cost that made a server's steps grow with its rows).

A step is `prepare`, its model calls (at most one, unless the caller splits it by width), `commit`:
  prepare   each row walks its grid from t_j to t_(j-1), drawing which of its masked tokens are committed
            (each with probability (alpha_(j-1) - alpha_j) / (1 - alpha_j), `ancestral_commit_probability`),
            until a step commits something. The rows whose canvas changed since their last call need the
            model: prepare returns that call (their canvases from column 0, right-padded to the longest).
  commit    keeps the states of the rows just called (our GPT has no time input, so an unchanged canvas
            gives the same prediction and a row calls the model at most once per change), draws the tokens
            of every committing row from them and writes them; rows with nothing left masked are finished.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from inference.batching import MaskedRowSlots, RowsCall
from inference.sampling import Sampler
from models.diffusion import NoiseSchedule, align_predictions


def ancestral_commit_probability(schedule: NoiseSchedule, t: float, s: float) -> float:
    """Probability that a token still masked at time t is unmasked by time s < t:
    (alpha_s - alpha_t) / (1 - alpha_t). At s = 0 it is 1 (alpha(0) = 1 in every schedule)."""
    if s <= 0.0:
        return 1.0
    a_t = float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))
    a_s = float(schedule.alpha(torch.tensor(s, dtype=torch.float64)))
    return (a_s - a_t) / (1.0 - a_t)


@dataclass
class _Row:
    generator: Optional[torch.Generator]
    sampler: Sampler
    length: int  # canvas columns: prompt + generation
    gen_start: int  # first generated column
    gen_len: int
    grid: list[float]  # grid[j]: commit probability from t_j to t_(j-1); index 0 unused
    j: int  # the next time step to take (counts down to 1)
    steps: int = 0  # time steps taken (the ones that committed nothing too)
    nfe: int = 0  # model calls the row took part in
    fresh: bool = False  # the kept states match the canvas
    committing: bool = False  # prepare found a step that commits something, commit has not run yet


class AncestralRows(MaskedRowSlots):
    """Ancestral rows (see the module docstring): add() a row at any time, it takes part from the next
    prepare; remove() it between a commit and the next prepare (finished or cancelled)."""

    def __init__(self, model, mask_id: int, vocab_limit: int, capacity: int, width: int):
        super().__init__(model, mask_id, vocab_limit, capacity, width)
        dev = self.device
        self.chosen = torch.zeros(capacity, width, dtype=torch.bool, device=dev)  # committed by this step
        self.u = torch.ones(capacity, width, device=dev)  # this step's draws (1: never below a probability)
        self.h: Optional[torch.Tensor] = None  # (N, W, C) the state predicting each column, from the last call
        self._grids: dict[tuple, list[float]] = {}

    def add(self, prompt_ids: list[int], gen_len: int, num_steps: int, schedule: NoiseSchedule, sampler: Sampler,
            generator: Optional[torch.Generator]) -> int:
        """A new row: prompt_ids then gen_len MASKs, sampled on a grid of num_steps time steps of `schedule`,
        its tokens drawn by `sampler` from `generator`. Returns its slot."""
        if num_steps < 1:
            raise ValueError(f"an ancestral row needs at least 1 time step, got {num_steps}")
        slot = self._take_masked_slot(prompt_ids, gen_len)
        self.rows[slot] = _Row(generator, sampler, len(prompt_ids) + gen_len, len(prompt_ids), gen_len,
                               self._grid(schedule, num_steps), num_steps)
        return slot

    def _grid(self, schedule: NoiseSchedule, num_steps: int) -> list[float]:
        key = (schedule.name, schedule.eps, num_steps)
        if key not in self._grids:
            self._grids[key] = [1.0] + [ancestral_commit_probability(schedule, j / num_steps, (j - 1) / num_steps)
                                        for j in range(1, num_steps + 1)]
        return self._grids[key]

    def prepare(self, split: Optional[Callable[[list[int]], list[list[int]]]] = None) -> list[RowsCall]:
        """Draw every row's commit decisions up to its next step that commits something; return the model
        calls the stale rows need (none: every committing row still has its states). One call, or as
        many as split(row lengths) returns groups of indices (a scheduler that weighs padding against calls)."""
        pending = [s for s, r in self.rows.items() if not r.committing]
        while pending:  # rows whose step committed nothing take their next step (no model call)
            p = []
            for s in pending:
                r = self.rows[s]
                torch.rand(r.gen_len, generator=r.generator, out=self.u[s, r.gen_start:r.length])
                p.append(r.grid[r.j] if r.j >= 1 else 1.0)  # past the grid (never, while tokens are masked): all
                r.j -= 1
                r.steps += 1
            index = torch.tensor(pending, device=self.device)
            chosen = self.todo[index] & (self.u[index] < torch.tensor(p, device=self.device)[:, None])  # (R, W)
            self.chosen[index] = chosen
            again = []
            for s, hit in zip(pending, chosen.any(1).tolist()):
                self.rows[s].committing = hit
                if not hit:
                    again.append(s)
            pending = again
        stale = sorted(s for s, r in self.rows.items() if not r.fresh)  # every row commits now: stale ones call
        self._calls = self._whole_calls(stale, split)
        self.calls += len(self._calls)
        return self._calls

    def commit(self, results: list[tuple]) -> tuple[list[int], list[int]]:
        """results: what each of prepare's calls returned (RowsCall.run: final hidden states (R, W, C) and
        keys/values, unused). Commits the drawn tokens; returns (the rows that committed, the rows now
        finished), slots in order."""
        calls, self._calls = self._calls, []
        for call, (h, _) in zip(calls, results):
            if self.h is None:
                self.h = h.new_zeros(self.x.size(0), self.x.size(1), h.size(-1))
            self.h[torch.tensor(call.slots, device=self.device), :h.size(1)] = align_predictions(h, self.shift)
            for s in call.slots:
                self.rows[s].fresh = True
                self.rows[s].nfe += 1
        slots = sorted(self.rows)  # after prepare, every row commits this step
        if not slots:
            return [], []
        index = torch.tensor(slots, device=self.device)
        chosen = self.chosen[index]  # (R, W)
        rows, cols = chosen.nonzero(as_tuple=True)  # row-major: each row's positions together, rows in order
        tokens, _ = self._sample(slots, chosen.sum(1).tolist(), self.h[index[rows], cols])
        self.x[index[rows], cols] = tokens
        self.todo[index[rows], cols] = False
        for s in slots:
            self.rows[s].fresh = self.rows[s].committing = False
        left = self.todo[index].any(1).tolist()
        return self._succeeded(slots, [s for s, more in zip(slots, left) if not more])
