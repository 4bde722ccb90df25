"""Masking benchmark: the fused Triton diffusion-masking kernel vs its PyTorch reference (kernels/masking.py).

    python -m bench.masking_bench                         # GPU: a few batch shapes, GB/s and the ratio
    python -m bench.masking_bench --json mask.json
    python -m bench.masking_bench --device cpu --tiny     # smoke run in the Triton interpreter

GB/s counts the bytes the fused kernel must move, the same count for both impls (so the ratio is the
speed ratio): per token x0 read (int64, 8 B), maskable read (1 B, when given), xt written (8 B) and
token_weight written (fp32, 4 B). The reference makes several passes (uniforms, compare, two wheres), so
its "effective" GB/s is lower than the memory traffic it really causes. Times: `triton.testing.do_bench`
median on a GPU.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_cli


@dataclass
class MaskingBenchConfig:
    shapes: list[str] = field(default_factory=lambda: ["64x1024", "64x8192", "512x8192"],
                              metadata={"help": "batch shapes BxT"})
    maskable: bool = field(default=True, metadata={"help": "pass a maskable (B, T) bool tensor (prompt / padding)"})
    device: str = field(default="cuda", metadata={"help": "where to run", "choices": ("cuda", "cpu")})
    tiny: bool = field(default=False, metadata={"help": "with --device cpu: one tiny shape in the Triton interpreter "
                                                        "(a smoke test, the numbers mean nothing)"})
    json: str = field(default="", metadata={"help": "also write the rows here"})


def main(argv=None) -> int:
    args = parse_cli(MaskingBenchConfig, argv, prog="python -m bench.masking_bench", description=__doc__.split("\n\n")[0])
    if args.device == "cpu":
        if not args.tiny:
            print("masking_bench: the CPU has no Triton kernel to time; run on a CUDA GPU, or pass "
                  "`--device cpu --tiny` for an interpreter smoke run.")
            return 0
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is decorated (imported)
        args.shapes = ["4x1000"]
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("masking_bench: no CUDA device found; nothing to benchmark.")
        return 0
    from kernels.masking import apply_diffusion_mask

    dev = args.device
    if dev == "cuda":
        from triton.testing import do_bench
        timer = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    else:
        def timer(fn, reps=3):
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)

    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)"
    print(f"device={device_name} maskable={args.maskable}")
    print(f"{'B x T':>12} {'tokens':>10} | {'triton ms':>10} {'GB/s':>8} | {'torch ms':>10} {'GB/s':>8} | {'x faster':>8}")
    rows = []
    for shape in args.shapes:
        B, T = (int(n) for n in shape.lower().split("x"))
        gen = torch.Generator(device=dev).manual_seed(0)
        x0 = torch.randint(0, 50000, (B, T), device=dev, generator=gen)
        p = torch.rand(B, device=dev, generator=gen)
        w = torch.rand(B, device=dev, generator=gen)
        maskable = torch.rand(B, T, device=dev, generator=gen) < 0.9 if args.maskable else None
        nbytes = B * T * (8 + 8 + 4 + (1 if args.maskable else 0))
        ms = {impl: timer(lambda impl=impl: apply_diffusion_mask(x0, p, w, 50257, 1234, maskable, impl=impl))
              for impl in ("triton", "torch")}
        row = {"B": B, "T": T, "tokens": B * T, "bytes": nbytes, "maskable": args.maskable,
               **{f"{impl}_ms": t for impl, t in ms.items()},
               **{f"{impl}_gb_s": nbytes / (t * 1e-3) / 1e9 for impl, t in ms.items()},
               "triton_vs_torch": ms["torch"] / ms["triton"]}
        rows.append(row)
        print(f"{shape:>12} {B * T:>10,} | {ms['triton']:>10.4f} {row['triton_gb_s']:>8.1f} | "
              f"{ms['torch']:>10.4f} {row['torch_gb_s']:>8.1f} | {row['triton_vs_torch']:>8.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
