"""A full disk, said plainly.

Writes that run out of space fail in many voices: OSError ENOSPC from Python, "basic_ios::clear: iostream
error" or "PytorchStreamWriter failed writing file" from torch.save's C++ writer, a bare RuntimeError from a
library. `disk_full_error` turns any of them into one message that names the path, the free space and what
to do; callers decide what is safe to keep (a checkpoint that failed to save is never marked `latest`).
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# the OS's own words for them, which libraries that wrap the OSError in their own type keep (safetensors:
# "Error while serializing: I/O error: No space left on device (os error 28)")
NO_SPACE_WORDS = tuple(os.strerror(n) for n in NO_SPACE_ERRNOS)
# below this much free space a failed write is taken to be a full disk, whatever the library's wording
NEARLY_FULL_BYTES = 4 << 20


class DiskFull(OSError):
    """A write failed because the filesystem (or the user's quota) is full; the message says where and what to do."""


def free_bytes(path) -> tuple[int, int] | None:
    """(free, total) bytes of the filesystem holding path (or its nearest existing parent); None if unknown."""
    p = Path(path)
    for candidate in (p, *p.parents):
        if candidate.exists():
            try:
                usage = shutil.disk_usage(candidate)
            except OSError:
                return None
            return usage.free, usage.total
    return None


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def is_disk_full(exc: BaseException, path) -> bool:
    """Whether `exc`, raised while writing under `path`, is a full disk: ENOSPC/EDQUOT anywhere in its
    chain (as an errno or in the OS's words), or any OSError/RuntimeError while the filesystem has almost
    no space left."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS):
            return True
        if any(words in str(e) for words in NO_SPACE_WORDS):
            return True
        e = e.__cause__ or e.__context__
    if isinstance(exc, (OSError, RuntimeError)):
        usage = free_bytes(path)
        return usage is not None and usage[0] < NEARLY_FULL_BYTES
    return False


def disk_full_error(path, what: str, keeps: str = "") -> DiskFull:
    """The DiskFull to raise: `what` could not be written to `path`; `keeps` says what is still safe."""
    usage = free_bytes(path)
    space = f"{human(usage[0])} free of {human(usage[1])}" if usage else "free space unknown"
    error = DiskFull(f"disk full: could not write {what} to {path} ({space} on that filesystem). "
                     f"{keeps + ' ' if keeps else ''}Free some space (or move out_dir to a larger disk), then "
                     f"continue with --resume.")
    error.errno = errno.ENOSPC
    return error
