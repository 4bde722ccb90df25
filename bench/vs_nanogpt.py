"""Steps per second of training/pretrain.py against nanoGPT's own train.py, same data and model, one run.

    python -m bench.training --vs_nanogpt /path/to/nanoGPT              # the model below, 3 interleaved rounds
    python -m bench.training --vs_nanogpt /path/to/nanoGPT --rounds 5 --model.n_layer=6 --batch_size 32

PATH is a checkout of karpathy/nanoGPT (its train.py, model.py and configurator.py are what run; nothing
of it is copied into this repository). Both scripts train from scratch, single process, on the same
prepared dataset (--data_dir, default data/shakespeare_char: nanoGPT reads the same train.bin / val.bin
through symlinks in a temporary folder, with a meta.pkl giving our padded vocabulary size) and the same
model: by default 4 layers / 4 heads / 128 dims, context 128, batch 16, fp32, learned positions, no
biases, dropout 0, AR, AdamW with the same LR schedule, weight decay, betas and clipping. Any training-config
key overrides it (--model.n_layer=6, --batch_size 32, --dtype=bf16 ...; --deepspeed_config picks our
ZeRO JSON, default pretrain.py's own, ZeRO-2).

Timing, the same for both: the wall time from the end of step `--warmup` to the end of step `--warmup +
--steps`, everything the loop does in between included (data, logging, host syncs). nanoGPT: the sum of
the per-iteration times it prints (log_interval=1, its default; each covers one whole loop iteration).
Ours: the difference of the timestamps of its train records in metrics.jsonl (log_interval = --steps
divides into it). The runs alternate (ours, nanoGPT, ours, ...), so load on the machine hits both alike;
the ratio is nanoGPT's median ms/step over ours (> 1: pretrain.py is faster).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the model: what nanoGPT's shakespeare_char example trains, shrunk to a CPU
BASE = {"model": {"block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0, "bias": False,
                  "pos_emb": "learned", "attention": "causal"},
        "objective": {"name": "ar"}, "batch_size": 16, "gradient_accumulation_steps": 1, "dtype": "fp32",
        "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": 10, "beta2": 0.99,
        "wandb_mode": "disabled"}
NANO_FILES = ("train.py", "model.py", "configurator.py")
SET_BY_BENCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")


def fresh_env() -> dict:
    """The environment without the rank variables this (bench) process set for its own DeepSpeed: with RANK
    set, nanoGPT would start DDP and pretrain.py would skip its own single-process setup."""
    return {k: v for k, v in os.environ.items() if k not in SET_BY_BENCH}


def nanogpt_flags(cfg, dataset: str, out_dir: str, max_iters: int, device: str) -> list[str]:
    """nanoGPT's train.py --key=value flags (its configurator) for our training config."""
    m = cfg.model
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(cfg.dtype, "float32")
    flags = dict(dataset=dataset, out_dir=out_dir, device=device, dtype=dtype, compile=cfg.compile,
                 batch_size=cfg.batch_size, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                 n_embd=m.n_embd, dropout=m.dropout, bias=m.bias,
                 gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
                 min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters, lr_decay_iters=cfg.lr_decay_iters or max_iters,
                 max_iters=max_iters, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
                 grad_clip=cfg.grad_clip, eval_interval=10 ** 9, eval_iters=1, log_interval=1,
                 always_save_checkpoint=False, wandb_log=False)
    return [f"--{k}={v}" for k, v in flags.items()]


def nanogpt_workdir(nanogpt: Path, data_dir: Path, vocab_size: int, tmp: Path) -> tuple[Path, str]:
    """A working folder nanoGPT's train.py can run in: configurator.py (read from the cwd) and
    data/<name>/{train,val}.bin symlinked to our dataset, meta.pkl with our vocabulary size."""
    missing = [f for f in NANO_FILES if not (nanogpt / f).is_file()]
    if missing:
        raise SystemExit(f"--vs_nanogpt {nanogpt}: not a nanoGPT checkout (no {', '.join(missing)}); get it with "
                         f"`git clone https://github.com/karpathy/nanoGPT`")
    work = tmp / "nanogpt_run"
    dataset = "diffusiongpt_data"
    (work / "data" / dataset).mkdir(parents=True)
    (work / "configurator.py").symlink_to((nanogpt / "configurator.py").resolve())
    for split in ("train", "val"):
        (work / "data" / dataset / f"{split}.bin").symlink_to((data_dir / f"{split}.bin").resolve())
    with open(work / "data" / dataset / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab_size}, f)
    return work, dataset


def run_nanogpt(nanogpt: Path, work: Path, flags: list[str], first: int, last: int) -> float:
    """ms per step over iterations first+1 .. last (their printed per-iteration times)."""
    proc = subprocess.run([sys.executable, str((nanogpt / "train.py").resolve()), *flags], cwd=work,
                          capture_output=True, text=True, env={**fresh_env(), "PYTHONUNBUFFERED": "1"})
    times = {int(m.group(1)): float(m.group(2))
             for m in re.finditer(r"^iter (\d+): loss [\d.naif]+, time ([\d.]+)ms", proc.stdout, re.M)}
    window = [times.get(i) for i in range(first + 1, last + 1)]
    if proc.returncode != 0 or None in window:
        raise SystemExit(f"nanoGPT's train.py failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return sum(window) / len(window)


def run_ours(config_path: Path, out_dir: Path, extra: list[str], first: int, last: int) -> float:
    """ms per step from the end of step `first` to the end of step `last` (metrics.jsonl timestamps)."""
    cmd = [sys.executable, str(REPO / "training" / "pretrain.py"), "--config", str(config_path), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=fresh_env())
    records = []
    if (out_dir / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    at = {r["step"]: r["time"] for r in records if r["kind"] == "train"}
    if proc.returncode != 0 or first not in at or last not in at:
        raise SystemExit(f"training/pretrain.py failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return (at[last] - at[first]) * 1000 / (last - first)


def main(nanogpt: str, args, overrides: list[str]) -> None:
    import torch

    from training.config import load_config
    from training.data import load_meta

    ds_flags = [o for o in overrides if o.startswith("--deepspeed_config")]
    overrides = [o for o in overrides if not o.startswith("--deepspeed_config")]
    base = dict(BASE)
    if args.config_given:
        base = {}
    cfg, _ = load_config(args.config if args.config_given else None, overrides, base=base)
    if cfg.objective.name != "ar" or cfg.model.attention != "causal" or cfg.model.pos_emb != "learned":
        raise SystemExit("--vs_nanogpt compares nanoGPT's model: objective ar, causal attention, learned positions")
    first, last = args.warmup, args.warmup + args.steps
    meta = load_meta(cfg.data_dir)
    vocab = cfg.model.vocab_size or meta["padded_vocab_size"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="vs_nanogpt_") as tmp:
        tmp = Path(tmp)
        work, dataset = nanogpt_workdir(Path(nanogpt), Path(cfg.data_dir), vocab, tmp)
        ours_out = tmp / "ours_out"
        ours_cfg = {**cfg.to_dict(), "out_dir": str(ours_out), "max_iters": last, "eval_interval": 10 ** 9,
                    "eval_iters": 1, "log_interval": math.gcd(first, args.steps) or 1,
                    "checkpoint_interval": 0, "export_dir": "none", "lr_decay_iters": cfg.lr_decay_iters or last}
        ours_cfg["model"]["vocab_size"] = vocab
        (tmp / "ours.json").write_text(json.dumps(ours_cfg))
        flags = nanogpt_flags(cfg, dataset, str(tmp / "nano_out"), last, device)
        print(f"model {cfg.model.n_layer}L/{cfg.model.n_head}H/{cfg.model.n_embd}d, context {cfg.model.block_size}, "
              f"batch {cfg.batch_size}, {cfg.dtype}, vocab {vocab}, data {cfg.data_dir}, {device}, "
              f"torch threads {torch.get_num_threads()}; steps {first + 1}..{last} timed, {args.rounds} interleaved rounds")
        print(f"  ours:    python training/pretrain.py --config <that config> {' '.join(ds_flags)}".rstrip())
        print(f"  nanoGPT: python {Path(nanogpt) / 'train.py'} {' '.join(flags)}")
        ours, nano = [], []
        for r in range(args.rounds):
            import shutil
            shutil.rmtree(ours_out, ignore_errors=True)
            ours.append(run_ours(tmp / "ours.json", ours_out, ds_flags, first, last))
            nano.append(run_nanogpt(Path(nanogpt), work, flags, first, last))
            print(f"round {r + 1}: pretrain.py {ours[-1]:.1f} ms/step, nanoGPT train.py {nano[-1]:.1f} ms/step, "
                  f"ratio {nano[-1] / ours[-1]:.3f}", flush=True)
    o, n = statistics.median(ours), statistics.median(nano)
    print(f"median: pretrain.py {o:.1f} ms/step ({1000 / o:.2f} steps/s), nanoGPT {n:.1f} ms/step "
          f"({1000 / n:.2f} steps/s): pretrain.py is {n / o:.3f}x nanoGPT's steps/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg.to_dict(), "ours_ms_per_step": ours,
                                               "nanogpt_ms_per_step": nano, "ratio": n / o}, indent=2))
