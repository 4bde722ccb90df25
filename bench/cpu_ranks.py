"""How to spend a CPU's cores: R ranks x T threads each, tokens/s of the real training run.

    python -m bench.cpu_ranks                                  # the quickstart: 2x1 vs 1x2 (and 1x2 at batch 2 x 32)
    python -m bench.cpu_ranks --layouts 2x1,1x2 --max_iters 300 --rounds 3

Each layout runs `deepspeed --num_gpus R training/pretrain.py` (DS_ACCELERATOR=cpu, OMP_NUM_THREADS=T, the
launcher and ZeRO JSON launch.sh uses) on the quickstart config (--config), and reads the tokens/s of its
train records from metrics.jsonl, skipping the first --skip steps (start-up). A layout "RxT@B" sets the
per-rank batch to B (default: the config's), e.g. 1x2@64 keeps the global batch of 2x1 at batch 32.
Layouts alternate within each round; the best round of each is reported, with the ratio to the first.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import knob, parse_cli
from common.ports import free_port
from training.cpu_comm_op import OP_CACHE

REPO = Path(__file__).resolve().parents[1]


@dataclass
class CpuRanksConfig:
    config: str = knob("training/configs/shakespeare_mdlm.json", "training config")
    layouts: list[str] = knob(["2x1", "1x2", "1x2@64"], "RANKSxTHREADS[@BATCH_PER_RANK] to compare")
    zero: int = knob(2, "ZeRO stage (ds_configs/zeroN.json)")
    max_iters: int = knob(200, "steps per run")
    skip: int = knob(50, "steps not counted (start-up, warm-up)")
    rounds: int = knob(2, "interleaved rounds; the best counts")
    json: str = knob("", "also write the results here")


def run_layout(layout: str, args, tmp: Path) -> float:
    """Global tokens/s of one run of `layout`, over its train records after step --skip."""
    shape, _, batch = layout.partition("@")
    ranks, threads = (int(n) for n in shape.lower().split("x"))
    out = tmp / layout.replace("@", "_b")
    shutil.rmtree(out, ignore_errors=True)
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "training/pretrain.py",
           "--config", args.config, "--deepspeed_config", f"ds_configs/zero{args.zero}.json", "--out_dir", str(out),
           f"--max_iters={args.max_iters}", f"--eval_interval={10 ** 9}", "--eval_iters=1", "--log_interval=10",
           "--checkpoint_interval=0", "--export_dir=none", "--wandb_mode=disabled", "--no_tensorboard",
           "--no_progress_bar"] + ([f"--batch_size={batch}"] if batch else [])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(OP_CACHE))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train" and r["step"] > args.skip]
    if proc.returncode != 0 or not rates:
        raise SystemExit(f"{layout} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return statistics.median(rates)


def main(argv=None) -> int:
    args = parse_cli(CpuRanksConfig, argv, prog="python -m bench.cpu_ranks", description=__doc__.split("\n\n")[0])
    best = {layout: 0.0 for layout in args.layouts}
    with tempfile.TemporaryDirectory(prefix="cpu_ranks_") as tmp:
        for r in range(args.rounds):
            for layout in args.layouts:
                tps = run_layout(layout, args, Path(tmp))
                best[layout] = max(best[layout], tps)
                print(f"round {r + 1}: {layout:>8} {tps:>10,.0f} tokens/s", flush=True)
    first = args.layouts[0]
    print(f"{args.config}, ZeRO-{args.zero}, {os.cpu_count()} CPUs, steps {args.skip + 1}..{args.max_iters}, "
          f"best of {args.rounds} rounds (RANKSxTHREADS[@batch per rank]):")
    for layout, tps in best.items():
        print(f"  {layout:>8} {tps:>10,.0f} tokens/s  {tps / best[first]:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "zero": args.zero, "tokens_per_s": best}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
