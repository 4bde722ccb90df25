"""Commit rules: which of a step's candidate tokens a confidence-based decoder commits.

Every rule sees conf (R, T): the confidence of each still-masked position's proposed token, -inf where
nothing may be committed, and commits at least one token per row and step, so decoding terminates.
`rows` index the rule's per-row state (a region's total of masked tokens, per-row step budgets) and
`step` is each row's step within its region (its block). Used by `inference.confidence_rows.ConfidenceRows`,
whose rows (at steps of their own) share one rule object per rule and budget, its state indexed by slot.
"""
from __future__ import annotations

from typing import Optional

import torch


def select_most_confident(conf: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """conf (R, T) with -inf where no token may be committed, n (R,) -> (R, T) bool: the n[r] most
    confident candidates of each row (ties: the leftmost first)."""
    order = torch.argsort(conf, dim=1, descending=True, stable=True)  # (R, T)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(conf.size(1), device=conf.device).expand_as(order))
    return (ranks < n[:, None]) & torch.isfinite(conf)


class CommitTopK:
    """LLaDA low-confidence remasking: commit the k most confident masked tokens per step.

    tokens_per_step=k: k per step, so a region of L masked tokens takes exactly ceil(L / k) calls.
    steps=S:           the region's L tokens are spread evenly over min(S, L) steps (LLaDA's schedule:
                       L // S per step, one more in the first L % S steps).
    """

    def __init__(self, steps=None, tokens_per_step: Optional[int] = None):
        if (steps is None) == (tokens_per_step is None):
            raise ValueError("CommitTopK needs exactly one of steps / tokens_per_step")
        self.steps, self.k = steps, tokens_per_step  # steps: an int, or a (B,) tensor (one per row)
        self.total = None

    def begin(self, remaining: torch.Tensor) -> None:
        self.total = remaining.clone()  # (B,) masked tokens of each row in this region

    def choose(self, conf, rows, step):
        if self.k is not None:
            n = torch.full_like(step, self.k)
        else:
            total, steps = self.total[rows], _per_row(self.steps, rows)
            n = total // steps + (step < total % steps).long()
        return select_most_confident(conf, n.clamp(min=1))

    def with_steps(self, steps) -> "CommitTopK":
        return CommitTopK(steps=steps)


class CommitRandom(CommitTopK):
    """LLaDA's random remasking: commit k still-masked positions chosen uniformly at random per step
    (same k / steps budget as CommitTopK). With k = 1 this is exact sampling from the model: a masked
    diffusion model is an any-order autoregressive model, and drawing one token at a time in a random
    order samples its joint without the independence error of committing several tokens at once. That
    makes k = 1 the honest one-token-per-step baseline for every parallel rule."""

    def __init__(self, generator: torch.Generator, steps=None, tokens_per_step: Optional[int] = None):
        super().__init__(steps=steps, tokens_per_step=tokens_per_step)
        self.generator = generator

    def choose(self, conf, rows, step):
        return self.choose_by(torch.rand(conf.shape, generator=self.generator, device=conf.device), conf, rows, step)

    def choose_by(self, scores, conf, rows, step):
        """The choice for given uniform scores (R, T) (rows that draw from generators of their own)."""
        return super().choose(scores.masked_fill(~torch.isfinite(conf), float("-inf")), rows, step)

    def with_steps(self, steps) -> "CommitRandom":
        return CommitRandom(self.generator, steps=steps)


class CommitThreshold:
    """Fast-dLLM: commit every masked token whose confidence exceeds tau, and at least one per step
    (the most confident), so decoding always terminates. steps=S additionally caps the calls: a row
    with m masked tokens and r steps left commits at least ceil(m / r)."""

    def __init__(self, tau: float, steps=None):
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {tau}")
        self.tau, self.steps = tau, steps

    def begin(self, remaining: torch.Tensor) -> None:
        pass

    def choose(self, conf, rows, step):
        left = torch.isfinite(conf).sum(1)  # (R,)
        if self.steps is None:
            n_min = torch.ones_like(left)
        else:
            steps_left = (_per_row(self.steps, rows) - step).clamp(min=1)
            n_min = torch.ceil(left / steps_left).long().clamp(min=1)
        return (conf > self.tau) | select_most_confident(conf, n_min)

    def with_steps(self, steps) -> "CommitThreshold":
        return CommitThreshold(self.tau, steps=steps)


def _per_row(steps, rows):
    """A step budget that is one int for all rows or a (B,) tensor, for the rows being decoded."""
    return steps[rows] if isinstance(steps, torch.Tensor) else steps
