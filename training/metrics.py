"""Where the numbers go: OUT_DIR/metrics.jsonl (always), TensorBoard (OUT_DIR/tb), wandb, a tqdm bar.

Only rank 0 writes. metrics.jsonl is the source of truth (tests and launch.sh read it, through
read_records: a torn last line, from a killed run or a full disk, is skipped); one JSON object
per line, each with a "kind":
    config   the resolved training and DeepSpeed configs, world size, parameter count, and what the run
             can be traced to: git_commit, git_dirty, versions (python, torch, deepspeed, triton, numpy)
    train    step, loss (nats/token, averaged over ranks), lr, grad_norm, tokens_per_s, mfu
             (model_flops_utilization), mem_mb
    eval     step, val_loss (nats/token; for mdlm the continuous-time NELBO), val_ppl = exp(val_loss)
             (for mdlm an upper bound: val_ppl_is_bound), tokens_seen
    resumed  step and the checkpoint a resumed run started from
    stopped  a SIGTERM stopped the run after writing a checkpoint
    done     the run finished: step, tokens_seen, checkpoint, export dir
wandb never hangs or fails a run: without WANDB_API_KEY it runs offline (files in OUT_DIR/wandb, sync
them later with `wandb sync`), and any error in it turns it off with a warning.
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.disk import disk_full_error, is_disk_full
from common.jsonl import JsonlAppender, read_jsonl

# ----------------------------------------------------------------------------- peak FLOP/s for MFU
# dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s per GPU, matched on the device name
GPU_PEAK_FLOPS = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("A10G", 125e12), ("L40", 181e12),
                  ("L4", 121e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


def default_peak_flops(dtype: str) -> float:
    """A rough peak FLOP/s per rank, for the MFU estimate (set peak_flops to your own figure).
    GPU: the table above (fp32 runs use 1/8 of it, about TF32 on Ampere+). CPU: the threads this rank
    uses x clock (2.5 GHz assumed) x FLOPs per cycle of one core's FMA units (64 with AVX-512, else 32)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((f for key, f in GPU_PEAK_FLOPS if key in name), 100e12)
        return peak if dtype in ("bf16", "fp16") else peak / 8
    flops_per_cycle = 32
    try:
        if re.search(r"\bavx512f\b", Path("/proc/cpuinfo").read_text()):
            flops_per_cycle = 64
    except OSError:
        pass
    return torch.get_num_threads() * 2.5e9 * flops_per_cycle


def model_flops_utilization(flops_per_token: float, tokens_per_s: float, peak_flops: float, ranks: int = 1) -> float:
    """MFU: the model FLOP/s a rank achieves over its peak. tokens_per_s counts all `ranks` together;
    peak_flops is per rank; flops_per_token is GPT.flops_per_token (forward + backward, attention included)."""
    return flops_per_token * tokens_per_s / ranks / peak_flops


def memory_mb() -> float:
    """Peak allocated GPU memory, or the process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import psutil  # a DeepSpeed dependency
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- provenance
def provenance(repo) -> dict:
    """What a result can be traced back to (the first record of every run): the git commit of the code
    in `repo` (None when it is not a git checkout or git is missing), whether tracked files differed from
    it, and the versions of Python and the libraries that decide the numbers."""
    def git(*args) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")  # a checkout of its own, not a folder inside another one
    is_checkout = top is not None and Path(top).resolve() == Path(repo).resolve()
    commit = git("rev-parse", "HEAD") if is_checkout else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    versions = {"python": platform.python_version()}
    for package in ("torch", "deepspeed", "triton", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status), "versions": versions}


# ----------------------------------------------------------------------------- the logger
class LossWindow:
    """The mean training loss over the steps since the last log. The sum stays on the loss's device, so a
    micro step never waits for the GPU (a .item() or .cpu() per micro step would); `read()` at log time is
    the one wait."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.steps = 0

    def add(self, loss: torch.Tensor, micro_batches: int = 1) -> None:
        """A micro batch's loss; a step's loss is the mean of its `micro_batches` (accumulation steps)."""
        part = loss.detach().float() / micro_batches
        self.total = part if self.total is None else self.total + part

    def end_step(self) -> None:
        self.steps += 1

    def read(self) -> float:
        """The mean loss per step since the last read (this rank's), and a new window."""
        mean = self.total.item() / self.steps
        self.total, self.steps = None, 0
        return mean


class Metrics:
    def __init__(self, out_dir, rank: int, cfg, total_steps: int, start_step: int):
        self.enabled = rank == 0
        self.out_dir = Path(out_dir)
        self.tb = self.wandb = self.bar = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # each record is written whole (or not at all) when it is logged: readable live; a torn last
        # record of an earlier, killed run is cut off first
        self.jsonl = JsonlAppender(self.out_dir / "metrics.jsonl")
        if self.jsonl.repaired_bytes:
            self.warn(f"{self.jsonl.path}: removed a torn last record ({self.jsonl.repaired_bytes} bytes) left by "
                      f"a run that was killed or ran out of disk")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out_dir / "tb"))
            except Exception as e:  # noqa: BLE001 - a dashboard must never stop training
                self.warn(f"tensorboard disabled: {e}")
        self.wandb = _init_wandb(cfg, self.out_dir, self.warn)
        # the bar is opened at the first update, so the run's header lines print above it
        self._bar_args = dict(total=total_steps, initial=start_step) if cfg.progress_bar else None

    def warn(self, msg: str) -> None:
        print(f"[metrics] {msg}", file=sys.stderr, flush=True)

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        try:
            self.jsonl.write(record)
        except OSError as e:
            if is_disk_full(e, self.jsonl.path):
                raise disk_full_error(self.jsonl.path, f"a {kind!r} record", keeps="metrics.jsonl ends with the "
                                      "last whole record and the last verified checkpoint is kept.") from e
            raise
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        if kind in ("train", "eval"):
            if self.tb is not None:
                for k, v in scalars.items():
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            if self.wandb is not None:
                try:
                    self.wandb.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)
                except Exception as e:  # noqa: BLE001
                    self.warn(f"wandb.log failed, wandb disabled: {e}")
                    self.wandb = None

    def advance(self, steps: int = 1, **postfix) -> None:
        if self.bar is None and self.enabled and self._bar_args is not None:
            from tqdm import tqdm
            self.bar = tqdm(**self._bar_args, unit="step", dynamic_ncols=True, file=sys.stdout)
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                self.warn(f"wandb.finish failed: {e}")
        self.jsonl.close()


def read_records(out_dir, kind: str | None = None) -> list[dict]:
    """The records of OUT_DIR/metrics.jsonl (of one kind, if given), skipping a torn last line."""
    return [r for r in read_jsonl(Path(out_dir) / "metrics.jsonl") if kind is None or r.get("kind") == kind]


def has_wandb_key() -> bool:
    """Whether wandb could log online: WANDB_API_KEY, or a key `wandb login` stored in ~/.netrc ($NETRC)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))  # where `wandb login` stores the key
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """The wandb mode to run with. "auto": WANDB_MODE from the environment when set (e.g. offline in the test
    suite, over a stored key), else online only when there is an API key, otherwise offline, which never
    waits on the network. Any other mode is kept."""
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")


def _init_wandb(cfg, out_dir: Path, warn):
    mode = cfg.wandb_mode
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    mode = resolve_wandb_mode(mode)
    try:
        import wandb
        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or Path(cfg.out_dir).name,
                         dir=str(out_dir), mode=mode, config=cfg.to_dict(),
                         settings=wandb.Settings(init_timeout=60, console="off", silent=True))
        if mode == "offline":
            print(f"[metrics] wandb offline: {out_dir}/wandb (upload later with `wandb sync {out_dir}/wandb/offline-run-*`)",
                  flush=True)
        return run
    except Exception as e:  # noqa: BLE001 - no network, no key, no package: train anyway
        warn(f"wandb disabled ({type(e).__name__}: {e})")
        return None
