"""The optimizer and the LR schedule, the same for every engine: torch AdamW over
GPT.optimizer_param_groups (no weight decay on biases and LayerNorms) and nanoGPT's linear warmup +
cosine decay as a LambdaLR stepped once per optimizer update.

The DeepSpeed engine hands both to deepspeed.initialize (unless the DeepSpeed JSON names DeepSpeed's own,
training/engines/ds_config.py); the FSDP engine steps them itself.
"""
from __future__ import annotations

import math

import torch

from models.gpt import GPT
from training.config import TrainConfig


def optimizer_kwargs(cfg: TrainConfig) -> dict:
    """The torch AdamW settings of the training config (what ds_config.resolve hands the DeepSpeed engine
    as client_optimizer when the JSON says "auto"; the FSDP engine takes them as they are)."""
    return {"lr": cfg.learning_rate, "betas": [cfg.beta1, cfg.beta2], "eps": cfg.eps, "weight_decay": cfg.weight_decay}


def schedule_kwargs(cfg: TrainConfig) -> dict:
    """warmup_cosine_lr's keyword arguments from the training config."""
    return {"lr": cfg.learning_rate, "min_lr": cfg.min_lr, "warmup_iters": cfg.warmup_iters,
            "decay_iters": cfg.decay_iters}


def warmup_cosine_lr(step: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """nanoGPT's get_lr: linear warmup to lr over warmup_iters, cosine decay to min_lr at decay_iters."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def build_optimizer(gpt: GPT, client_optimizer: dict) -> torch.optim.Optimizer:
    """torch AdamW over GPT.optimizer_param_groups from the resolved kwargs (lr, betas, eps, weight_decay)."""
    fused = torch.cuda.is_available()  # fused AdamW is the fast path on GPUs; foreach is on CPU
    return torch.optim.AdamW(gpt.optimizer_param_groups(client_optimizer["weight_decay"]),
                             lr=client_optimizer["lr"], betas=tuple(client_optimizer["betas"]),
                             eps=client_optimizer["eps"], **({"fused": True} if fused else {}))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, client_scheduler: dict):
    """warmup_cosine_lr (client_scheduler: its kwargs) as a LambdaLR stepped once per optimizer update."""
    peak = client_scheduler["lr"]  # LambdaLR scales the optimizer's lr (= peak); peak 0 (a frozen run) stays 0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_lr(step, **client_scheduler) / peak if peak else 0.0)
