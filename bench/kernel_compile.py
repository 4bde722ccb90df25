"""Compile every Triton kernel for A100 (sm_80) and H100 (sm_90) without a GPU, and check that the autotune
pruner never has to run a config that spills registers or needs more shared memory than the GPU has.

    python -m bench.kernel_compile                   # everything (see below), all cores
    python -m bench.kernel_compile --subset          # the representative cases tests/test_attention_kernel.py runs
    python -m bench.kernel_compile --arch 90 --kernels masking --json OUT.json

The interpreter (TRITON_INTERPRET=1, every CPU test) accepts programs the GPU compiler rejects or spills,
so this compiles the real kernels with Triton's bundled ptxas (GPUTarget("cuda", 80 | 90, 32): no GPU, no
driver). A case is an attention kernel (forward, dK/dV, dQ) in fp16, bf16, fp32 with TF32 dots or exact
fp32, for the padded block-causal mask or the block-diffusion mask (its second tile loop), at head dim 16, 32,
64 or 128. For each case the pruner (`_tuned` in kernels/attention.py) keeps some autotune configs; on a GPU
it then compiles them and drops those that spill or do not fit, keeping the least-spilling ones when all
do. This compiles each kept config, and a case FAILS when none is left without spills within the shared
memory limit (the opt-in maximum per block: sm_80 163 KiB = 166,912 bytes, sm_90 227 KiB = 232,448 bytes).
A config that compiles cleanly at a head dim is taken to do so at smaller ones (registers and shared
memory only grow with it), so only the largest head dim is compiled until a config fails. The masking
kernel (one config) must compile cleanly for int64 and int32 ids, with and without the maskable flags.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: compile the kernels, do not interpret them

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}  # bytes of dynamic shared memory per block, opt-in maximum
ATTENTION_KERNELS = {"fwd": ("_attn_fwd_kernel", "_FWD_TUNING"),
                     "dkdv": ("_attn_bwd_dkdv_kernel", "_BWD_DKDV_TUNING"),
                     "dq": ("_attn_bwd_dq_kernel", "_BWD_DQ_TUNING")}
KERNELS = (*ATTENTION_KERNELS, "masking")
# (q/k/v dtype, tl.dot input precision); 16-bit inputs ignore the precision (kernels/attention.py passes "ieee")
PRECISIONS = (("fp16", "ieee"), ("bf16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee"))
HEAD_DIMS = (16, 32, 64, 128)  # the kernel pads a head dim to BLOCK_D, one of these
MASKS = {"block_causal_padded": dict(KIND=2, HAS_LEN=True, HAS_START=True),
         "block_diffusion": dict(KIND=3, HAS_LEN=False, HAS_START=False)}
LONG = 8192  # the lengths the pruner sees: long enough that no tile is pruned for being longer than the input


@dataclass
class Case:
    """One compile: a kernel, an architecture, a dtype / precision, a mask, a head dim, one config."""
    kernel: str  # fwd | dkdv | dq | masking
    arch: int
    dtype: str
    precision: str = ""
    mask: str = ""
    head_dim: int = 0
    block_m: int = 0
    block_n: int = 0
    num_warps: int = 4
    num_stages: int = 3
    result: dict = field(default_factory=dict)

    def config(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"

    def name(self) -> str:
        if self.kernel == "masking":
            return f"masking sm_{self.arch} {self.dtype} ids, maskable={self.mask}"
        return f"{self.kernel} sm_{self.arch} {self.dtype}/{self.precision} {self.mask} d{self.head_dim} {self.config()}"


def kept_configs(tuning, dtype: str, precision: str, head_dim: int) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the configs the pruner keeps before compiling, at long lengths."""
    import torch
    q = torch.empty(0, dtype={"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    kept = tuning.prune(tuning.configs, {"Q": q, "TQ_BUCKET": LONG, "TK_BUCKET": LONG},
                        HEAD_DIM=head_dim, INPUT_PRECISION=precision)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


def groups(archs=(80, 90), kernels=KERNELS, subset=False) -> dict:
    """{(kernel, arch, dtype, precision, mask, head dim): [the configs the pruner keeps]}; masking: one each.
    subset: per kernel and arch, bf16 at head dim 128 with the padded block-causal mask, and the masking
    kernel for int64 ids with the maskable flags (the tiles most likely to spill)."""
    import kernels.attention as A
    out = {}
    for arch in archs:
        for kernel in kernels:
            if kernel == "masking":
                for ids in ("i64", "i32"):
                    for flags in ("True", "False"):
                        if not subset or (ids, flags) == ("i64", "True"):
                            out[(kernel, arch, ids, "", flags, 0)] = [(0, 0, 4, 3)]
                continue
            tuning = getattr(A, ATTENTION_KERNELS[kernel][1])
            for dtype, precision in PRECISIONS:
                for mask in MASKS:
                    for head_dim in HEAD_DIMS:
                        if subset and (dtype, mask, head_dim) != ("bf16", "block_causal_padded", 128):
                            continue
                        out[(kernel, arch, dtype, precision, mask, head_dim)] = kept_configs(
                            tuning, dtype, precision, head_dim)
    return out


_PTXAS_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def compile_case(case: Case) -> Case:
    """Compile one case; case.result gets registers, spill bytes, shared memory, seconds and any problem."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.attention as A
    import kernels.masking as M

    if case.kernel == "masking":
        fn = M._diffusion_mask_kernel
        pointers = dict(X0=f"*{case.dtype}", XT=f"*{case.dtype}", WEIGHT="*fp32", MASK_PROB="*fp32",
                        LOSS_WEIGHT="*fp32", MASKABLE="*u8")
        constexprs = dict(HAS_MASKABLE=case.mask == "True", BLOCK=M._BLOCK)
    else:
        fn = getattr(A, ATTENTION_KERNELS[case.kernel][0]).fn
        pointers = {n: f"*{case.dtype}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        pointers.update(LSE="*fp32", DELTA="*fp32", KEY_LEN="*i32", KEY_START="*i32")
        constexprs = dict(HEAD_DIM=case.head_dim, BLOCK_D=case.head_dim, INPUT_PRECISION=case.precision,
                          BLOCK_M=case.block_m, BLOCK_N=case.block_n, **MASKS[case.mask])
    floats = ("qk_scale_log2", "sm_scale")
    signature = {n: "constexpr" if n in constexprs else pointers.get(n) or ("fp32" if n in floats else "i32")
                 for n in fn.arg_names}
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report is printed to stdout: the registers and spills
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", case.arch, 32),
                                      options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    except Exception as exc:  # noqa: BLE001 - a compile error is this case's result
        case.result = dict(problem=f"does not compile: {type(exc).__name__}: {str(exc)[:500]}")
        return case
    usage, registers = _PTXAS_USAGE.search(log.getvalue()), _PTXAS_REGISTERS.search(log.getvalue())
    if usage is None or registers is None:
        case.result = dict(problem=f"no ptxas report (a cached compile?): {log.getvalue()[-300:]!r}")
        return case
    stack, spill_stores, spill_loads = (int(x) for x in usage.groups())
    shared = int(compiled.metadata.shared)
    problems = []
    if spill_stores or spill_loads:
        problems.append(f"spills {max(spill_stores, spill_loads)} B")
    if shared > SHARED_MEMORY_LIMIT[case.arch]:
        problems.append(f"{shared:,} B shared memory > {SHARED_MEMORY_LIMIT[case.arch]:,}")
    case.result = dict(registers=int(registers.group(1)), stack_bytes=stack, spill_stores=spill_stores,
                       spill_loads=spill_loads, shared_bytes=shared, seconds=round(time.perf_counter() - t0, 1),
                       problem=", ".join(problems))
    return case


def _compile_all(cases: list[Case], jobs: int) -> list[Case]:
    if jobs <= 1 or len(cases) <= 1:
        return [compile_case(c) for c in cases]
    with ProcessPoolExecutor(min(jobs, len(cases))) as pool:  # fork: the workers inherit the imported kernels
        return list(pool.map(compile_case, cases))


def run(work: dict, jobs: int) -> tuple[dict, list[Case]]:
    """Compile what `work` (from `groups`) needs; -> ({group: verdict}, every compiled case).

    Each (kernel, arch, dtype, precision, mask, config) is compiled at the largest head dim it is kept for,
    then, while it fails, at the next smaller one."""
    by_config = {}  # (kernel, arch, dtype, precision, mask, config) -> head dims it is kept for, largest first
    for (kernel, arch, dtype, precision, mask, head_dim), configs in work.items():
        for config in configs:
            by_config.setdefault((kernel, arch, dtype, precision, mask, config), []).append(head_dim)
    pending = {key: sorted(dims, reverse=True) for key, dims in by_config.items()}
    clean_at = {}  # config key -> the largest head dim it compiled cleanly at (clean at every smaller one too)
    compiled = []
    # a fresh cache: a cached kernel skips ptxas, whose report is what is checked
    with tempfile.TemporaryDirectory(prefix="kernel_compile.") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        while pending:
            cases = [Case(k[0], k[1], k[2], k[3], k[4], dims[0], *k[5]) for k, dims in pending.items()]
            done = _compile_all(cases, jobs)
            compiled += done
            for key, case in zip(list(pending), done):
                if not case.result.get("problem"):
                    clean_at[key] = case.head_dim
                    del pending[key]
                else:
                    pending[key] = pending[key][1:]
                    if not pending[key]:
                        del pending[key]
    problems = {(c.kernel, c.arch, c.dtype, c.precision, c.mask, c.head_dim,
                 (c.block_m, c.block_n, c.num_warps, c.num_stages)): c.result["problem"]
                for c in compiled if c.result.get("problem")}
    verdicts = {}
    for group, configs in work.items():
        kept, dropped = [], []
        for config in configs:
            key = (*group[:5], config)
            if clean_at.get(key, -1) >= group[5]:
                kept.append(config)
            else:
                dropped.append((config, problems.get((*group, config), "fails at a larger head dim: not compiled")))
        verdicts[group] = dict(kept=kept, dropped=dropped, ok=bool(kept))
    return verdicts, compiled


def _config_name(config) -> str:
    bm, bn, warps, stages = config
    return f"{bm}x{bn} w{warps} s{stages}"


def _group_name(group) -> str:
    kernel, arch, dtype, precision, mask, head_dim = group
    if kernel == "masking":
        return f"masking sm_{arch} {dtype} ids, maskable={mask}"
    return f"{kernel} sm_{arch} {dtype}/{precision} {mask} d{head_dim}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel_compile", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"some of {','.join(KERNELS)}")
    ap.add_argument("--subset", action="store_true", help="only the representative cases (`subset`)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel (default: all cores)")
    ap.add_argument("--json", help="write every case and its result here")
    args = ap.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    kernels = tuple(args.kernels.split(","))
    for a in archs:
        if a not in SHARED_MEMORY_LIMIT:
            ap.error(f"--arch {a}: expected some of {','.join(map(str, SHARED_MEMORY_LIMIT))}")
    for k in kernels:
        if k not in KERNELS:
            ap.error(f"--kernels {k}: expected some of {','.join(KERNELS)}")
    work = groups(archs, kernels, args.subset)
    t0 = time.perf_counter()
    print(f"checking {len(work)} cases with {args.jobs} jobs", flush=True)
    verdicts, compiled = run(work, args.jobs)
    for group, v in verdicts.items():
        kept = ", ".join(map(_config_name, v["kept"])) if group[0] != "masking" else "compiles cleanly"
        dropped = "; ".join(f"{_config_name(c)}: {why}" for c, why in v["dropped"])
        if v["ok"]:
            print(f"ok      {_group_name(group)}: {kept}" + (f" (dropped on the GPU: {dropped})" if dropped else ""))
        else:
            print(f"FAILED  {_group_name(group)}: every config the pruner keeps fails: {dropped}")
    seconds = time.perf_counter() - t0
    bad = [g for g, v in verdicts.items() if not v["ok"]]
    print(f"{len(verdicts) - len(bad)} cases ok, {len(bad)} failing, {len(compiled)} compiles in {seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "archs": archs, "subset": args.subset, "seconds": round(seconds, 1),
            "cases": [{"name": _group_name(g), "kernel": g[0], "arch": g[1], "ok": v["ok"],
                       "kept": [_config_name(c) for c in v["kept"]],
                       "dropped": [[_config_name(c), why] for c, why in v["dropped"]]} for g, v in verdicts.items()],
            "compiles": [asdict(c) | {"name": c.name()} for c in compiled]}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
