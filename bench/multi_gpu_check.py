"""The multi-GPU training path, end to end: a step of bench/gpu_check.sh.

    python -m bench.multi_gpu_check OUT.json --data DIR [--dry-run]

With 2+ GPUs: DeepSpeed ZeRO-2 in bf16 on 2 GPUs through the deepspeed launcher (the default process
group is NCCL, which serves CUDA tensors only: the project's own collectives run on training/distributed's
host group), then its step-10 checkpoint resumed on 1 GPU (fewer GPUs than wrote it: universal checkpoint,
the RNG state of the rank's own GPU), whose losses must follow the 2-GPU run's. With 1 GPU: the same on one
GPU (resume on as many), and the 2-GPU part is recorded as not run. --dry-run: the same steps on 2 CPU ranks
in fp32 (the plumbing; CI runs it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.ports import free_port  # noqa: E402
from training.metrics import read_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "training/configs/tiny_test.json"
STEPS, RESUME_AT = 20, 10
# bf16 on GPUs: the two runs reduce gradients over different numbers of ranks, in another order; a loss
# may move in its third digit. fp32 on CPU ranks: the same sums up to float rounding.
TOLERANCE = {"bf16": 5e-2, "fp32": 1e-4}


def run(cmd: list[str], log: Path, env: dict) -> int:
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(out_dir, "train")}


def check(out: Path, data: str, dry_run: bool) -> dict:
    import torch

    gpus = 0 if dry_run else torch.cuda.device_count()
    if not dry_run and gpus == 0:
        return {"status": "failed", "problem": "no CUDA GPU visible (use --dry-run on CPU)"}
    ranks = 2 if dry_run or gpus >= 2 else 1
    dtype = "fp32" if dry_run else "bf16"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if dry_run:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    work = Path(tempfile.mkdtemp(prefix="multi_gpu_check."))
    common = ["training/pretrain.py", "--config", str(CONFIG), "--data_dir", data, "--dtype=" + dtype,
              "--deepspeed_config", "ds_configs/zero2.json", f"--max_iters={STEPS}",
              f"--checkpoint_interval={RESUME_AT}", "--log_interval=1", f"--eval_interval={RESUME_AT}"]
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port())]
    result = {"gpus": gpus, "ranks": ranks, "dtype": dtype, "dry_run": dry_run, "checks": {}}
    full = work / "full"
    rc = run([*deepspeed, "--num_gpus", str(ranks), *common, "--out_dir", str(full)], out.with_suffix(".full.log"), env)
    losses = train_losses(full) if (full / "metrics.jsonl").exists() else {}
    finite = len(losses) == STEPS and all(math.isfinite(v) for v in losses.values())
    result["checks"][f"zero2_{dtype}_{ranks}_ranks"] = {
        "ok": rc == 0 and finite, "exit": rc, "first_loss": losses.get(1), "last_loss": losses.get(STEPS)}
    if rc == 0:
        resumed = work / "resumed"
        (resumed / "ckpt").mkdir(parents=True)
        tag = f"step_{RESUME_AT:06d}"
        shutil.copytree(full / "ckpt" / tag, resumed / "ckpt" / tag)
        (resumed / "ckpt" / "latest").write_text(tag)
        rc2 = run([*deepspeed, "--num_gpus", "1", *common, "--out_dir", str(resumed), "--resume"],
                  out.with_suffix(".resumed.log"), env)
        after = train_losses(resumed) if (resumed / "metrics.jsonl").exists() else {}
        worst = max((abs(after[s] - losses[s]) for s in after if s in losses), default=math.inf)
        result["checks"][f"resume_{ranks}_ranks_on_1"] = {
            "ok": rc2 == 0 and len(after) == STEPS - RESUME_AT and worst <= TOLERANCE[dtype], "exit": rc2,
            "steps": len(after), "max_loss_difference": worst, "tolerance": TOLERANCE[dtype]}
    if ranks == 1:
        result["not_run"] = f"2-GPU NCCL training and resume on fewer GPUs: {gpus} GPU visible"
    result["status"] = "ok" if all(c["ok"] for c in result["checks"].values()) else "failed"
    shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.multi_gpu_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", help="result JSON (logs beside it: OUT.full.log, OUT.resumed.log)")
    ap.add_argument("--data", required=True, help="a prepared dataset (python -m training.prepare)")
    ap.add_argument("--dry-run", action="store_true", help="2 CPU ranks in fp32: the plumbing, no GPU")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = check(out, args.data, args.dry_run)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
