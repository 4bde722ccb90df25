"""Test-wide setup. Runs before any test module imports the kernels."""
import os

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
