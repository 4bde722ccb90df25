"""MDLM ancestral sampling of many independent rows, each at its own point of its own decode.

`generate` and the server's scheduler decode ancestral sampling through `AncestralRows`: over the whole
canvas (the MDLM default), or block by block (BD3-LM's sampler, on a block-causal model: each block by an
ancestral chain of its own, conditioned on the finished blocks before it, with their exact KV cache; see
`inference.diffusion_rows`). Each row is a canvas of its own (its prompt, then L MASKs, from column 0)
with its own time grid t_j = j / S (in each block) and its own random generator. Everything a step does is one tensor
operation over all rows (commit decisions, the model call, the cache of hidden states, the output
layer, sampling, writing tokens), except the random draws: each row takes them from its own generator,
in the order it would alone. So a row decodes exactly what it decodes alone, whatever else is in the
batch, whenever it joined, wherever the others are in their decodes; and its own work per step costs
a few small operations instead of a few dozen (the cost that made a server's steps grow with its rows).

A step is `prepare`, its model calls (at most one, unless the caller splits it by width), `commit`:
  prepare   each row walks its grid from t_j to t_(j-1), drawing which of its masked tokens are committed
            (each with probability (alpha_(j-1) - alpha_j) / (1 - alpha_j), `ancestral_commit_probability`),
            until a step commits something. The rows whose canvas changed since their last call need the
            model: prepare returns their calls.
  commit    keeps the states of the rows just called (our GPT has no time input, so an unchanged canvas
            gives the same prediction and a row calls the model at most once per change), draws the tokens
            of every committing row from them and writes them; a row whose block is done goes on to its
            next block, and with nothing left masked it is finished.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from inference.batching import RowsCall
from inference.diffusion_rows import DiffusionRow, DiffusionRows, Split
from inference.sampling import Sampler
from models.diffusion import NoiseSchedule


def ancestral_commit_probability(schedule: NoiseSchedule, t: float, s: float) -> float:
    """Probability that a token still masked at time t is unmasked by time s < t:
    (alpha_s - alpha_t) / (1 - alpha_t). At s = 0 it is 1 (alpha(0) = 1 in every schedule)."""
    if s <= 0.0:
        return 1.0
    a_t = float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))
    a_s = float(schedule.alpha(torch.tensor(s, dtype=torch.float64)))
    return (a_s - a_t) / (1.0 - a_t)


@dataclass(kw_only=True)
class _Row(DiffusionRow):
    num_steps: int  # time steps of each block
    grid: list[float]  # grid[j]: commit probability from t_j to t_(j-1); index 0 unused
    j: int = 0  # the next time step to take in the block (counts down to 1)
    fresh: bool = False  # the kept states match the canvas
    committing: bool = False  # prepare found a step that commits something, commit has not run yet


class AncestralRows(DiffusionRows):
    """Ancestral rows (see the module docstring): add() a row at any time, it takes part from the next
    prepare; remove() it between a commit and the next prepare (finished or cancelled)."""

    def __init__(self, model, mask_id: int, vocab_limit: int, capacity: int, width: int):
        super().__init__(model, mask_id, vocab_limit, capacity, width)
        dev = self.device
        self.chosen = torch.zeros(capacity, width, dtype=torch.bool, device=dev)  # committed by this step
        self.u = torch.ones(capacity, width, device=dev)  # this step's draws (read only in `todo` columns)
        self._grids: dict[tuple, list[float]] = {}

    def add(self, prompt_ids: list[int], gen_len: int, num_steps: int, schedule: NoiseSchedule, sampler: Sampler,
            generator: Optional[torch.Generator], block_length: Optional[int] = None, kv_cache: bool = False) -> int:
        """A new row: prompt_ids then gen_len MASKs, sampled on a grid of num_steps time steps of `schedule`
        (in each block of block_length; None: the whole generation), its tokens drawn by `sampler` from
        `generator`; kv_cache: the exact cache of the finished blocks (block-causal models). Returns its slot."""
        if num_steps < 1:
            raise ValueError(f"an ancestral row needs at least 1 time step, got {num_steps}")
        if kv_cache and not (block_length and self.block_causal):
            raise ValueError("the ancestral sampler's KV cache is exact only block by block on a block-causal "
                             "(BD3-LM) model; decode without it (kv_cache=False)")
        return self._place(prompt_ids, _Row(generator=generator, sampler=sampler, length=len(prompt_ids) + gen_len,
                                            gen_start=len(prompt_ids), gen_len=gen_len,
                                            block_length=block_length or 0, kv_cache=kv_cache,
                                            num_steps=num_steps, grid=self._grid(schedule, num_steps)))

    def _begin_block(self, slot: int) -> None:
        r = self.rows[slot]
        r.j = r.num_steps

    def _grid(self, schedule: NoiseSchedule, num_steps: int) -> list[float]:
        key = (schedule.name, schedule.eps, num_steps)
        if key not in self._grids:
            self._grids[key] = [1.0] + [ancestral_commit_probability(schedule, j / num_steps, (j - 1) / num_steps)
                                        for j in range(1, num_steps + 1)]
        return self._grids[key]

    def prepare(self, split: Split = None) -> list[RowsCall]:
        """Draw every row's commit decisions up to its next step that commits something; return the model
        calls the stale rows need (none: every committing row still has its states). One call, or as
        many as split(row widths) returns groups of indices (a scheduler that weighs padding against calls)."""
        pending = [s for s, r in self.rows.items() if not r.committing]
        while pending:  # rows whose step committed nothing take their next step (no model call)
            p = []
            for s in pending:
                r = self.rows[s]
                lo = max(r.lo, r.gen_start)
                torch.rand(r.hi - lo, generator=r.generator, out=self.u[s, lo:r.hi])
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
        self._calls = self._model_calls(stale, split)
        return self._calls

    def commit(self, results: list[tuple]) -> tuple[list[int], list[int]]:
        """results: what each of prepare's calls returned (RowsCall.run: final hidden states and keys/values).
        Commits the drawn tokens; returns (the rows that committed, the rows now finished), slots in order."""
        calls, self._calls = self._calls, []
        self._take_states(calls, results)
        for call in calls:
            for s in call.slots:
                self.rows[s].fresh = True
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
        return self._succeeded(slots, self._end_blocks(slots))
