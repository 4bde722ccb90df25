"""Resolve a DeepSpeed JSON against the training config, so every number is stated exactly once.

Batch size, gradient clipping, optimizer, LR schedule and precision can live in either file. In the
DeepSpeed JSON a field may say "auto" (or be left out): the training config fills it. If the JSON
states a value, the training config adopts it, unless the training config also states that key
explicitly (in --config or a flag) with another value: that is a contradiction and an error naming
both. DeepSpeed itself does not accept "auto" everywhere, so the dict handed to deepspeed.initialize
is fully resolved here.

The optimizer: an "Adam"/"AdamW" section becomes a client torch.optim.AdamW (training/optim.py) over
GPT.optimizer_param_groups (no weight decay on biases and LayerNorms), and is removed from the dict
DeepSpeed sees. That keeps DeepSpeed from JIT-compiling its own Adam op (~60 s on a CPU), and is what
the plain-PyTorch baseline in bench/training.py runs too. Any other optimizer type is handed to
DeepSpeed unchanged (after filling "auto"). The LR schedule is the training config's (nanoGPT's linear
warmup + cosine decay) unless the JSON has a "scheduler" section, which DeepSpeed then runs.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from training.config import TrainConfig
from training.optim import schedule_kwargs
from common.precision import native_bf16

AUTO = "auto"
CLIENT_OPTIMIZERS = ("adam", "adamw")  # built as torch AdamW by us


class ConfigConflict(ValueError):
    """The DeepSpeed JSON and the training config state different values for the same thing."""


@dataclass
class ResolvedDeepSpeed:
    config: dict  # what deepspeed.initialize receives: no "auto" left
    client_optimizer: dict | None  # AdamW kwargs (lr, betas, eps, weight_decay) or None (DeepSpeed builds it)
    client_scheduler: dict | None  # warmup_cosine_lr kwargs or None (the JSON names DeepSpeed's scheduler)
    source: str  # the JSON's path, for messages


def load_ds_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist (see ds_configs/ for zero0..zero3)")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    check_ds_shape(ds, path)
    return ds


ZERO_STAGES = (0, 1, 2, 3)


def check_ds_shape(ds, path) -> None:
    """The few things DeepSpeed would otherwise reject with a long pydantic traceback: the file is one JSON
    object, and zero_optimization (when given) is an object whose stage is 0, 1, 2 or 3."""
    fix = "start from one of ds_configs/zero0.json .. zero3.json"
    if not isinstance(ds, dict):
        raise ValueError(f"DeepSpeed config {path} must hold one JSON object ({{\"zero_optimization\": ...}}), not a "
                         f"{type(ds).__name__}: {fix}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"DeepSpeed config {path}: zero_optimization must be an object ({{\"stage\": 2}}), got "
                         f"{zero!r}: {fix}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ValueError(f"DeepSpeed config {path}: zero_optimization.stage={stage!r}, but DeepSpeed's ZeRO stages are "
                         f"0, 1, 2 and 3 (0 = plain data parallel, 3 = parameters sharded too): set one of them, or "
                         f"{fix}")


def default_dtype(loss_scaling: bool = True) -> str:
    """fp32 on CPU (fp16 is refused there and bf16 matmuls are slow on most CPUs); bf16 on GPUs that
    compute it natively (common/precision.py); on older GPUs fp16 where the engine scales the loss
    (DeepSpeed: its fp16 section's dynamic loss scaling), else fp32."""
    if not torch.cuda.is_available():
        return "fp32"
    if native_bf16():
        return "bf16"
    return "fp16" if loss_scaling else "fp32"


class _Resolver:
    def __init__(self, ds: dict, cfg: TrainConfig, explicit: set[str], source: str):
        self.ds, self.cfg, self.explicit, self.source = ds, cfg, explicit, source

    def reconcile(self, ds_path: str, ds_value, cfg_keys: tuple[str, ...], cfg_value, adopt) -> object:
        """One field: fill "auto" from the config, or adopt the JSON's value unless that contradicts an
        explicitly stated config value. Returns the resolved value."""
        if ds_value is None or ds_value == AUTO:
            return cfg_value
        if not _same(ds_value, cfg_value):
            stated = [k for k in cfg_keys if k in self.explicit]
            if stated:
                raise ConfigConflict(
                    f"{self.source} says {ds_path}={json.dumps(ds_value)} but the training config says "
                    f"{_describe(cfg_keys, self.cfg)} (stated in --config or a flag): state it in one place, "
                    f"e.g. set \"{ds_path.split('.')[-1]}\": \"auto\" in the JSON")
            adopt(ds_value)
        return ds_value


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _describe(keys, cfg) -> str:
    return ", ".join(f"{k}={json.dumps(getattr(cfg, k))}" for k in keys)


def resolve(ds_json: dict, cfg: TrainConfig, explicit: set[str], world_size: int,
            source: str = "DeepSpeed config") -> ResolvedDeepSpeed:
    """Fill every "auto" of ds_json from cfg (and cfg from the JSON's stated values, in place)."""
    ds = copy.deepcopy(ds_json)
    r = _Resolver(ds, cfg, explicit, source)

    def setter(key, cast=lambda v: v):
        return lambda v: setattr(cfg, key, cast(v))

    # --- batch: micro batch x accumulation x ranks = global batch
    ds["train_micro_batch_size_per_gpu"] = r.reconcile(
        "train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu"), ("batch_size",),
        cfg.batch_size, setter("batch_size", int))
    gas_in_json = ds.get("gradient_accumulation_steps", AUTO) != AUTO
    tbs = ds.get("train_batch_size", AUTO)
    if tbs != AUTO and not gas_in_json and "gradient_accumulation_steps" not in explicit:
        # the JSON fixes the global batch: derive the accumulation from it, as DeepSpeed would
        per_step = cfg.batch_size * world_size
        if tbs % per_step:
            raise ConfigConflict(f"{source} says train_batch_size={tbs}, which is not a multiple of "
                                 f"batch_size={cfg.batch_size} x {world_size} ranks")
        cfg.gradient_accumulation_steps = tbs // per_step
    ds["gradient_accumulation_steps"] = r.reconcile(
        "gradient_accumulation_steps", ds.get("gradient_accumulation_steps"), ("gradient_accumulation_steps",),
        cfg.gradient_accumulation_steps, setter("gradient_accumulation_steps", int))
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    if tbs != AUTO and tbs != global_batch:
        raise ConfigConflict(
            f"{source} says train_batch_size={tbs} but batch_size={cfg.batch_size} x "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} x {world_size} ranks = {global_batch}")
    ds["train_batch_size"] = global_batch

    # --- gradient clipping (0 = off in both)
    ds["gradient_clipping"] = r.reconcile("gradient_clipping", ds.get("gradient_clipping"), ("grad_clip",),
                                          cfg.grad_clip, setter("grad_clip", float))

    # --- optimizer
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    params["lr"] = r.reconcile("optimizer.params.lr", params.get("lr"), ("learning_rate",), cfg.learning_rate,
                               setter("learning_rate", float))
    params["betas"] = list(r.reconcile("optimizer.params.betas", params.get("betas"), ("beta1", "beta2"),
                                       [cfg.beta1, cfg.beta2],
                                       lambda v: (setattr(cfg, "beta1", float(v[0])), setattr(cfg, "beta2", float(v[1])))))
    params["eps"] = r.reconcile("optimizer.params.eps", params.get("eps"), ("eps",), cfg.eps, setter("eps", float))
    params["weight_decay"] = r.reconcile("optimizer.params.weight_decay", params.get("weight_decay"),
                                         ("weight_decay",), cfg.weight_decay, setter("weight_decay", float))
    client_optimizer = None
    if str(opt.get("type", "")).lower() in CLIENT_OPTIMIZERS:
        extra = sorted(set(params) - {"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode"})
        if extra:
            raise ValueError(f"{source}: optimizer params {extra} are not supported by the torch AdamW this "
                             f"toolkit builds (known: lr, betas, eps, weight_decay)")
        client_optimizer = {k: params[k] for k in ("lr", "betas", "eps", "weight_decay")}
        del ds["optimizer"]
        # ZeRO-Offload refuses a client optimizer unless told it is deliberate: ours is torch AdamW, which
        # steps the offloaded fp32 master weights on the CPU without compiling DeepSpeed's CPU Adam op
        ds.setdefault("zero_force_ds_cpu_optimizer", False)

    # --- LR schedule: without a "scheduler" section, nanoGPT's warmup + cosine from the training config
    # (a client LambdaLR: DeepSpeed's WarmupCosineLR trains its first two steps at lr 0); with a
    # WarmupCosineLR section, DeepSpeed's runs and its "auto" params come from the training config
    client_scheduler = None
    sched = ds.get("scheduler")
    if sched is None:
        client_scheduler = schedule_kwargs(cfg)
    elif sched.get("type") == "WarmupCosineLR":
        sp = sched.setdefault("params", {})
        sp["warmup_num_steps"] = r.reconcile("scheduler.params.warmup_num_steps", sp.get("warmup_num_steps"),
                                             ("warmup_iters",), cfg.warmup_iters, setter("warmup_iters", int))
        sp["warmup_num_steps"] = max(1, sp["warmup_num_steps"])  # DeepSpeed wants a positive integer
        sp["total_num_steps"] = r.reconcile("scheduler.params.total_num_steps", sp.get("total_num_steps"),
                                            ("lr_decay_iters", "max_iters"), cfg.decay_iters,
                                            setter("lr_decay_iters", int))
        sp["cos_min_ratio"] = r.reconcile("scheduler.params.cos_min_ratio", sp.get("cos_min_ratio"),
                                          ("min_lr", "learning_rate"), cfg.min_lr / cfg.learning_rate,
                                          lambda v: setattr(cfg, "min_lr", float(v) * cfg.learning_rate))
        sp.setdefault("warmup_min_ratio", 0.0)
        sp.setdefault("warmup_type", "linear")
    elif any(v == AUTO for v in sched.get("params", {}).values()):
        raise ValueError(f"{source}: 'auto' is only understood in a WarmupCosineLR scheduler section; "
                         f"state the values of {sched.get('type')} explicitly")

    # --- precision: bf16 / fp16 sections; fp32 when neither is enabled
    want = cfg.dtype if cfg.dtype != AUTO else default_dtype()
    enabled = {name: ds.setdefault(name, {}).get("enabled", AUTO) for name in ("bf16", "fp16")}
    on = [name for name, v in enabled.items() if v is True]
    if len(on) == 2:
        raise ValueError(f"{source} enables both bf16 and fp16")
    stated = on[0] if on else ("fp32" if enabled.get(want) is False else None)
    if stated is not None and stated != want:
        if "dtype" in explicit:
            raise ConfigConflict(f"{source} says {stated} ({', '.join(f'{k}.enabled={json.dumps(v)}' for k, v in enabled.items())}) "
                                 f"but the training config says dtype={json.dumps(cfg.dtype)}: state the precision in one place")
        want = stated
    for name in ("bf16", "fp16"):
        ds[name]["enabled"] = want == name
    # fp16 without a stated loss_scale: DeepSpeed's default, dynamic loss scaling (loss_scale 0)
    cfg.dtype = want
    if want == "fp16" and not torch.cuda.is_available():
        raise ValueError("fp16 needs a GPU (DeepSpeed refuses it on CPU); use dtype=bf16 or fp32")

    leftover = _find_auto(ds)
    if leftover:
        raise ValueError(f"{source}: 'auto' is not understood for {leftover}; state those values explicitly")
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves (metrics.py); DeepSpeed's prints would duplicate
    return ResolvedDeepSpeed(config=ds, client_optimizer=client_optimizer, client_scheduler=client_scheduler,
                             source=source)


def _find_auto(d, prefix="") -> list[str]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _find_auto(v, f"{prefix}{k}.")
    elif d == AUTO:
        out.append(prefix.rstrip("."))
    return out


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it names none): the one place that reads it."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))
