"""Give back the shared memory DeepSpeed's CPU all-reduce takes.

On CPU, DeepSpeed's communication op (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates one shared-memory
file per rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (66 MB),
maps the files of the other ranks of the node, and never unlinks its own. /dev/shm is RAM: every CPU
run would leave 66 MB per rank behind until the machine reboots (a test suite with dozens of 2-rank
runs leaked 20 GB here and slowed everything to a crawl). Unlinking at exit is safe: the other ranks
opened the file during initialization, and a mapping outlives the name.
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"


def own_buffer() -> Path | None:
    """This rank's buffer file, or None when the launcher's environment does not name one."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    rank = os.environ.get("RANK")
    if not (addr and port and rank is not None) or not hasattr(os, "getuid"):
        return None
    # shm_interface.cpp only uses shared memory when every rank is on this node, so the global rank
    return SHM_DIR / f"{PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def remove_own_buffer() -> None:
    path = own_buffer()
    if path is not None:
        try:
            path.unlink()
        except (FileNotFoundError, PermissionError):  # no CPU shm op ran, or another user's file
            pass


def release_at_exit() -> None:
    """Unlink this rank's buffer when the process exits (normally, by an exception or on SIGTERM's
    clean exit); a process killed with SIGKILL cannot clean up after itself."""
    atexit.register(remove_own_buffer)
