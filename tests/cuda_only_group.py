"""One rank of a world whose default process group serves CUDA tensors only, as DeepSpeed's NCCL group does
on GPUs, simulated on CPU: init_process_group("cuda:gloo") maps the backend to the cuda device type alone,
so a collective on CPU tensors raises "No backend type associated with device type cpu", as under NCCL.
Runs the project's own collectives (training/distributed.py) and prints what each returned, as JSON.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/cuda_only_group.py
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from training.distributed import (StopOnSigterm, all_gather_object, all_max, all_mean, barrier,  # noqa: E402
                                  broadcast_object, rank_and_world)


def main() -> None:
    rank, _, world = rank_and_world()
    dist.init_process_group("cuda:gloo", rank=rank, world_size=world)
    try:
        dist.all_reduce(torch.ones(1))  # the condition itself: CPU tensors on the default group fail
        cpu_on_default = "served"
    except RuntimeError as e:
        cpu_on_default = str(e)
    stop = StopOnSigterm()
    stop.received = rank == 1  # one rank saw SIGTERM: every rank must agree to stop
    results = {
        "cpu_on_default": cpu_on_default,
        "all_mean": all_mean([float(rank + 1), 10.0 * rank]),
        "all_max": all_max(3 * rank),
        "agreed": stop.agreed(),
        "reason": stop.reason,
        "broadcast": broadcast_object({"tag": f"step_{rank}"}),
        "gathered": all_gather_object(rank),
    }
    barrier()
    print(json.dumps(results), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
