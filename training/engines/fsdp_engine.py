"""The FSDP2 engine: PyTorch's fully_shard behind training/engines/interface.py's interface, as the DeepSpeed engine is.

    torchrun --nproc_per_node 2 training/pretrain.py --config training/configs/shakespeare_mdlm.json --engine=fsdp

One fully_shard per Transformer block and one over the root (the TrainingModule, so the root group holds
the tied embedding / lm_head and the final LayerNorm, gathered for the whole loss: the MDLM loss calls
hidden_states and lm_head separately). Parameters, gradients and AdamW states are sharded across ranks
(ZeRO-3-like). The optimizer, LR schedule, clipping and gradient accumulation are the DeepSpeed path's:
the same AdamW over GPT.optimizer_param_groups (optim.build_optimizer), the same warmup + cosine
LambdaLR (optim.build_lr_scheduler), the global grad norm clipped at grad_clip, and backward scaling the
loss by 1/accumulation with an update every accumulation-th step(). Gradients are averaged over ranks.

Precision: fp32 on CPU; on GPUs, dtype=bf16 is FSDP2 mixed precision (bf16 compute, fp32 master
weights, optimizer states and gradient reduction). fp16 needs loss scaling, which only the DeepSpeed
engine does here: it is refused.

Checkpoints (torch.distributed.checkpoint, resharding-capable) go into the tag dir that
training/checkpointing/layout.py then verifies and marks:
    step_N/fsdp/               DCP files: every rank's model + optimizer shards and .metadata
    step_N/fsdp_checkpoint.json   written by rank 0 after the DCP save: the marker that says "FSDP",
                               plus the LR scheduler state and the loop's client state (step, tokens)
training/export.py recognises the marker and consolidates the model shards into model.safetensors.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from training.checkpointing.layout import FSDP_MARKER, atomic_write_text, checkpoint_kind
from training.config import TrainConfig
from training.distributed import barrier, rank_and_world
from training.engines.ds_config import default_dtype
from training.engines.interface import Engine, TrainingModule
from training.optim import build_lr_scheduler, build_optimizer, optimizer_kwargs, schedule_kwargs

DCP_DIR = "fsdp"  # the DCP checkpoint inside the tag dir
CONFIG_FILE = "fsdp_config.json"  # the resolved engine config beside the checkpoint (ds_config.json's twin)


@dataclass
class ResolvedFSDP:
    config: dict  # the engine settings, logged and saved beside checkpoints
    client_optimizer: dict  # AdamW kwargs (lr, betas, eps, weight_decay)
    client_scheduler: dict  # warmup_cosine_lr kwargs
    source: str = "training config"


def resolve_fsdp(cfg: TrainConfig, world_size: int) -> ResolvedFSDP:
    """The FSDP engine's settings, all from the training config (there is no second file to reconcile)."""
    dtype = cfg.dtype if cfg.dtype != "auto" else default_dtype(loss_scaling=False)
    if dtype == "fp16":
        raise ValueError("engine=fsdp trains in fp32 or bf16 (fp16 needs loss scaling, which only the DeepSpeed "
                         "engine does here): set --dtype=bf16 or --dtype=fp32, or use --engine=deepspeed")
    if dtype == "bf16" and not torch.cuda.is_available():
        raise ValueError("engine=fsdp uses bf16 mixed precision on GPUs only; on CPU use --dtype=fp32")
    cfg.dtype = dtype
    opt, sched = optimizer_kwargs(cfg), schedule_kwargs(cfg)
    config = {
        "engine": "fsdp",
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": opt},
        "scheduler": {"type": "warmup_cosine", "params": sched},
        "mixed_precision": {"param_dtype": dtype, "reduce_dtype": "fp32"},
    }
    return ResolvedFSDP(config=config, client_optimizer=opt, client_scheduler=sched)


def init_process_group() -> torch.device:
    rank, local_rank, world = rank_and_world()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # gloo beside nccl: the loop all-reduces a few CPU scalars (stop flag, logged means)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return device


class FSDPEngine(Engine):
    """FSDP2 (fully_shard) with the Engine interface: loss, backward, step, lr, grad_norm, save, load."""

    def __init__(self, module: TrainingModule, config: dict, client_optimizer: dict, client_scheduler: dict):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.device = init_process_group()
        # a Block returns its (k, v) views for the KV cache; training drops them, nothing edits them in place
        warnings.filterwarnings("ignore", category=UserWarning, message=r"FSDP2-wrapped module .* returned a view tensor")
        self.gas = int(config["gradient_accumulation_steps"])
        self._grad_clip = float(config["gradient_clipping"])
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        param_dtype = dtypes[config["mixed_precision"]["param_dtype"]]
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        module.to(self.device)
        for block in module.gpt.transformer.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
        self.module = module
        # the parameters are DTensors now: the optimizer is built over the sharded ones
        self.optimizer = build_optimizer(module.gpt, client_optimizer)
        self.scheduler = build_lr_scheduler(self.optimizer, client_scheduler)
        self._micro_steps = 0
        self._last_grad_norm = None

    # --- the training step
    def loss(self, x, y, seed: int, future_attention: float = 1.0) -> torch.Tensor:
        return self.module(x.to(self.device), y.to(self.device), seed, future_attention)

    def backward(self, loss: torch.Tensor) -> None:
        # as DeepSpeed: the loss of a micro step counts 1/accumulation of the update
        (loss / self.gas if self.gas > 1 else loss).backward()

    def step(self) -> None:
        """Call after every micro step; the optimizer updates at the accumulation boundary."""
        self._micro_steps += 1
        if self._micro_steps % self.gas:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        clip = self._grad_clip if self._grad_clip > 0 else float("inf")
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a replicated DTensor
            self._last_grad_norm = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def grad_norm(self) -> float | None:
        return self._last_grad_norm

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    # --- checkpoints (sharded: every rank writes its part through DCP)
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        tag_dir = Path(ckpt_dir) / tag
        (tag_dir / DCP_DIR).mkdir(parents=True, exist_ok=True)
        dcp.save(self._state(), checkpoint_id=str(tag_dir / DCP_DIR))
        barrier()
        if dist.get_rank() == 0:
            marker = {"engine": "fsdp", "format": "torch.distributed.checkpoint", "dcp_dir": DCP_DIR,
                      "world_size": dist.get_world_size(), "micro_steps": self._micro_steps,
                      "scheduler": self.scheduler.state_dict(), "client_state": client_state}
            atomic_write_text(tag_dir / FSDP_MARKER, json.dumps(marker, indent=2) + "\n")

    def load(self, ckpt_dir: str, tag: str) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        tag_dir = Path(ckpt_dir) / tag
        if checkpoint_kind(tag_dir) != "fsdp":
            raise RuntimeError(f"{tag_dir} is not an FSDP checkpoint (no {FSDP_MARKER}; a DeepSpeed one?): "
                               f"resume it with --engine=deepspeed")
        marker = json.loads((tag_dir / FSDP_MARKER).read_text())
        state = self._state()
        dcp.load(state, checkpoint_id=str(tag_dir / marker["dcp_dir"]))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(marker["scheduler"])
        self._micro_steps = int(marker["micro_steps"])
        return marker["client_state"]


def consolidated_state_dict(tag_dir) -> dict[str, torch.Tensor]:
    """The full (unsharded) fp32 model state dict of an FSDP checkpoint, keys as the TrainingModule
    names them ("gpt.transformer..."), read in this one process (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tag_dir = Path(tag_dir)
    marker = json.loads((tag_dir / FSDP_MARKER).read_text())
    path = str(tag_dir / marker["dcp_dir"])
    metadata = dcp.FileSystemReader(path).read_metadata()
    prefix = "model."
    template = {k: torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in metadata.state_dict_metadata.items()
                if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not template:
        raise ValueError(f"{path}: no model tensors in this DCP checkpoint")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        dcp.load(template, checkpoint_id=path, no_dist=True)
    return {k[len(prefix):]: v for k, v in template.items()}
