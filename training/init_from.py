"""--init_from: start a run from existing weights (an AR model adapted to diffusion, GPT-2, a finished run).

    --init_from out/shakespeare_ar/export   consolidated weights of ours (python -m training.export writes them)
    --init_from out/shakespeare_ar          a training run (its latest verified checkpoint, DeepSpeed or FSDP)
    --init_from gpt2 | gpt2-medium | ...    OpenAI's GPT-2 (Hugging Face hub or cache), or a local
                                            save_pretrained GPT-2 directory

Only the weights are taken: the optimizer, LR schedule, step and data order start fresh, and the attention
follows the new run's objective (bidirectional for mdlm, block-causal for bd3lm, causal for ar). The
network's shape (n_layer, n_head, n_embd, bias, pos_emb, and block_size unless stated) comes from the
source; a shape stated in the config that disagrees is an error naming both sides, as is a source trained on
other token ids. An AR model's head predicts the NEXT token: `--model.shift` keeps that meaning in a
diffusion model (models/diffusion.py), which is what makes adaptation pay off (docs/training.md).
Any direction is allowed, diffusion -> AR included: these are only initial weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from models.gpt import GPT, GPT2_NAMES, GPTConfig, is_hf_gpt2_dir
from training.checkpointing import layout as ckpt

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "bias", "pos_emb")  # must match the source's tensors
GPT2_VOCAB = 50257  # rows of OpenAI's embedding (our gpt2 data adds MASK and padding rows after them)


@dataclass
class InitSource:
    """Weights to start from, and what they were."""
    path: str
    kind: str  # "export" | "checkpoint" | "gpt2"
    model: GPTConfig  # the source network
    objective: str  # what it was trained for: ar | mdlm | bd3lm
    tokenizer: Optional[dict]  # tokenizer meta of its data (None: OpenAI GPT-2, the gpt2 tokenizer)
    state: dict = field(repr=False, default_factory=dict)
    step: Optional[int] = None
    notes: list = field(default_factory=list)  # for the run's log (adopt_source_shape)
    distillation: Optional[dict] = None  # what a distilled model was distilled for (training/distillation.py)

    @classmethod
    def ours(cls, path: str, kind: str, state: dict, info: dict) -> "InitSource":
        """From our weights and the info an export records (models/weights.py, training/export.py)."""
        return cls(path, kind, GPTConfig.from_dict(info["model"]), (info.get("objective") or {}).get("name", "mdlm"),
                   info.get("tokenizer"), state, info.get("step"), distillation=info.get("distillation"))

    def describe(self) -> str:
        m = self.model
        what = f"{self.objective} model, {m.n_layer}L/{m.n_embd}d, context {m.block_size}, {m.pos_emb} positions"
        return f"{self.path} ({self.kind}: {what}{'' if self.step is None else f', step {self.step}'})"

    def record(self) -> dict:
        """What the run config records about it."""
        return {"path": self.path, "kind": self.kind, "objective": self.objective, "step": self.step,
                "model": self.model.to_dict()}


def read_source(spec: str) -> InitSource:
    """Load the weights `spec` names (see the module docstring) on the CPU."""
    p = Path(spec)
    kind = ckpt.checkpoint_kind(p) if p.is_dir() else None
    if kind is None and p.is_dir() and ckpt.checkpoint_kind(p / "export") == "consolidated":
        p, kind = p / "export", "consolidated"  # a run dir that only kept its export
    if kind == "consolidated":
        from models.weights import load_consolidated
        gpt, info = load_consolidated(p, device="cpu")
        return InitSource.ours(str(p), "export", gpt.state_dict(), info)
    if kind in ("deepspeed", "fsdp"):
        from training.export import checkpoint_weights
        state, info = checkpoint_weights(p)
        return InitSource.ours(info["source_checkpoint"], "checkpoint", state, info)
    if spec in GPT2_NAMES or is_hf_gpt2_dir(p):
        try:
            gpt = GPT.from_pretrained(spec)
        except OSError as e:  # transformers: not cached and no network, or a broken dir
            raise FileNotFoundError(f"--init_from {spec}: cannot load GPT-2 ({e}). Without network it must be in the "
                                    f"Hugging Face cache or a local save_pretrained directory") from e
        return InitSource(spec, "gpt2", gpt.config, "ar", None, gpt.state_dict())
    if not p.exists():
        raise FileNotFoundError(f"--init_from {spec}: no such directory. Give a run's out_dir, its export/ folder, "
                                f"one ckpt/step_N folder, a Hugging Face GPT-2 directory or one of {', '.join(GPT2_NAMES)}")
    raise ValueError(f"--init_from {spec}: neither our weights (an export with model.safetensors + config.json, or a "
                     f"training checkpoint) nor a Hugging Face GPT-2 directory (config.json with model_type gpt2)")


def source_for_run(spec: str, model: GPTConfig, explicit: set[str], data_tokenizer: dict, data_dir: str) -> InitSource:
    """The weights `spec` names, checked against the run: first the token ids (weights trained on other ids
    are of no use whatever their shape, so that is the problem to name), then the shape, which is adopted
    into `model` (in place; the notes go to source.notes)."""
    source = read_source(spec)
    check_same_tokens(source, data_tokenizer, model.vocab_size, spec, data_dir)
    source.notes = adopt_source_shape(model, explicit, source, spec)
    return source


def adopt_source_shape(model: GPTConfig, explicit: set[str], source: InitSource, spec: str) -> list[str]:
    """Take the source's network shape into the run's GPTConfig (in place). A key the config states
    explicitly must agree; returns notes for the log."""
    notes = []
    for key in SHAPE_KEYS:
        mine, theirs = getattr(model, key), getattr(source.model, key)
        if mine == theirs:
            continue
        if f"model.{key}" in explicit:
            hint = (" (GPT-2 has learned position embeddings)" if key == "pos_emb" and source.kind == "gpt2" else "")
            raise ValueError(f"--init_from {spec}: the source has {key}={theirs!r}{hint} but this run states "
                             f"model.{key}={mine!r}; drop --model.{key} (the source's shape is taken) or start "
                             f"from a source of that shape")
        setattr(model, key, theirs)
    if "model.block_size" not in explicit:
        model.block_size = source.model.block_size
    elif model.pos_emb == "learned" and model.block_size > source.model.block_size:
        raise ValueError(f"--init_from {spec}: the source has learned positions for block_size="
                         f"{source.model.block_size} tokens, this run asks for model.block_size={model.block_size}; "
                         f"use --model.block_size <= {source.model.block_size}")
    elif model.pos_emb == "learned" and model.block_size < source.model.block_size:
        notes.append(f"the first {model.block_size} of the source's {source.model.block_size} position embeddings are kept")
    if "model.shift" not in explicit and source.model.shift and model.attention != "causal":
        model.shift = True  # a shifted diffusion model stays shifted unless told otherwise
    if source.objective == "ar" and model.attention != "causal" and not model.shift:
        notes.append("hint: this AR model's head predicts the next token; --model.shift keeps that meaning in the "
                     "diffusion model (measured better, docs/training.md)")
    if source.objective != "ar" and model.attention == "causal":
        notes.append(f"an AR run from a {source.objective} model: only its weights are used")
    return notes


def check_same_tokens(source: InitSource, data_tokenizer: dict, vocab_size: int, spec: str, data_dir: str) -> None:
    """The source must have been trained on the token ids of this run's data."""
    if source.kind == "gpt2":
        if data_tokenizer.get("tokenizer") != "gpt2":
            raise ValueError(f"--init_from {spec}: GPT-2 reads GPT-2 BPE ids ({GPT2_VOCAB}), but --data_dir={data_dir} was "
                             f"prepared with the {data_tokenizer.get('tokenizer')!r} tokenizer "
                             f"({data_tokenizer.get('vocab_size', '?')} ids). Prepare the data with the gpt2 "
                             f"tokenizer (python -m training.prepare --help)")
        return
    if source.tokenizer is not None and source.tokenizer != data_tokenizer:
        raise ValueError(f"--init_from {spec}: the source was trained on {source.tokenizer.get('tokenizer')!r} ids "
                         f"({source.tokenizer.get('vocab_size', '?')}), --data_dir={data_dir} holds "
                         f"{data_tokenizer.get('tokenizer')!r} ids ({data_tokenizer.get('vocab_size', '?')}): the ids "
                         f"mean other things. Use data prepared with the source's tokenizer")
    if source.model.vocab_size != vocab_size:
        raise ValueError(f"--init_from {spec}: the source has vocab_size={source.model.vocab_size} embedding rows, this "
                         f"run has model.vocab_size={vocab_size}; drop --model.vocab_size (0 takes the data's)")


@torch.no_grad()
def load_weights(gpt: GPT, source: InitSource) -> None:
    """Copy the source's tensors into `gpt`. Position embeddings may be cropped to a shorter context; GPT-2's
    50257 embedding rows fill the first rows of a padded vocabulary (MASK and padding keep their init)."""
    sd = gpt.state_dict()
    missing = sorted(k for k in sd if k not in source.state and k != "lm_head.weight")
    if missing:
        raise ValueError(f"--init_from {source.path}: the source lacks {missing[:4]}")
    for key, src in source.state.items():
        if key not in sd:
            continue
        dst = sd[key]
        if key == "transformer.wpe.weight":
            src = src[:dst.size(0)]
        elif key in ("transformer.wte.weight", "lm_head.weight") and src.size(0) < dst.size(0):
            dst = dst[:src.size(0)]
        if src.shape != dst.shape:
            raise ValueError(f"--init_from {source.path}: {key} is {tuple(src.shape)} there, {tuple(dst.shape)} here")
        dst.copy_(src)
