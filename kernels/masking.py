"""The masked-diffusion forward process as one fused kernel, with its PyTorch reference.

Given clean ids x0 (B, T) and, per sequence, the masking probability `mask_prob` = 1 - alpha(t)
and the loss weight (e.g. -alpha'(t) / (1 - alpha(t))), both computed by the caller from the noise
schedule in models/diffusion.py, one pass writes
    xt[b, i]           = mask_id          if token i is masked, else x0[b, i]
    token_weight[b, i] = loss_weight[b]   if token i is masked, else 0
where each token is masked independently with probability mask_prob[b], and never where
`maskable[b, i]` is False (prompt or padding tokens).

Randomness: the Triton kernel draws Philox numbers `tl.rand(seed, b * T + i)`; the reference draws
`torch.rand` from a `torch.Generator` seeded with `seed`. Each impl is deterministic for a seed,
but the two impls draw different masks for the same seed (same distribution). A token's draw (Philox on
(seed, flat token index), then one comparison) is the same on every GPU and for any launch grid; the kernel
runs on x0's device (kernels/launch.py), one program per 1,024 tokens on grid axis 0.
"""
from __future__ import annotations

import operator
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from kernels.launch import checked_grid, launch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK = 1024  # tokens per program


def _checked_inputs(x0, mask_prob, loss_weight, mask_id, seed, maskable):
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2:
        raise ValueError(f"x0 must be a (B, T) tensor of token ids; got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0)}")
    if x0.is_floating_point() or x0.is_complex() or x0.dtype == torch.bool:
        raise TypeError(f"x0 must hold integer token ids; got {x0.dtype}")
    B, T = x0.shape
    for name, t in (("mask_prob", mask_prob), ("loss_weight", loss_weight)):
        if not isinstance(t, torch.Tensor) or t.shape != (B,):
            raise ValueError(f"{name} must be a ({B},) tensor (one value per sequence); got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor; got {t.dtype}")
    if maskable is not None:
        if not isinstance(maskable, torch.Tensor) or maskable.shape != (B, T):
            raise ValueError(f"maskable must be a ({B}, {T}) bool tensor; got "
                             f"{tuple(maskable.shape) if isinstance(maskable, torch.Tensor) else type(maskable)}")
        if maskable.dtype != torch.bool:
            raise TypeError(f"maskable must be a bool tensor; got {maskable.dtype}")
    seed, mask_id = _as_int("seed", seed), _as_int("mask_id", mask_id)
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2**63); got {seed}")
    if not torch.iinfo(x0.dtype).min <= mask_id <= torch.iinfo(x0.dtype).max:
        raise ValueError(f"mask_id {mask_id} does not fit x0's dtype {x0.dtype}")
    # the per-sequence vectors and the maskable flags follow x0 (they are small or bool)
    mask_prob, loss_weight = mask_prob.to(x0.device), loss_weight.to(x0.device)
    maskable = maskable.to(x0.device) if maskable is not None else None
    return mask_prob, loss_weight, mask_id, seed, maskable


def _as_int(name, value) -> int:
    """Python / numpy / 0-d tensor integers -> int; anything else (bool, float) is an error."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer; got {type(value).__name__}") from None


def apply_diffusion_mask_reference(x0, mask_prob, loss_weight, mask_id: int, seed: int,
                                   maskable: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: x0 (B, T) ints -> (xt (B, T) same dtype as x0, token_weight (B, T) fp32)."""
    mask_prob, loss_weight, mask_id, seed, maskable = _checked_inputs(
        x0, mask_prob, loss_weight, mask_id, seed, maskable)
    gen = torch.Generator(device=x0.device).manual_seed(seed)
    u = torch.rand(x0.shape, generator=gen, device=x0.device)  # (B, T) uniform in [0, 1)
    masked = u < mask_prob.float()[:, None]
    if maskable is not None:
        masked = masked & maskable
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    token_weight = torch.where(masked, loss_weight.float()[:, None], torch.zeros((), device=x0.device))
    return xt, token_weight


if HAS_TRITON:

    @triton.jit
    def _diffusion_mask_kernel(X0, XT, WEIGHT, MASK_PROB, LOSS_WEIGHT, MASKABLE,
                               n_tokens, T, seed, mask_id,
                               HAS_MASKABLE: tl.constexpr, BLOCK: tl.constexpr):
        # flat token index over the (B, T) batch; Philox counter = that index, so a token's draw
        # depends only on (seed, b, i), not on the launch configuration
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < n_tokens
        b = offs // T
        x0 = tl.load(X0 + offs, mask=in_range, other=0)
        p = tl.load(MASK_PROB + b, mask=in_range, other=0.0).to(tl.float32)
        w = tl.load(LOSS_WEIGHT + b, mask=in_range, other=0.0).to(tl.float32)
        u = tl.rand(seed, offs.to(tl.uint32))  # counters wrap past 2**32 tokens (4G per call)
        masked = u < p
        if HAS_MASKABLE:
            masked = masked & (tl.load(MASKABLE + offs, mask=in_range, other=0) != 0)
        xt = tl.where(masked, mask_id, x0)
        tl.store(XT + offs, xt.to(XT.dtype.element_ty), mask=in_range)
        tl.store(WEIGHT + offs, tl.where(masked, w, 0.0), mask=in_range)


def masking_grid(n_tokens: int) -> tuple:
    """One program per _BLOCK tokens of the flattened (B, T) batch, on grid axis 0 (up to 2^31 - 1 programs)."""
    return checked_grid((-(-n_tokens // _BLOCK),), "diffusion-masking")


def _apply_diffusion_mask_triton(x0, mask_prob, loss_weight, mask_id, seed, maskable):
    mask_prob, loss_weight, mask_id, seed, maskable = _checked_inputs(
        x0, mask_prob, loss_weight, mask_id, seed, maskable)
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs triton installed")
    if not (x0.is_cuda or INTERPRET):
        raise RuntimeError("the Triton masking kernel needs CUDA tensors "
                           "(or TRITON_INTERPRET=1 for the CPU interpreter)")
    B, T = x0.shape
    x0 = x0.contiguous()
    xt = torch.empty_like(x0)
    token_weight = torch.empty((B, T), dtype=torch.float32, device=x0.device)
    n_tokens = B * T
    if n_tokens == 0:
        return xt, token_weight
    maskable_u8 = maskable.contiguous().view(torch.uint8) if maskable is not None else x0  # dummy if absent
    launch(
        _diffusion_mask_kernel, masking_grid(n_tokens),
        x0, xt, token_weight, mask_prob.contiguous(), loss_weight.contiguous(), maskable_u8,
        n_tokens, T, seed, mask_id,
        device_of=x0, HAS_MASKABLE=maskable is not None, BLOCK=_BLOCK,
    )
    return xt, token_weight


# --------------------------------------------------------------------------------------------
# First-use check (impl="auto"), as for the attention kernel (kernels/attention.py)
# --------------------------------------------------------------------------------------------
# The two impls draw different masks for one seed, so the check is not "equal outputs" but the contract
# both must keep, on a random problem of 4 rows x 1000 tokens (4 programs): mask_prob 0 masks nothing,
# mask_prob 1 masks every maskable token, xt is mask_id exactly where masked and x0 elsewhere, token_weight
# is loss_weight[b] where masked and 0 elsewhere, unmaskable tokens stay, the same seed gives the same
# draw, and the masked fraction at mask_prob 0.5 and 0.25 is within CHECK_SIGMAS standard deviations.
CHECK_SIGMAS = 6.0


@dataclass
class MaskingCheck:
    key: tuple
    ok: bool
    detail: str = ""


_MASKING_CHECKS: dict = {}  # (device, x0 dtype) -> MaskingCheck


def _kernel_device(x0) -> bool:
    """Whether "auto" may run the kernel on x0's device (CUDA). Tests point it at the interpreter."""
    return x0.is_cuda


def masking_checks() -> list[MaskingCheck]:
    """Every first-use check this process ran (bench/gpu_check.sh reports them)."""
    return list(_MASKING_CHECKS.values())


def check_masking_kernel(device: str, dtype: torch.dtype = torch.int64) -> MaskingCheck:
    """Run the Triton masking kernel on a small random problem and check the contract above. Never raises."""
    key = (device, dtype)
    mask_id = 7
    try:
        B, T = 4, 1000
        gen = torch.Generator().manual_seed(0)
        x0 = torch.randint(0, mask_id, (B, T), generator=gen).to(device, dtype)  # never the mask id itself
        mask_prob = torch.tensor([0.0, 1.0, 0.5, 0.25], device=device)
        loss_weight = torch.tensor([3.0, 5.0, 2.0, 4.0], device=device)
        maskable = (torch.rand(B, T, generator=gen) < 0.9).to(device)
        xt, weight = _apply_diffusion_mask_triton(x0, mask_prob, loss_weight, mask_id, 1234, maskable)
        again = _apply_diffusion_mask_triton(x0, mask_prob, loss_weight, mask_id, 1234, maskable)
        masked = xt == mask_id
        problems = []
        if xt.shape != x0.shape or xt.dtype != x0.dtype or weight.shape != (B, T) or weight.dtype != torch.float32:
            problems.append(f"outputs of shape/dtype {tuple(xt.shape)} {xt.dtype}, {tuple(weight.shape)} {weight.dtype}")
        else:
            if not torch.equal(torch.where(masked, x0, xt), x0):
                problems.append("xt differs from x0 at unmasked positions")
            if (masked & ~maskable).any():
                problems.append(f"{int((masked & ~maskable).sum())} unmaskable tokens were masked")
            if masked[0].any():
                problems.append(f"mask_prob 0 masked {int(masked[0].sum())} tokens")
            if not torch.equal(masked[1], maskable[1]):
                problems.append(f"mask_prob 1 masked {int(masked[1].sum())} of {int(maskable[1].sum())} maskable tokens")
            want_weight = torch.where(masked, loss_weight[:, None], torch.zeros((), device=device))
            if not torch.equal(weight, want_weight):
                problems.append(f"token_weight off by up to {float((weight - want_weight).abs().max()):.3g}")
            for b in (2, 3):
                n, p = int(maskable[b].sum()), float(mask_prob[b])
                frac = float(masked[b].sum()) / n
                if abs(frac - p) > CHECK_SIGMAS * (p * (1 - p) / n) ** 0.5:
                    problems.append(f"mask_prob {p} masked a fraction {frac:.3f} of {n} tokens")
            if not (torch.equal(again[0], xt) and torch.equal(again[1], weight)):
                problems.append("the same seed gave a different mask")
        if problems:
            return MaskingCheck(key, False, "; ".join(problems) + f" (random {B} x {T} problem)")
        return MaskingCheck(key, True)
    except Exception as exc:  # noqa: BLE001 - any failure of the kernel means: do not use it here
        return MaskingCheck(key, False, f"it raised {type(exc).__name__}: {str(exc)[:300]}")


@torch._disable_dynamo  # eagerly, once (see kernels/attention.py's _check_once); later calls read the verdict
def _check_once(device: str, dtype: torch.dtype) -> MaskingCheck:
    verdict = _MASKING_CHECKS.get((device, dtype))
    if verdict is None:
        verdict = _MASKING_CHECKS[(device, dtype)] = check_masking_kernel(device, dtype)
        if not verdict.ok:
            where = device
            if device.startswith("cuda") and torch.cuda.is_available():
                where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
            warnings.warn(
                f"diffusionGPT: the Triton diffusion-masking kernel broke its contract on its first use for "
                f"{str(dtype).replace('torch.', '')} token ids on {where}: {verdict.detail}. From now on "
                f"masking_impl='auto' uses the PyTorch reference there (correct, slower). Please report it (an "
                f"issue on the diffusionGPT repository with this message, the GPU name and the torch and triton "
                f"versions; `bash bench/gpu_check.sh OUT_DIR` collects all of it). masking_impl='triton' forces "
                f"the kernel, masking_impl='torch' skips it and this check.", RuntimeWarning, stacklevel=4)
    return verdict


def apply_diffusion_mask(x0, mask_prob, loss_weight, mask_id: int, seed: int,
                         maskable: Optional[torch.Tensor] = None,
                         impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Noise x0 (B, T) for masked diffusion -> (xt (B, T) like x0, token_weight (B, T) fp32).

    mask_prob (B,): probability 1 - alpha(t) of masking each token of sequence b.
    loss_weight (B,): weight of a masked token of sequence b in the loss (0 where unmasked).
    maskable (B, T) bool, optional: False = never mask (prompt, padding).
    impl: "auto" (Triton on CUDA once its first-use check passed there, PyTorch elsewhere) | "triton" | "torch".
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown masking impl {impl!r}; expected auto | triton | torch")
    if impl == "auto":
        impl = "triton" if _kernel_device(x0) and HAS_TRITON and _check_once(str(x0.device), x0.dtype).ok else "torch"
    if impl == "torch":
        return apply_diffusion_mask_reference(x0, mask_prob, loss_weight, mask_id, seed, maskable)
    return _apply_diffusion_mask_triton(x0, mask_prob, loss_weight, mask_id, seed, maskable)
