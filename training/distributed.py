"""The processes around the model: the launcher's environment, ranks, seeds, and the few collectives the
training loop itself runs (a mean over ranks, agreeing to stop on SIGTERM).

Nothing here imports DeepSpeed: `prepare_environment()` must run before it is imported, because DeepSpeed
picks its accelerator (DS_ACCELERATOR) and, in a process no launcher started, its rank discovery at
import time.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from common.ports import free_port


def prepare_environment() -> None:
    """Make a plain `python training/pretrain.py` a world of one, and pick the CPU accelerator when
    there is no GPU. Launchers (deepspeed, torchrun, mpirun via DeepSpeed) set these variables
    themselves and are left alone."""
    global _STARTED_BY_LAUNCHER
    _STARTED_BY_LAUNCHER = "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ
    if not _STARTED_BY_LAUNCHER:
        # without these DeepSpeed falls back to MPI discovery and fails on a missing mpi4py
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates: one warning per call site
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.\w+` is deprecated")


def rank_and_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def mix_seed(*ints: int) -> int:
    """One well-mixed 63-bit seed from several integers (SeedSequence hashing), e.g. (seed, step, rank,
    micro_step) for the diffusion mask of a batch: a resumed run draws the same masks."""
    a, b = np.random.SeedSequence(list(ints)).generate_state(2, dtype=np.uint32)
    return int(a) << 31 ^ int(b)


def all_mean(values: list[float]) -> list[float]:
    """The mean over ranks of each value (float64), in every rank; the values themselves in a world of one."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


_STARTED_BY_LAUNCHER = False  # set by prepare_environment: a launcher (deepspeed, torchrun, mpirun) started us


def launcher_processes() -> list:
    """The processes whose end should stop this rank (psutil.Process objects): the launcher that started it
    (its parent: DeepSpeed's per-node launch.py, or torchrun) and, above DeepSpeed's launch.py, the
    `deepspeed` command itself, which is what a user or a scheduler kills (it forwards nothing on one node).
    Empty for a process that no launcher started: a plain `python training/pretrain.py` outlives its shell
    (nohup) as before."""
    if not _STARTED_BY_LAUNCHER:
        return []
    import psutil  # a DeepSpeed dependency

    try:
        parent = psutil.Process(os.getppid())
        chain = [parent]
        if any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
            grand = parent.parent()
            if grand is not None and any("deepspeed" in part for part in grand.cmdline()[:2]):
                chain.append(grand)
        return chain
    except psutil.Error:
        return []


class StopOnSigterm:
    """SIGTERM sets a flag; at every step boundary the ranks agree (all-reduce max) on whether to stop,
    so they all write the same checkpoint and leave together. Stopping mid-step would desync ZeRO.
    A rank whose launcher is gone (killed: `kill <deepspeed pid>` leaves its ranks running otherwise)
    stops the same way: a watcher thread checks the launcher processes every `poll_s` seconds."""

    def __init__(self, poll_s: float = 1.0):
        self.received = False
        self.reason = "SIGTERM"
        signal.signal(signal.SIGTERM, self._handler)
        watched = launcher_processes()
        if watched:
            threading.Thread(target=self._watch_launchers, args=(watched, poll_s), daemon=True,
                             name="launcher-watch").start()

    def _handler(self, signum, frame):
        self.received = True

    def _watch_launchers(self, watched: list, poll_s: float) -> None:
        import psutil

        while not self.received:
            time.sleep(poll_s)
            for proc in watched:
                try:
                    gone = not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
                except psutil.Error:
                    gone = True
                if gone:
                    self.reason = f"launcher gone (pid {proc.pid})"
                    print(f"rank {os.environ.get('RANK', 0)}: its launcher (pid {proc.pid}) is gone: stopping as on "
                          f"SIGTERM (checkpoint, then exit)", file=sys.stderr, flush=True)
                    self.received = True
                    return

    def agreed(self) -> bool:
        # 0: run on, 1: SIGTERM, 2: a launcher is gone; the max over ranks, so every rank logs the same reason
        code = 0.0 if not self.received else 2.0 if self.reason.startswith("launcher gone") else 1.0
        flag = torch.tensor([code])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed and agreed != code:  # another rank's reason
            self.reason = "launcher gone (seen by another rank)" if agreed == 2 else "SIGTERM"
        return bool(agreed)
