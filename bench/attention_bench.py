"""Attention benchmark: the Triton kernel vs SDPA (flash backend) vs FlexAttention with a block mask.

    python -m bench.attention_bench                       # T in {512..4096}, d in {64, 128}, 3 masks
    python -m bench.attention_bench --seq-lens 2048 --head-dims 128 --masks block_causal
    python -m bench.attention_bench --device cpu --tiny   # smoke run in the Triton interpreter

Every row is measured in the same run, so the ratios compare like with like. Times come from
`triton.testing.do_bench` (median ms) on a GPU. FLOPs count only visible (query, key) pairs:
forward = 4 * B * H * D * pairs (two matmuls), backward = 2.5 x forward (five matmuls, one of them the
recomputed QK^T), so fwd+bwd = 3.5 x forward. "x faster" columns are baseline time / Triton time.
SDPA's flash backend has no block-causal mask, so that cell is n/a; FlexAttention runs every mask.
"""
from __future__ import annotations

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


MASKS = ("causal", "bidirectional", "block_causal")


@dataclass
class AttentionBenchConfig:
    # nargs-style lists: --seq-lens 512 1024 and --seq_lens=512,1024 both read (dashes are underscores)
    seq_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096],
                                metadata={"help": "sequence lengths T"})
    head_dims: list[int] = field(default_factory=lambda: [64, 128], metadata={"help": "head dimensions"})
    masks: list[str] = field(default_factory=lambda: list(MASKS), metadata={"help": "attention masks",
                                                                           "choices": MASKS})
    block_length: int = field(default=128, metadata={"help": "block length of the block-causal mask"})
    tokens: int = field(default=16384, metadata={"help": "batch size = tokens // T (constant work per T)"})
    model_dim: int = field(default=2048, metadata={"help": "heads = model_dim // head_dim"})
    dtype: str = field(default="bf16", metadata={"help": "input dtype", "choices": ("bf16", "fp16", "fp32")})
    modes: list[str] = field(default_factory=lambda: ["fwd", "fwd+bwd"],
                             metadata={"help": "passes to time", "choices": ("fwd", "fwd+bwd")})
    flex: bool = field(default=True, metadata={"help": "time FlexAttention too (its compile takes a while)"})
    device: str = field(default="cuda", metadata={"help": "where to run", "choices": ("cuda", "cpu")})
    tiny: bool = field(default=False, metadata={"help": "with --device cpu: tiny shapes through the Triton interpreter "
                                                        "(a smoke test, the times mean nothing)"})


def parse_args(argv=None) -> AttentionBenchConfig:
    return parse_cli(AttentionBenchConfig, argv, prog="python -m bench.attention_bench",
                     description=__doc__.split("\n\n")[0])


def visible_pairs(mask_kind: str, T: int, block_length: int) -> int:
    """Number of (query, key) pairs the mask lets through for one sequence of length T."""
    if mask_kind == "bidirectional":
        return T * T
    if mask_kind == "causal":
        return T * (T + 1) // 2
    # block-causal: query i sees every key of blocks 0..i//b
    return sum(min(T, (i // block_length + 1) * block_length) for i in range(T))


def _timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn, grads: do_bench(fn, grad_to_none=grads, return_mode="median")

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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        if not args.tiny:
            print("attention_bench: the CPU has no Triton kernels to time; run on a CUDA GPU, "
                  "or pass `--device cpu --tiny` for an interpreter smoke run.")
            return 0
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (imported)
        args.seq_lens, args.head_dims, args.tokens, args.model_dim = [64, 100], [32], 128, 64
        args.block_length, args.dtype = 16, "fp32"  # bf16 tl.dot is wrong in the interpreter
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("attention_bench: no CUDA device found; nothing to benchmark "
              "(use `--device cpu --tiny` for an interpreter smoke run).")
        return 0

    import torch.nn.functional as F
    from kernels.attention import AttentionMask, attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = args.device
    bench = _timer(dev)

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

    header = " | ".join([f"{'T':>5} {'d':>4} {'mask':>13} {'mode':>7}", f"{'triton ms':>10} {'TFLOP/s':>8}",
                         f"{sdpa_label + ' ms':>14} {'TFLOP/s':>8} {'x faster':>8}",
                         f"{'flex ms':>10} {'TFLOP/s':>8} {'x faster':>8}"])
    print(f"device={torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (Triton interpreter)'} "
          f"dtype={args.dtype} tokens/batch={args.tokens} model_dim={args.model_dim} "
          f"block_length={args.block_length}")
    print(header)
    print("-" * len(header))

    for D in args.head_dims:
        H = max(1, args.model_dim // D)
        for T in args.seq_lens:
            B = max(1, args.tokens // T)
            gen = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=gen).requires_grad_()
                       for _ in range(3))
            do = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=gen)
            for kind in args.masks:
                mask = AttentionMask(kind, block_length=args.block_length if kind == "block_causal" else 0)
                fwd_flops = 4 * B * H * D * visible_pairs(kind, T, args.block_length)

                runners = {"triton": lambda: attention(q, k, v, mask, impl="triton")}
                forward_only = set()
                if kind != "block_causal" and sdpa_kernel is not None:
                    backend = SDPBackend.FLASH_ATTENTION if dev == "cuda" else SDPBackend.MATH

                    def run_sdpa(causal=(kind == "causal"), backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    runners["sdpa"] = run_sdpa
                if flex is not None:
                    bs = args.block_length

                    def mask_mod(b, h, q_idx, kv_idx, kind=kind, bs=bs):
                        if kind == "causal":
                            return kv_idx <= q_idx
                        if kind == "block_causal":
                            return (kv_idx // bs) <= (q_idx // bs)
                        return kv_idx >= 0  # bidirectional: everything

                    try:
                        block_mask = create_block_mask(mask_mod, None, None, T, T, device=dev)
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
                    ms = {}
                    for name, run in runners.items():
                        if mode != "fwd" and name in forward_only:
                            continue
                        fn = run if mode == "fwd" else (lambda run=run: run().backward(do))
                        try:
                            ms[name] = bench(fn, [q, k, v])
                        except Exception as exc:  # noqa: BLE001 - a baseline may not support a case
                            print(f"  ({name} failed at T={T} d={D} {kind} {mode}: {type(exc).__name__}: "
                                  f"{str(exc)[:120]})", file=sys.stderr)
                    print(_row(T, D, kind, mode, ms, flops))
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

    return " | ".join([f"{T:>5} {D:>4} {kind:>13} {mode:>7}", cell("triton", 10, False),
                       cell("sdpa", 14, True), cell("flex", 10, True)])


if __name__ == "__main__":
    sys.exit(main())
