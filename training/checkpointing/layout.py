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
each file's sha256, read once at save (the files split over the ranks, training/checkpointing/checkpointer.py), which
catches a changed byte too, at the price of reading the whole checkpoint on save and on resume.

Loading: the tag `latest` names, if it verifies; otherwise the newest older tag that does, and the
user is told which one was skipped and why. Verification checks what the manifest recorded: sizes, and
sha256 where there is one. A run of many ranks verifies on rank 0 only and hands the tag to the others
(training/checkpointing/checkpointer.py). (Multi-node runs need OUT_DIR on a shared filesystem, as DeepSpeed does.)
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

from training.checkpointing.safe_load import safe_torch_load

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
FSDP_MARKER = "fsdp_checkpoint.json"  # in a tag dir: written by the FSDP engine (training/engines/fsdp_engine.py)
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


def no_checkpoint_message(out_dir) -> str:
    ckpt_dir = ckpt_root(out_dir)
    tags = list_tags(ckpt_dir)
    if not tags:
        return (f"--resume: no checkpoint in {ckpt_dir} (nothing has been saved to out_dir={out_dir} yet). "
                f"Check --out_dir, or start without --resume.")
    return (f"--resume: none of the checkpoints in {ckpt_dir} is complete and intact "
            f"({', '.join(t for _, t in tags)}); start without --resume or point --out_dir elsewhere.")
