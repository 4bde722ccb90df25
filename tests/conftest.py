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
