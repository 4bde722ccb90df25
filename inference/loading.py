"""Where a model comes from: consolidated weights, a training checkpoint (DeepSpeed or FSDP), or OpenAI's GPT-2.

    load_model(ckpt="out/mdlm/export")   consolidated dir (model.safetensors + config.json)
    load_model(ckpt="out/mdlm")          a training out dir: uses out/mdlm/export, or consolidates
                                         its DeepSpeed checkpoint first (see below)
    load_model(init_from="gpt2")         GPT-2 through GPT.from_pretrained (hub name or local HF dir)

Inference never imports DeepSpeed. What kind of directory a path is (consolidated, DeepSpeed, FSDP) is
training.checkpointing.layout.checkpoint_kind's call (file checks only). A training checkpoint is consolidated by
running `python -m training.export` in a subprocess (its own process imports DeepSpeed, not this one);
when that module is not available the error names the exact command to run.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from inference.api import check_model_and_tokenizer
from models.diffusion import OBJECTIVES, ObjectiveConfig
from models.gpt import GPT2_NAMES, is_hf_gpt2_dir
from models.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_meta
from models.weights import CONFIG_FILE, WEIGHTS_FILE, load_consolidated
from training.checkpointing.layout import MANIFEST, checkpoint_kind, latest_tag_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINING_KINDS = ("deepspeed", "fsdp")  # checkpoint_kind values that training.export consolidates


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    objective: str  # "ar" | "mdlm" | "bd3lm" (models.diffusion.is_diffusion tells the diffusion ones apart)
    schedule: str = "loglinear"  # MDLM noise schedule (ancestral sampling uses the one it was trained with)
    source: str = ""
    info: dict = field(default_factory=dict)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def export_command(ckpt: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "training.export", "--ckpt", str(ckpt), "--out", str(out)]


def export_dir_for(ckpt: Path) -> Path:
    """Where the consolidated copy of a DeepSpeed checkpoint goes: RUN/export for a run dir or its ckpt/
    folder (the latest verified tag), RUN/export_<tag> for one tag dir, else CKPT/export."""
    if (ckpt / "ckpt").is_dir():
        return ckpt / "export"
    if ckpt.name == "ckpt":
        return ckpt.parent / "export"
    if (ckpt / MANIFEST).is_file() and ckpt.parent.name == "ckpt":
        return ckpt.parent.parent / f"export_{ckpt.name}"
    return ckpt / "export"


def consolidate(ckpt: Path, log=print) -> Path:
    """Consolidate a DeepSpeed checkpoint with `python -m training.export` in a subprocess (this process
    never imports DeepSpeed) and return the consolidated dir."""
    out = export_dir_for(ckpt)
    cmd = export_command(ckpt, out)
    shown = " ".join(["python"] + cmd[1:])
    if not (REPO_ROOT / "training" / "export.py").is_file():
        raise FileNotFoundError(f"{ckpt} is a training checkpoint (DeepSpeed or FSDP), not consolidated weights, and training.export "
                                f"is not available here to consolidate it. Run on a machine with the training "
                                f"dependencies: {shown}  then pass --ckpt {out}")
    log(f"consolidating the training checkpoint (DeepSpeed or FSDP) {ckpt} -> {out}: {shown}")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or checkpoint_kind(out) != "consolidated":
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"consolidating {ckpt} failed (exit {proc.returncode}); command: {shown}\n{tail}")
    return out


def resolve_checkpoint(path, log=print) -> Path:
    """A directory with consolidated weights for `path` (consolidating a DeepSpeed checkpoint if needed)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist: give a training run's out_dir, its export/ folder "
                                f"or one ckpt/step_N folder (or --init_from gpt2 for OpenAI's weights)")
    kind = checkpoint_kind(p)
    if kind == "consolidated":
        return p
    if kind in TRAINING_KINDS:
        out = export_dir_for(p)
        if checkpoint_kind(out) == "consolidated" and not _newer_than(latest_tag_dir(p), out / CONFIG_FILE):
            return out
        return consolidate(p, log)
    if checkpoint_kind(p / "export") == "consolidated":
        return p / "export"
    raise FileNotFoundError(f"{p} holds neither consolidated weights ({WEIGHTS_FILE} + {CONFIG_FILE}) nor a "
                            f"DeepSpeed checkpoint")


def _newer_than(a: Optional[Path], b: Path) -> bool:
    return a is not None and a.stat().st_mtime > b.stat().st_mtime


def load_model(ckpt: Optional[str] = None, init_from: Optional[str] = None, device: str = "auto",
               attn_impl: str = "auto", log=print) -> LoadedModel:
    """Load a model and the tokenizer it was trained with (see the module docstring)."""
    if (ckpt is None) == (init_from is None):
        raise ValueError("give exactly one of ckpt (our weights) or init_from (gpt2 | gpt2-medium | ... | HF dir)")
    device = resolve_device(device)
    if init_from is not None and checkpoint_kind(init_from) is None \
            and checkpoint_kind(Path(init_from) / "export") != "consolidated":
        return load_gpt2(init_from, device, attn_impl)
    source = ckpt if ckpt is not None else init_from
    model_dir = resolve_checkpoint(source, log)
    model, info = load_consolidated(model_dir, device=device, attn_impl=attn_impl)
    if "tokenizer" not in info:
        raise ValueError(f"{model_dir}/{CONFIG_FILE} records no tokenizer; re-export the checkpoint")
    tokenizer = tokenizer_from_meta(info["tokenizer"])
    check_model_and_tokenizer(model, tokenizer)
    for key in ("mask_id", "eot_id"):
        if info.get(key) is not None and info[key] != getattr(tokenizer, key):
            raise ValueError(f"{model_dir}/{CONFIG_FILE} says {key}={info[key]} but its tokenizer "
                             f"{tokenizer.name!r} has {getattr(tokenizer, key)}: the export is inconsistent")
    objective = (info.get("objective") or {}).get("name") or ("ar" if model.config.kind == "ar" else "mdlm")
    if objective not in OBJECTIVES:
        raise ValueError(f"{model_dir}: unknown objective {objective!r}; expected one of {OBJECTIVES}")
    if model.config.attention not in ObjectiveConfig(objective).required_attention():
        raise ValueError(f"{model_dir}: objective {objective!r} does not match attention "
                         f"{model.config.attention!r}")
    schedule = (info.get("objective") or {}).get("schedule", "loglinear")
    return LoadedModel(model, tokenizer, objective, schedule, str(model_dir), info)


def load_gpt2(name_or_dir: str, device: str, attn_impl: str = "auto") -> LoadedModel:
    """OpenAI GPT-2 (a hub name, or a local `save_pretrained` dir) as an AR model with the gpt2 tokenizer."""
    p = Path(name_or_dir)
    if name_or_dir not in GPT2_NAMES and not p.is_dir():
        raise ValueError(f"--init_from {name_or_dir!r}: expected one of {', '.join(GPT2_NAMES)}, a local "
                         f"Hugging Face GPT-2 directory, or a diffusionGPT checkpoint directory")
    if p.is_dir() and not is_hf_gpt2_dir(p):
        raise ValueError(f"{p} is not a Hugging Face GPT-2 directory (its config.json has no model_type 'gpt2')")
    from models.gpt import GPT
    try:
        model = GPT.from_pretrained(name_or_dir, attn_impl=attn_impl)
    except OSError as e:  # transformers: not in the cache and no network, or a broken dir
        raise FileNotFoundError(f"cannot load GPT-2 weights {name_or_dir!r} ({e}). Without network they must be "
                                f"in the Hugging Face cache or a local save_pretrained directory") from e
    return LoadedModel(model.to(device).eval(), get_tokenizer("gpt2"), "ar", source=name_or_dir,
                       info={"model": model.config.to_dict(), "objective": {"name": "ar"}})
