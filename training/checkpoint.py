"""Checkpoints that are either complete or ignored.

    OUT_DIR/ckpt/step_000500/      one tag: model/optimizer shards of every rank (DeepSpeed's files, or
                                   FSDP's fsdp/ DCP dir + fsdp_checkpoint.json), plus
        train_config.json          the resolved training config
        ds_config.json             the resolved DeepSpeed config (fsdp_config.json for FSDP)
        data_meta.json             the tokenizer meta, mask_id, eot_id (what export needs, offline)
        rng_rank{r}.pt             each rank's RNG states (dropout)
        manifest.json              written last: step and the size of every file above (and its sha256
                                   with checkpoint_hash=sha256)
    OUT_DIR/ckpt/latest            the tag of the newest *verified* checkpoint, replaced atomically

Saving: every rank writes its shards, a barrier, then rank 0 writes manifest.json (atomically) and only
then points `latest` at the tag (write + rename), and prunes old tags. DeepSpeed is told not to write its
own `latest` (it would name a tag before it is complete), so a crash at any moment leaves `latest` naming a
complete checkpoint. By default the manifest holds sizes only: a torn save (no manifest) and a missing or
truncated file are caught without reading a byte of the shards. With checkpoint_hash=sha256 it also holds
each file's sha256, read once at save (the files split over the ranks, training/checkpointer.py), which
catches a changed byte too, at the price of reading the whole checkpoint on save and on resume.

Loading: the tag `latest` names, if it verifies; otherwise the newest older tag that does, and the
user is told which one was skipped and why. Verification checks what the manifest recorded: sizes, and
sha256 where there is one. A run of many ranks verifies on rank 0 only and hands the tag to the others
(training/checkpointer.py). (Multi-node runs need OUT_DIR on a shared filesystem, as DeepSpeed does.)
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.unpickling import refusal_reason

MANIFEST = "manifest.json"
DS_CONFIG = "ds_config.json"
ENGINE_CONFIGS = (DS_CONFIG, "fsdp_config.json")  # the resolved engine config: one of these per tag
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d+)$")


def ckpt_root(out_dir) -> Path:
    return Path(out_dir) / "ckpt"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file, fsync it, then rename it over `path`: readers see the old file or the
    whole new one, never a torn write."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- what a directory holds
FSDP_MARKER = "fsdp_checkpoint.json"  # in a tag dir: written by the FSDP engine (training/fsdp_engine.py)
# DeepSpeed's own shard files, in a tag dir or up to two levels below (also checkpoints without our manifest)
_DEEPSPEED_SHARDS = ("mp_rank_*_model_states.pt", "*/mp_rank_*_model_states.pt", "*/*/mp_rank_*_model_states.pt",
                     "*zero_pp_rank_*", "*/*zero_pp_rank_*")


def checkpoint_kind(path) -> str | None:
    """What a directory holds, from its file names alone (nothing is loaded, DeepSpeed is not imported):
        "consolidated"   model.safetensors + config.json of models/weights.py (what inference reads)
        "fsdp"           a training checkpoint of the FSDP engine: a run's OUT_DIR, its ckpt/ or one tag dir
        "deepspeed"      the same written by DeepSpeed (or DeepSpeed's own layout, without our manifest)
        None             anything else: a Hugging Face dir, a run dir with only export/, a missing path
    For a run dir or ckpt/ the engine is read from the tag `latest` names."""
    from models.weights import is_consolidated  # the owner of that format

    p = Path(path)
    if not p.is_dir():
        return None
    if is_consolidated(p):
        return "consolidated"
    tag = latest_tag_dir(p)
    if (tag is not None and (tag / FSDP_MARKER).is_file()) or (p / FSDP_MARKER).is_file():
        return "fsdp"
    if tag is not None or (p / MANIFEST).is_file() or any((r / LATEST).is_file() for r in (p, p / "ckpt")):
        return "deepspeed"
    return "deepspeed" if any(next(p.glob(g), None) is not None for g in _DEEPSPEED_SHARDS) else None


def latest_tag_dir(path) -> Path | None:
    """The tag dir that a run dir or its ckpt/ points at through `latest` (None without one, or when the
    tag it names is gone). Not verified: find_latest_good does that."""
    for root in (Path(path) / "ckpt", Path(path)):
        marker = root / LATEST
        if marker.is_file():
            tag = root / marker.read_text().strip()
            return tag if tag.is_dir() else None
    return None


# ----------------------------------------------------------------------------- saving
def write_side_files(tag_dir: Path, rank: int, train_config: dict, ds_config: dict, data_meta: dict,
                     engine_config_name: str = DS_CONFIG) -> None:
    """Our files beside the engine's shards: configs and tokenizer meta (rank 0), RNG state (every rank).
    `ds_config` is the resolved engine config: ds_config.json for DeepSpeed, fsdp_config.json for FSDP."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for name, obj in (("train_config.json", train_config), (engine_config_name, ds_config),
                          ("data_meta.json", data_meta)):
            atomic_write_text(tag_dir / name, json.dumps(obj, indent=2) + "\n")
    torch.save(rng_state_as_tensors(), tag_dir / f"rng_rank{rank}.pt")


def sha256_share(tag_dir: Path, rank: int, world: int) -> dict[str, str]:
    """sha256 of this rank's share of a tag's files, by name: the files go, biggest first, to the rank with
    the fewest bytes so far, so each file is read once and the ranks read about equally. Every rank lists
    the same files (after the save's barrier, on the filesystem they share), so the shares split them."""
    files = sorted(_files(tag_dir), key=lambda p: (-p.stat().st_size, str(p)))
    load = [0] * world
    mine = {}
    for p in files:
        r = load.index(min(load))
        load[r] += p.stat().st_size
        if r == rank:
            mine[str(p.relative_to(tag_dir))] = _sha256(p)
    return mine


def finalize(ckpt_dir: Path, tag: str, step: int, keep: int, sha256: dict[str, str] | None = None) -> None:
    """Rank 0, after every rank finished writing: the manifest (sizes, and the `sha256` of every file when
    given: sha256_share's of all ranks), then move `latest`, then prune. Nothing is read back: the
    manifest is written from what was just measured, atomically, and `latest` moves only after it."""
    tag_dir = ckpt_dir / tag
    files = {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size} for p in _files(tag_dir)}
    if sha256 is not None:
        if set(sha256) != set(files):
            raise RuntimeError(f"checkpoint {tag_dir} changed while it was hashed: these files were hashed but "
                               f"are gone, or appeared since: {sorted(set(sha256) ^ set(files))}")
        for name, digest in sha256.items():
            files[name]["sha256"] = digest
    atomic_write_text(tag_dir / MANIFEST, json.dumps({"step": step, "files": files}, indent=2) + "\n")
    atomic_write_text(ckpt_dir / LATEST, tag)
    # keep the newest `keep` complete checkpoints; never the one `latest` names
    tags = sorted(list_tags(ckpt_dir), key=lambda t: t[0])
    for _, old in tags[:-keep] if keep > 0 else []:
        if old != tag:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


# ----------------------------------------------------------------------------- loading
def list_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = TAG_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p.name))
    return sorted(out)


def verify(tag_dir: Path) -> str | None:
    """None if the checkpoint is complete, else what is wrong: every file the manifest lists is there with
    its size, and with its sha256 where the manifest records one (checkpoint_hash=sha256: a full read)."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"manifest.json is unreadable ({e})"
    for name, expected in files.items():
        p = tag_dir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != expected["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if "sha256" in expected and _sha256(p) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


@dataclass
class Found:
    tag: str
    step: int
    skipped: list[str]  # human-readable notes on newer checkpoints that were not usable


def find_latest_good(out_dir) -> Found | None:
    """The newest verified checkpoint at or before the one `latest` names (or, without a readable
    `latest`, the newest verified one). None when there is none at all."""
    ckpt_dir = ckpt_root(out_dir)
    tags = list_tags(ckpt_dir)
    marker = ckpt_dir / LATEST
    named = marker.read_text().strip() if marker.is_file() else None
    named_step = int(TAG_RE.match(named).group(1)) if named and TAG_RE.match(named) else None
    skipped = []
    if named_step is not None:
        newer = [t for s, t in tags if s > named_step]
        if newer:  # a save that never reached its marker: incomplete by construction
            skipped += [f"{t}: newer than the last verified checkpoint (its save did not finish)" for t in newer]
        tags = [(s, t) for s, t in tags if s <= named_step]
        if named_step not in [s for s, _ in tags]:
            skipped.append(f"{named}: named by {marker} but missing")
    for step, tag in reversed(tags):
        problem = verify(ckpt_dir / tag)
        if problem is None:
            return Found(tag=tag, step=step, skipped=skipped)
        skipped.append(f"{tag}: {problem}")
    return None


def load_side_files(tag_dir: Path) -> tuple[dict, dict, dict]:
    """(train_config, engine config, data_meta) saved with a checkpoint (the engine config is
    ds_config.json for DeepSpeed, fsdp_config.json for FSDP)."""
    engine_file = next((n for n in ENGINE_CONFIGS if (tag_dir / n).is_file()), DS_CONFIG)
    return tuple(json.loads((tag_dir / n).read_text()) for n in ("train_config.json", engine_file, "data_meta.json"))


def rng_state_as_tensors() -> dict:
    """This process's RNG states (torch, CUDA, numpy, Python) as tensors and plain numbers only, so that
    torch.load(weights_only=True) reads them back: nothing in a checkpoint needs unpickling code."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, mt_state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            # this rank's own GPU only: a resume may see fewer GPUs (another world size is a feature), and
            # every rank restores the state of the device it runs on
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def restore_rng(tag_dir: Path, rank: int) -> None:
    path = tag_dir / f"rng_rank{rank}.pt"
    if not path.is_file():  # a checkpoint from more ranks than now: keep this rank's seeded state
        return
    rng = safe_torch_load(path)
    torch.set_rng_state(rng["torch"])
    if isinstance(rng["numpy"], dict):
        n = rng["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # checkpoints written before the states were stored as tensors: numpy's own tuple
        np.random.set_state(rng["numpy"])
    if isinstance(rng["python"], dict):
        p = rng["python"]
        random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    else:
        random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        state = rng["cuda"]
        if isinstance(state, (list, tuple)):  # written before: every visible GPU's state, indexed by device
            state = state[torch.cuda.current_device()] if torch.cuda.current_device() < len(state) else None
        if state is not None:
            torch.cuda.set_rng_state(state)  # the current device: the one this rank runs on


# ----------------------------------------------------------------------------- loading never runs code
def _safe_globals() -> list:
    """The classes, beyond tensors and containers, that torch.load(weights_only=True) may rebuild from our
    checkpoints: DeepSpeed's ZeRO optimizer files hold these objects, and rng files written before the
    states were stored as tensors hold numpy arrays. Each only stores data; none runs code on load."""
    out = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        out.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy < 2
        out.append(np.core.multiarray._reconstruct)
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        out += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # inference without DeepSpeed: its files are not read there
        pass
    return out


class UnsafeCheckpoint(ValueError):
    """A file in a checkpoint would run code (or build objects we do not know) when unpickled."""


def safe_torch_load(path, **kwargs):
    """torch.load with weights_only=True: tensors, containers and _safe_globals() only. A file that
    needs anything else (a pickle that would import os.system, say) raises UnsafeCheckpoint, unread."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except OSError:  # missing or unreadable: not a question of trust
        raise
    except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError, RuntimeError of a non-zip file, ...
        raise UnsafeCheckpoint(
            f"refusing to load {path}: it is not plain tensor data that can be read without running code "
            f"({refusal_reason(e)}). Loading never executes code from a file; a checkpoint written by diffusionGPT "
            f"never needs it. Use checkpoints you trained yourself, or ask for an export (model.safetensors + "
            f"config.json, which cannot hold code).") from None


def check_safe_to_load(tag_dir) -> None:
    """Read every pickle of a tag dir the safe way before DeepSpeed (which unpickles its files with
    weights_only=False) or torch.distributed.checkpoint (which pickle.loads its .metadata and byte items)
    touches it; UnsafeCheckpoint names the first that fails. The .pt files are memory-mapped, so only their
    pickled structure is read, not the tensor data. Every file DeepSpeed unpickles is named *.pt (model and
    optimizer states, and in universal/ the per-parameter fp32/exp_avg/exp_avg_sq/step files)."""
    tag_dir = Path(tag_dir)
    _refuse_links(tag_dir)
    for path in sorted(tag_dir.rglob("*.pt")):
        safe_torch_load(path, mmap=True)
    for metadata in sorted(tag_dir.rglob(".metadata")):
        _check_dcp_dir(metadata.parent)


def _refuse_links(tag_dir: Path) -> None:
    """UnsafeCheckpoint for any symbolic link inside a tag dir (the tag dir itself may be one: that is where
    the checkpoint lives). Neither DeepSpeed, DCP nor this module ever writes a link, and rglob does not
    follow linked folders: a `universal/` linked to a folder of pickles would be skipped by the scan, then
    taken as DeepSpeed's converted checkpoint and unpickled on a resume at another world size. Refusing
    every link, rather than judging where each one leads, keeps the rule simple to check: every file any
    loader opens under tag_dir is a plain file the scan has read."""
    for root, dirs, files in os.walk(tag_dir):  # followlinks=False: a linked folder is listed, not entered
        for name in sorted(dirs + files):
            path = Path(root) / name
            if path.is_symlink():
                raise UnsafeCheckpoint(
                    f"refusing to load {tag_dir}: {path.relative_to(tag_dir)} is a symbolic link (to "
                    f"{os.readlink(path)}). Checkpoints never hold links, and the files behind one are not part of "
                    f"the checkpoint that was verified; loading never executes code from a file. Replace the link "
                    f"by the files themselves (cp -rL), or use an export (model.safetensors + config.json).")


def _check_dcp_dir(dcp_dir: Path) -> None:
    """An FSDP (torch.distributed.checkpoint) directory: its .metadata through an unpickler that can only
    build DCP's own metadata classes (pickle's "restricting globals"), then every non-tensor item it lists."""
    import io
    import pickle

    from torch.distributed.checkpoint import filesystem, metadata as m

    allowed = {(c.__module__, c.__qualname__): c for c in (
        m.Metadata, m.TensorStorageMetadata, m.ChunkStorageMetadata, m.BytesStorageMetadata, m.TensorProperties,
        m.MetadataIndex, m.StorageMeta, m._MEM_FORMAT_ENCODING, filesystem._StorageInfo, torch.Size)}
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for name in ("PosixPath", "PurePosixPath"):
        allowed[("pathlib", name)] = getattr(__import__("pathlib"), name)

    class MetadataUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                return allowed[(module, name)]
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which DCP metadata never holds")

    path = dcp_dir / ".metadata"
    try:
        with open(path, "rb") as f:
            meta = MetadataUnpickler(f).load()
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UnsafeCheckpoint(f"refusing to load {path}: it is not the plain metadata torch.distributed.checkpoint "
                               f"writes ({e}); loading never executes code from a file. Use checkpoints you trained "
                               f"yourself, or ask for an export (model.safetensors + config.json).") from None
    for index, info in getattr(meta, "storage_data", {}).items():
        if isinstance(meta.state_dict_metadata.get(index.fqn), m.BytesStorageMetadata):
            with open(dcp_dir / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            safe_torch_load(io.BytesIO(blob))


# ----------------------------------------------------------------------------- another cluster size
UNIVERSAL = "universal"  # in a tag dir: DeepSpeed's universal form of that checkpoint (made on demand)


def saved_world_and_stage(engine_config: dict) -> tuple[int, int]:
    """(ranks, ZeRO stage) of the run that wrote a checkpoint, from its saved ds_config.json."""
    per_rank = engine_config["train_micro_batch_size_per_gpu"] * engine_config["gradient_accumulation_steps"]
    from training.ds_config import zero_stage  # here: ds_config -> config -> distillation imports this module
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


def no_checkpoint_message(out_dir) -> str:
    ckpt_dir = ckpt_root(out_dir)
    tags = list_tags(ckpt_dir)
    if not tags:
        return (f"--resume: no checkpoint in {ckpt_dir} (nothing has been saved to out_dir={out_dir} yet). "
                f"Check --out_dir, or start without --resume.")
    return (f"--resume: none of the checkpoints in {ckpt_dir} is complete and intact "
            f"({', '.join(t for _, t in tags)}); start without --resume or point --out_dir elsewhere.")
