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

from inference.sampling import Sampler, predict_tokens
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
class RowsCall:
    """The model call of a step: these rows' canvases, columns [0, W)."""

    slots: list[int]
    idx: torch.Tensor  # (R, W) ids
    key_lengths: Optional[torch.Tensor]  # (R,) each row's length; None when every row is W long (no padding)


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


class AncestralRows:
    """Up to `capacity` rows of at most `width` columns, decoded step by step (see the module docstring).

    add() a row at any time (it takes part from the next prepare), remove() it between commit and the next
    prepare (finished or cancelled); `calls` counts the model calls prepare asked for."""

    def __init__(self, model, mask_id: int, vocab_limit: int, capacity: int, width: int):
        self.model = model
        self.mask_id, self.vocab_limit = mask_id, vocab_limit
        self.shift = int(model.config.shift)  # 1: column c is predicted from the state of column c - 1
        dev = next(model.parameters()).device
        self.device = dev
        self.x = torch.zeros(capacity, width, dtype=torch.long, device=dev)  # (N, W) every row's canvas
        self.todo = torch.zeros(capacity, width, dtype=torch.bool, device=dev)  # still masked
        self.chosen = torch.zeros(capacity, width, dtype=torch.bool, device=dev)  # committed by this step
        self.u = torch.ones(capacity, width, device=dev)  # this step's draws (1: never below a probability)
        self.h: Optional[torch.Tensor] = None  # (N, W, C) the state predicting each column, from the last call
        self.rows: dict[int, _Row] = {}  # slot -> row
        self._free = list(range(capacity - 1, -1, -1))
        self._grids: dict[tuple, list[float]] = {}
        self._calls: list[RowsCall] = []  # prepare's calls, until commit
        self.calls = 0

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def has_room(self) -> bool:
        return bool(self._free)

    def add(self, prompt_ids: list[int], gen_len: int, num_steps: int, schedule: NoiseSchedule, sampler: Sampler,
            generator: Optional[torch.Generator]) -> int:
        """A new row: prompt_ids then gen_len MASKs, sampled on a grid of num_steps time steps of `schedule`,
        its tokens drawn by `sampler` from `generator`. Returns its slot."""
        length = len(prompt_ids) + gen_len
        if not self._free:
            raise RuntimeError(f"all {self.x.size(0)} rows are taken")
        if length > self.x.size(1) or gen_len < 1 or num_steps < 1:
            raise ValueError(f"a row of {len(prompt_ids)} + {gen_len} columns in {num_steps} steps does not fit "
                             f"{self.x.size(1)} columns")
        if self.shift and not prompt_ids:
            raise ValueError("a shifted model predicts each token from the column before it: give the row at "
                             "least one prompt token")
        slot = self._free.pop()
        row = torch.full((length,), self.mask_id, dtype=torch.long)
        row[:len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
        self.x[slot, :length] = row.to(self.device)
        self.todo[slot] = False
        self.todo[slot, len(prompt_ids):length] = True
        self.rows[slot] = _Row(generator, sampler, length, len(prompt_ids), gen_len, self._grid(schedule, num_steps),
                               num_steps)
        return slot

    def remove(self, slot: int) -> None:
        del self.rows[slot]
        self._free.append(slot)

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
        lengths = [self.rows[s].length for s in stale]
        groups = split(lengths) if (split is not None and len(stale) > 1) else [list(range(len(stale)))]
        self._calls = []
        for group in groups:
            if not group:
                continue
            slots, widths = [stale[i] for i in group], [lengths[i] for i in group]
            width = max(widths)
            padded = min(widths) < width
            self._calls.append(RowsCall(slots, self.x[torch.tensor(slots, device=self.device), :width],
                                        torch.tensor(widths, device=self.device) if padded else None))
        self.calls += len(self._calls)
        return self._calls

    def commit(self, hs: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """hs: the final hidden states (R, W, C) of each of prepare's calls. Commits the drawn tokens;
        returns (the rows that committed, the rows now finished), slots in order."""
        calls, self._calls = self._calls, []
        for call, h in zip(calls, hs):
            if self.h is None:
                self.h = h.new_zeros(self.x.size(0), self.x.size(1), h.size(-1))
            self.h[torch.tensor(call.slots, device=self.device), :h.size(1)] = align_predictions(h, self.shift)
            for s in call.slots:
                self.rows[s].fresh = True
                self.rows[s].nfe += 1
        slots = sorted(self.rows)  # after prepare, every row commits this step
        if not slots:
            return [], []
        by_sampler: dict[Sampler, list[int]] = {}  # rows with the same sampling knobs draw in one go
        for s in slots:
            by_sampler.setdefault(self.rows[s].sampler, []).append(s)
        for sampler, group in by_sampler.items():
            index = torch.tensor(group, device=self.device)
            chosen = self.chosen[index]  # (R, W)
            counts = chosen.sum(1).tolist()
            rows, cols = chosen.nonzero(as_tuple=True)  # row-major: each row's positions together, rows in order
            tokens, _ = predict_tokens(self.model, self.h[index[rows], cols], self.vocab_limit, sampler,
                                       [self.rows[s].generator for s in group], counts)
            self.x[index[rows], cols] = tokens
            self.todo[index[rows], cols] = False
        for s in slots:
            self.rows[s].fresh = self.rows[s].committing = False
        left = self.todo[torch.tensor(slots, device=self.device)].any(1).tolist()
        finished = [s for s, more in zip(slots, left) if not more]
        return slots, finished

    def generated(self, slots: list[int]) -> list[list[int]]:
        """Each row's generated ids so far (MASK where nothing is committed yet), one host copy for all."""
        if not slots:
            return []
        canvases = self.x[torch.tensor(slots, device=self.device)].tolist()
        return [c[self.rows[s].gen_start:self.rows[s].length] for s, c in zip(slots, canvases)]
