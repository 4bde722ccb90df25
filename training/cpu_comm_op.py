"""Build DeepSpeed's CPU communication op before the first CPU run needs it.

    python -m training.cpu_comm_op        # `make install` runs it

DeepSpeed's CPU ranks (DS_ACCELERATOR=cpu) load its shm communication op (deepspeed/ops/csrc/cpu/comm), which
torch compiles on first use into TORCH_EXTENSIONS_DIR: ~40 s of both cores on a 2-core machine, inside the first
run. launch.sh, evaluation.study, the benchmarks and the tests point TORCH_EXTENSIONS_DIR at this checkout's
.cache/torch_extensions (unless it is set); building the op there at install time takes that wait out of the
first run. With a CUDA GPU nothing is built: GPU ranks communicate through NCCL.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# this checkout's cache of compiled torch extensions: every command of the project that starts CPU ranks points
# TORCH_EXTENSIONS_DIR here unless it is set (launch.sh and bench/gpu_check.sh name the same folder)
OP_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m training.cpu_comm_op", description=__doc__.split("\n\n")[0]).parse_args(argv)
    import torch

    if torch.cuda.is_available():
        print("cpu_comm_op: a CUDA GPU is available (ranks use NCCL): nothing to build")
        return 0
    os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed picks its accelerator
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(OP_CACHE))
    from deepspeed.comm.torch import build_shm_op  # what each CPU rank calls when it sets up communication

    t0 = time.time()
    try:
        built = build_shm_op()
    except Exception as e:  # noqa: BLE001 - the first CPU run builds it again and shows DeepSpeed's own error
        print(f"cpu_comm_op: warning: building DeepSpeed's shm communication op failed ({type(e).__name__}: {e}); "
              f"the first CPU run will try again (a C++ compiler is needed: apt-get install g++)", file=sys.stderr)
        return 0
    if built is None:
        print("cpu_comm_op: DeepSpeed does not use its shm communication op on this machine: nothing to build")
        return 0
    print(f"cpu_comm_op: DeepSpeed's shm communication op is built in {os.environ['TORCH_EXTENSIONS_DIR']} "
          f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
