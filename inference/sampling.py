"""Turning final hidden states into tokens: vocabulary restriction, temperature, top-k, top-p.

Every decoding rule (diffusion and AR) picks its tokens through `predict_tokens`, so they all agree on
what "temperature 0" and "confidence" mean:
  temperature == 0   greedy: the argmax token; confidence = its softmax probability
  temperature > 0    logits / temperature, then top-k and top-p (nucleus) filtering, then one draw
                     (`inverse_cdf` of one uniform number); confidence = the probability of the drawn
                     token under that filtered distribution
Only the first `vocab_limit` rows of the output layer are used. For a diffusion model that limit is
the mask id, which is exactly SUBS (models.diffusion.subs_logits: MASK and the padding ids above it
get -inf), done by slicing so the padded rows cost nothing; for an AR model it keeps padding ids out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

# lm_head rows are applied to at most this many positions at once. One (chunk, V) fp32 tensor is
# 4096 x 50257 x 4 B = 0.82 GB with GPT-2's vocabulary, and sampling a chunk holds several at once (the
# logits, the scaled and filtered logits, the probabilities, their cumulative sum; top-p also sorts them
# and keeps the order as int64): a few GB at the peak on the device, counted from the code, not measured.
PREDICT_CHUNK = 4096


@dataclass(frozen=True)
class Sampler:
    temperature: float = 1.0
    top_k: Optional[int] = None  # keep the k most likely tokens (nanoGPT's --top_k); None = all
    top_p: Optional[float] = None  # nucleus: smallest set with probability >= top_p; None = all

    def __post_init__(self):
        if not math.isfinite(self.temperature):  # NaN would pass `< 0` and make every probability NaN
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Set the logits outside top-k / top-p to -inf. logits (N, V) -> (N, V); the argmax always survives."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked before it already hold top_p of the mass
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(logits: torch.Tensor, sampler: Sampler, generator, counts: Optional[list[int]] = None):
    """logits (N, V) -> tokens (N,) long, confidence (N,) float32 (see the module docstring).

    generator: one torch.Generator for every row, or (with counts) one per run of rows: rows
    [sum(counts[:i]), sum(counts[:i + 1])) draw from generator[i], as they would in a call of their own."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax, cumsum and sampling in at least fp32
    if sampler.temperature == 0:
        conf, tokens = F.softmax(logits, dim=-1).max(dim=-1)
        return tokens, conf
    logits = filter_logits(logits / sampler.temperature, sampler.top_k, sampler.top_p)
    probs = F.softmax(logits, dim=-1)  # (N, V)
    kw = dict(dtype=probs.dtype, device=probs.device)
    if counts is None:
        u = torch.rand(probs.size(0), generator=generator, **kw)  # (N,)
    else:  # one small draw per run, the rest of the sampling vectorised over every run
        u = torch.cat([torch.rand(n, generator=g, **kw) for n, g in zip(counts, generator)])
    tokens = inverse_cdf(probs, u)
    return tokens, probs.gather(1, tokens[:, None]).squeeze(1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (N, V), from uniform draws u (N,) in [0, 1): the first token whose
    cumulative probability exceeds u x the row's total. A token of probability 0 is never drawn (the
    cumulative sum does not rise there), and one uniform number per row is all the randomness it takes,
    so rows of many decodes are sampled in one operation, each from draws of its own generator."""
    cdf = probs.cumsum(dim=-1)  # (N, V)
    total = cdf[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # < total despite rounding
    # a row of NaN probabilities (a model whose output is not finite) finds no token: clamped to a real id, its
    # confidence stays NaN, and the caller fails that row alone (`RowSlots._sample`)
    index = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # (N,)
    return index.clamp(max=probs.size(-1) - 1)


def _chunks(n: int, generator, counts: Optional[list[int]]):
    """(start, stop, generator, counts) spans of at most PREDICT_CHUNK positions. With counts, a span holds
    whole runs, and a run longer than PREDICT_CHUNK is cut every PREDICT_CHUNK positions from its own
    start, as it is in a call of its own: each piece is one draw from its run's generator either way."""
    if counts is None:
        return [(s, min(s + PREDICT_CHUNK, n), generator, None) for s in range(0, n, PREDICT_CHUNK)]
    spans, start, size, runs, gens = [], 0, 0, [], []  # the open span: [start, start + size)
    for count, g in zip(counts, generator):
        for k in range(0, count, PREDICT_CHUNK):
            piece = min(PREDICT_CHUNK, count - k)
            if size + piece > PREDICT_CHUNK:
                spans.append((start, start + size, gens, runs))
                start, size, runs, gens = start + size, 0, [], []
            size, runs, gens = size + piece, runs + [piece], gens + [g]
    if runs:
        spans.append((start, start + size, gens, runs))
    return spans


def predict_tokens(model, h: torch.Tensor, vocab_limit: int, sampler: Sampler, generator,
                   counts: Optional[list[int]] = None):
    """Final hidden states h (N, C) -> tokens (N,), confidence (N,), through model.lm_head's first
    `vocab_limit` rows, in chunks so that N x V logits never sit in memory at once. generator / counts:
    one generator for all positions, or one per run of positions (`sample_from_logits`): the rows of many
    decodes predicted together, each drawing from its own generator exactly what it would draw alone."""
    weight = model.lm_head.weight[:vocab_limit]  # (V', C)
    bias = None if model.lm_head.bias is None else model.lm_head.bias[:vocab_limit]
    tokens, conf = [], []
    for start, stop, gen, runs in _chunks(h.size(0), generator, counts):
        logits = F.linear(h[start:stop], weight, bias)  # (n, V')
        t, c = sample_from_logits(logits, sampler, gen, runs)
        tokens.append(t)
        conf.append(c)
    if not tokens:
        return h.new_zeros(0, dtype=torch.long), h.new_zeros(0, dtype=torch.float32)
    return torch.cat(tokens), torch.cat(conf)
