"""The training config: one typed dataclass, overridden by a JSON/TOML file and then by command-line flags.

    defaults (below)  <  --config FILE (.json or .toml)  <  --key=value / --key value flags

Keys are the field names below. The model and the objective are nested dataclasses and are addressed
with a dot, in files as nested tables and on the command line as dotted keys:

    --model.n_layer=4  --model.attention=bidirectional  --objective.name=ar  --max_iters 200  --compile

A bare boolean flag (`--compile`, `--resume`) means true. `--objective=ar` is short for
`--objective.name=ar`. Unknown keys are an error that lists the known ones. Nothing is ever exec'd.

`load_config` also returns which keys were stated explicitly (in the file or a flag): the DeepSpeed
JSON may state batch size, clipping, optimizer and LR schedule too, and a value stated in both places
that disagrees is an error (training/ds_config.py), while a default silently yields to the JSON.
"""
from __future__ import annotations

import json
import tomllib
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from models.diffusion import ObjectiveConfig
from models.gpt import GPTConfig


ENGINES = ("deepspeed", "fsdp")


def _quickstart_model() -> GPTConfig:
    # the char-level Shakespeare quickstart model (training/configs/shakespeare_mdlm.json states it too);
    # vocab_size=0 means "take padded_vocab_size from the data's meta.json"
    return GPTConfig(block_size=64, vocab_size=0, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                     bias=False, attention="bidirectional", pos_emb="rope")


@dataclass
class TrainConfig:
    # the engine that shards the model (training/engine.py): DeepSpeed (ZeRO stage from --deepspeed_config) or FSDP2
    engine: str = field(default="deepspeed", metadata={"help": "deepspeed | fsdp (FSDP2: launch with torchrun; all settings from this config, --deepspeed_config is an error)"})
    # data and output
    data_dir: str = field(default="data/shakespeare_char", metadata={"help": "prepared dataset (train.bin, val.bin, meta.json)"})
    out_dir: str = field(default="out", metadata={"help": "checkpoints, metrics.jsonl, tb/, wandb/, export/"})
    model: GPTConfig = field(default_factory=_quickstart_model, metadata={"help": "the backbone (models/gpt.py GPTConfig); model.vocab_size=0 takes it from the data"})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"help": "ar | mdlm | bd3lm and its noise schedule (models/diffusion.py)"})
    tokenizer: str = field(default="", metadata={"help": "expected tokenizer of the data ('' = whatever the data was prepared with)"})
    # batch: stated here or in the DeepSpeed JSON, not both (ds_config.py)
    batch_size: int = field(default=32, metadata={"help": "micro batch per rank (DeepSpeed train_micro_batch_size_per_gpu)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro steps per optimizer step"})
    # optimizer (torch AdamW, no weight decay on biases and LayerNorms) and cosine LR schedule
    learning_rate: float = field(default=1.5e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1.5e-4, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_iters: int = field(default=50, metadata={"help": "linear warmup steps"})
    lr_decay_iters: int = field(default=0, metadata={"help": "step where the cosine reaches min_lr (0 = max_iters)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices and embeddings"})
    beta1: float = 0.9
    beta2: float = field(default=0.99, metadata={"help": "0.99 suits small batches (nanoGPT's shakespeare_char)"})
    eps: float = 1e-8
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (0 = off)"})
    # the loop
    max_iters: int = field(default=1000, metadata={"help": "optimizer steps to train in total"})
    eval_interval: int = field(default=250, metadata={"help": "evaluate every N steps (and at the end)"})
    eval_iters: int = field(default=20, metadata={"help": "val batches per evaluation (rounded up to a multiple of the world size)"})
    eval_only: bool = field(default=False, metadata={"help": "evaluate once (after --resume: the checkpoint) and exit"})
    log_interval: int = field(default=10, metadata={"help": "write a train record every N steps"})
    checkpoint_interval: int = field(default=500, metadata={"help": "save a checkpoint every N steps (0 = only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many complete checkpoints to keep (older ones are deleted)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest good checkpoint in out_dir"})
    export_dir: str = field(default="", metadata={"help": "consolidated weights at the end ('' = out_dir/export, 'none' = skip)"})
    seed: int = 1337
    # precision and speed
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU) | fp32 | bf16 | fp16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (first step compiles, ~10-20 s on CPU)"})
    # logging
    wandb_project: str = field(default="diffusiongpt", metadata={"help": "wandb project"})
    wandb_run_name: str = field(default="", metadata={"help": "wandb run name ('' = out_dir's name)"})
    wandb_mode: str = field(default="auto", metadata={"help": "auto (online with WANDB_API_KEY, else offline) | online | offline | disabled"})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard events to out_dir/tb"})
    progress_bar: bool = field(default=True, metadata={"help": "tqdm bar on rank 0"})
    peak_flops: float = field(default=0.0, metadata={"help": "peak FLOP/s per rank for MFU (0 = a default per device, see metrics.py)"})

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}: expected {' | '.join(ENGINES)}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype={self.dtype!r}: expected auto | fp32 | bf16 | fp16")
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"wandb_mode={self.wandb_mode!r}: expected auto | online | offline | disabled")
        for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters",
                     "log_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        allowed = self.objective.required_attention()
        if self.model.attention not in allowed:
            raise ValueError(
                f"objective {self.objective.name!r} cannot train a model with attention={self.model.attention!r}: "
                f"it needs one of {allowed} (set --model.attention={allowed[0]})")
        if self.objective.name == "bd3lm":
            b, T = self.model.block_length, self.model.block_size
            if b < 1:
                raise ValueError(f"objective 'bd3lm' needs --model.block_length >= 1 (the diffusion block size); "
                                 f"got {b}")
            if T % b:
                raise ValueError(f"objective 'bd3lm' trains on sequences of model.block_size={T} tokens, which "
                                 f"must be a multiple of model.block_length={b}")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.max_iters

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- building from dicts
def _known_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        sub = _nested_type(cls, f)
        keys += _known_keys(sub, f"{prefix}{f.name}.") if sub else [prefix + f.name]
    return keys


def _nested_type(cls, f):
    hint = typing.get_type_hints(cls)[f.name]
    return hint if is_dataclass(hint) else None


def _default_instance(cls, f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a (possibly nested) dict on top of its defaults."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {[where + k for k in unknown]} in {cls.__name__}; known keys: "
                         f"{', '.join(_known_keys(cls, where))}")
    kwargs = {}
    for name, f in known.items():
        sub = _nested_type(cls, f)
        if sub is not None:
            base = asdict(_default_instance(cls, f))
            kwargs[name] = _build(sub, {**base, **values.get(name, {})}, f"{where}{name}.")
        elif name in values:
            kwargs[name] = _checked(values[name], typing.get_type_hints(cls)[name], where + name)
    return cls(**kwargs)


def _checked(value, typ, key: str):
    """A value from a config file must already have the field's type (an int is fine for a float)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"config key {key}: expected {typ.__name__}, got {value!r}")
    return value


def _coerce(text: str, typ, key: str):
    """A command-line string to the field's type."""
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}: expected true/false, got {text!r}")
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{key}: expected {typ.__name__}, got {text!r}") from None


def _field_types(cls, prefix: str = "") -> dict[str, type]:
    out = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        if is_dataclass(hint):
            out.update(_field_types(hint, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = hint
    return out


def read_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def parse_overrides(argv: list[str]) -> dict[str, object]:
    """['--model.n_layer=4', '--max_iters', '100', '--compile'] -> {'model.n_layer': 4, ...} (typed)."""
    types = _field_types(TrainConfig)
    known = ", ".join(types)
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: overrides look like --key=value or --key value")
        key, eq, value = arg[2:].partition("=")
        if key == "objective" and (eq or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))):
            key = "objective.name"  # --objective=ar is short for --objective.name=ar
        if key not in types:
            raise ValueError(f"unknown config key --{key}; known keys: {known}")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if types[key] is bool and not has_value:
                value = "true"  # a bare boolean flag
            elif not has_value:
                raise ValueError(f"--{key} needs a value")
            else:
                value = argv[i + 1]
                i += 1
        out[key] = _coerce(value, types[key], key)
        i += 1
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def load_config(config_file: str | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> tuple[TrainConfig, set[str]]:
    """defaults < base (e.g. a checkpoint's saved config) < config_file < overrides.
    Returns the config and the dotted keys stated explicitly by base, file or flags."""
    values: dict = {}
    for layer in (base or {}, read_config_file(config_file) if config_file else {}):
        values.update(_flatten(layer))
    values.update(parse_overrides(overrides or []))
    explicit = set(values)
    cfg = _build(TrainConfig, _nest(values), "")
    return cfg, explicit


def config_help() -> str:
    """Every key with its default and meaning, for --help."""
    lines = []
    default = TrainConfig()
    flat_default = _flatten(default.to_dict())
    helps = {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}
    for key, value in flat_default.items():
        top = key.split(".")[0]
        note = helps.get(key, "") if "." not in key else ""
        lines.append(f"  --{key}={json.dumps(value)}" + (f"   {note}" if note else ""))
        if "." in key and key == next(k for k in flat_default if k.startswith(top + ".")) and helps.get(top):
            lines[-1] += f"   [{top}: {helps[top]}]"
    return "\n".join(lines)
