"""When a training run saves, how, and what it resumes from: one object beside the loop, so the loop only
asks `should_save(step)` and calls `save` (torchtitan's checkpointer decides by itself in the same way).

The files and their checks are training/checkpointing/layout.py's (the owner of the format); this module sequences
them for a run of many ranks:
    save     side files (configs and data meta from rank 0, the RNG state of every rank), the engine's
             shards, a barrier, with checkpoint_hash=sha256 every rank hashing its share of the files (each
             file read once), rank 0's manifest + `latest` + pruning (layout.finalize), and a barrier
             again, so no rank runs on (or exports) before the checkpoint is marked
    resume   the newest verified checkpoint (layout.find_latest_good, on rank 0 only: the other ranks
             are handed its tag, so a sha256 checkpoint is read once, not once per rank), refused with the flags that fix
             it when it holds another network or another engine; on another number of ranks the global batch
             is kept (accumulation adapts), and ZeRO shards of another world size or stage are re-cut through
             DeepSpeed's universal checkpoint (FSDP's DCP reshards by itself); then the engine's state and
             this rank's RNG state
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from common.disk import disk_full_error, is_disk_full
from models.gpt import GPTConfig
from training.checkpointing import layout as ckpt
from training.checkpointing import universal
from training.checkpointing.safe_load import check_safe_to_load
from training.distributed import all_gather_object, all_mean, barrier, broadcast_object
from training.engines.ds_config import zero_stage
from training.engines.interface import Engine

# model keys that may change when a run is resumed: they do not change the parameters
RESUMABLE_MODEL_KEYS = ("dropout", "attn_impl")


@dataclass
class ResumePoint:
    """The checkpoint --resume continues from, with the configs saved beside it."""
    tag: str
    tag_dir: Path
    skipped: list[str]  # newer checkpoints that were not usable, and why
    train_config: dict  # the resolved training config of the run that wrote it
    engine_config: dict  # its resolved DeepSpeed (or FSDP) config
    data_meta: dict = field(default_factory=dict)  # tokenizer, mask/EOT ids and data_dir of the run that wrote it
    universal: bool = False  # load through DeepSpeed's universal checkpoint (another world size or ZeRO stage)
    notes: list[str] = field(default_factory=list)  # what was adapted, for the run's log

    @classmethod
    def find(cls, out_dir) -> ResumePoint:
        """The newest verified checkpoint in out_dir; FileNotFoundError saying what is there when none is.
        In a process group of several ranks (pretrain.py makes it first when resuming), rank 0 verifies and
        every rank resumes from the tag it found."""
        found = _found_on_rank0(out_dir)
        if found is None:
            raise FileNotFoundError(ckpt.no_checkpoint_message(out_dir))
        tag_dir = ckpt.ckpt_root(out_dir) / found.tag
        check_safe_to_load(tag_dir)  # before DeepSpeed unpickles anything: a planted pickle is refused
        train_config, engine_config, data_meta = ckpt.load_side_files(tag_dir)
        return cls(found.tag, tag_dir, found.skipped, train_config, engine_config, data_meta)

    def check_compatible(self, cfg, world: int) -> None:
        """ValueError naming the difference and its fix, when this run cannot continue the checkpoint."""
        self._check_same_architecture(cfg)
        kind = ckpt.checkpoint_kind(self.tag_dir)  # "deepspeed" | "fsdp": a verified tag dir is one of them
        if kind != cfg.engine:
            raise ValueError(f"checkpoint {self.tag} in {cfg.out_dir} was written by engine={kind}; resume it with "
                             f"--engine={kind} (or export it and start a new run)")

    def check_same_data(self, tokenizer_meta: dict, data_dir: str) -> None:
        """Token ids mean nothing under another tokenizer: a resume on data prepared with another one is a
        ValueError naming both and the fix. Other data under the same tokenizer is allowed (a moved or
        extended dataset) and noted in the run's log."""
        saved = self.data_meta.get("tokenizer")
        saved_dir = self.data_meta.get("data_dir", "?")
        if saved is not None and saved != tokenizer_meta:
            raise ValueError(
                f"--resume: the checkpoint {self.tag_dir} was trained on data tokenized with "
                f"{saved.get('tokenizer', saved)!r} ({saved.get('vocab_size', '?')} ids, from {saved_dir}), but "
                f"--data_dir={data_dir} was prepared with {tokenizer_meta.get('tokenizer', tokenizer_meta)!r} "
                f"({tokenizer_meta.get('vocab_size', '?')} ids): its token ids mean other things. Resume with "
                f"--data_dir={saved_dir}, or train into a new --out_dir.")
        if saved_dir != "?" and Path(saved_dir).resolve() != Path(data_dir).resolve():
            self.notes.append(f"data_dir is {data_dir}; the checkpoint was trained on {saved_dir} "
                              f"(same tokenizer): the run continues on the new data")

    def keep_global_batch(self, cfg, world: int, accumulation_flag: bool = False) -> None:
        """On another number of ranks, set the accumulation that keeps the checkpoint's global batch: the
        resumed run then trains on the same batches (pretrain.py numbers micro batches by their place in the
        global batch), so its loss curve continues the original. A --gradient_accumulation_steps flag
        given now wins (the global batch then changes, and the note says so)."""
        saved_world, _ = universal.saved_world_and_stage(self.engine_config)
        if saved_world == world:
            return
        saved_gas = self.engine_config["gradient_accumulation_steps"]
        micro_batches = saved_world * saved_gas  # per optimizer step
        if accumulation_flag:
            self.notes.append(f"{saved_world} -> {world} rank(s) with --gradient_accumulation_steps="
                              f"{cfg.gradient_accumulation_steps}: the global batch changes from {micro_batches} to "
                              f"{world * cfg.gradient_accumulation_steps} micro batches of {cfg.batch_size}")
            return
        if micro_batches % world:
            raise ValueError(f"--resume: the checkpoint {self.tag_dir} was trained by {saved_world} rank(s) x "
                             f"accumulation {saved_gas} = {micro_batches} micro batches per step, which {world} ranks "
                             f"cannot split evenly. Resume with a number of ranks that divides {micro_batches}, or "
                             f"change the global batch with --gradient_accumulation_steps=N.")
        cfg.gradient_accumulation_steps = micro_batches // world
        self.notes.append(f"{saved_world} -> {world} rank(s): global batch kept at {micro_batches} x {cfg.batch_size} "
                          f"sequences, gradient_accumulation_steps {saved_gas} -> {cfg.gradient_accumulation_steps}")

    def plan_resharding(self, engine_config: dict, world: int) -> None:
        """DeepSpeed: whether the ZeRO shards must be re-cut for this run (another number of ranks or another
        stage >= 1). If so, load through a universal checkpoint (converted on first use, Checkpointer.load)
        and tell DeepSpeed so in engine_config (its `checkpoint.load_universal`). ZeRO-0 keeps the optimizer
        state whole: it resumes on any number of ranks, but is no ZeRO-1/2/3 state (nor the reverse)."""
        saved_world, saved_stage = universal.saved_world_and_stage(self.engine_config)
        stage = zero_stage(engine_config)
        if (saved_world, saved_stage) == (world, stage) or (saved_stage == 0 and stage == 0):
            return
        if 0 in (saved_stage, stage):
            raise ValueError(f"--resume: the checkpoint {self.tag_dir} holds ZeRO-{saved_stage} optimizer state and this "
                             f"run uses ZeRO-{stage}; ZeRO-0 state is not sharded and does not convert to or from "
                             f"ZeRO-1/2/3. Resume with ZeRO-{saved_stage} (ZERO={saved_stage} bash launch.sh --resume, "
                             f"or --deepspeed_config ds_configs/zero{saved_stage}.json), or export it and start a "
                             f"new run.")
        universal.check_convertible(self.tag_dir, verified=True)
        self.universal = True
        engine_config.setdefault("checkpoint", {})["load_universal"] = True
        self.notes.append(f"ZeRO-{saved_stage} on {saved_world} rank(s) -> ZeRO-{stage} on {world} rank(s): loading "
                          f"{self.tag} through a DeepSpeed universal checkpoint ({self.tag_dir / universal.UNIVERSAL})")

    def _check_same_architecture(self, cfg) -> None:
        """A resumed run must rebuild the checkpoint's network: a config file edited since (another
        pos_emb, width, objective, ...) would otherwise fail deep inside the engine's state-dict loading."""
        saved, now = self.train_config, cfg.to_dict()
        then = GPTConfig.from_dict(saved["model"]).to_dict()  # keys added since the checkpoint: their defaults
        diffs = [(f"model.{k}", v, now["model"].get(k)) for k, v in then.items()
                 if k not in RESUMABLE_MODEL_KEYS and now["model"].get(k) != v
                 and not (k == "vocab_size" and now["model"].get(k) == 0)]  # 0 = "from the data"
        if saved["objective"]["name"] != now["objective"]["name"]:
            diffs.append(("objective.name", saved["objective"]["name"], now["objective"]["name"]))
        if diffs:
            what = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, old, new in diffs)
            flags = " ".join(f"--{key}={old}" for key, old, _ in diffs)
            raise ValueError(f"--resume: the checkpoint {self.tag_dir} was trained with another network than the "
                             f"config now describes ({what}). Resume with the checkpoint's values ({flags}) or "
                             f"train into a new --out_dir.")


def _found_on_rank0(out_dir) -> ckpt.Found | None:
    """checkpoint.find_latest_good on rank 0, handed to every rank of the process group (when there is one
    of several ranks): verification reads a sha256 checkpoint whole, and N ranks reading it N times is what
    this avoids. An error on rank 0 stops every rank (the others are told to look at rank 0's)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ckpt.find_latest_good(out_dir)
    found, error = None, None
    if dist.get_rank() == 0:
        try:
            found = ckpt.find_latest_good(out_dir)
        except Exception as e:  # noqa: BLE001 (re-raised below, after the other ranks know)
            error = e
    box = broadcast_object([found, error is not None])  # on the host group (training/distributed.py)
    if error is not None:
        raise error
    if box[1]:
        raise RuntimeError(f"rank 0 could not look for a checkpoint in {out_dir} to resume from (see its error)")
    return box[0]


class Checkpointer:
    """Saves a run every `interval` steps (0: never), at its last step and when it stops, into
    out_dir/ckpt/step_N; and loads the checkpoint a resumed run continues from. The run's config says
    whether the manifest records sha256 too (train_config["checkpoint_hash"], default "none": sizes)."""

    def __init__(self, out_dir, rank: int, interval: int, keep: int, train_config: dict, engine_config: dict,
                 engine_config_name: str, data_meta: dict):
        self.root = ckpt.ckpt_root(out_dir)
        self.rank, self.interval, self.keep = rank, interval, keep
        self.train_config, self.engine_config, self.data_meta = train_config, engine_config, data_meta
        self.engine_config_name = engine_config_name  # ds_config.json or fsdp_config.json
        self.sha256 = train_config.get("checkpoint_hash", "none") == "sha256"
        self.last_tag: str | None = None  # the newest checkpoint of this run: saved, or resumed from

    def should_save(self, step: int, stopping: bool = False, last: bool = False) -> bool:
        return stopping or last or bool(self.interval and step % self.interval == 0)

    def save(self, engine: Engine, step: int, tokens_seen: int) -> str:
        """Every rank calls this at the same step; returns the tag once it is verified and `latest`."""
        tag = ckpt.tag_for(step)
        with self._disk_full_said(tag):
            ckpt.write_side_files(self.root / tag, self.rank, self.train_config, self.engine_config, self.data_meta,
                                  engine_config_name=self.engine_config_name)
            engine.save(str(self.root), tag, {"step": step, "tokens_seen": tokens_seen})
            barrier()  # every rank's shards are on disk before anyone lists (or hashes) them
            sha256 = self._sha256_of_every_file(self.root / tag) if self.sha256 else None
            if self.rank == 0:
                ckpt.finalize(self.root, tag, step, self.keep, sha256)
            barrier()
        self.last_tag = tag
        return tag

    def _sha256_of_every_file(self, tag_dir: Path) -> dict[str, str]:
        """Each file's sha256, each read once: every rank hashes its share, rank 0 gets them all."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = ckpt.sha256_share(tag_dir, self.rank, world)
        if world == 1:
            return mine
        shares = all_gather_object(mine)  # small: names and hex digests
        return {name: digest for share in shares for name, digest in share.items()}

    @contextmanager
    def _disk_full_said(self, tag: str):
        """A save that runs out of space (torch's C++ writer says only "iostream error") becomes DiskFull
        naming the path, the free space and the checkpoint that is still good: the torn tag is never
        marked `latest`, so --resume skips it."""
        try:
            yield
        except Exception as e:
            if is_disk_full(e, self.root):
                good = self.last_tag or "none yet"
                raise disk_full_error(self.root / tag, f"checkpoint {tag}", keeps=(
                    f"The last verified checkpoint ({good}) is intact and `latest` still names it; {tag} is "
                    f"incomplete and --resume skips it.")) from e
            raise

    def load(self, engine: Engine, resume: ResumePoint) -> tuple[int, int]:
        """The engine's and this rank's RNG state from the checkpoint; returns its (step, tokens_seen)."""
        if resume.universal:
            # rank 0 converts once into the shared out_dir; every rank learns whether it worked
            error = None
            if self.rank == 0:
                try:
                    universal.to_universal(resume.tag_dir, verified=True)
                except Exception as e:  # noqa: BLE001 (re-raised below, after the other ranks know)
                    error = e
            converted = all_mean([0.0 if error else 1.0])[0] == 1.0
            if error is not None:
                raise error
            if not converted:
                raise RuntimeError(f"rank 0 could not convert {resume.tag_dir} to a universal checkpoint (see its error)")
            client = engine.load(str(resume.tag_dir), universal.UNIVERSAL)
        else:
            client = engine.load(str(resume.tag_dir.parent), resume.tag)
        ckpt.restore_rng(resume.tag_dir, self.rank)
        self.last_tag = resume.tag
        return client["step"], client["tokens_seen"]
