"""Give back the shared memory DeepSpeed's CPU all-reduce takes.

On CPU, DeepSpeed's communication op (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates one shared-memory
file per rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (66 MB),
maps the files of the other ranks of the node, and never unlinks its own. /dev/shm is RAM: every CPU
run would leave 66 MB per rank behind until the machine reboots (a test suite with dozens of 2-rank
runs leaked 20 GB here and slowed everything to a crawl). Unlinking at exit is safe: the other ranks
opened the file during initialization, and a mapping outlives the name.

A rank killed with SIGKILL cannot unlink its buffer, so a new run removes the buffers of dead runs first
(remove_stale_buffers): this user's files that no live process has mapped or open and that are older than a
minute (a starting rank creates its file a moment before it maps it). Buffers of live runs are never touched.
"""
from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"
STALE_AFTER_S = 60.0  # younger files may belong to a rank between creating and mapping its buffer


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


def _files_in_use() -> set[str]:
    """Every path some process this user can inspect has mapped or open (/proc/*/maps and /proc/*/fd)."""
    used: set[str] = set()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for line in (pid_dir / "maps").read_text().splitlines():
                if str(SHM_DIR) in line:
                    used.add(line.split(None, 5)[-1].removesuffix(" (deleted)"))
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(str(SHM_DIR)):
                    used.add(target)
        except OSError:  # the process ended meanwhile, or it is another user's
            continue
    return used


def remove_stale_buffers(log=None) -> list[str]:
    """Unlink this user's DeepSpeed all-reduce buffers in /dev/shm that belong to dead processes (see the
    module doc); returns what was removed. Without /proc (not Linux) nothing is removed."""
    if not hasattr(os, "getuid") or not SHM_DIR.is_dir() or not Path("/proc/self/maps").exists():
        return []
    mine = [p for p in SHM_DIR.glob(f"{PREFIX}_{os.getuid()}_*") if p.is_file()]
    now = time.time()
    candidates = []
    for p in mine:
        try:
            if now - p.stat().st_mtime > STALE_AFTER_S:
                candidates.append(p)
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    in_use = _files_in_use()
    removed = []
    for p in candidates:
        if str(p) in in_use:
            continue
        try:
            size = p.stat().st_size
            p.unlink()
        except (FileNotFoundError, PermissionError):
            continue
        removed.append(f"{p} ({size / 2**20:.0f} MB)")
    if removed and log is not None:
        log(f"removed {len(removed)} stale DeepSpeed buffer(s) of dead runs from {SHM_DIR}: {', '.join(removed)}")
    return removed
