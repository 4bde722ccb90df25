"""What every Triton launch in kernels/ shares: the tensors' GPU, the CUDA grid limits, one launch at a time.

- Triton launches on the calling thread's *current* CUDA device (torch.cuda.current_device()), not on the
  device of the tensors it is given. A model on cuda:1 (`--device cuda:1`) or one called from a thread that
  never chose a device (the server's scheduler thread) would run its kernels on cuda:0's stream and context
  with cuda:1 pointers. `launch` makes the tensors' device current for the launch (torch.cuda.device_of:
  a no-op for CPU tensors, the interpreter).
- A CUDA grid has at most 2^31 - 1 programs on axis 0 and 65,535 on axes 1 and 2. `checked_grid` refuses a
  grid over those limits with a clear error instead of the driver's "invalid argument".
- Triton's autotuner keeps per-kernel state while it times its configs (the arguments of the call being
  tuned, the cache it fills); two threads tuning one kernel at once corrupt it or tune twice. `launch`
  holds one process-wide lock around each launch: uncontended it costs well under a microsecond against a
  launch's tens, and while one thread tunes a new shape (once per autotune key) the others wait for it.
Under torch.compile the launch is traced as it is: the compiled graph sets its own device and the compiler
tunes the kernel itself.
"""
from __future__ import annotations

import threading

import torch

CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)  # programs per grid axis (x, y, z), any NVIDIA GPU since sm_30

_LAUNCH_LOCK = threading.RLock()


def checked_grid(grid: tuple, kernel: str) -> tuple:
    """`grid` itself, after checking it against CUDA_GRID_LIMITS (ValueError naming the kernel and axis)."""
    for axis, (programs, limit) in enumerate(zip(grid, CUDA_GRID_LIMITS)):
        if programs > limit:
            raise ValueError(f"the {kernel} launch needs {programs:,} programs on grid axis {axis}, over CUDA's "
                             f"limit of {limit:,}: split the call into smaller batches")
    return grid


def launch(kernel, grid, *args, device_of: torch.Tensor, **kwargs):
    """kernel[grid](*args, **kwargs) on `device_of`'s device, one launch (and autotuning) at a time."""
    if torch.compiler.is_compiling():
        return kernel[grid](*args, **kwargs)
    with torch.cuda.device_of(device_of), _LAUNCH_LOCK:
        return kernel[grid](*args, **kwargs)
