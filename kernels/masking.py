"""The diffusion forward process as one fused step: noised ids + per-token loss weight.

NOTE: the Triton kernel is added by the kernels issue; this is the PyTorch reference and dispatcher.
"""
from __future__ import annotations

from typing import Optional

import torch


def apply_diffusion_mask_reference(x0, mask_prob, loss_weight, mask_id: int, seed: int, maskable=None):
    """x0 (B, T) ids; mask_prob, loss_weight (B,) per sequence -> xt (B, T), token_weight (B, T).

    Each token is independently replaced by `mask_id` with probability mask_prob[b] (never where
    maskable is False); token_weight is loss_weight[b] where a token was masked, else 0.
    """
    gen = torch.Generator(device=x0.device).manual_seed(int(seed))
    u = torch.rand(x0.shape, generator=gen, device=x0.device)  # (B, T)
    masked = u < mask_prob.to(u.dtype).view(-1, 1)
    if maskable is not None:
        masked = masked & maskable
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    token_weight = masked.to(torch.float32) * loss_weight.to(torch.float32).view(-1, 1)
    return xt, token_weight


def apply_diffusion_mask(x0, mask_prob, loss_weight, mask_id: int, seed: int,
                         maskable: Optional[torch.Tensor] = None, impl: str = "auto"):
    """Dispatch: "auto" = Triton on CUDA, PyTorch elsewhere."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown masking impl {impl!r}; expected auto | triton | torch")
    if impl == "auto":
        impl = "triton" if x0.is_cuda else "torch"
    if impl == "torch":
        return apply_diffusion_mask_reference(x0, mask_prob, loss_weight, mask_id, seed, maskable)
    raise NotImplementedError("the Triton masking kernel is not implemented yet")
