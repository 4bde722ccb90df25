"""A command line called in this process, for the refusals a user meets before anything runs (config, data,
resume point, DeepSpeed JSON, init source, a prompt too long): each one as a new process costs an
interpreter and the imports (~3.5 s on 2 cores for training/pretrain.py, which imports DeepSpeed) and shows
nothing more than the message. What only a process shows -- the exit status and that no traceback is
printed -- is checked once per command as a subprocess (test_faults.py, test_data.py).

Importing training.pretrain leaves os.environ alone (its process setup runs only as __main__); the out_dir
lock that a refused run took is released here, as the process exit releases it for a real run.
"""
from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(main, *args, prog: str = "") -> subprocess.CompletedProcess:
    """What `python PROG ARGS` run from the repository root returns when PROG's entry point is main(argv):
    the exit status (sys.exit("message") is exit 1 with the message on stderr, as the interpreter does),
    stdout and stderr."""
    from training.run_lock import release_all

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
        finally:
            release_all()
    if isinstance(code, str):
        err.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess([prog, *argv], code or 0, out.getvalue(), err.getvalue())


def pretrain_cli(*args) -> subprocess.CompletedProcess:
    """`python training/pretrain.py ARGS`, in this process."""
    from training import pretrain

    return run_cli(pretrain.cli, *args, prog="training/pretrain.py")
