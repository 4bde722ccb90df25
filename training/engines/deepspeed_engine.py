"""The DeepSpeed engine behind training/engines/interface.py's interface (the default; --engine=deepspeed).

DeepSpeed does the ZeRO stage its JSON names (training/engines/ds_config.py resolves the JSON against the training
config), gradient accumulation (backward scales the loss by 1/accumulation; step() only updates at the
accumulation boundary), clipping and the LR schedule. The optimizer and schedule are training/optim.py's,
handed to deepspeed.initialize, unless the JSON names DeepSpeed's own.

DeepSpeed is imported lazily: training.distributed.prepare_environment() must run first, because
DeepSpeed picks its accelerator (DS_ACCELERATOR) and, in a process no launcher started, its rank
discovery at import time.
"""
from __future__ import annotations

from pathlib import Path

import torch

from training.engines.ds_config import zero_stage
from training.engines.interface import Engine, TrainingModule
from training.optim import build_lr_scheduler, build_optimizer


def init_process_group() -> None:
    """DeepSpeed's process group, made now as deepspeed.initialize makes it (which then reuses it), with this
    rank's device current: an object collective before the engine exists (the resume's checkpoint choice)
    sends from torch.cuda.current_device() under NCCL."""
    import deepspeed  # after prepare_environment()
    from deepspeed.accelerator import get_accelerator

    from training.distributed import rank_and_world

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    get_accelerator().set_device(rank_and_world()[1])  # what the engine does first; a no-op on the CPU


class DeepSpeedEngine(Engine):
    """deepspeed.initialize over the TrainingModule, with the Engine interface."""

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
        self._own_clipping = (zero_stage(ds_config) == 0
                              and not ds_config.get("bf16", {}).get("enabled") and not ds_config.get("fp16", {}).get("enabled"))
        self._grad_clip = float(ds_config.get("gradient_clipping", 0.0))
        if self._own_clipping:
            ds_config = {**ds_config, "gradient_clipping": 0.0}
        self.ds, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, model_parameters=params,
                                                lr_scheduler=scheduler, config=ds_config)
        self.device = self.ds.device
        self._last_grad_norm = None

    # --- the training step
    def loss(self, x, y, seed: int, future_attention: float = 1.0) -> torch.Tensor:
        return self.ds(x.to(self.device), y.to(self.device), seed, future_attention)

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
        norm = self._last_grad_norm if self._own_clipping else self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train(self):
        self.ds.train()

    def eval(self):
        self.ds.eval()

    # --- checkpoints (sharded: every rank writes its part)
    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        # save_latest=False: DeepSpeed's own "latest" file is written before anything is verified;
        # training/checkpointing/layout.py writes the marker once the checkpoint is known to be complete
        self.ds.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir: str, tag: str) -> dict:
        path, client_state = self.ds.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
        if self.ds.load_universal_checkpoint() and self.ds.zero_optimization_partition_weights():
            self._restore_param_group_settings(Path(ckpt_dir) / tag)
        return client_state

    def _restore_param_group_settings(self, universal_dir: Path) -> None:
        """DeepSpeed 0.19's ZeRO-3 universal loader gives every param group the settings of group 0, so the
        no-decay group (biases, LayerNorms) would get weight decay: put back each group's own."""
        saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", weights_only=False)["param_groups"]
        optimizer = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)  # the wrapped torch optimizer
        for group, saved_group in zip(optimizer.param_groups, saved):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
