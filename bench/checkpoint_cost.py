"""What a checkpoint costs: the time of a save and of a resume vs the model's size, this checkout's code
against another checkout's (the baseline), measured in one run.

    python -m bench.checkpoint_cost --baseline /tmp/old_checkout            # 10M..350M parameters, 2 CPU ranks
    python -m bench.checkpoint_cost --sizes 10M,40M --repeats 1             # this checkout only, quickly

Each cell is a real run: `deepspeed --num_gpus 2 bench/checkpoint_cost.py --worker` with the code under test
first on sys.path. Every rank builds the GPT of that size (causal, vocab 50304, context 128, fp32 on CPU),
wraps it in DeepSpeed with ds_configs/zero2.json exactly as training/pretrain.py does, and takes one optimizer
step on random tokens (so the Adam moments exist and the checkpoint has its real size). Then, through that
code's training/checkpointing/checkpointer.py, --repeats times:
    save       Checkpointer.save (side files, DeepSpeed's shards, the manifest, `latest`): the whole call
    checking   ResumePoint.find: choosing and verifying the checkpoint to resume from
    resume     that + Checkpointer.load (DeepSpeed's load of the shards and the RNG states)
timed on every rank between barriers; the slowest rank counts, and the best repeat of each. This checkout
runs twice per size, with checkpoint_hash=none (the default) and sha256, the two interleaved in every
repeat; the baseline once (its code has one way). The checkpoint files are read back from the page cache (just written, plenty of free memory), so
the reads cost hashing, not a disk: a shared filesystem makes reading costlier, not cheaper. Sizes whose
two ranks would not fit in the free memory are skipped and say so.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does): find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
# n_layer, n_head, n_embd at vocab 50304 and context 128: ~11M, ~45M, GPT-2 small (124M) and medium (350M)
SIZES = {"10M": (4, 4, 192), "40M": (6, 8, 512), "124M": (12, 12, 768), "350M": (24, 16, 1024)}
CONTEXT, VOCAB = 128, 50304


def peak_bytes_per_rank(params: int, ranks: int) -> float:
    """fp32 ZeRO-2 on CPU: weights and gradients, this rank's partition of the fp32 master weights and Adam's
    two moments, and a load's copy of the weights (18 B/parameter at 2 ranks; 17.8 measured at 124M), plus
    torch and DeepSpeed themselves."""
    return params * (8 + 12 / ranks + 4) + 1024 ** 3


def worker(args) -> None:
    """One size, one code tree, in every rank the deepspeed launcher started."""
    sys.path.insert(0, args.code)  # the code under test, before anything of training/ is imported
    from training.distributed import prepare_environment, rank_and_world

    prepare_environment()
    import torch
    import torch.distributed as dist

    from models.gpt import GPT
    from training.checkpointing import layout as ckpt
    from training.checkpointing.checkpointer import Checkpointer, ResumePoint
    from training.config import load_config
    from training.engines.deepspeed_engine import DeepSpeedEngine
    from training.engines.ds_config import load_ds_json, resolve
    from training.engines.interface import TrainingModule

    rank, _, world = rank_and_world()
    n_layer, n_head, n_embd = SIZES[args.size]
    cfg, explicit = load_config(None, [f"--model.n_layer={n_layer}", f"--model.n_head={n_head}",
                                       f"--model.n_embd={n_embd}", f"--model.block_size={CONTEXT}",
                                       f"--model.vocab_size={VOCAB}", "--model.attention=causal", "--objective.name=ar",
                                       "--batch_size=1", "--gradient_accumulation_steps=1", "--dtype=fp32"])
    resolved = resolve(load_ds_json(REPO / "ds_configs/zero2.json"), cfg, explicit, world, source="zero2.json")
    torch.manual_seed(0)
    gpt = GPT(cfg.model)
    params = sum(p.numel() for p in gpt.parameters())
    engine = DeepSpeedEngine(TrainingModule(gpt, cfg.objective, mask_id=VOCAB - 1), resolved.config,
                             resolved.client_optimizer, resolved.client_scheduler)
    x = torch.randint(0, VOCAB, (1, CONTEXT), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine.loss(x, torch.roll(x, -1, 1), seed=0))
    engine.step()

    def slowest_rank(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    modes = args.modes.split(",")
    savers = {mode: Checkpointer(Path(args.out_dir) / mode, rank, interval=1, keep=1,
                                 train_config={**cfg.to_dict(), "checkpoint_hash": mode},  # older code ignores it
                                 engine_config=resolved.config, engine_config_name=ckpt.DS_CONFIG, data_meta={})
              for mode in modes}
    times = {mode: {"save_s": [], "find_s": [], "load_s": []} for mode in modes}
    checkpoint_bytes = {}
    for step in range(1, args.repeats + 1):
        for mode, saver in savers.items():  # interleaved: the page cache and the disk's writeback see the same
            dist.barrier()
            t0 = time.perf_counter()
            tag = saver.save(engine, step, tokens_seen=0)
            times[mode]["save_s"].append(slowest_rank(time.perf_counter() - t0))
            checkpoint_bytes[mode] = sum(p.stat().st_size for p in (saver.root / tag).rglob("*") if p.is_file())
            dist.barrier()
            t0 = time.perf_counter()
            point = ResumePoint.find(saver.root.parent)
            t1 = time.perf_counter()
            saver.load(engine, point)
            t2 = time.perf_counter()
            assert point.tag == tag, (point.tag, tag)
            times[mode]["find_s"].append(slowest_rank(t1 - t0))
            times[mode]["load_s"].append(slowest_rank(t2 - t1))
    results = {}
    for mode, t in times.items():
        resume = [f + lo for f, lo in zip(t["find_s"], t["load_s"])]
        best = min(range(len(resume)), key=resume.__getitem__)
        results[mode] = {"save_s": min(t["save_s"]), "resume_s": resume[best], "find_s": min(t["find_s"]),
                         "load_s": t["load_s"][best], "checkpoint_bytes": checkpoint_bytes[mode]}
    peak_rss = [None] * world  # bytes, for the memory estimate that skips sizes (peak_bytes_per_rank)
    dist.all_gather_object(peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if rank == 0:
        Path(args.result).write_text(json.dumps({"size": args.size, "params": params, "modes": results,
                                                 "peak_rss": peak_rss}) + "\n")
    dist.barrier()
    dist.destroy_process_group()  # explicitly: a teardown in interpreter shutdown can abort the rank


def available_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_cell(size: str, code: Path, modes: str, args, tmp: Path) -> dict:
    """One launch: `size` under the code in `code`, each of `modes` (checkpoint_hash values)."""
    from common.ports import free_port

    result = tmp / "cell.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "WANDB_MODE": "disabled"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    proc = subprocess.run([deepspeed, "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
                           "bench/checkpoint_cost.py", "--worker", "--size", size, "--code", str(code),
                           "--modes", modes, "--repeats", str(args.repeats), "--out_dir", str(tmp / "runs"),
                           "--result", str(result)], cwd=REPO, env=env, capture_output=True, text=True)
    shutil.rmtree(tmp / "runs", ignore_errors=True)
    if not result.is_file():  # written once every rank measured (an abort at exit is forgiven)
        raise SystemExit(f"{size} under {code} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(result.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--baseline", default="", help="another checkout (e.g. a git worktree of older code) to "
                        "measure against: its training/checkpointing/checkpointer.py saves and resumes once per size")
    parser.add_argument("--repeats", type=int, default=3, help="saves and resumes per cell; the best counts")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (one node)")
    parser.add_argument("--json", default="", help="also write the rows here")
    for hidden in ("--size", "--code", "--modes", "--out_dir", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    gib = 1024 ** 3
    rows = []
    with tempfile.TemporaryDirectory(prefix="checkpoint_cost_", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        for size in args.sizes.split(","):
            n_layer, _, n_embd = SIZES[size]
            params = VOCAB * n_embd + CONTEXT * n_embd + 12 * n_layer * n_embd ** 2
            needed = args.ranks * peak_bytes_per_rank(params, args.ranks)
            if needed > 0.85 * available_bytes():
                print(f"{size}: skipped (needs ~{needed / gib:.0f} GiB, {available_bytes() / gib:.0f} GiB available)",
                      flush=True)
                continue
            t0 = time.time()
            row = run_cell(size, REPO, "none,sha256", args, Path(tmp))
            if args.baseline:
                row["modes"]["baseline"] = run_cell(size, Path(args.baseline).resolve(), "none", args, Path(tmp))["modes"]["none"]
            rows.append(row)
            print(format_row(row) + f"   ({time.time() - t0:.0f} s)", flush=True)
    print(HEADER)
    for row in rows:
        print(format_row(row))
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))


HEADER = ("| size | params | checkpoint | save, s: baseline / none / sha256 | baseline ÷ none, ÷ sha256 "
          "| checking on resume, s | baseline ÷ none, ÷ sha256 | resume in all, s | baseline ÷ none, ÷ sha256 |\n"
          "|---|---|---|---|---|---|---|---|---|")


def format_row(row: dict) -> str:
    m = row["modes"]
    base = m.get("baseline")
    cells = []
    for key, digits in (("save_s", 2), ("find_s", 3), ("resume_s", 2)):
        cells.append(" / ".join(f"{m[k][key]:.{digits}f}" if k in m else "-" for k in ("baseline", "none", "sha256")))
        cells.append("-" if base is None else f"{base[key] / m['none'][key]:.1f}x, {base[key] / m['sha256'][key]:.1f}x")
    gb = m["none"]["checkpoint_bytes"] / 1e9
    return f"| {row['size']} | {row['params'] / 1e6:.1f}M | {gb:.2f} GB | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
