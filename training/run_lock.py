"""One run per out_dir: an advisory lock held for the whole life of the run.

Two runs writing one out_dir replace each other's checkpoints, `latest` and export and interleave their
metrics.jsonl. So a run locks OUT_DIR/run.lock before it reads or writes anything there, and a second run
refuses, naming the holder (pid, host, start time, command) and what to do.

The lock is flock(2) on the file: the kernel drops it when the process ends, however it ends (SIGKILL
included), so nothing stale is left to clean up by hand. Linux NFS emulates flock with POSIX locks, which the
server shares between nodes; Lustre needs the `flock` mount option. The file holds the holder's identity
for the message; a free lock whose file still names a holder was left by a process that was killed
(a clean exit empties it), and the new run says so and takes over.

Who holds it: global rank 0, alone. A run over several nodes needs an out_dir every node sees (its ranks
write their shards into one checkpoint directory), so the one file catches a second run whichever nodes it
runs on. (Per-node locks would add nothing there and would collide between two "nodes" of one machine.)

One run per out_dir over time, too: a new run (no --resume) in an out_dir that holds an earlier run would
overwrite its step_N checkpoints and export, move `latest` back to its own first save and append a second
run to metrics.jsonl. `claim_out_dir` refuses that, naming what is there and the ways on: --resume, another
out_dir, or --overwrite, which removes the earlier run's checkpoints, export and logs before the new run
starts (after every other check has passed, so a typo never costs the earlier run).

    python -m training.run_lock OUT_DIR     # exit 1 naming the holder if a run holds OUT_DIR (launch.sh)

Standard library only: launch.sh calls it before anything heavy is imported.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from training.distributed import rank_and_world

LOCK_FILE = "run.lock"


class OutDirInUse(RuntimeError):
    """Another live process holds the out_dir's lock."""


def _holder(fd: int) -> dict:
    """The identity the holder wrote into the lock file ({} when it is empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that has not written its identity yet (it is just starting)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {started}"
            f" ({holder.get('command', '?')})")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


class RunLock:
    """An exclusive flock on one file, held until release() or the end of the process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.stale: dict = {}  # the identity a killed holder left behind, when the lock was taken over

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _holder(fd)
            for _ in range(10):  # a holder that is just starting writes its identity within moments
                if holder:
                    break
                time.sleep(0.1)
                holder = _holder(fd)
            os.close(fd)
            raise OutDirInUse(self._refusal(holder)) from None
        self.fd = fd
        self.stale = _holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        return self

    def _refusal(self, holder: dict) -> str:
        out_dir = self.path.parent
        msg = (f"out_dir {out_dir} is in use by another run: {_describe(holder)} holds {self.path}. Two runs in one "
               f"out_dir would overwrite each other's checkpoints, export and metrics.jsonl. Wait for that run to "
               f"finish, or stop it (kill -TERM {holder.get('pid', 'PID')} writes a checkpoint and exits; then "
               f"continue it with --resume), or train into another directory (--out_dir=NEW_DIR; OUT_DIR=NEW_DIR "
               f"for launch.sh).")
        if holder.get("host") == socket.gethostname() and holder.get("pid") and not _pid_alive(holder["pid"]):
            msg += (f" (pid {holder['pid']} is no longer running on this host, yet the filesystem still holds its "
                    f"lock: a network filesystem releases it when its lease expires, usually within 90 s; try again "
                    f"then.)")
        return msg

    def release(self) -> None:
        """Empty the file (a clean exit leaves no identity behind) and unlock. The file itself stays:
        deleting a lock file races with a process that has just opened it."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:  # a full or read-only disk: the lock still goes away with the descriptor
            pass
        os.close(self.fd)
        self.fd = None


_held: list[RunLock] = []


def lock_out_dir(out_dir) -> list[str]:
    """On global rank 0, lock OUT_DIR/run.lock for the rest of this process's life (other ranks hold
    nothing: when rank 0 refuses and exits, the launcher stops them). Raises OutDirInUse naming the holder.
    Returns notes for the log (a lock taken over from a killed run)."""
    names = [LOCK_FILE] if rank_and_world()[0] == 0 else []  # any launcher: MPI ones set no RANK yet
    notes = []
    for name in names:
        path = Path(out_dir) / name
        if any(lock.path == path for lock in _held):
            continue
        lock = RunLock(path).acquire()
        if not _held:
            atexit.register(release_all)
        _held.append(lock)
        if lock.stale:
            notes.append(f"{path} named {_describe(lock.stale)}, which ended without releasing it (killed?); "
                         f"this run holds it now")
    return notes


def release_all() -> None:
    while _held:
        _held.pop().release()


def check_free(out_dir) -> None:
    """OutDirInUse when a run holds out_dir right now (nothing is created or changed)."""
    path = Path(out_dir) / LOCK_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: never blocks another checker
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutDirInUse(RunLock(path)._refusal(_holder(fd))) from None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- an earlier run in out_dir
# what a run leaves in its out_dir (launch.sh's train.log is not among them: it appends to it)
RUN_PARTS = ("ckpt", "export", "metrics.jsonl", "tb", "wandb")


class OutDirHoldsARun(ValueError):
    """A new run was asked to start in an out_dir that holds an earlier one."""


def earlier_run(out_dir) -> list[str]:
    """What an earlier run left in out_dir, for a message ([] when there is none: a fresh run may start)."""
    out = Path(out_dir)
    found = []
    ckpt_dir = out / "ckpt"
    # complete checkpoints only (a manifest is written last): a tag a killed save left half-written holds nothing
    tags = sorted(p.parent.name for p in ckpt_dir.glob("step_*/manifest.json")) if ckpt_dir.is_dir() else []
    latest = ckpt_dir / "latest"
    if tags or latest.is_file():
        named = latest.read_text().strip() if latest.is_file() else None
        found.append(f"checkpoints {', '.join(tags) or 'none'}" + (f" (latest: {named})" if named else ""))
    if (out / "export").is_dir() and any((out / "export").iterdir()):
        found.append(f"an export in {out / 'export'}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(f"{metrics}")
    return found


def claim_out_dir(out_dir, resume: bool, overwrite: bool, rank: int = 0, log=print) -> None:
    """Where a run may start: OutDirHoldsARun when a new run (no --resume) would land on an earlier run
    without --overwrite; with --overwrite, global rank 0 removes the earlier run first. Call it once every
    other check has passed, before anything is written: the other ranks write nothing to out_dir before
    they meet rank 0 in the engine's collective setup, so they never see a half-removed run."""
    if resume and overwrite:
        raise OutDirHoldsARun("--resume continues the run in out_dir and --overwrite discards it: give one of them")
    if resume or rank != 0:
        return
    found = earlier_run(out_dir)
    if not found:
        return
    if not overwrite:
        ways = ["train into another directory (--out_dir=NEW_DIR; OUT_DIR=NEW_DIR for launch.sh)",
                "discard the earlier run and start over with --overwrite"]
        if (Path(out_dir) / "ckpt" / "latest").is_file():
            ways.insert(0, "continue it with --resume")
        raise OutDirHoldsARun(f"out_dir {out_dir} holds an earlier run ({'; '.join(found)}); a new run there would "
                              f"overwrite its checkpoints, export and metrics. Either {', or '.join(ways)}.")
    log(f"--overwrite: removing the earlier run in {out_dir} ({'; '.join(found)})")
    for name in RUN_PARTS:
        path = Path(out_dir) / name
        if path.is_symlink() or path.is_file():
            path.unlink()  # a linked folder: the link goes, nothing behind it is deleted
        elif path.is_dir():
            if name == "ckpt":  # `latest` first: a removal cut short leaves no marker naming a half-deleted tag
                (path / "latest").unlink(missing_ok=True)
            shutil.rmtree(path)


def main(argv: list[str] | None = None) -> int:
    """python -m training.run_lock OUT_DIR: exit 0 when no run holds OUT_DIR, 1 naming the holder when one does."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.run_lock",
                                 description="Exit 1, naming the run, when a training run holds OUT_DIR (launch.sh "
                                             "asks before it starts one); exit 0 when OUT_DIR is free.")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="a training run's out_dir")
    args = ap.parse_args(argv)
    try:
        check_free(args.out_dir)
    except OutDirInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
