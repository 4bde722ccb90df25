"""Test-wide setup. Runs before any test module imports the kernels."""
import os

import pytest
import torch

# Triton kernels are decorated at import time; the interpreter must be chosen before that.
# Without a GPU the Triton tests run in the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Never reach for the network in tests (wandb, HF hub, datasets).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The tests' models are tiny: per-op overhead dominates and extra intra-op threads only add contention
# (on a busy 2-core machine, 2 OpenMP threads made single tests 20-100x slower). Subprocesses the tests
# launch (deepspeed ranks) set their own OMP_NUM_THREADS.
torch.set_num_threads(1)


# what a launcher or training.distributed.prepare_environment() sets: inherited by every later subprocess
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _process_state_is_left_as_found():
    """Tests share one process. Code under test that switches autograd off globally (a CLI's
    torch.set_grad_enabled(False) called in-process) breaks every later test that trains; rank variables
    left in os.environ (a MASTER_PORT of a finished run) make later training subprocesses reuse a port or
    believe a launcher started them. Fail the test that leaks either, and restore the state for the rest."""
    env = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    yield
    leaked = [name for name in LAUNCH_VARIABLES if os.environ.get(name) != env[name]]
    for name in leaked:
        if env[name] is None:
            os.environ.pop(name)
        else:
            os.environ[name] = env[name]
    grad_off = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not grad_off, "the test left autograd disabled (torch.set_grad_enabled(False) outside a with-block)"
    assert not leaked, f"the test left {leaked} changed in os.environ"
