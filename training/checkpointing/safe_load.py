"""Loading a checkpoint never runs code from it.

DeepSpeed unpickles its files with weights_only=False and torch.distributed.checkpoint pickle.loads its
.metadata: before either touches a tag dir, `check_safe_to_load` reads every pickle in it the safe way
(torch.load(weights_only=True) with the few data-only classes our checkpoints hold, or an unpickler that
builds DCP's metadata classes only) and refuses links. `safe_torch_load` is the one way this project
reads a .pt file it did not just write.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from common.unpickling import refusal_reason

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


