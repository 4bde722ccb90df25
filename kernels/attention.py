"""Attention with index-computed masks: one entry point, a PyTorch reference, a Triton kernel.

Every attention call in diffusionGPT goes through `attention(q, k, v, mask, impl)`.
The mask is never a T x T tensor handed in by the caller: it is described by `AttentionMask`
(kind + diffusion block length + per-sequence key padding + query offset) and computed from indices.

The Triton kernel is FlashAttention-2 style: each program owns a tile of queries, walks the key
tiles with an online softmax and never holds a Tq x Tk matrix. The forward saves the log-sum-exp
per query row; the backward recomputes the probabilities tile by tile (one kernel for dK/dV that
walks query tiles, one for dQ that walks key tiles; no atomics). The mask is evaluated inside the
kernel from row/column indices, and key tiles that the mask hides completely are never visited:
the loop bounds start after the left padding and stop at the causal / block-causal frontier and at
the right padding. The block-diffusion mask (two disjoint visible key ranges per query tile) walks two
tile ranges, so it skips its fully masked tiles too.

Supported by the Triton path (impl="triton"):
  - dtypes fp32, fp16, bf16 (q, k, v all the same dtype); fp32 matmuls are exact IEEE unless
    `torch.backends.cuda.matmul.allow_tf32` is set, in which case they use TF32 like torch does;
  - head dims 1..128 (tuned for 32, 64, 128; other sizes are zero-padded to a power of two >= 16
    inside the kernel); larger head dims raise ValueError (impl="auto" falls back to the reference);
  - any Tq, Tk (odd lengths included), Tq != Tk with q_offset (KV cache), every `AttentionMask`;
  - query rows that see no key at all output 0, with zero (finite) gradients, like the reference.
Not supported: attention dropout (omitted on purpose: no model here uses it), grouped-query K/V
(k and v must have the same number of heads as q), gradients w.r.t. `scale` or the mask.

Launching (kernels/launch.py): each launch makes the tensors' GPU the current device (a model on cuda:1,
or one called from a thread that never chose a device, runs its kernels on its own GPU), stays within
CUDA's grid limits (`attention_grid`), and holds a process-wide lock, so the autotuner tunes each key once
even when threads launch together.

Where this is verified: on CPU every test runs the kernels in the Triton interpreter, with fixed tiles
and without the autotuner; the compiler's view (register spills, shared memory) of every kernel, autotune
config and dtype for sm_80 and sm_90 is checked without a GPU by `python -m bench.kernel_compile`. What only
a GPU shows (bf16 dots, autotuning, long sequences, two GPUs, huge grids) is bench/gpu_check.sh's.

Exact equalities: for identical inputs and tiles the kernels are deterministic (a fixed order of the sums,
no atomics). The project's bitwise equalities ("a row decodes the same batched as alone", "KV-cached
decoding gives the tokens of uncached decoding") hold on CPU in fp32 / fp64, where they are tested. On a
GPU they hold up to rounding only: the autotuner may time another tile best for another length bucket (a
row padded into a batch has a longer one), which sums the keys in another order, and bf16 / fp16 rounds
those differences up to ~1e-2 relative. The logits then agree within the dtype's tolerance (`CHECK_TOL`)
and a greedy or seeded choice between near-tied tokens may flip: on a GPU, compare logits within a stated
tolerance, not tokens.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kernels.launch import checked_grid, launch

try:  # Triton ships with CUDA builds of torch; without it only the reference is available
    import triton
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    Autotuner = None
    HAS_TRITON = False

MASK_KINDS = ("causal", "bidirectional", "block_causal", "block_diffusion")
MAX_TRITON_HEAD_DIM = 128  # larger heads would need smaller tiles than the configs below
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see, described by indices.

    kind:         "causal" (key j <= query position), "bidirectional" (all keys),
                  "block_causal" (full attention inside a block of `block_length`, causal across blocks),
                  or "block_diffusion": the BD3-LM training pass over [x_t ; x_0] (see `dense_mask`).
    block_length: the diffusion block b (GPTConfig.block_length) for "block_causal" (b=1 is causal,
                  b>=T is bidirectional) and "block_diffusion". Not the context (GPTConfig.block_size)
                  and not a Triton tile (BLOCK_M / BLOCK_N).
    key_lengths:  (B,) int tensor; keys at index >= key_lengths[b] are padding (right padding).
    key_starts:   (B,) int tensor; keys at index < key_starts[b] are padding (left padding).
    q_offset:     absolute position of query 0 among the keys. With a KV cache the queries are the
                  last Tq of Tk keys, so q_offset = Tk - Tq. Only matters for causal / block_causal.
    future_attention, future_seed: attention annealing (DiffuGPT; training only). Below 1, each pair of a
                  query and a key at a LATER position that `kind` lets it see stays visible with this
                  probability (one draw per pair, from future_seed; positions inside each half for
                  block_diffusion): 0 is causal, 1 is `kind` itself. Reference path only (see `attention`).
    """

    kind: str = "causal"
    block_length: int = 0
    key_lengths: Optional[torch.Tensor] = None
    key_starts: Optional[torch.Tensor] = None
    q_offset: int = 0
    future_attention: float = 1.0
    future_seed: int = 0

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"unknown attention mask kind {self.kind!r}; expected one of {MASK_KINDS}")
        if self.kind in ("block_causal", "block_diffusion") and self.block_length < 1:
            raise ValueError(f"{self.kind} attention needs block_length >= 1")
        if self.kind == "block_diffusion" and (self.key_lengths is not None or self.key_starts is not None
                                               or self.q_offset != 0):
            raise ValueError("block_diffusion attention is the training pass over [x_t ; x_0]: it takes no "
                             "key_lengths / key_starts padding and no q_offset (KV cache)")
        if not 0.0 <= self.future_attention <= 1.0:
            raise ValueError(f"future_attention is a probability in [0, 1]; got {self.future_attention}")


def check_block_diffusion_shape(mask: AttentionMask, tq: int, tk: int) -> None:
    """block_diffusion needs Tq == Tk = 2 L (x_t then x_0) with L a multiple of block_length."""
    if mask.kind != "block_diffusion":
        return
    if tq != tk or tk % 2 or (tk // 2) % mask.block_length:
        raise ValueError(f"block_diffusion attention needs Tq == Tk = 2 L (the noised then the clean sequence) "
                         f"with L a multiple of block_length={mask.block_length}; got Tq={tq}, Tk={tk}")


def dense_mask(mask: AttentionMask, batch: int, tq: int, tk: int, device) -> torch.Tensor:
    """Materialise `mask` as a (B, 1, Tq, Tk) bool tensor, True = may attend. Reference only.

    block_diffusion (BD3-LM's vectorised training pass): the input is [x_t ; x_0], half = L tokens each,
    both with positions 0..L-1. With qb, kb the block indices of query and key inside their half:
      x_t query -> x_t key  iff qb == kb   (its own noised block, all of it)
      x_t query -> x_0 key  iff kb <  qb   (the clean blocks before it)
      x_0 query -> x_0 key  iff kb <= qb   (block-causal over the clean sequence); never an x_t key.
    """
    check_block_diffusion_shape(mask, tq, tk)
    q_pos = torch.arange(tq, device=device)[:, None] + mask.q_offset  # (Tq, 1)
    k_pos = torch.arange(tk, device=device)[None, :]  # (1, Tk)
    if mask.kind == "causal":
        allowed = k_pos <= q_pos
    elif mask.kind == "block_causal":
        allowed = (k_pos // mask.block_length) <= (q_pos // mask.block_length)
    elif mask.kind == "block_diffusion":
        half = tk // 2
        q_xt, k_xt = q_pos < half, k_pos < half
        qb, kb = (q_pos % half) // mask.block_length, (k_pos % half) // mask.block_length
        allowed = torch.where(q_xt, torch.where(k_xt, qb == kb, kb < qb), ~k_xt & (kb <= qb))
    else:
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if mask.future_attention < 1.0:  # annealing: drop each later key with probability 1 - future_attention
        half = tk // 2 if mask.kind == "block_diffusion" else None
        later = (k_pos % half > q_pos % half) if half else (k_pos > q_pos)  # (Tq, Tk)
        gen = torch.Generator(device=device).manual_seed(int(mask.future_seed))
        drawn = torch.rand(tq, tk, generator=gen, device=device) < mask.future_attention
        allowed = allowed & (~later | drawn)
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
    unpadded = mask.key_lengths is None and mask.key_starts is None and mask.future_attention == 1.0
    if mask.kind == "causal" and mask.q_offset == 0 and Tq == Tk and unpadded:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if mask.kind == "bidirectional" and unpadded:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    allowed = dense_mask(mask, B, Tq, Tk, q.device)  # (B, 1, Tq, Tk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    # rows with no visible key come back as NaN from SDPA; they are padding queries, zero them
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))


def attention(q, k, v, mask: AttentionMask, impl: str = "auto", scale: Optional[float] = None) -> torch.Tensor:
    """The one attention function of the project. impl: "auto" | "triton" | "torch".

    "auto" runs the Triton kernel on a CUDA device and the PyTorch reference elsewhere; on CUDA it
    also falls back to the reference for inputs the kernel does not support (head dim > 128, a
    dtype other than fp32/fp16/bf16, Triton not installed), and for a case whose first-use check
    failed (`check_kernel`: the kernel disagreed with the reference here, warned once).
    "triton" never falls back and is never checked: unsupported inputs raise ValueError /
    TypeError / RuntimeError with the reason.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown attention impl {impl!r}; expected auto | triton | torch")
    if impl == "auto":
        impl = _auto_impl(q, k, v, mask)
    if impl == "torch":
        return attention_reference(q, k, v, mask, scale)
    return flash_attention(q, k, v, mask, scale)


# --------------------------------------------------------------------------------------------
# First-use check (impl="auto")
# --------------------------------------------------------------------------------------------
# "auto" trusts the kernel on a GPU only after it has agreed with the reference there once. On the first
# call of each case the kernel and the fp64 reference run a small random problem of the same kind
# (forward and backward, the same compiled variant: dtype, head dim, padding, KV-cache shape); a mismatch
# beyond CHECK_TOL, a NaN or an exception warns once, in words, and sends that case to the reference for
# the rest of the process. Tolerances (abs, rel) per dtype: twice the test suite's (rounding of P / dS to
# the input dtype before the second matmul), so rounding never trips the check and a wrong kernel, whose
# errors are O(1), always does. "tf32": fp32 inputs with torch.backends.cuda.matmul.allow_tf32.
CHECK_TOL = {torch.float32: (4e-5, 2e-4), "tf32": (1e-2, 1e-2), torch.float16: (1e-2, 2e-2),
             torch.bfloat16: (8e-2, 8e-2)}
REPORT_HINT = ("Please report it (an issue on the diffusionGPT repository with this message, the GPU name and "
               "`python -c \"import torch, triton; print(torch.__version__, triton.__version__)\"`; "
               "`bash bench/gpu_check.sh OUT_DIR` collects all of it). attn_impl='triton' forces the kernel, "
               "attn_impl='torch' skips it and this check.")


@dataclass
class KernelCheck:
    """The verdict of one first-use check: ok, and what differed (empty when ok)."""
    key: tuple
    ok: bool
    detail: str = ""


_KERNEL_CHECKS: dict = {}  # case key -> KernelCheck, filled on first use


def _kernel_device(q) -> bool:
    """Whether "auto" may run the kernel on q's device (CUDA). Tests point it at the interpreter."""
    return q.is_cuda


def _case_key(q, k, mask: AttentionMask) -> tuple:
    """What selects a compiled kernel variant: device, dtype, mask kind, head dim, padding, KV-cache shape."""
    return (str(q.device), q.dtype, mask.kind, q.shape[-1], mask.key_lengths is not None,
            mask.key_starts is not None, q.shape[2] != k.shape[2])


def _auto_impl(q, k, v, mask: AttentionMask) -> str:
    if not _kernel_device(q) or triton_unsupported_reason(q, k, v) is not None or mask.future_attention < 1.0:
        return "torch"  # (annealing masks are random per pair: the reference materialises them)
    key = _case_key(q, k, mask)
    verdict = _KERNEL_CHECKS.get(key)
    if verdict is None:
        verdict = _check_once(key, mask.block_length)
    return "triton" if verdict.ok else "torch"


def kernel_checks() -> list[KernelCheck]:
    """Every first-use check this process ran (bench/gpu_check.sh reports them)."""
    return list(_KERNEL_CHECKS.values())


def _check_problem(key: tuple, block_length: int, seed: int = 0):
    """A small random problem of the case `key`: (q, k, v, dout, mask) on the key's device."""
    device, dtype, kind, head_dim, has_len, has_start, kv_cache = key
    B, H = 2, 2
    if kind == "block_diffusion":
        half = block_length * max(1, math.ceil(64 / block_length))
        tq = tk = 2 * half
    else:
        tk = 150  # more than one tile, with a ragged last one
        tq = 37 if kv_cache else tk
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, t, head_dim, generator=gen).to(device, dtype) for t in (tq, tk, tk))
    dout = torch.randn(B, H, tq, head_dim, generator=gen).to(device, dtype)
    mask = AttentionMask(kind, block_length if kind in ("block_causal", "block_diffusion") else 0,
                         key_lengths=torch.tensor([tk, tk - 39], device=device) if has_len else None,
                         key_starts=torch.tensor([0, 7], device=device) if has_start else None,
                         q_offset=tk - tq)
    return q, k, v, dout, mask


def check_kernel(key: tuple, block_length: int = 16) -> KernelCheck:
    """Run the kernel and the fp64 reference on `_check_problem(key)`; forward output and dq/dk/dv must
    agree within CHECK_TOL. Never raises: an exception in the kernel is a failed check."""
    dtype = key[1]
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET
    atol, rtol = CHECK_TOL["tf32" if tf32 else dtype]
    device_type = torch.device(key[0]).type
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            q, k, v, dout, mask = _check_problem(key, block_length)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = flash_attention(*leaves, mask)
            out.backward(dout)
            ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
            ref = attention_reference(*ref_leaves, mask)
            ref.backward(dout.double())
            worst = None  # (excess over the tolerance, name, max abs error)
            for name, got, want in (("forward output", out, ref), ("dq", leaves[0].grad, ref_leaves[0].grad),
                                    ("dk", leaves[1].grad, ref_leaves[1].grad),
                                    ("dv", leaves[2].grad, ref_leaves[2].grad)):
                got, want = got.detach().double(), want.detach()
                if not torch.isfinite(got).all():
                    worst = (math.inf, name, math.nan)
                    break
                err = (got - want).abs()
                excess = float((err - atol - rtol * want.abs()).max())
                if excess > 0 and (worst is None or excess > worst[0]):
                    worst = (excess, name, float(err.max()))
        if worst is None:
            return KernelCheck(key, True)
        _, name, max_err = worst
        what = (f"its {name} had NaN/inf" if math.isnan(max_err) else
                f"its {name} was off by up to {max_err:.3g} (tolerance {atol:g} + {rtol:g} x |reference|)")
        return KernelCheck(key, False, f"{what} on a random {tuple(q.shape)} x {tuple(k.shape)} problem")
    except Exception as exc:  # noqa: BLE001 - any failure of the kernel means: do not use it here
        return KernelCheck(key, False, f"it raised {type(exc).__name__}: {str(exc)[:300]}")


def _describe(key: tuple) -> str:
    device, dtype, kind, head_dim, has_len, has_start, kv_cache = key
    extras = [w for w, on in (("key padding (right)", has_len), ("key padding (left)", has_start),
                              ("a KV cache", kv_cache)) if on]
    where = device
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return (f"{kind} attention in {str(dtype).replace('torch.', '')}, head dim {head_dim}"
            + (f", with {' and '.join(extras)}" if extras else "") + f", on {where}")


# runs eagerly once (a compiled caller graph-breaks here, then reads the verdict). torch._disable_dynamo is
# torch.compiler.disable applied at the first call: the decorator imports torch._dynamo (~1.5 s of CPU), which
# every process that imports the kernels would pay at import, compiling or not.
@torch._disable_dynamo
def _check_once(key: tuple, block_length: int) -> KernelCheck:
    verdict = _KERNEL_CHECKS.get(key)
    if verdict is None:
        verdict = _KERNEL_CHECKS[key] = check_kernel(key, max(block_length, 1))
        if not verdict.ok:
            warnings.warn(
                f"diffusionGPT: the Triton attention kernel disagreed with the PyTorch reference on its first "
                f"use for {_describe(key)}: {verdict.detail}. From now on attn_impl='auto' uses the reference "
                f"for this case (correct, slower). {REPORT_HINT}", RuntimeWarning, stacklevel=4)
    return verdict


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

# The interpreter (TRITON_INTERPRET=1, CPU tests) runs every program in Python: it cannot autotune
# several configs and its cost grows with programs x loop steps, so it gets one fixed tile size.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETER_BLOCK_M = 64  # tests may lower these to exercise more tiles with short sequences
INTERPRETER_BLOCK_N = 64
_LOG2E = 1.4426950408889634
_KIND_CODE = {"bidirectional": 0, "causal": 1, "block_causal": 2, "block_diffusion": 3}


def triton_unsupported_reason(q, k, v) -> Optional[str]:
    """Why the Triton kernel cannot run these inputs (None = it can). Shape errors are not
    reasons to fall back: `flash_attention` reports them."""
    error = _support_error(q)
    return None if error is None else str(error)


def _support_error(q) -> Optional[Exception]:
    if not HAS_TRITON:
        return RuntimeError("triton is not installed")
    if q.dtype not in TRITON_DTYPES:
        return TypeError(f"dtype {q.dtype} is not one of fp32/fp16/bf16")
    if q.dim() == 4 and q.shape[-1] > MAX_TRITON_HEAD_DIM:
        return ValueError(f"head dim {q.shape[-1]} > {MAX_TRITON_HEAD_DIM}")
    if not (q.is_cuda or INTERPRET):
        return RuntimeError("the kernel needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return None


def _check_inputs(q, k, v, mask: AttentionMask):
    """Raise a clear error for every input the kernel would otherwise misread."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, T, D); got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    B, H, Tq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, H, Tk, D) = ({B}, {H}, Tk, {D}); "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    error = _support_error(q)
    if error is not None:
        raise type(error)(f"the Triton attention kernel cannot run this input: {error}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        # row offsets inside one (batch, head) slice are int32 in the kernel
        if t.shape[2] * max(t.stride(2), 1) + t.shape[3] * max(t.stride(3), 1) >= 2 ** 31:
            raise ValueError(f"{name} is too long for the kernel's int32 row offsets: shape "
                             f"{tuple(t.shape)}, strides {t.stride()}")
    if mask.q_offset < 0:
        raise ValueError(f"q_offset must be >= 0; got {mask.q_offset}")
    if mask.future_attention < 1.0:
        raise ValueError("the Triton kernel has no annealing mask (future_attention < 1): use impl='torch' or "
                         "'auto' (which routes it to the PyTorch reference)")
    check_block_diffusion_shape(mask, Tq, k.shape[2])
    for name, t in (("key_lengths", mask.key_lengths), ("key_starts", mask.key_starts)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (B,):
            raise ValueError(f"mask.{name} must be a ({B},) tensor; got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"mask.{name} must be an integer tensor; got {t.dtype}")


def _key_bound_tensor(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(B,) int32 on the kernel's device; a 1-element dummy when absent (never read)."""
    if t is None:
        return torch.zeros(1, dtype=torch.int32, device=like.device)
    lo, hi = torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max
    return t.to(device=like.device).clamp(lo, hi).to(torch.int32).contiguous()


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # any strides work, but rows must be contiguous for coalesced (vectorised) loads
    return t if t.stride(-1) == 1 else t.contiguous()


def _bucket(n: int) -> int:
    """Autotune key for a length: retune per power of two, not per length (KV-cache decoding
    changes Tk every step)."""
    return 1 << max(n - 1, 0).bit_length()


if HAS_TRITON:

    def _config_key(config):
        # by value, not id(): torch.compile hands the pruner copies of the configs
        return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages

    def without_spills(configs, spilled_bytes):
        """The configs that compile without register spills (spilled_bytes(config): bytes of local memory per
        thread, inf when it cannot run at all); when every one spills, the least-spilling ones (never none)."""
        spilled = [spilled_bytes(c) for c in configs]
        least = min(spilled)
        if least == math.inf:
            return list(configs)  # nothing compiles: the autotuner's own timing reports why
        return [c for c, n in zip(configs, spilled) if n == least]

    def _spilled_bytes(kernel, config, named_args, kwargs) -> float:
        """Local memory (register spills) per thread of `kernel` compiled with `config` for the current GPU;
        inf when it cannot be loaded there (shared memory, threads) or does not compile."""
        args = [named_args[name] for name in kernel.arg_names if name in named_args]
        launch_kwargs = {k: v for k, v in kwargs.items() if k != "warmup"}
        try:
            compiled = kernel.warmup(*args, **launch_kwargs, **config.all_kwargs())
            compiled.run  # loads it on the GPU: raises when its shared memory or threads do not fit
            return 4 * compiled.n_spills  # the driver reports spilled 4-byte registers
        except Exception:  # noqa: BLE001 - such a config is simply not a candidate
            return math.inf

    def _tuned(table, key):
        """Autotune on a GPU over `table` = [(BLOCK_M, BLOCK_N, warps, stages, largest head dim)];
        a plain kernel in the interpreter (tile sizes passed by the caller).

        Before timing, the pruner keeps the configs that can be fast for the call: the head-dim caps and the
        exact-fp32 rule below drop tiles that cannot fit in registers; configs whose tiles exceed the
        (bucketed) lengths go too (few queries when decoding with a KV cache). Then, on a GPU, it compiles
        what is left for that GPU (the autotuner would compile each config to time it anyway) and drops the
        configs that spill registers or do not fit in its shared memory, keeping the least-spilling ones
        only when all do: which configs spill depends on the architecture, the dtype and the mask, and
        `python -m bench.kernel_compile` measures it for sm_80 and sm_90 without a GPU, failing when some
        case would be left with spilling configs only."""
        max_head_dim = {}
        configs = []
        for bm, bn, warps, stages, max_d in table:
            config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            max_head_dim[_config_key(config)] = max_d
            configs.append(config)

        def prune(configs, named_args, kernel=None, **kwargs):
            """The configs worth timing (`kernel`: the jitted function, to compile them on a GPU)."""
            head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
            tq = max(16, named_args["TQ_BUCKET"])
            tk = max(16, named_args["TK_BUCKET"])
            fits = [c for c in configs if head_dim <= max_head_dim.get(_config_key(c), MAX_TRITON_HEAD_DIM)]
            q = named_args.get("Q")
            if getattr(q, "dtype", None) == torch.float32 and kwargs.get("INPUT_PRECISION") == "ieee":
                # exact fp32 dots run on FMA units with register-hungry tiles: only small tiles
                # can compile without spills (2048 elements at head dim 64, measured with ptxas)
                fits = [c for c in fits if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * head_dim <= 2048 * 64]
            fits = fits or list(configs)
            short = [c for c in fits if c.kwargs["BLOCK_M"] <= tq and c.kwargs["BLOCK_N"] <= tk]
            if not short:
                smallest = min(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in fits)
                short = [c for c in fits if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == smallest]
            if kernel is None or not getattr(q, "is_cuda", False) or torch.compiler.is_compiling():
                return short
            return without_spills(short, lambda c: _spilled_bytes(kernel, c, named_args, kwargs))

        def autotune(fn, do_bench=None):
            return triton.autotune(configs=configs, key=key, do_bench=do_bench,
                                   prune_configs_by={"early_config_prune": functools.partial(prune, kernel=fn)})(fn)

        def wrap(fn):
            return fn if INTERPRET else autotune(fn)
        # for tests (an autotuner over a stand-in kernel and clock) and the offline compile check
        wrap.configs, wrap.prune, wrap.autotune = configs, prune, autotune
        return wrap

    # What a tuned config depends on. Triton adds the tensors' dtypes itself. INPUT_PRECISION: a tile timed
    # with TF32 dots must not be reused for exact fp32 ones, which the pruner limits to small tiles.
    _TUNE_KEY = ["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "KIND", "HAS_LEN", "HAS_START", "INPUT_PRECISION"]
    _FWD_TUNING = _tuned([  # BLOCK_M queries per program, BLOCK_N keys per step
        (128, 64, 4, 3, 64), (128, 64, 8, 3, 128), (128, 128, 8, 3, 64), (128, 32, 8, 3, 128),
        (64, 64, 4, 3, 64), (64, 64, 8, 3, 128), (64, 32, 4, 4, 128), (32, 32, 4, 2, 128),
        (16, 64, 4, 3, 128), (16, 128, 4, 3, 128),  # few queries: KV-cache decoding
        (16, 64, 8, 2, 128),  # exact fp32 at head dim 128: a tile that spills on neither sm_80 nor sm_90
    ], _TUNE_KEY)
    _BWD_DKDV_TUNING = _tuned([  # BLOCK_N keys per program, BLOCK_M queries per step
        (32, 128, 8, 3, 64), (64, 128, 8, 3, 64), (32, 64, 4, 3, 64), (32, 64, 8, 3, 128),
        (64, 64, 8, 3, 128), (32, 32, 4, 3, 128), (16, 64, 4, 2, 64),
        (32, 32, 8, 2, 128), (16, 32, 8, 2, 128),  # head dim 128 on sm_80 and exact fp32: the others spill
    ], _TUNE_KEY)
    _BWD_DQ_TUNING = _tuned([  # BLOCK_M queries per program, BLOCK_N keys per step
        (128, 32, 8, 3, 64), (128, 64, 8, 3, 64), (64, 64, 8, 3, 128), (64, 32, 8, 3, 128),
        (64, 32, 4, 3, 64), (32, 32, 4, 3, 128), (64, 16, 4, 2, 64),
        (32, 32, 8, 2, 128),  # head dim 128 on sm_80 and exact fp32: the others spill
    ], _TUNE_KEY)

    @triton.jit
    def _key_bounds(KEY_LEN, KEY_START, b, TK, HAS_LEN: tl.constexpr, HAS_START: tl.constexpr):
        """[kv_start, kv_end): the keys of sequence b that are not padding."""
        kv_end = TK + 0 * b
        if HAS_LEN:
            kv_end = tl.minimum(tl.load(KEY_LEN + b), kv_end)
        kv_start = 0 * b
        if HAS_START:
            kv_start = tl.maximum(tl.load(KEY_START + b), kv_start)
        return kv_start, kv_end

    @triton.jit
    def _visible(q_pos, k_pos, kv_start, kv_end, block_length, half, KIND: tl.constexpr):
        """Mask from indices: q_pos (M, 1) absolute query positions, k_pos (1, N) key indices (or the
        transpose). half = Tk // 2, read by block_diffusion only."""
        ok = (k_pos >= kv_start) & (k_pos < kv_end)
        if KIND == 1:  # causal
            ok = ok & (k_pos <= q_pos)
        elif KIND == 2:  # block-causal: whole blocks visible, causal across blocks
            ok = ok & ((k_pos // block_length) <= (q_pos // block_length))
        elif KIND == 3:  # block diffusion over [x_t ; x_0] (dense_mask states the rule)
            q_xt = q_pos < half
            k_xt = k_pos < half
            qb = tl.where(q_xt, q_pos, q_pos - half) // block_length
            kb = tl.where(k_xt, k_pos, k_pos - half) // block_length
            ok = ok & tl.where(q_xt, tl.where(k_xt, qb == kb, kb < qb), (k_pos >= half) & (kb <= qb))
        return ok

    @triton.jit
    def _key_tile_range(start_m, TQ, q_offset, kv_start, kv_end, block_length,
                        KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Key range [lo, hi) a query tile must visit; tiles outside it are fully masked."""
        lo = (kv_start // BLOCK_N) * BLOCK_N  # skip whole tiles of left padding
        hi = kv_end  # stop at the right padding
        last_q = tl.minimum(start_m + BLOCK_M, TQ) - 1 + q_offset  # last query position in the tile
        if KIND == 1:
            hi = tl.minimum(hi, last_q + 1)
        elif KIND == 2:
            hi = tl.minimum(hi, (last_q // block_length + 1) * block_length)
        elif KIND == 3:
            # block diffusion (no padding, q_offset 0): this is the x_t-key range, the blocks of the
            # tile's x_t queries; the x_0 keys are the second range (_clean_key_tile_range)
            half = TQ // 2
            last_t = tl.minimum(last_q, half - 1)
            has_xt = start_m < half
            lo = tl.where(has_xt, ((start_m // block_length) * block_length // BLOCK_N) * BLOCK_N, 0)
            hi = tl.where(has_xt, (last_t // block_length + 1) * block_length, 0)
        hi = tl.where(hi <= kv_start, lo, hi)  # nothing visible (e.g. all left padding): no tile
        return lo, hi

    @triton.jit
    def _clean_key_tile_range(start_m, TQ, block_length, hi_first,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """block_diffusion only: the x_0 keys [half, half + n) a query tile sees, as a tile range that
        starts after the tiles the first range [.., hi_first) already visited (one tile may hold the
        last x_t keys and the first x_0 keys when half is not a multiple of BLOCK_N)."""
        half = TQ // 2
        last_q = tl.minimum(start_m + BLOCK_M, TQ) - 1
        # x_t queries see the clean blocks before their own; x_0 queries see their own clean block too
        n_t = tl.where(start_m < half, (tl.minimum(last_q, half - 1) // block_length) * block_length, 0)
        n_0 = tl.where(last_q >= half, ((last_q - half) // block_length + 1) * block_length, 0)
        n = tl.maximum(n_t, n_0)
        lo = tl.maximum((half // BLOCK_N) * BLOCK_N, ((hi_first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
        hi = tl.where(n > 0, half + n, lo)
        return lo, tl.maximum(hi, lo)

    @triton.jit
    def _query_tile_range(start_n, TQ, q_offset, kv_start, kv_end, block_length,
                          KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Query range [lo, hi) that can see some key of the tile [start_n, start_n + BLOCK_N)."""
        first_k = tl.maximum(start_n, kv_start)  # first key of the tile that is not padding
        first_q = 0 * start_n  # first query index (not position) that sees key first_k
        if KIND == 1:
            first_q = first_k - q_offset
        elif KIND == 2:
            first_q = (first_k // block_length) * block_length - q_offset
        lo = (tl.maximum(first_q, 0) // BLOCK_M) * BLOCK_M
        padding_only = first_k >= tl.minimum(start_n + BLOCK_N, kv_end)
        hi = tl.where(padding_only, 0, TQ)
        if KIND == 3:
            # block diffusion (no padding): this is the x_t-query range. An x_t key is seen by the x_t
            # queries of its block, an x_0 key by the x_t queries of later blocks; both end at half
            # when the tile holds both kinds, so their union is one range. x_0 queries: second range.
            half = TQ // 2
            last_k = tl.minimum(start_n + BLOCK_N, TQ) - 1
            has_kt = start_n < half
            first_k0 = tl.maximum(start_n, half) - half
            lo_0 = (first_k0 // block_length + 1) * block_length  # x_t queries that see x_0 key first_k0
            has_k0 = (last_k >= half) & (lo_0 < half)
            q_lo = tl.minimum(tl.where(has_kt, (start_n // block_length) * block_length, half),
                              tl.where(has_k0, lo_0, half))
            q_hi = tl.maximum(tl.where(has_kt, (tl.minimum(last_k, half - 1) // block_length + 1) * block_length, 0),
                              tl.where(has_k0, half, 0))
            lo = tl.where(q_hi > q_lo, (q_lo // BLOCK_M) * BLOCK_M, 0)
            hi = tl.where(q_hi > q_lo, q_hi, 0)
        return lo, hi

    @triton.jit
    def _clean_query_tile_range(start_n, TQ, block_length, hi_first,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """block_diffusion only: the x_0 queries [half + kb * b, 2 half) that see some x_0 key of the
        tile (kb = block of its first x_0 key), after the tiles the first range already visited."""
        half = TQ // 2
        last_k = tl.minimum(start_n + BLOCK_N, TQ) - 1
        first_k0 = tl.maximum(start_n, half) - half
        q_lo = half + (first_k0 // block_length) * block_length
        lo = tl.maximum((q_lo // BLOCK_M) * BLOCK_M, ((hi_first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        hi = tl.where(last_k >= half, TQ, lo)
        return lo, tl.maximum(hi, lo)

    @triton.jit
    def _fwd_tile(acc, l_i, m_i, q, K, V, start_n, q_pos, offs_d, d_ok, TK, kv_start, kv_end, block_length,
                  qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd,
                  KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
        """One key tile of the forward's online softmax (in base 2): m_i running max of the scaled
        logits, l_i running denominator, acc running numerator."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < TK
        kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, kT, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        ok = _visible(q_pos, offs_n[None, :], kv_start, kv_end, block_length, TK // 2, KIND)
        s = tl.where(ok, qk * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 there, not -inf,
        # so exp2 gives 0 instead of NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        return acc, l_i, m_new

    @triton.jit
    def _dkdv_tile(dk, dv, k, v, k_idx, Q, DO, LSE, DELTA, start_m, offs_d, d_ok, TQ, TK, q_offset,
                   kv_start, kv_end, block_length, qk_scale_log2, stride_qm, stride_qd, stride_dom, stride_dod,
                   KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
        """One query tile's contribution to dK and dV of this program's key tile (transposed scores)."""
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < TQ
        qT = tl.load(Q + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_M)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        qkT = tl.dot(k, qT, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ok = _visible((offs_m + q_offset)[None, :], k_idx, kv_start, kv_end, block_length, TK // 2, KIND)
        ok = ok & m_ok[None, :]
        pT = tl.where(ok, tl.exp2(qkT * qk_scale_log2 - lse[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=INPUT_PRECISION)
        return dk, dv

    @triton.jit
    def _dq_tile(dq, q, do, lse, delta, K, V, start_n, q_pos, offs_d, d_ok, TK, kv_start, kv_end, block_length,
                 qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd,
                 KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
        """One key tile's contribution to dQ of this program's query tile."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < TK
        dn_ok = d_ok[:, None] & n_ok[None, :]
        kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=dn_ok, other=0.0)
        vT = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=dn_ok, other=0.0)
        qk = tl.dot(q, kT, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ok = _visible(q_pos, offs_n[None, :], kv_start, kv_end, block_length, TK // 2, KIND)
        p = tl.where(ok, tl.exp2(qk * qk_scale_log2 - lse[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=INPUT_PRECISION)
        return dq

    @_FWD_TUNING
    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, KEY_LEN, KEY_START,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        H, TQ, TK, q_offset, block_length, qk_scale_log2,
        TQ_BUCKET, TK_BUCKET,  # autotune keys only
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KIND: tl.constexpr,
        HAS_LEN: tl.constexpr, HAS_START: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M  # the grid of `attention_grid`: (tiles, heads, batch)
        h = tl.program_id(1)
        b = tl.program_id(2)
        bh = b * H + h
        Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        LSE += bh.to(tl.int64) * TQ

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        m_ok = offs_m < TQ
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        q_pos = (offs_m + q_offset)[:, None]  # (BLOCK_M, 1)

        kv_start, kv_end = _key_bounds(KEY_LEN, KEY_START, b, TK, HAS_LEN, HAS_START)
        lo, hi = _key_tile_range(start_m, TQ, q_offset, kv_start, kv_end, block_length,
                                 KIND, BLOCK_M, BLOCK_N)

        # online softmax in base 2: m_i running max of the scaled logits, l_i running denominator
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, start_n, q_pos, offs_d, d_ok, TK, kv_start, kv_end,
                                      block_length, qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd,
                                      KIND, INPUT_PRECISION, BLOCK_N)
        if KIND == 3:  # block diffusion: the clean (x_0) keys are a second, disjoint range
            lo2, hi2 = _clean_key_tile_range(start_m, TQ, block_length, hi, BLOCK_M, BLOCK_N)
            for start_n in range(lo2, hi2, BLOCK_N):
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, start_n, q_pos, offs_d, d_ok, TK, kv_start,
                                          kv_end, block_length, qk_scale_log2, stride_kn, stride_kd, stride_vn,
                                          stride_vd, KIND, INPUT_PRECISION, BLOCK_N)

        empty = l_i == 0.0  # no visible key: output 0 (acc is 0 there), lse = +inf so p = 0
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 o.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE + offs_m, lse, mask=m_ok)

    @_BWD_DKDV_TUNING
    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, KEY_LEN, KEY_START,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # dk and dv share a layout
        H, TQ, TK, q_offset, block_length, sm_scale, qk_scale_log2,
        TQ_BUCKET, TK_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KIND: tl.constexpr,
        HAS_LEN: tl.constexpr, HAS_START: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        start_n = tl.program_id(0) * BLOCK_N  # the grid of `attention_grid`: (tiles, heads, batch)
        h = tl.program_id(1)
        b = tl.program_id(2)
        bh = b * H + h
        Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        DK += b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
        DV += b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
        LSE += bh.to(tl.int64) * TQ
        DELTA += bh.to(tl.int64) * TQ

        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        n_ok = offs_n < TK
        nd_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=nd_ok, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=nd_ok, other=0.0)
        k_idx = offs_n[:, None]  # (BLOCK_N, 1): this kernel works on transposed scores (keys x queries)

        kv_start, kv_end = _key_bounds(KEY_LEN, KEY_START, b, TK, HAS_LEN, HAS_START)
        lo, hi = _query_tile_range(start_n, TQ, q_offset, kv_start, kv_end, block_length,
                                   KIND, BLOCK_M, BLOCK_N)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for start_m in range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, k_idx, Q, DO, LSE, DELTA, start_m, offs_d, d_ok, TQ, TK, q_offset,
                                kv_start, kv_end, block_length, qk_scale_log2, stride_qm, stride_qd, stride_dom,
                                stride_dod, KIND, INPUT_PRECISION, BLOCK_M)
        if KIND == 3:  # block diffusion: the clean (x_0) queries are a second, disjoint range
            lo2, hi2 = _clean_query_tile_range(start_n, TQ, block_length, hi, BLOCK_M, BLOCK_N)
            for start_m in range(lo2, hi2, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, k_idx, Q, DO, LSE, DELTA, start_m, offs_d, d_ok, TQ, TK,
                                    q_offset, kv_start, kv_end, block_length, qk_scale_log2, stride_qm, stride_qd,
                                    stride_dom, stride_dod, KIND, INPUT_PRECISION, BLOCK_M)
        dk = dk * sm_scale
        tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=nd_ok)
        tl.store(DV + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 dv.to(DV.dtype.element_ty), mask=nd_ok)

    @_BWD_DQ_TUNING
    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, KEY_LEN, KEY_START,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        H, TQ, TK, q_offset, block_length, sm_scale, qk_scale_log2,
        TQ_BUCKET, TK_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KIND: tl.constexpr,
        HAS_LEN: tl.constexpr, HAS_START: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M  # the grid of `attention_grid`: (tiles, heads, batch)
        h = tl.program_id(1)
        b = tl.program_id(2)
        bh = b * H + h
        Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
        LSE += bh.to(tl.int64) * TQ
        DELTA += bh.to(tl.int64) * TQ

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        m_ok = offs_m < TQ
        md_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=md_ok, other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=md_ok, other=0.0)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        q_pos = (offs_m + q_offset)[:, None]

        kv_start, kv_end = _key_bounds(KEY_LEN, KEY_START, b, TK, HAS_LEN, HAS_START)
        lo, hi = _key_tile_range(start_m, TQ, q_offset, kv_start, kv_end, block_length,
                                 KIND, BLOCK_M, BLOCK_N)
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, K, V, start_n, q_pos, offs_d, d_ok, TK, kv_start, kv_end,
                          block_length, qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd,
                          KIND, INPUT_PRECISION, BLOCK_N)
        if KIND == 3:  # block diffusion: the clean (x_0) keys are a second, disjoint range
            lo2, hi2 = _clean_key_tile_range(start_m, TQ, block_length, hi, BLOCK_M, BLOCK_N)
            for start_n in range(lo2, hi2, BLOCK_N):
                dq = _dq_tile(dq, q, do, lse, delta, K, V, start_n, q_pos, offs_d, d_ok, TK, kv_start, kv_end,
                              block_length, qk_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd,
                              KIND, INPUT_PRECISION, BLOCK_N)
        dq = dq * sm_scale
        tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=md_ok)


def attention_grid(batch: int, heads: int, length: int, tile: int) -> tuple:
    """The launch grid of the three kernels: (tiles of `tile` rows of `length`, heads, batch). Tiles go on
    axis 0 (up to 2^31 - 1 programs) and batch and heads on their own axes (65,535 each): batch x heads on
    one axis would pass that limit (64 requests x 65 rows x 16 heads in the lm-eval backend is 66,560).
    Axis 0 runs fastest, so a head's tiles run side by side and share its keys and values in L2."""
    return checked_grid((-(-length // tile), heads, batch), "attention")


def _input_precision(q) -> str:
    """fp32 dots are exact IEEE unless torch allows TF32 (as torch's own matmuls do); 16-bit inputs ignore it."""
    if q.dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch_meta(q, k, mask: AttentionMask):
    """Arguments shared by the three kernels (everything but tensors, strides and scales)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    return dict(
        scalars=(H, Tq, Tk, mask.q_offset, max(mask.block_length, 1)),
        buckets=(_bucket(Tq), _bucket(Tk)),
        consts=dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), KIND=_KIND_CODE[mask.kind],
                    HAS_LEN=mask.key_lengths is not None, HAS_START=mask.key_starts is not None,
                    INPUT_PRECISION=_input_precision(q)),
    )


def _launch_attention(kernel, grid, *args, device_of, **kwargs):
    """`launch` (the tensors' device, one launch at a time), with the interpreter's fixed tiles for a kernel
    that is not autotuned."""
    if not isinstance(kernel, Autotuner):
        kwargs.update(BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=INTERPRETER_BLOCK_N)
    return launch(kernel, grid, *args, device_of=device_of, **kwargs)


def _flash_forward(q, k, v, key_len, key_start, mask: AttentionMask, scale: float):
    """q (B, H, Tq, D), k/v (B, H, Tk, D) -> out (B, H, Tq, D), lse_log2 (B, H, Tq) fp32."""
    B, H, Tq, D = q.shape
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)  # log2-sum-exp2 per row
    if out.numel() == 0:
        return out, lse
    meta = _launch_meta(q, k, mask)
    _launch_attention(
        _attn_fwd_kernel, lambda META: attention_grid(B, H, Tq, META["BLOCK_M"]),
        q, k, v, out, lse, key_len, key_start,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *meta["scalars"], scale * _LOG2E, *meta["buckets"],
        device_of=q, **meta["consts"],
    )
    return out, lse


def _flash_backward(do, q, k, v, out, lse, key_len, key_start, mask: AttentionMask, scale: float):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dq = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Tk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Tk, D), dtype=v.dtype, device=v.device)
    if Tq == 0 or Tk == 0 or B * H * D == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i, the row term of the softmax backward
    delta = (do.float() * out.float()).sum(-1).contiguous()  # (B, H, Tq) fp32
    meta = _launch_meta(q, k, mask)
    common = (*meta["scalars"], scale, scale * _LOG2E, *meta["buckets"])
    _launch_attention(
        _attn_bwd_dkdv_kernel, lambda META: attention_grid(B, H, Tk, META["BLOCK_N"]),
        q, k, v, do, dk, dv, lse, delta, key_len, key_start,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        *common, device_of=q, **meta["consts"],
    )
    _launch_attention(
        _attn_bwd_dq_kernel, lambda META: attention_grid(B, H, Tq, META["BLOCK_M"]),
        q, k, v, do, dq, lse, delta, key_len, key_start,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *common, device_of=q, **meta["consts"],
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k, v, out, lse); backward recomputes P tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, mask: AttentionMask, scale: float):
        key_len = _key_bound_tensor(mask.key_lengths, q)
        key_start = _key_bound_tensor(mask.key_starts, q)
        out, lse = _flash_forward(q, k, v, key_len, key_start, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_len, key_start)
        ctx.mask = mask
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_len, key_start = ctx.saved_tensors
        dout = _unit_last_stride(dout)
        dq, dk, dv = _flash_backward(dout, q, k, v, out, lse, key_len, key_start, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, mask: AttentionMask, scale: Optional[float] = None) -> torch.Tensor:
    """The Triton path of `attention`: same contract as `attention_reference`, differentiable in
    q, k and v. Raises (never falls back) on inputs the kernel does not support."""
    _check_inputs(q, k, v, mask)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    return FlashAttentionFunction.apply(q, k, v, mask, float(scale))
