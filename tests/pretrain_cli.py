"""`training/pretrain.py ARGS` called in this process, for the refusals a user meets before anything trains
(config, data, resume point, DeepSpeed JSON, init source): each one as a new process costs an interpreter
and a DeepSpeed import (~3.5 s on 2 cores) and shows nothing more than the message. What only a process
shows -- the exit status and that no traceback is printed -- test_faults.py checks once, as a subprocess
(test_a_bad_input_exits_1_with_one_line_and_no_traceback).

Importing training.pretrain leaves os.environ alone (its process setup runs only as __main__); the out_dir
lock that a refused run took is released here, as the process exit releases it for a real run.
"""
from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pretrain_cli(*args) -> subprocess.CompletedProcess:
    """What `python training/pretrain.py ARGS` run from the repository root returns: the exit status
    (sys.exit("message") is exit 1 with the message on stderr, as the interpreter does), stdout and stderr."""
    from training import pretrain
    from training.run_lock import release_all

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            pretrain.cli(argv)
        except SystemExit as e:
            code = e.code
        finally:
            release_all()
    if isinstance(code, str):
        err.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess(["training/pretrain.py", *argv], code or 0, out.getvalue(), err.getvalue())
