"""Consolidated weights: the one on-disk format that inference and GPT-2 export read and write.

A model directory holds
    model.safetensors   the GPT state dict (fp32; lm_head.weight omitted: it is tied to wte)
    config.json         {"format": "diffusiongpt", "model": GPTConfig, "objective": ObjectiveConfig,
                         "tokenizer": tokenizer meta (name + what rebuilds it), "mask_id", "eot_id", ...,
                         "distillation" for a distilled student: its teacher and the steps it samples in}
Both files are written to temporary names and renamed, so a crash never leaves a half-written model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.gpt import GPT, GPTConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "diffusiongpt"
TIED_KEY = "lm_head.weight"  # same storage as transformer.wte.weight


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_consolidated(state_dict: dict, info: dict, out_dir) -> Path:
    """Write `state_dict` (a GPT's) and `info` (must hold "model": GPTConfig dict) to out_dir."""
    if "model" not in info:
        raise ValueError("info must contain the 'model' key (a GPTConfig dict)")
    GPTConfig.from_dict(info["model"])  # refuse to write a config nobody can load
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state_dict.items() if k != TIED_KEY}
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    _atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps({"format": FORMAT, **info}, indent=2)))
    return out


def is_consolidated(model_dir) -> bool:
    """Whether a directory holds this format (a Hugging Face dir also has config.json + model.safetensors,
    without "format"). Unreadable config.json counts as ours: read_info then says what is wrong."""
    d = Path(model_dir)
    if not ((d / CONFIG_FILE).is_file() and (d / WEIGHTS_FILE).is_file()):
        return False
    try:
        return json.loads((d / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return True


def read_info(model_dir) -> dict:
    """config.json of a consolidated model directory, with errors that say what to do."""
    d = Path(model_dir)
    cfg = d / CONFIG_FILE
    if not cfg.is_file() or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{d} is not a consolidated model directory (needs {WEIGHTS_FILE} and {CONFIG_FILE}). "
            f"If it is a DeepSpeed checkpoint, run: python -m training.export --ckpt {d} --out {d}/export")
    try:
        info = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON ({e}); the export is corrupt, export it again") from e
    if info.get("format") != FORMAT or "model" not in info:
        raise ValueError(f"{cfg} is not a diffusionGPT model config (format={info.get('format')!r})")
    return info


def load_consolidated(model_dir, device="cpu", **config_overrides) -> tuple[GPT, dict]:
    """Build the GPT described by config.json and fill it from model.safetensors -> (model, info).
    config_overrides replace GPTConfig fields (e.g. attn_impl="torch")."""
    info = read_info(model_dir)
    config = GPTConfig.from_dict({**info["model"], **config_overrides})
    model = GPT(config)
    try:
        tensors = load_file(str(Path(model_dir) / WEIGHTS_FILE), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{model_dir}/{WEIGHTS_FILE} cannot be read ({e}); the export is corrupt, "
                         f"export it again from the training checkpoint") from e
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != TIED_KEY]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match config.json (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.distilled_steps = (info.get("distillation") or {}).get("steps")  # decoding's default step count
    return model.to(device).eval(), info
