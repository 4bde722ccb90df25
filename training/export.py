"""Turn a training checkpoint (DeepSpeed, any ZeRO stage, or FSDP) into consolidated weights that inference/ reads.

    python -m training.export --ckpt out/shakespeare_mdlm --out out/shakespeare_mdlm/export
    python -m training.export --ckpt out/run/ckpt/step_000500 --out exported/

--ckpt may be a run's OUT_DIR, its ckpt/ folder (both: the latest verified checkpoint) or one tag dir.
Writes OUT/model.safetensors + OUT/config.json through models.weights.save_consolidated; config.json
carries the GPTConfig, the objective, the tokenizer meta (so tokenizer_from_meta rebuilds it offline),
mask_id, eot_id, the step and the training config.

ZeRO-1/2/3 shards (and bf16 runs' fp32 master weights) are merged by DeepSpeed's
get_fp32_state_dict_from_zero_checkpoint, in-process; its zero_to_fp32.py script is not used (it
needs huggingface_hub). A ZeRO-0 checkpoint holds the whole model in one file; in bf16/fp16 the fp32
master weights beside it in the optimizer state are exported instead (zero0_master_weights).
An FSDP checkpoint (a tag dir with fsdp_checkpoint.json, training/engines/fsdp_engine.py) is a
torch.distributed.checkpoint directory: its model shards are loaded whole in this one process.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.config import parse_cli
from common.disk import free_bytes, human, is_disk_full
from training.checkpointing import layout as ckpt
from training.checkpointing.safe_load import check_safe_to_load, safe_torch_load
from training.distillation import distillation_record

MODULE_PREFIX = "gpt."  # the engine wraps GPT in TrainingModule (training/engines/interface.py)


def resolve_tag_dir(path) -> Path:
    """A run dir, a ckpt/ dir or a tag dir -> the tag dir to export (verified)."""
    path = Path(path)
    if (path / ckpt.MANIFEST).is_file() or (path / "train_config.json").is_file():
        problem = ckpt.verify(path)
        if problem:
            raise ValueError(f"checkpoint {path} is incomplete or corrupt: {problem}")
        check_safe_to_load(path)
        return path
    out_dir = path.parent if path.name == "ckpt" else path
    found = ckpt.find_latest_good(out_dir)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {path} (expected {ckpt.ckpt_root(out_dir)}/step_*/)")
    for note in found.skipped:
        print(f"export: skipped {note}", file=sys.stderr)
    tag_dir = ckpt.ckpt_root(out_dir) / found.tag
    check_safe_to_load(tag_dir)  # DeepSpeed's readers unpickle with weights_only=False: refuse planted code first
    return tag_dir


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The GPT's fp32 state dict from one DeepSpeed or FSDP tag directory."""
    from training.engines.fsdp_engine import consolidated_state_dict as fsdp_state_dict

    if ckpt.checkpoint_kind(tag_dir) == "fsdp":
        state = fsdp_state_dict(tag_dir)
    elif list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:  # ZeRO-0: the model file holds the full weights (and, in bf16/fp16, the fp32 masters)
        saved = safe_torch_load(tag_dir / "mp_rank_00_model_states.pt")
        state = saved["module"]
        masters = zero0_master_weights(saved.get("optimizer"), ckpt.load_side_files(tag_dir)[0]["model"])
        if masters is not None:
            state = {k: masters.get(k, v) for k, v in state.items()}
    out = {}
    for k, v in state.items():
        if not k.startswith(MODULE_PREFIX):
            raise ValueError(f"{tag_dir}: unexpected parameter {k!r} (not a diffusionGPT training checkpoint?)")
        out[k[len(MODULE_PREFIX):]] = v.float()
    return out


def zero0_master_weights(optimizer_state: dict | None, model_config: dict) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights of a ZeRO-0 run in bf16 or fp16, by state-dict key; None for an fp32 run.

    Such a run trains a bf16/fp16 copy of the model (the checkpoint's "module") and keeps the fp32 weights
    the optimizer updates in DeepSpeed's FP16 optimizer: a list per param group ("fp32_groups", torch's
    optimizers) or one flat tensor per group ("fp32_groups_flat", DeepSpeed's fused Adam). Exporting the
    module would round every weight to 8 (bf16) or 11 (fp16) bits. The groups hold the parameters in the
    order of GPT.optimizer_param_groups, which both ways of building the optimizer use
    (training/engines/deepspeed_engine.py); that order is rebuilt on the meta device to name them."""
    if not optimizer_state:
        return None
    groups = optimizer_state.get("fp32_groups")
    flat = optimizer_state.get("fp32_groups_flat")
    if groups is None and flat is None:
        return None
    from models.gpt import GPT, GPTConfig

    with torch.device("meta"):
        gpt = GPT(GPTConfig.from_dict(model_config))
    names = {}  # a parameter -> every state-dict key it is saved under (tied weights: more than one)
    for name, tensor in gpt.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(MODULE_PREFIX + name)
    order = [group["params"] for group in gpt.optimizer_param_groups(0.0)]
    if groups is None:  # one flat tensor per group: cut it into the group's parameters, in order
        groups = [list(torch.split(f, [p.numel() for p in params])) for f, params in zip(flat, order)]
    out = {}
    for params, masters in zip(order, groups, strict=True):
        for param, master in zip(params, masters, strict=True):
            for key in names[id(param)]:
                out[key] = master.reshape(param.shape)
    return out


def checkpoint_weights(ckpt_path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the GPT's fp32 state dict, the info an export records) of a run dir, its ckpt/ or one tag dir."""
    tag_dir = resolve_tag_dir(ckpt_path)
    train_config, _, data_meta = ckpt.load_side_files(tag_dir)
    info = {
        "model": train_config["model"],
        "objective": train_config["objective"],
        "tokenizer": data_meta["tokenizer"],
        "mask_id": data_meta["mask_id"],
        "eot_id": data_meta["eot_id"],
        "step": int(ckpt.TAG_RE.match(tag_dir.name).group(1)),
        "train_config": train_config,
        "source_checkpoint": str(tag_dir),
    }
    record = distillation_record(train_config, info["step"])  # a distilled student: its teacher and steps
    if record is not None:
        info["distillation"] = record
    return consolidated_state_dict(tag_dir), info


def export_checkpoint(ckpt_path, out_dir) -> Path:
    from models.weights import save_consolidated  # imports GPT; kept here so --help stays fast

    state, info = checkpoint_weights(ckpt_path)
    return save_consolidated(state, info, out_dir)


@dataclass
class ExportConfig:
    ckpt: str = field(metadata={"help": "run OUT_DIR, its ckpt/ folder, or one ckpt/step_N tag dir"})
    out: str = field(metadata={"help": "directory for model.safetensors + config.json"})
    overwrite: bool = field(default=False, metadata={"help": (
        "replace an export in --out made from another run (without it, that export is kept and this one "
        "refused; a checkpoint of the run the export came from may always replace it, as training does)")})


def check_no_other_run_in_out(out: Path, tag_dir: Path, overwrite: bool) -> None:
    """ValueError when `out` holds an export of another run (or of weights of unknown origin) and --overwrite
    was not given: that export may be all that is left of it. A checkpoint of the same run replaces its
    export, as the end of training and inference.loading's re-consolidation of a newer checkpoint do."""
    from models.weights import is_consolidated, read_info

    if overwrite or not is_consolidated(out):
        return
    try:
        info = read_info(out)
        source, step = info.get("source_checkpoint"), info.get("step", "?")
    except (ValueError, FileNotFoundError):
        source, step = None, "?"
    if source and Path(source).resolve().parent == tag_dir.resolve().parent:
        return  # a checkpoint of the same run (its ckpt/ folder)
    raise ValueError(f"--out {out} holds an export of another run ({source or 'origin unknown'}, step {step}); "
                     f"exporting {tag_dir} would replace it. Write this one elsewhere (--out NEW_DIR) or replace "
                     f"that one (--overwrite)")


def main(argv=None):
    args = parse_cli(ExportConfig, argv, prog="python -m training.export", description=__doc__)
    try:
        check_no_other_run_in_out(Path(args.out), resolve_tag_dir(args.ckpt), args.overwrite)
        out = export_checkpoint(args.ckpt, args.out)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"export: {e}")
    except Exception as e:
        if not is_disk_full(e, args.out):
            raise
        free = free_bytes(args.out)
        sys.exit(f"export: disk full: could not write {args.out} ({human(free[0]) if free else 'unknown'} free on that "
                 f"filesystem). The checkpoint is unchanged: free some space, or give --out on a larger disk, and "
                 f"run this command again.")
    print(f"exported {args.ckpt} -> {out}/model.safetensors, {out}/config.json")


if __name__ == "__main__":
    main()
