"""The engine boundary: what the training loop may ask of whatever shards the model.

pretrain.py talks to an `Engine` and never to DeepSpeed or FSDP directly. Two engines sit behind it:
    training/engines/deepspeed_engine.py   DeepSpeed: ZeRO 0-3 as its JSON says (the default)
    training/engines/fsdp_engine.py        PyTorch FSDP2 (fully_shard), --engine=fsdp
`make_engine` picks one from the training config's `engine` key and imports only that one (DeepSpeed must
not be imported before training.distributed.prepare_environment() has run). Both build the optimizer and
LR schedule of training/optim.py.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from models.diffusion import ObjectiveConfig, compute_loss
from models.gpt import GPT


class Engine(Protocol):
    """What the loop may ask. Gradient accumulation is the engine's: backward scales the loss by
    1/accumulation, and step() (called after every micro step) updates at the accumulation boundary,
    clipping the gradients and stepping the LR schedule."""

    device: torch.device

    def loss(self, x: torch.Tensor, y: torch.Tensor, seed: int, future_attention: float = 1.0) -> torch.Tensor:
        """The TrainingModule's loss of one micro batch (nats per token); x, y may be on the CPU.
        future_attention < 1 while attention anneals (models.diffusion.anneal_mask)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    @property
    def lr(self) -> float:
        """The learning rate the next update uses."""

    @property
    def grad_norm(self) -> float | None:
        """Global grad norm (before clipping) of the last update, None when the engine did not compute it."""

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        """Every rank writes its shards into ckpt_dir/tag (training/checkpointing/layout.py verifies and marks them)."""

    def load(self, ckpt_dir: str, tag: str) -> dict:
        """Model, optimizer and LR schedule from ckpt_dir/tag; returns the client_state it was saved with."""


class TrainingModule(nn.Module):
    """The GPT plus its objective: forward(x, y, seed) -> loss in nats per token.

    The engine wraps this module rather than the bare GPT, so the engine's forward *is* the loss: under
    ZeRO-3 its hooks gather each layer's parameters as the loss walks the model (the MDLM loss calls
    hidden_states and lm_head separately, which a logits-returning forward would not cover).
    `seed` fixes the diffusion time and mask of the batch, so a step is reproducible (and resumable);
    `future_attention` < 1 while the attention anneals."""

    def __init__(self, gpt: GPT, objective: ObjectiveConfig, mask_id: int):
        super().__init__()
        self.gpt = gpt
        self.objective = objective
        self.mask_id = mask_id

    def forward(self, x, y, seed: int, future_attention: float = 1.0):
        return compute_loss(self.gpt, x, y, self.objective, self.mask_id, seed, future_attention)


def compile_blocks(gpt: GPT) -> None:
    """torch.compile each Transformer block in place. Per block rather than the whole loss: the loss
    builds a torch.Generator from a Python seed (a graph break and a recompile per seed), while the
    blocks see the same shapes every step. In place, so the engine sees the same parameters."""
    for block in gpt.transformer.h:
        block.compile()


def init_process_group(name: str) -> None:
    """The process group of the engine `name`, made before the engine itself (which then reuses it): a
    resumed run's ranks agree on the checkpoint first, because its config decides the model to build."""
    if name == "fsdp":
        from training.engines.fsdp_engine import init_process_group as init_fsdp
        init_fsdp()
        return
    from training.engines.deepspeed_engine import init_process_group as init_deepspeed
    init_deepspeed()


def make_engine(name: str, module: TrainingModule, resolved) -> Engine:
    """The engine the training config names ("deepspeed" | "fsdp") over `resolved` (ds_config.resolve's
    or fsdp_engine.resolve_fsdp's result: config dict, client optimizer and scheduler kwargs)."""
    if name == "fsdp":
        from training.engines.fsdp_engine import FSDPEngine
        return FSDPEngine(module, resolved.config, resolved.client_optimizer, resolved.client_scheduler)
    from training.engines.deepspeed_engine import DeepSpeedEngine
    return DeepSpeedEngine(module, resolved.config, resolved.client_optimizer, resolved.client_scheduler)
