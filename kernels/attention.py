"""Attention with index-computed masks: one entry point, a PyTorch reference, a Triton kernel.

Every attention call in diffusionGPT goes through `attention(q, k, v, mask, impl)`.
The mask is never a T x T tensor handed in by the caller: it is described by `AttentionMask`
(kind + block size + per-sequence key padding + query offset) and computed from indices.

NOTE: the Triton kernel is added by the kernels issue; until then "triton" raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

MASK_KINDS = ("causal", "bidirectional", "block_causal")


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see, described by indices.

    kind:        "causal" (key j <= query position), "bidirectional" (all keys), or
                 "block_causal" (full attention inside a block of `block_size`, causal across blocks).
    block_size:  block length for "block_causal" (b=1 is causal, b>=T is bidirectional).
    key_lengths: (B,) int tensor; keys at index >= key_lengths[b] are padding (right padding).
    key_starts:  (B,) int tensor; keys at index < key_starts[b] are padding (left padding).
    q_offset:    absolute position of query 0 among the keys. With a KV cache the queries are the
                 last Tq of Tk keys, so q_offset = Tk - Tq. Only matters for causal / block_causal.
    """

    kind: str = "causal"
    block_size: int = 0
    key_lengths: Optional[torch.Tensor] = None
    key_starts: Optional[torch.Tensor] = None
    q_offset: int = 0

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"unknown attention mask kind {self.kind!r}; expected one of {MASK_KINDS}")
        if self.kind == "block_causal" and self.block_size < 1:
            raise ValueError("block_causal attention needs block_size >= 1")


def dense_mask(mask: AttentionMask, batch: int, tq: int, tk: int, device) -> torch.Tensor:
    """Materialise `mask` as a (B, 1, Tq, Tk) bool tensor, True = may attend. Reference only."""
    q_pos = torch.arange(tq, device=device)[:, None] + mask.q_offset  # (Tq, 1)
    k_pos = torch.arange(tk, device=device)[None, :]  # (1, Tk)
    if mask.kind == "causal":
        allowed = k_pos <= q_pos
    elif mask.kind == "block_causal":
        allowed = (k_pos // mask.block_size) <= (q_pos // mask.block_size)
    else:
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
    allowed = allowed[None, None].expand(batch, 1, tq, tk)  # (B, 1, Tq, Tk)
    if mask.key_lengths is not None:
        allowed = allowed & (k_pos[None, None] < mask.key_lengths.to(device).view(batch, 1, 1, 1))
    if mask.key_starts is not None:
        allowed = allowed & (k_pos[None, None] >= mask.key_starts.to(device).view(batch, 1, 1, 1))
    return allowed


def attention_reference(q, k, v, mask: AttentionMask, scale: Optional[float] = None) -> torch.Tensor:
    """Plain PyTorch attention: q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D).

    Uses SDPA with a materialised boolean mask (or its built-in causal path when that is exact).
    A query row whose keys are all masked (only possible with padding) returns zeros, not NaN.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    plain_causal = (mask.kind == "causal" and mask.q_offset == 0 and Tq == Tk
                    and mask.key_lengths is None and mask.key_starts is None)
    if plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if mask.kind == "bidirectional" and mask.key_lengths is None and mask.key_starts is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    allowed = dense_mask(mask, B, Tq, Tk, q.device)  # (B, 1, Tq, Tk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    # rows with no visible key come back as NaN from SDPA; they are padding queries, zero them
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


def attention(q, k, v, mask: AttentionMask, impl: str = "auto", scale: Optional[float] = None) -> torch.Tensor:
    """The one attention function of the project. impl: "auto" | "triton" | "torch".

    "auto" runs the Triton kernel on a CUDA device and the PyTorch reference elsewhere.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown attention impl {impl!r}; expected auto | triton | torch")
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "torch":
        return attention_reference(q, k, v, mask, scale)
    raise NotImplementedError("the Triton attention kernel is not implemented yet")
