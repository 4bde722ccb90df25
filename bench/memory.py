"""Per-rank memory of each ZeRO stage, measured, next to DeepSpeed's own estimate.

    python -m bench.memory                                   # GPT-2 124M and 350M x ZeRO 0/1/2/3/3-offload x 1/2/4 ranks
    python -m bench.memory --sizes 124M --ranks 1,2 --stages 2,3 --steps 2

Each cell is a real run: `deepspeed --num_gpus N bench/memory.py --worker ...` builds the GPT-2-sized model
(causal, vocab 50304, context 128, batch 1, fp32 on CPU / bf16 on GPUs), wraps it in the DeepSpeed engine
with ds_configs/zeroS.json exactly as training/pretrain.py does, and runs --steps optimizer steps on
random tokens. Every rank then reports
    steady   memory held after the steps, above what the process held before the model was built
             (CPU: resident set size; GPU: torch.cuda.memory_allocated): the model states
             (parameters, gradients, optimizer state, ZeRO's buffers) plus what the allocator keeps
    peak     the highest resident set (CPU: ru_maxrss; GPU: max_memory_allocated) above that baseline,
             which includes building the full model on every rank before ZeRO-3 partitions it
and the table shows rank 0's values (the ranks agree to a few %). Beside it, DeepSpeed's estimate of the
model states per rank: the numbers behind estimate_zero2_model_states_mem_needs_all_live /
estimate_zero3_model_states_mem_needs_all_live (stage3's estimate_zero3_model_states_mem_needs with the
model's largest layer), for one node of N ranks, not offloaded (3-offload: its CPU share / N plus the
device share). DeepSpeed's formulas assume mixed precision (2-byte params and grads, 12 bytes of fp32
Adam state per parameter); the CPU runs here are fp32, so they hold more per parameter. DeepSpeed has no
estimator for ZeRO-0/1 (shown as -). Cells whose estimated total would not fit in the free memory are
skipped and say so.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does): find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SIZES = {"124M": (12, 12, 768), "350M": (24, 16, 1024), "tiny": (2, 2, 64)}  # GPT-2 small / medium; tiny: a smoke test
STAGES = ("0", "1", "2", "3", "3_offload")
CONTEXT = 128


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """One cell, in every rank the deepspeed launcher started."""
    from training.distributed import all_gather_object, barrier, prepare_environment, rank_and_world

    prepare_environment()
    import gc

    import torch
    import torch.distributed as dist

    from models.gpt import GPT
    from training.config import load_config
    from training.engines.deepspeed_engine import DeepSpeedEngine
    from training.engines.ds_config import load_ds_json, resolve
    from training.engines.interface import TrainingModule

    rank, _, world = rank_and_world()
    cuda = torch.cuda.is_available()
    n_layer, n_head, n_embd = SIZES[args.size]
    cfg, explicit = load_config(None, [f"--model.n_layer={n_layer}", f"--model.n_head={n_head}",
                                       f"--model.n_embd={n_embd}", f"--model.block_size={CONTEXT}",
                                       "--model.vocab_size=50304", "--model.attention=causal", "--objective.name=ar",
                                       "--batch_size=1", "--gradient_accumulation_steps=1",
                                       f"--dtype={'bf16' if cuda else 'fp32'}"])
    ds_json = load_ds_json(REPO / f"ds_configs/zero{args.stage}.json")
    resolved = resolve(ds_json, cfg, explicit, world, source=f"zero{args.stage}.json")
    gc.collect()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    torch.manual_seed(0)
    gpt = GPT(cfg.model)
    engine = DeepSpeedEngine(TrainingModule(gpt, cfg.objective, mask_id=50257), resolved.config,
                             resolved.client_optimizer, resolved.client_scheduler)
    g = torch.Generator().manual_seed(rank)
    for step in range(args.steps):
        x = torch.randint(0, 50257, (1, CONTEXT), generator=g)
        loss = engine.loss(x, torch.roll(x, -1, 1), seed=step)
        engine.backward(loss)
        engine.step()
    gc.collect()
    if cuda:
        steady, peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    else:
        steady, peak = rss_bytes() - base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    mine = {"rank": rank, "steady": steady, "peak": peak}
    everyone = all_gather_object(mine)  # on the host group: DeepSpeed's NCCL group serves CUDA tensors only
    if rank == 0:
        Path(args.out).write_text(json.dumps({"ranks": everyone}) + "\n")
    barrier()
    dist.destroy_process_group()  # explicitly: a teardown in interpreter shutdown can abort the rank


def estimate(stage: str, params: int, largest_layer: int, ranks: int) -> float | None:
    """DeepSpeed's per-rank estimate of the model states (bytes), one node of `ranks` ranks."""
    if stage in ("0", "1"):
        return None
    if stage == "2":
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        _, per_device = estimate_zero2_model_states_mem_needs(params, ranks, 1, cpu_offload=False, additional_buffer_factor=1.0)
        return per_device
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    offload = stage == "3_offload"
    cpu, per_device, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, ranks, 1, cpu_offload=offload,
                                                            cpu_offload_params=offload, zero_init=True,
                                                            additional_buffer_factor=1.0)
    return per_device + (cpu / ranks if offload else 0)


def model_numbers(size: str) -> tuple[int, int]:
    """(parameters, largest layer's parameters) of a size, from a meta-device model."""
    import torch

    from models.gpt import GPT, GPTConfig

    n_layer, n_head, n_embd = SIZES[size]
    with torch.device("meta"):
        gpt = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=CONTEXT, vocab_size=50304))
    params = sum(p.numel() for p in gpt.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in gpt.modules())
    return params, largest


def free_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="124M,350M", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma list of 0,1,2,3,3_offload")
    parser.add_argument("--ranks", default="1,2,4", help="comma list of ranks per run (one node)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run (memory is flat after the first)")
    parser.add_argument("--out", default="results/bench_memory.jsonl", help="one JSON record per cell")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch

    from training.distributed import free_port

    cuda = torch.cuda.is_available()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gib = 1024 ** 3
    rows = []
    for size in args.sizes.split(","):
        params, largest = model_numbers(size)
        for ranks in map(int, args.ranks.split(",")):
            for stage in args.stages.split(","):
                est = estimate(stage, params, largest, ranks)
                needed = ranks * (params * 20 + 1.2 * gib)  # fp32 params+grads+Adam+copy, and torch itself
                row = {"size": size, "params": params, "stage": stage, "ranks": ranks, "estimate": est,
                       "device": "cuda" if cuda else "cpu"}
                if stage in ("0", "1") and needed > 0.8 * free_bytes() or needed > 1.5 * free_bytes():
                    row["skipped"] = f"needs ~{needed / gib:.0f} GiB, {free_bytes() / gib:.0f} GiB free"
                else:
                    cell = out.with_suffix(".cell.json")
                    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
                    if not cuda:
                        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, len(os.sched_getaffinity(0)) // ranks)))
                    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
                    deepspeed = str(Path(sys.executable).parent / "deepspeed")
                    t0 = time.time()
                    proc = subprocess.run([deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()),
                                           "bench/memory.py", "--worker", "--size", size, "--stage", stage,
                                           "--steps", str(args.steps), "--out", str(cell)],
                                          cwd=REPO, env=env, capture_output=True, text=True)
                    if not cell.is_file():  # written once every rank measured (an abort at exit is forgiven)
                        row["failed"] = (proc.stdout + proc.stderr)[-800:]
                    else:
                        result = json.loads(cell.read_text())
                        cell.unlink()
                        r0 = next(r for r in result["ranks"] if r["rank"] == 0)
                        row.update(steady=r0["steady"], peak=r0["peak"], seconds=round(time.time() - t0, 1),
                                   all_ranks=result["ranks"])
                rows.append(row)
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(format_row(row), flush=True)
    print(f"\n{len(rows)} cells -> {out}")


def format_row(row: dict) -> str:
    gib = 1024 ** 3
    est = "-" if row["estimate"] is None else f"{row['estimate'] / gib:.2f}"
    head = f"| {row['size']} | ZeRO-{row['stage'].replace('_offload', ' + offload')} | {row['ranks']} |"
    if "skipped" in row:
        return f"{head} skipped ({row['skipped']}) | | {est} |"
    if "failed" in row:
        return f"{head} failed | | {est} |"
    return f"{head} {row['steady'] / gib:.2f} | {row['peak'] / gib:.2f} | {est} |"


if __name__ == "__main__":
    main()
