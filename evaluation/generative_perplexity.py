"""Generative perplexity: how likely an AR judge model finds the generated text (lower = more fluent).

gen PPL = exp( sum over generated tokens of -log p_judge(token | prompt, earlier tokens) / #tokens ),
token-weighted over all requests. The judge reads the prompt as context but scores only the generated
tokens. When judge and generator share a tokenizer the generated ids are scored as they are;
otherwise the text is re-tokenised with the judge's tokenizer (e.g. a char model judged by GPT-2).
Caveat (as in the MDLM paper): repetitive text gets a low gen PPL, so read it beside the samples.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from models.diffusion import next_token_nll


@dataclass
class JudgeScore:
    perplexity: float
    nats_per_token: float
    num_tokens: int
    sequence_nats: list = field(default_factory=list)  # mean NLL of each scored completion (for error bars)

    def stderr_nats(self) -> float:
        """Standard error of nats_per_token across completions (0 with fewer than two). exp(+-2 SE)
        brackets the perplexity: two samplers whose PPLs differ by less than that are not told apart."""
        n = len(self.sequence_nats)
        if n < 2:
            return 0.0
        mean = sum(self.sequence_nats) / n
        return math.sqrt(sum((v - mean) ** 2 for v in self.sequence_nats) / (n - 1) / n)


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy in nats of the empirical token distribution of one sample (0 for a single repeated token)."""
    if not ids:
        return 0.0
    counts = torch.tensor(list(Counter(ids).values()), dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def same_tokenizer(a, b) -> bool:
    return a.to_meta() == b.to_meta()


def generative_perplexity(judge, judge_tokenizer, completions, generator_tokenizer=None,
                          batch_size: int = 8) -> JudgeScore:
    """Score `completions` (inference.api.Completion) under the AR model `judge`."""
    if judge.config.attention != "causal":
        raise ValueError("the judge must be an autoregressive (causal) model")
    share = generator_tokenizer is not None and same_tokenizer(judge_tokenizer, generator_tokenizer)
    ctx = judge.config.block_size
    seqs = []  # (ids, number of scored tokens at the end)
    for c in completions:
        gen = list(c.token_ids) if share else judge_tokenizer.encode(c.text)
        if not gen:
            continue
        prompt = list(c.prompt_ids) if share else judge_tokenizer.encode(c.prompt)
        ids = ([judge_tokenizer.eot_id] + prompt + gen)[-ctx:]  # EOT first: GPT-2's document start
        seqs.append((ids, min(len(gen), len(ids) - 1)))
    if not seqs:
        return JudgeScore(float("nan"), float("nan"), 0)
    device = next(judge.parameters()).device
    total_nll, total_tokens, per_sequence = 0.0, 0, []
    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            T = max(len(ids) for ids, _ in chunk)
            # right padding is invisible to real tokens under causal attention, so no mask is needed
            x = torch.full((len(chunk), T), judge_tokenizer.eot_id, dtype=torch.long)
            scored = torch.zeros(len(chunk), T, dtype=torch.bool)
            for r, (ids, n) in enumerate(chunk):
                x[r, :len(ids)] = torch.tensor(ids)
                scored[r, len(ids) - n:len(ids)] = True  # positions whose token is scored
            x, scored = x.to(device), scored.to(device)
            nll = next_token_nll(judge, x[:, :-1], x[:, 1:], judge_tokenizer.vocab_size)  # (B, T-1): i predicts i+1
            keep = scored[:, 1:].to(nll.dtype)
            total_nll += float((nll * keep).sum())
            total_tokens += int(keep.sum())
            per_sequence += ((nll * keep).sum(1) / keep.sum(1)).tolist()
    nats = total_nll / total_tokens
    return JudgeScore(math.exp(nats), nats, total_tokens, per_sequence)
