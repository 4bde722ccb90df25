"""Resuming on another number of ranks or another ZeRO stage: DeepSpeed's universal checkpoint.

`to_universal` converts a verified ZeRO-1/2/3 tag dir once, into tag_dir/universal, in both of the
dialects DeepSpeed's stage loaders read; training/checkpointing/checkpointer.py decides when a resume
needs it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from training.checkpointing.layout import MANIFEST, TAG_RE, checkpoint_kind, verify
from training.engines.ds_config import zero_stage

UNIVERSAL = "universal"  # in a tag dir: DeepSpeed's universal form of that checkpoint (made on demand)


def saved_world_and_stage(engine_config: dict) -> tuple[int, int]:
    """(ranks, ZeRO stage) of the run that wrote a checkpoint, from its saved ds_config.json."""
    per_rank = engine_config["train_micro_batch_size_per_gpu"] * engine_config["gradient_accumulation_steps"]
    return engine_config["train_batch_size"] // per_rank, zero_stage(engine_config)


def check_convertible(tag_dir, verified: bool = False) -> None:
    """ValueError saying why tag_dir cannot become a universal checkpoint (nothing is written). `verified`:
    the caller has just verified it (a resume), so a sha256 manifest is not read through again."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir() or checkpoint_kind(tag_dir) != "deepspeed" or not TAG_RE.match(tag_dir.name):
        raise ValueError(f"{tag_dir} is not a DeepSpeed checkpoint (expected OUT_DIR/ckpt/step_N with "
                         f"DeepSpeed's shards and {MANIFEST}): nothing to convert to a universal checkpoint")
    problem = None if verified else verify(tag_dir)
    if problem:
        raise ValueError(f"{tag_dir} cannot be converted to a universal checkpoint: {problem}")
    if not any(tag_dir.glob("*optim_states.pt")):
        raise ValueError(f"{tag_dir} holds no ZeRO optimizer shards (a ZeRO-0 checkpoint?): ZeRO-0 keeps whole "
                         f"optimizer state, which resumes on any number of ranks without conversion")


def _loadable_by_every_stage(zero_dir: Path) -> None:
    """DeepSpeed 0.19 writes a universal checkpoint in the dialect of the stage that saved it: ZeRO-1/2
    loaders want {"param": tensor} files, a step.pt per parameter and ds_version; the ZeRO-3 loader wants the
    step inside optimizer_state.pt. Write both dialects, so ZeRO-2 <-> ZeRO-3 works in either direction."""
    import deepspeed

    common = torch.load(zero_dir / "optimizer_state.pt", weights_only=False)
    step_files = sorted(zero_dir.glob("*/step.pt"))
    if "optimizer_state_dict" in common:  # written from ZeRO-3
        step = common["optimizer_state_dict"]["state"][0]["step"]
    else:
        step = torch.load(step_files[0], weights_only=False) if step_files else None
        common["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": common["param_groups"]}
    common.setdefault("ds_version", deepspeed.__version__)
    torch.save(common, zero_dir / "optimizer_state.pt")
    for param_dir in (p for p in zero_dir.iterdir() if p.is_dir()):
        for name in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"):
            f = param_dir / name
            if f.is_file():
                value = torch.load(f, weights_only=False)
                if isinstance(value, torch.Tensor):
                    torch.save({"param": value}, f)
        if (param_dir / "exp_avg.pt").is_file() and not (param_dir / "step.pt").is_file() and step is not None:
            torch.save(step, param_dir / "step.pt")


def to_universal(tag_dir, verified: bool = False) -> Path:
    """DeepSpeed's universal checkpoint of a ZeRO-1/2/3 tag dir, written once into tag_dir/universal
    (deepspeed.checkpoint.ds_to_universal: every parameter's fp32 weights and Adam moments unsharded, one
    folder per parameter), which any number of ranks and any ZeRO stage >= 1 can load
    (`"checkpoint": {"load_universal": true}`). Returns that folder; ValueError for anything that is not a
    verified DeepSpeed ZeRO checkpoint (`verified`: as check_convertible). The conversion runs in this
    process (no worker pool)."""
    tag_dir = Path(tag_dir)
    out = tag_dir / UNIVERSAL
    if (out / "zero").is_dir() and (tag_dir / "latest_universal").is_file():
        return out  # converted before (latest_universal is DeepSpeed's last write)
    check_convertible(tag_dir, verified)
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # our runs do not record TP/PP info: there is none
    (tag_dir / "latest_universal").unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)  # a conversion that was interrupted
    with contextlib.redirect_stdout(io.StringIO()):  # its step-by-step prints and progress bars
        ds_to_universal.main(args)
    # the weights and Adam moments come from out/zero/; the model-states file only carries the step, the LR
    # schedule and the client state. ZeRO-3 looks for it under its own name, ZeRO-1/2 under theirs: give both
    stage3_name, stage12_name = "zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"
    for have, want in ((stage3_name, stage12_name), (stage12_name, stage3_name)):
        if (out / have).is_file() and not (out / want).is_file():
            shutil.copy2(out / have, out / want)
    _loadable_by_every_stage(out / "zero")
    (tag_dir / "latest_universal").write_text(UNIVERSAL)  # last: the conversion is complete
    return out


