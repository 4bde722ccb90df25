"""The processes around the model: the launcher's environment, ranks, seeds, and the few collectives the
project itself runs (a mean over ranks, agreeing to stop on SIGTERM, barriers and small objects around
checkpoints). Every one of them goes through this module, on the host group (`host_group()`), so they take
CPU tensors whatever backend serves the default group: DeepSpeed creates that group with backend "nccl"
on GPUs, and NCCL serves CUDA tensors only.

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


# Where each launcher puts (rank, local rank, world size). torchrun and DeepSpeed's own launcher set the
# torch names; MPI-style launchers (`deepspeed --launcher openmpi|mpich|mvapich|slurm`, or mpirun/srun by
# hand) set only their own, and DeepSpeed copies them to the torch names in its MPI discovery, which runs
# inside deepspeed.initialize -- after pretrain.py has already decided which rank it is.
RANK_VARIABLES = (
    ("RANK", "LOCAL_RANK", "WORLD_SIZE"),  # torchrun, the deepspeed launcher, DeepSpeed's MPI discovery
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_SIZE"),  # MVAPICH2
    ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),  # MPICH / Intel MPI (hydra)
    # srun: SLURM_STEP_NUM_TASKS is set for the tasks of a job step only, not in an sbatch script, where a
    # plain `python training/pretrain.py` sees SLURM_PROCID=0 of the whole allocation
    ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS"),
)


def _launcher_variables() -> tuple[str, str, str] | None:
    for names in RANK_VARIABLES:
        if names[0] in os.environ and names[2] in os.environ:
            return names
    return None


def prepare_environment() -> None:
    """Make a plain `python training/pretrain.py` a world of one, and pick the CPU accelerator when
    there is no GPU. Launchers (deepspeed, torchrun, mpirun and srun via DeepSpeed) set their rank
    variables themselves and are left alone."""
    global _STARTED_BY_LAUNCHER
    _STARTED_BY_LAUNCHER = _launcher_variables() is not None
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
    """(rank, local_rank, world_size) from the launcher's environment, whichever launcher it was (before
    DeepSpeed's MPI discovery has run, too); (0, 0, 1) for a process no launcher started."""
    names = _launcher_variables()
    if names is None:
        return 0, 0, 1
    rank_name, local_name, world_name = names
    return int(os.environ[rank_name]), int(os.environ.get(local_name, 0)), int(os.environ[world_name])


def mix_seed(*ints: int) -> int:
    """One well-mixed 63-bit seed from several integers (SeedSequence hashing), e.g. (seed, step, rank,
    micro_step) for the diffusion mask of a batch: a resumed run draws the same masks."""
    a, b = np.random.SeedSequence(list(ints)).generate_state(2, dtype=np.uint32)
    return int(a) << 31 ^ int(b)


_HOST_GROUP = None  # host_group()'s answer, made once per process group


def _serves_cpu(group=None) -> bool:
    """Whether `group`'s backend takes CPU tensors: "cpu:gloo,cuda:nccl" (FSDP, torch's "gloo") does,
    "cuda:nccl" (DeepSpeed on GPUs: init_process_group("nccl")) does not."""
    return any(part.split(":")[0] == "cpu" for part in dist.get_backend_config(group).split(","))


def host_group():
    """The process group this module's collectives run on: the default group when its backend takes CPU
    tensors, else a gloo group over the same ranks, made once. Every rank must reach the first call at the
    same point (new_group is itself collective); the collectives below are, by their nature."""
    global _HOST_GROUP
    default = dist.group.WORLD
    if _HOST_GROUP is None or _HOST_GROUP[0] is not default:
        _HOST_GROUP = (default, default if _serves_cpu() else dist.new_group(backend="gloo"))
    return _HOST_GROUP[1]


def _many_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_mean(values: list[float]) -> list[float]:
    """The mean over ranks of each value (float64), in every rank; the values themselves in a world of one."""
    t = torch.tensor(values, dtype=torch.float64)
    if _many_ranks():
        dist.all_reduce(t, group=host_group())
        t /= dist.get_world_size()
    return t.tolist()


def all_max(value: int) -> int:
    """The largest of every rank's `value`, in every rank."""
    t = torch.tensor([value], dtype=torch.int64)
    if _many_ranks():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return int(t.item())


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a world of one)."""
    if _many_ranks():
        dist.barrier(group=host_group())


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` (a small picklable value), in every rank."""
    if not _many_ranks():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=host_group())
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj` (small, picklable), in rank order, in every rank."""
    if not _many_ranks():
        return [obj]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj, group=host_group())
    return everyone


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
                    print(f"rank {rank_and_world()[0]}: its launcher (pid {proc.pid}) is gone: stopping as on "
                          f"SIGTERM (checkpoint, then exit)", file=sys.stderr, flush=True)
                    self.received = True
                    return

    def agreed(self) -> bool:
        # 0: run on, 1: SIGTERM, 2: a launcher is gone; the max over ranks, so every rank logs the same reason
        code = 0 if not self.received else 2 if self.reason.startswith("launcher gone") else 1
        agreed = all_max(code)
        if agreed and agreed != code:  # another rank's reason
            self.reason = "launcher gone (seen by another rank)" if agreed == 2 else "SIGTERM"
        return bool(agreed)
