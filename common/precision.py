"""Which half precision a GPU computes in. One answer for training (ds_config, FSDP) and inference
(sample, serve, the decoding benchmark).

torch.cuda.is_bf16_supported() counts emulation by default: a V100 or T4 answers True and then runs bf16
through fp32 units, several times slower than fp16. Only GPUs with native bf16 (compute capability 8.0,
Ampere, and newer) get bf16 by default here; older ones get fp16 (with DeepSpeed's dynamic loss scaling
when training).
"""
from __future__ import annotations

import contextlib

import torch


def native_bf16(device: torch.device | str | None = None) -> bool:
    """True when `device` (default: the current CUDA device) computes bf16 natively; False without a GPU."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        return torch.cuda.is_bf16_supported(including_emulation=False)


def half_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The autocast dtype of dtype "auto" on a GPU: bf16 where it is native, else fp16."""
    return torch.bfloat16 if native_bf16(device) else torch.float16


def autocast(device: torch.device | str, dtype: str) -> contextlib.AbstractContextManager:
    """The context a model call runs in on `device` for a --dtype of auto | float32 | float64 | bfloat16 |
    float16: autocast to the half dtype on a GPU (auto: half_dtype()), nothing on CPU or in float32/64."""
    device = torch.device(device)
    if device.type != "cuda" or dtype in ("float32", "float64"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=half_dtype(device) if dtype == "auto" else getattr(torch, dtype))
