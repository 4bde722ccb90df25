"""The engine boundary: what the training loop may ask of whatever shards the model.

pretrain.py talks to an `Engine` (loss, backward, step, lr, grad_norm, save, load) and never to
DeepSpeed directly, so a second engine (FSDP2, training/fsdp_engine.py) sits behind the same few methods;
`make_engine` picks one from the training config's `engine` key. DeepSpeed's engine
does the ZeRO stage its JSON names, gradient accumulation (backward scales the loss by 1/accumulation;
step() only updates at the accumulation boundary), clipping and the LR schedule.

DeepSpeed is imported lazily: `prepare_environment()` must run first, because DeepSpeed picks its
accelerator (DS_ACCELERATOR) and, in a process no launcher started, its rank discovery at import time.
"""
from __future__ import annotations

import os
import socket
import warnings

import numpy as np
import torch
import torch.nn as nn

from models.diffusion import ObjectiveConfig, compute_loss
from models.gpt import GPT


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment() -> None:
    """Make a plain `python training/pretrain.py` a world of one, and pick the CPU accelerator when
    there is no GPU. Launchers (deepspeed, torchrun, mpirun via DeepSpeed) set these variables
    themselves and are left alone."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # without these DeepSpeed falls back to MPI discovery and fails on a missing mpi4py
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates: one warning per call site
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.\w+` is deprecated")


def rank_and_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def mix_seed(*ints: int) -> int:
    """One well-mixed 63-bit seed from several integers (SeedSequence hashing), e.g. (seed, step, rank,
    micro_step) for the diffusion mask of a batch: a resumed run draws the same masks."""
    a, b = np.random.SeedSequence(list(ints)).generate_state(2, dtype=np.uint32)
    return int(a) << 31 ^ int(b)


class TrainingModule(nn.Module):
    """The GPT plus its objective: forward(x, y, seed) -> loss in nats per token.

    The engine wraps this module rather than the bare GPT, so the engine's forward *is* the loss: under
    ZeRO-3 its hooks gather each layer's parameters as the loss walks the model (the MDLM loss calls
    hidden_states and lm_head separately, which a logits-returning forward would not cover).
    `seed` fixes the diffusion time and mask of the batch, so a step is reproducible (and resumable)."""

    def __init__(self, gpt: GPT, objective: ObjectiveConfig, mask_id: int):
        super().__init__()
        self.gpt = gpt
        self.objective = objective
        self.mask_id = mask_id

    def forward(self, x, y, seed: int):
        return compute_loss(self.gpt, x, y, self.objective, self.mask_id, seed)


def compile_blocks(gpt: GPT) -> None:
    """torch.compile each Transformer block in place. Per block rather than the whole loss: the loss
    builds a torch.Generator from a Python seed (a graph break and a recompile per seed), while the
    blocks see the same shapes every step. In place, so DeepSpeed sees the same parameters."""
    for block in gpt.transformer.h:
        block.compile()


def build_optimizer(gpt: GPT, client_optimizer: dict) -> torch.optim.Optimizer:
    """torch AdamW over GPT.optimizer_param_groups (no decay on biases and LayerNorms), from the
    resolved kwargs (lr, betas, eps, weight_decay); both engines build it here."""
    fused = torch.cuda.is_available()  # fused AdamW is the fast path on GPUs; foreach is on CPU
    return torch.optim.AdamW(gpt.optimizer_param_groups(client_optimizer["weight_decay"]),
                             lr=client_optimizer["lr"], betas=tuple(client_optimizer["betas"]),
                             eps=client_optimizer["eps"], **({"fused": True} if fused else {}))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, client_scheduler: dict):
    """nanoGPT's warmup + cosine (training/ds_config.py warmup_cosine_lr) as a LambdaLR stepped once
    per optimizer update; both engines build it here."""
    from training.ds_config import warmup_cosine_lr

    peak = client_scheduler["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_lr(step, **client_scheduler) / peak)


class Engine:
    """The DeepSpeed engine behind the small interface the loop uses."""

    def __init__(self, module: TrainingModule, ds_config: dict, client_optimizer: dict | None,
                 client_scheduler: dict | None = None):
        import deepspeed  # after prepare_environment()

        optimizer = build_optimizer(module.gpt, client_optimizer) if client_optimizer is not None else None
        params = None if optimizer else module.gpt.optimizer_param_groups(ds_config["optimizer"]["params"]["weight_decay"])
        scheduler = None
        if client_scheduler is not None:
            # a callable: DeepSpeed hands it the optimizer it built; it steps it after every update
            scheduler = lambda opt: build_lr_scheduler(opt, client_scheduler)  # noqa: E731
        # DeepSpeed reports the grad norm from its ZeRO / bf16 / fp16 optimizers, but its plain fp32 ZeRO-0
        # path computes it for clipping and throws it away: there we clip ourselves (same maths, one
        # pass over the already all-reduced grads) and keep the norm
        self._own_clipping = (int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 0
                              and not ds_config.get("bf16", {}).get("enabled") and not ds_config.get("fp16", {}).get("enabled"))
        self._grad_clip = float(ds_config.get("gradient_clipping", 0.0))
        if self._own_clipping:
            ds_config = {**ds_config, "gradient_clipping": 0.0}
        self.ds, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, model_parameters=params,
                                                lr_scheduler=scheduler, config=ds_config)
        self.device = self.ds.device
        self._last_grad_norm = None

    # --- the training step
    def loss(self, x, y, seed: int) -> torch.Tensor:
        return self.ds(x.to(self.device), y.to(self.device), seed)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        """Call after every micro step; the optimizer updates at the accumulation boundary."""
        if self._own_clipping and self.ds.is_gradient_accumulation_boundary():
            params = [p for p in self.ds.module.parameters() if p.grad is not None]
            clip = self._grad_clip if self._grad_clip > 0 else float("inf")
            self._last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if params else None
        self.ds.step()

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def grad_norm(self) -> float | None:
        """Global grad norm (before clipping) of the last update, None when the engine did not compute it."""
        norm = self._last_grad_norm if self._own_clipping else self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train(self):
        self.ds.train()

    def eval(self):
        self.ds.eval()

    # --- checkpoints (sharded: every rank writes its part)
    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        # save_latest=False: DeepSpeed's own "latest" file is written before anything is verified;
        # training/checkpoint.py writes the marker once the checkpoint is known to be complete
        self.ds.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir: str, tag: str) -> dict:
        path, client_state = self.ds.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
        return client_state


def make_engine(name: str, module: TrainingModule, resolved):
    """The engine the training config names ("deepspeed" | "fsdp") over `resolved` (ds_config.resolve's
    or fsdp_engine.resolve_fsdp's result: config dict, client optimizer and scheduler kwargs)."""
    if name == "fsdp":
        from training.fsdp_engine import FSDPEngine
        return FSDPEngine(module, resolved.config, resolved.client_optimizer, resolved.client_scheduler)
    return Engine(module, resolved.config, resolved.client_optimizer, resolved.client_scheduler)
