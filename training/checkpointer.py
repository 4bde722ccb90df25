"""When a training run saves, how, and what it resumes from: one object beside the loop, so the loop only
asks `should_save(step)` and calls `save` (torchtitan's checkpointer decides by itself in the same way).

The files and their checks are training/checkpoint.py's (the owner of the format); this module sequences
them for a run of many ranks:
    save     side files (configs and data meta from rank 0, the RNG state of every rank), the engine's
             shards, a barrier, rank 0's manifest + verification + `latest` + pruning (checkpoint.finalize),
             and a barrier again, so no rank runs on (or exports) before the checkpoint is marked
    resume   the newest verified checkpoint (checkpoint.find_latest_good), refused with the flags that fix
             it when it holds another network, another engine, or optimizer shards of another world size;
             then the engine's state and this rank's RNG state
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from models.gpt import GPTConfig
from training import checkpoint as ckpt
from training.engine import Engine

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

    @classmethod
    def find(cls, out_dir) -> ResumePoint:
        """The newest verified checkpoint in out_dir; FileNotFoundError saying what is there when none is."""
        found = ckpt.find_latest_good(out_dir)
        if found is None:
            raise FileNotFoundError(ckpt.no_checkpoint_message(out_dir))
        tag_dir = ckpt.ckpt_root(out_dir) / found.tag
        train_config, engine_config, _ = ckpt.load_side_files(tag_dir)
        return cls(found.tag, tag_dir, found.skipped, train_config, engine_config)

    def check_compatible(self, cfg, world: int) -> None:
        """ValueError naming the difference and its fix, when this run cannot continue the checkpoint."""
        self._check_same_world(world)
        self._check_same_architecture(cfg)
        kind = ckpt.checkpoint_kind(self.tag_dir)  # "deepspeed" | "fsdp": a verified tag dir is one of them
        if kind != cfg.engine:
            raise ValueError(f"checkpoint {self.tag} in {cfg.out_dir} was written by engine={kind}; resume it with "
                             f"--engine={kind} (or export it and start a new run)")

    def _check_same_world(self, world: int) -> None:
        """ZeRO stages >= 1 shard the optimizer state over the ranks, and DeepSpeed cannot re-shard it."""
        saved = self.engine_config
        per_rank = saved["train_micro_batch_size_per_gpu"] * saved["gradient_accumulation_steps"]
        saved_world = saved["train_batch_size"] // per_rank
        if saved_world != world and saved.get("zero_optimization", {}).get("stage", 0) >= 1:
            raise ValueError(f"--resume: the checkpoint {self.tag_dir} was written by {saved_world} rank(s) with ZeRO "
                             f"stage {saved['zero_optimization']['stage']}, whose optimizer state is sharded per "
                             f"rank; this run has {world}. Resume with {saved_world} ranks (e.g. NPROC={saved_world} "
                             f"bash launch.sh --resume), or train into a new --out_dir.")

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


class Checkpointer:
    """Saves a run every `interval` steps (0: never), at its last step and when it stops, into
    out_dir/ckpt/step_N; and loads the checkpoint a resumed run continues from."""

    def __init__(self, out_dir, rank: int, interval: int, keep: int, train_config: dict, engine_config: dict,
                 engine_config_name: str, data_meta: dict):
        self.root = ckpt.ckpt_root(out_dir)
        self.rank, self.interval, self.keep = rank, interval, keep
        self.train_config, self.engine_config, self.data_meta = train_config, engine_config, data_meta
        self.engine_config_name = engine_config_name  # ds_config.json or fsdp_config.json
        self.last_tag: str | None = None  # the newest checkpoint of this run: saved, or resumed from

    def should_save(self, step: int, stopping: bool = False, last: bool = False) -> bool:
        return stopping or last or bool(self.interval and step % self.interval == 0)

    def save(self, engine: Engine, step: int, tokens_seen: int) -> str:
        """Every rank calls this at the same step; returns the tag once it is verified and `latest`."""
        tag = ckpt.tag_for(step)
        ckpt.write_side_files(self.root / tag, self.rank, self.train_config, self.engine_config, self.data_meta,
                              engine_config_name=self.engine_config_name)
        engine.save(str(self.root), tag, {"step": step, "tokens_seen": tokens_seen})
        dist.barrier()  # every rank's shards are on disk before rank 0 hashes them
        if self.rank == 0:
            ckpt.finalize(self.root, tag, step, self.keep)
        dist.barrier()
        self.last_tag = tag
        return tag

    def load(self, engine: Engine, resume: ResumePoint) -> tuple[int, int]:
        """The engine's and this rank's RNG state from the checkpoint; returns its (step, tokens_seen)."""
        client = engine.load(str(resume.tag_dir.parent), resume.tag)
        ckpt.restore_rng(resume.tag_dir, self.rank)
        self.last_tag = resume.tag
        return client["step"], client["tokens_seen"]
