"""The training config: one typed dataclass, overridden by a JSON/TOML file and then by command-line flags.

    defaults (below)  <  --config FILE (.json or .toml)  <  --key=value / --key value flags

Keys are the field names below. The model and the objective are nested dataclasses and are addressed
with a dot, in files as nested tables and on the command line as dotted keys:

    --model.n_layer=4  --model.attention=bidirectional  --objective.name=ar  --max_iters 200  --compile

A bare boolean flag (`--compile`, `--resume`) means true. `--objective=ar` is short for
`--objective.name=ar`. Unknown keys are an error that lists the known ones. Nothing is ever exec'd.
The loader is the one every command uses (common/config.py); this module holds what is training's own.

`load_config` also returns which keys were stated explicitly (in the file or a flag): the DeepSpeed
JSON may state batch size, clipping, optimizer and LR schedule too, and a value stated in both places
that disagrees is an error (training/engines/ds_config.py), while a default silently yields to the JSON.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from common.config import help_text, load
from models.diffusion import ObjectiveConfig
from models.gpt import GPTConfig
from training.distillation import check_config as check_distillation_config


ENGINES = ("deepspeed", "fsdp")
CHECKPOINT_HASHES = ("none", "sha256")  # what a checkpoint's manifest records besides each file's size


def _quickstart_model() -> GPTConfig:
    # the char-level Shakespeare quickstart model (training/configs/shakespeare_mdlm.json states it too);
    # vocab_size=0 means "take padded_vocab_size from the data's meta.json"
    return GPTConfig(block_size=64, vocab_size=0, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                     bias=False, attention="bidirectional", pos_emb="rope")


@dataclass
class TrainConfig:
    # the engine that shards the model (training/engines/interface.py): DeepSpeed (ZeRO stage from --deepspeed_config) or FSDP2
    engine: str = field(default="deepspeed", metadata={"help": "deepspeed | fsdp (FSDP2: launch with torchrun; all settings from this config, --deepspeed_config is an error)"})
    # data and output
    data_dir: str = field(default="data/shakespeare_char", metadata={"help": "prepared dataset (train.bin, val.bin, meta.json)"})
    out_dir: str = field(default="out", metadata={"help": "checkpoints, metrics.jsonl, tb/, wandb/, export/"})
    model: GPTConfig = field(default_factory=_quickstart_model, metadata={"help": "the backbone (models/gpt.py GPTConfig); model.vocab_size=0 takes it from the data"})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"help": "ar | mdlm | bd3lm and its noise schedule (models/diffusion.py)"})
    tokenizer: str = field(default="", metadata={"help": "expected tokenizer of the data ('' = whatever the data was prepared with)"})
    init_from: str = field(default="", metadata={"help": "start from these weights (training/init_from.py): a run's out_dir, its export/, a ckpt/step_N dir, gpt2 | gpt2-medium | ... or a Hugging Face GPT-2 dir; the shape comes from it, the optimizer starts fresh ('' = random init)"})
    anneal_attention_iters: int = field(default=0, metadata={"help": "attention annealing (DiffuGPT, diffusion objectives): over the first N steps each query sees each later key with probability step/N, from causal to the model's own mask (0 = off)"})
    # distillation through time (training/distillation.py): a student that samples in fewer steps than its teacher
    distill_from: str = field(default="", metadata={"help": "distil this mdlm teacher (an export, a run's out_dir or a ckpt/step_N dir) into a student that samples in distill_steps ancestral steps; the student starts from the teacher's weights ('' = ordinary training)"})
    distill_steps: int = field(default=0, metadata={"help": "the steps the final student samples in (required with distill_from)"})
    distill_rounds: int = field(default=0, metadata={"help": "rounds, each halving the steps; the first teacher samples in distill_steps * 2^rounds steps; max_iters is split evenly over them (0 = from the teacher: one token per step of model.block_size, or the steps it was distilled for)"})
    distill_divergence: str = field(default="kl", metadata={"help": "kl (KL(teacher || student)) | reverse_kl | tvd | mse (of log-probabilities)"})
    verify_data: bool = field(default=False, metadata={"help": "check the data's sha256 and every token id against meta.json before training (a full read)"})
    # batch: stated here or in the DeepSpeed JSON, not both (engines/ds_config.py)
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
    checkpoint_hash: str = field(default="none", metadata={"help": "none (the manifest holds each file's size: catches torn and truncated saves, reads nothing) | sha256 (also each file's sha256: catches a changed byte, reads the whole checkpoint once at save, split over the ranks, and once on resume, on rank 0)"})
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
        if self.checkpoint_hash not in CHECKPOINT_HASHES:
            raise ValueError(f"checkpoint_hash={self.checkpoint_hash!r}: expected {' | '.join(CHECKPOINT_HASHES)}")
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"wandb_mode={self.wandb_mode!r}: expected auto | online | offline | disabled")
        for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters",
                     "log_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.anneal_attention_iters < 0:
            raise ValueError(f"anneal_attention_iters must be >= 0 (got {self.anneal_attention_iters})")
        if self.anneal_attention_iters and self.objective.name == "ar":
            raise ValueError("anneal_attention_iters anneals a diffusion model's attention from causal to its own "
                             "mask; an AR model is causal throughout: drop it or pick --objective=mdlm|bd3lm")
        if self.anneal_attention_iters and self.model.attn_impl == "triton":
            raise ValueError("the Triton attention kernel has no annealing mask: with anneal_attention_iters use "
                             "--model.attn_impl=auto (annealing steps run the PyTorch attention)")
        if self.model.shift and self.objective.name == "ar":
            raise ValueError("model.shift is for diffusion objectives (an AR model always predicts the next token): "
                             "drop --model.shift or pick --objective=mdlm|bd3lm")
        check_distillation_config(self)
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


# ----------------------------------------------------------------------------- loading (common/config.py)
ALIASES = {"objective": "objective.name"}  # --objective=ar is short for --objective.name=ar


def load_config(config_file: str | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> tuple[TrainConfig, set[str]]:
    """defaults < base (e.g. a checkpoint's saved config) < config_file < overrides.
    Returns the config and the dotted keys stated explicitly by base, file or flags.
    (pretrain.py reads --config itself, beside the launcher's and DeepSpeed's own flags.)"""
    cfg, explicit, _ = load(TrainConfig, overrides or [], config_file=config_file, base=base, aliases=ALIASES,
                            config_flag=None)
    return cfg, explicit


def config_help() -> str:
    """Every key with its default and meaning, for --help."""
    return help_text(TrainConfig)
