"""Attention benchmark: the Triton kernel vs SDPA (flash backend) vs FlexAttention with a block mask.

    python -m bench.attention_bench                       # T in {1k, 4k, 8k}, d in {64, 128}, every mask
    python -m bench.attention_bench --seq-lens 2048 --head-dims 128 --masks block_causal --block-lengths 16
    python -m bench.attention_bench --json att.json --time_budget 90   # what bench/gpu_check.sh runs
    python -m bench.attention_bench --device cpu --tiny   # smoke run in the Triton interpreter

Masks: causal, bidirectional, block_causal (one row per --block-lengths b) and block_diffusion, the BD3-LM
training pass over [x_t ; x_0] (T = 2L; blocks of --bd3-block-length). Every row is measured in the same
run, so the ratios compare like with like. Times come from `triton.testing.do_bench` (median ms) on a GPU.
FLOPs count only visible (query, key) pairs: forward = 4 * B * H * D * pairs (two matmuls), backward = 2.5 x
forward (five matmuls, one of them the recomputed QK^T), so fwd+bwd = 3.5 x forward. "x faster" columns are
baseline time / Triton time. SDPA's flash backend has no block masks, so those cells are n/a; FlexAttention
runs every mask. --json rewrites its file after every row, and --time_budget stops starting new rows once
that many seconds have passed, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_cli


MASKS = ("causal", "bidirectional", "block_causal", "block_diffusion")


@dataclass
class AttentionBenchConfig:
    # nargs-style lists: --seq-lens 512 1024 and --seq_lens=512,1024 both read (dashes are underscores)
    seq_lens: list[int] = field(default_factory=lambda: [1024, 4096, 8192], metadata={"help": "sequence lengths T"})
    head_dims: list[int] = field(default_factory=lambda: [64, 128], metadata={"help": "head dimensions"})
    masks: list[str] = field(default_factory=lambda: list(MASKS), metadata={"help": "attention masks",
                                                                           "choices": MASKS})
    block_lengths: list[int] = field(default_factory=lambda: [4, 16],
                                     metadata={"help": "block lengths b of the block-causal mask (one row each)"})
    bd3_block_length: int = field(default=16, metadata={"help": "block length of the block_diffusion mask"})
    tokens: int = field(default=16384, metadata={"help": "batch size = tokens // T (constant work per T)"})
    model_dim: int = field(default=2048, metadata={"help": "heads = model_dim // head_dim"})
    dtype: str = field(default="bf16", metadata={"help": "input dtype", "choices": ("bf16", "fp16", "fp32")})
    modes: list[str] = field(default_factory=lambda: ["fwd", "fwd+bwd"],
                             metadata={"help": "passes to time", "choices": ("fwd", "fwd+bwd")})
    flex: bool = field(default=True, metadata={"help": "time FlexAttention too (its compile takes a while)"})
    device: str = field(default="cuda", metadata={"help": "where to run", "choices": ("cuda", "cpu")})
    tiny: bool = field(default=False, metadata={"help": "with --device cpu: tiny shapes through the Triton interpreter "
                                                        "(a smoke test, the times mean nothing)"})
    json: str = field(default="", metadata={"help": "write every row here (rewritten after each row)"})
    time_budget: float = field(default=0.0, metadata={"help": "seconds; start no new row after this (0 = no limit)"})
    warmup_ms: int = field(default=25, metadata={"help": "do_bench warm-up time per measurement (GPU)"})
    rep_ms: int = field(default=100, metadata={"help": "do_bench measuring time per measurement (GPU)"})


def parse_args(argv=None) -> AttentionBenchConfig:
    return parse_cli(AttentionBenchConfig, argv, prog="python -m bench.attention_bench",
                     description=__doc__.split("\n\n")[0], aliases={"block_length": "block_lengths"})


def visible_pairs(mask_kind: str, T: int, block_length: int) -> int:
    """Number of (query, key) pairs the mask lets through for one sequence of length T."""
    if mask_kind == "bidirectional":
        return T * T
    if mask_kind == "causal":
        return T * (T + 1) // 2
    if mask_kind == "block_diffusion":  # T = 2L; query block i of x_t sees its own block + i clean ones,
        b = block_length                 # query block i of x_0 sees clean blocks 0..i
        return sum(b * (b + i * b) + b * (i + 1) * b for i in range(T // 2 // b))
    # block-causal: query i sees every key of blocks 0..i//b
    return sum(min(T, (i // block_length + 1) * block_length) for i in range(T))


def cases(args) -> list[tuple[str, int]]:
    """(mask kind, block length) of every row of one (T, d)."""
    out = []
    for kind in args.masks:
        if kind == "block_causal":
            out += [(kind, b) for b in args.block_lengths]
        elif kind == "block_diffusion":
            out.append((kind, args.bd3_block_length))
        else:
            out.append((kind, 0))
    return out


def _timer(device: str, warmup_ms: int, rep_ms: int):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn, grads: do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads, return_mode="median")

    def cpu_time(fn, grads, reps=3):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            for g in grads:
                g.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_time


def _mask_mod(kind: str, b: int, T: int):
    """FlexAttention's mask_mod for one of our masks (the same rule as kernels.attention.dense_mask)."""
    half = T // 2

    def mask_mod(batch, head, q_idx, kv_idx):
        if kind == "causal":
            return kv_idx <= q_idx
        if kind == "block_causal":
            return (kv_idx // b) <= (q_idx // b)
        if kind == "block_diffusion":
            q_xt, k_xt = q_idx < half, kv_idx < half
            qb, kb = (q_idx % half) // b, (kv_idx % half) // b
            return (q_xt & k_xt & (qb == kb)) | (q_xt & ~k_xt & (kb < qb)) | (~q_xt & ~k_xt & (kb <= qb))
        return kv_idx >= 0  # bidirectional: everything
    return mask_mod


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "cpu":
        if not args.tiny:
            print("attention_bench: the CPU has no Triton kernels to time; run on a CUDA GPU, "
                  "or pass `--device cpu --tiny` for an interpreter smoke run.")
            return 0
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (imported)
        args.seq_lens, args.head_dims, args.tokens, args.model_dim = [64], [32], 64, 64
        args.block_lengths, args.bd3_block_length, args.dtype = [4, 16], 16, "fp32"  # bf16 tl.dot is wrong in the interpreter
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("attention_bench: no CUDA device found; nothing to benchmark "
              "(use `--device cpu --tiny` for an interpreter smoke run).")
        return 0

    import torch.nn.functional as F
    from kernels.attention import AttentionMask, attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = args.device
    bench = _timer(dev, args.warmup_ms, args.rep_ms)

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        sdpa_kernel = None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        if dev == "cuda":
            # one compiled graph per (shape, mask): lift dynamo's recompile cap above the sweep size
            for knob in ("cache_size_limit", "recompile_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 256)
            flex = torch.compile(flex_attention, dynamic=False)
        else:
            flex = flex_attention  # eager, forward only: FlexAttention has no CPU backward
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    except ImportError:  # pragma: no cover - old torch
        flex = None
    if not args.flex:
        flex = None
    sdpa_label = "sdpa-flash" if dev == "cuda" else "sdpa-math"

    header = " | ".join([f"{'T':>5} {'d':>4} {'mask':>20} {'mode':>7}", f"{'triton ms':>10} {'TFLOP/s':>8}",
                         f"{sdpa_label + ' ms':>14} {'TFLOP/s':>8} {'x faster':>8}",
                         f"{'flex ms':>10} {'TFLOP/s':>8} {'x faster':>8}"])
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)"
    print(f"device={device_name} dtype={args.dtype} tokens/batch={args.tokens} model_dim={args.model_dim}")
    print(header)
    print("-" * len(header), flush=True)
    result = {"device": device_name, "dtype": args.dtype, "tokens": args.tokens, "model_dim": args.model_dim,
              "torch": torch.__version__, "rows": [], "complete": False}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    stopped = False
    for D in args.head_dims:
        H = max(1, args.model_dim // D)
        for T in args.seq_lens:
            B = max(1, args.tokens // T)
            gen = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=gen).requires_grad_()
                       for _ in range(3))
            do = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=gen)
            for kind, bl in cases(args):
                if args.time_budget and time.perf_counter() - t_start > args.time_budget:
                    stopped = True
                    break
                if kind == "block_diffusion" and (T % 2 or (T // 2) % bl):
                    continue
                mask = AttentionMask(kind, block_length=bl)
                label = kind if not bl else f"{kind} b={bl}"
                fwd_flops = 4 * B * H * D * visible_pairs(kind, T, bl)

                runners = {"triton": lambda mask=mask: attention(q, k, v, mask, impl="triton")}
                forward_only = set()
                if kind in ("causal", "bidirectional") and sdpa_kernel is not None:
                    backend = SDPBackend.FLASH_ATTENTION if dev == "cuda" else SDPBackend.MATH

                    def run_sdpa(causal=(kind == "causal"), backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    runners["sdpa"] = run_sdpa
                if flex is not None:
                    try:
                        block_mask = create_block_mask(_mask_mod(kind, bl, T), None, None, T, T, device=dev)
                        if dev == "cuda":
                            runners["flex"] = lambda bm=block_mask: flex(q, k, v, block_mask=bm)
                        else:
                            qd, kd, vd = q.detach(), k.detach(), v.detach()
                            runners["flex"] = lambda bm=block_mask: flex(qd, kd, vd, block_mask=bm)
                            forward_only.add("flex")
                    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the others
                        print(f"  (flex unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)

                for mode in args.modes:
                    flops = fwd_flops * (1.0 if mode == "fwd" else 3.5)
                    ms, errors = {}, {}
                    for name, run in runners.items():
                        if mode != "fwd" and name in forward_only:
                            continue
                        fn = run if mode == "fwd" else (lambda run=run: run().backward(do))
                        try:
                            ms[name] = bench(fn, [q, k, v])
                        except Exception as exc:  # noqa: BLE001 - a baseline may not support a case
                            errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                            print(f"  ({name} failed at T={T} d={D} {label} {mode}: {errors[name]})", file=sys.stderr)
                    print(_row(T, D, label, mode, ms, flops), flush=True)
                    row = {"T": T, "head_dim": D, "heads": H, "batch": B, "mask": kind, "block_length": bl,
                           "mode": mode, "flops": flops, "errors": errors}
                    for name, t in ms.items():
                        row[f"{name}_ms"] = t
                        row[f"{name}_tflops"] = flops / (t * 1e-3) / 1e12
                        if name != "triton" and "triton" in ms:
                            row[f"triton_vs_{name}"] = t / ms["triton"]  # > 1: Triton is faster
                    result["rows"].append(row)
                    save()
            if stopped:
                break
        if stopped:
            break
    result["complete"] = not stopped
    result["seconds"] = time.perf_counter() - t_start
    save()
    if stopped:
        print(f"attention_bench: stopped after {args.time_budget:g} s (--time_budget); {len(result['rows'])} rows")
    return 0


def _row(T, D, kind, mode, ms, flops):
    """One table line; "x faster" = baseline ms / Triton ms (> 1: the Triton kernel is faster)."""
    def cell(name, width, with_ratio):
        if name not in ms:
            return f"{'n/a':>{width}} {'':>8}" + (f" {'':>8}" if with_ratio else "")
        tflops = flops / (ms[name] * 1e-3) / 1e12
        text = f"{ms[name]:>{width}.3f} {tflops:>8.3g}"
        if with_ratio:
            text += f" {ms[name] / ms['triton'] if 'triton' in ms else float('nan'):>8.2f}"
        return text

    return " | ".join([f"{T:>5} {D:>4} {kind:>20} {mode:>7}", cell("triton", 10, False),
                       cell("sdpa", 14, True), cell("flex", 10, True)])


if __name__ == "__main__":
    sys.exit(main())
